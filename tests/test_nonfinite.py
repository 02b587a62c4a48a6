"""One non-finite policy for every engine (issue 17, item 5): ``--nonfinite error|skip``.

A NaN is put in worker 1's gradient at step K (``GRADZIP_TEST_FAULT``): under ``error``
every engine stops with one message naming the step, the worker (and its rank) and the
first coordinate's parameter, the run writes its summary and exits non-zero; under
``skip`` every rank drops step K together (the state of step K - 1 is kept) and the run
counts it; the torch.distributed engines then equal the simulated ones bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gradzip.cli import main
from gradzip.engines import Algorithm, SimulatedEngine
from gradzip.engines import torchdist as td
from gradzip.engines.policy import NonFiniteStep
from gradzip.experiments.config import RunConfig
from gradzip.experiments.runner import read_metrics, train
from gradzip.methods import method
from gradzip.problems import build

K = 3
ONE_PROCESS = {"simulated": SimulatedEngine, "simulated-sharded": td.ShardedSimulatedEngine}


def _engine(name: str, policy: str, spec: str = "fosgd"):
    problem = build("softmax-digits", workers=3, batch_size=16)
    algo = Algorithm(method(spec), problem.dim, seed=1, nonfinite=policy)
    return ONE_PROCESS[name](problem, algo, 3, seed=1)


@pytest.mark.parametrize("name", ONE_PROCESS)
def test_one_process_engines(name, monkeypatch):
    monkeypatch.setenv(td.FAULT_ENV, f"worker=1,step={K},kind=nan")
    err, skip = _engine(name, "error"), _engine(name, "skip")
    for t in range(K):
        err.step(t, 0.3)
        skip.step(t, 0.3)
    before = skip.state_dict()
    with pytest.raises(NonFiniteStep, match=rf"at step {K}: worker 1: gradient has 1 NaN and "
                       r"0 inf, the first at coordinate 0 \(parameter") as e:  # fmt: skip
        err.step(K, 0.3)
    assert e.value.step == K and "--nonfinite skip" in str(e.value)
    assert torch.equal(err.x, before["x"])  # nothing of step K was applied
    s = skip.step(K, 0.3)
    assert s.skipped and f"at step {K}: worker 1" in s.skipped and s.loss != s.loss
    after = skip.state_dict()  # parameters and every memory as after step K - 1
    assert torch.equal(after["x"], before["x"])
    assert str(after) == str(before)
    s = skip.step(K + 1, 0.3)  # and the run goes on
    assert s.skipped is None and s.loss == s.loss and not torch.equal(skip.x, before["x"])


@pytest.mark.parametrize("name", ONE_PROCESS)
def test_parameters_made_non_finite_by_the_update(name):
    """A finite gradient whose update overflows: every replica finds it (no message)."""
    eng = _engine(name, "skip", spec="sgd")
    x0 = eng.x.clone()
    s = eng.step(0, 1e39)  # float32: inf
    assert "at step 0: every replica: parameters after the update has " in s.skipped
    assert torch.equal(eng.x, x0)
    with pytest.raises(NonFiniteStep, match="at step 0: every replica: parameters after"):
        _engine(name, "error", spec="sgd").step(0, 1e39)


def _cfg(engine: str, policy: str, out) -> RunConfig:
    return RunConfig(
        problem="softmax-digits", method="memsgd-topk", workers=3, steps=6, eval_every=0,
        lr=0.2, seed=4, engine=engine, nonfinite=policy, out=str(out), checkpoint_seconds=0,
    )  # fmt: skip


def _x(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["engine"]["x"]


@pytest.mark.parametrize("engine", ["simulated", "simulated-sharded"])
def test_the_command_line(engine, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(td.FAULT_ENV, f"worker=1,step={K},kind=inf")
    flags = ["--problem", "softmax-digits", "--workers", "3", "--steps", "6", "--quiet"]
    flags += ["--engine", engine, "--eval-every", "0", "--method", "fosgd"]
    # error: one message, the summary written, exit status non-zero
    assert main(["train", *flags, "--out", str(tmp_path / "e")]) != 0
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["diverged_at"] == K
    assert f"at step {K}: worker 1: gradient has 0 NaN and 1 inf" in summary["reason"]
    assert "(parameter " in summary["reason"]
    # skip: counted, the row says so, the run ends normally
    assert main(["train", *flags, "--nonfinite", "skip", "--out", str(tmp_path / "s")]) == 0
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and "diverged_at" not in summary
    rows, _ = read_metrics(tmp_path / "s")
    assert [r["step"] for r in rows if r.get("skipped")] == [K]
    lost = [r["step"] for r in rows if r["loss"] is None or r["loss"] != r["loss"]]  # or NaN
    assert lost == [K]


@pytest.mark.parametrize("engine, ref", [("torchdist", "simulated"),
                                         ("torchdist-sharded", "simulated-sharded")])  # fmt: skip
def test_torch_distributed_engines(engine, ref, tmp_path, monkeypatch):
    """Both policies; under skip, the same parameters as the one-process engine."""
    monkeypatch.setenv(td.FAULT_ENV, f"worker=1,step={K},kind=nan")
    got = train(_cfg(engine, "error", tmp_path / "e"), progress=False)
    assert got["diverged_at"] == K
    assert (
        f"at step {K}: worker 1 (rank {2 if engine == 'torchdist' else 1}): gradient has "
        in (got["reason"])
    )
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["diverged_at"] == K
    got = train(_cfg(engine, "skip", tmp_path / "s"), progress=False)
    want = train(_cfg(ref, "skip", tmp_path / "r"), progress=False)
    assert got["skipped_steps"] == want["skipped_steps"] == 1
    assert torch.equal(_x(tmp_path / "s"), _x(tmp_path / "r"))
    a, _ = read_metrics(tmp_path / "s")
    b, _ = read_metrics(tmp_path / "r")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert a[K]["skipped"] == b[K]["skipped"].replace("worker 1", a[K]["skipped"].split(": ")[1])


def test_every_torchrun_rank_raises_the_same_error(tmp_path):
    """Under torchrun each rank is its own process: every one ends with the message."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env[td.FAULT_ENV] = f"worker=0,step={K},kind=nan"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "gradzip", "train", "--engine", "torchdist-sharded", "--workers", "2",
        "--problem", "softmax-digits", "--steps", "6", "--eval-every", "0", "--quiet",
        "--out", str(tmp_path / "tr"),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0
    text = f"non-finite values at step {K}: worker 0 (rank 0): gradient has 1 NaN"
    assert r.stderr.count(text) >= 2, r.stderr[-4000:]  # rank 0's warning and rank 1's error
    assert f"gradzip train: error: {text}" in r.stderr  # rank 1, a worker
    assert json.loads((tmp_path / "tr" / "summary.json").read_text())["diverged_at"] == K
