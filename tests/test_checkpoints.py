"""Checkpoints that survive (issue 17 item 1) and resume as users expect (issue 16 item 4).

Atomic writes (a temporary file, fsync, rename: a kill at any instant leaves the previous
checkpoint); SIGKILL during checkpoint writes and SIGTERM of a ``gradzip train`` process,
resumed to the end, bit-identical to an uninterrupted run; metrics with no row lost or
repeated, a damaged tail repaired; ``--resume`` reading the saved configuration (in a moved
folder), and every refusal a one-line error that changes no file.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gradzip.checkpoint as ck
from gradzip.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from chaos import rank_pid  # noqa: E402  (the chaos script's, which it uses too)

#: a run whose state has every kind of memory: workers' and server's error feedback
#: (fp16 leaves a residual) and the server's momentum; fp16 needs no numba kernel, so a
#: subprocess starts without compiling any
FLAGS = [
    "--problem", "softmax-digits", "--method", "sgd", "--uplink", "fp16", "--uplink-rule",
    "ef", "--downlink", "fp16", "--downlink-rule", "ef", "--momentum", "0.9", "--workers",
    "2", "--eval-every", "7", "--quiet",
]  # fmt: skip
TIMES = ("t_compute", "t_compress", "t_comm", "cum_time")  # wall times: not reproducible


def _train(*argv) -> int:
    return main(["train", *FLAGS, *map(str, argv)])


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMES} for r in rows]


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def assert_same_run(a: Path, b: Path, end_eval: int | None = None) -> None:
    """Bit for bit: the final state (parameters, every memory, averaging), every metrics
    row (each once, in order) and the summary, wall times aside. ``end_eval``: where ``b``
    was a shorter run, extended: its evaluation at its former end stays (a measurement
    made), the one row ``a`` does not have."""
    sa, sb = ck.load(a / "checkpoint.pt"), ck.load(b / "checkpoint.pt")
    assert sa["step"] == sb["step"]
    assert _equal(sa["engine"], sb["engine"]), "final states differ"
    assert _equal(sa["average"], sb["average"])
    rows_b = [r for r in _rows(b) if not (r.get("eval") and r["step"] == end_eval)]
    assert _rows(a) == rows_b, "metrics rows differ (lost, repeated or changed)"
    ja, jb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert {k: v for k, v in ja.items() if k not in TIMES} == {
        k: v for k, v in jb.items() if k not in TIMES
    }


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _one_line_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# --- the helper ------------------------------------------------------------------------


def test_save_is_atomic_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ck.save({"step": 1, "x": torch.ones(3)}, path)

    def cut_short(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(OSError, match="disk full"):
        ck.save({"step": 2}, path)
    assert ck.load(path)["step"] == 1, "the previous checkpoint was damaged"
    assert not ck.tmp_path(path).exists()
    ck.write_text(tmp_path / "s.json", "{}")
    assert (tmp_path / "s.json").read_text() == "{}"


@pytest.mark.parametrize("cut", [0, 1000])
def test_damaged_checkpoint_is_a_one_line_error_naming_the_file(tmp_path, capsys, cut):
    run = tmp_path / "r"
    assert _train("--steps", 4, "--out", run) == 0
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[:cut])
    before = _snapshot(run)
    capsys.readouterr()
    rc = _train("--steps", 6, "--resume", "--out", run)
    _one_line_error(capsys, rc, str(run / "checkpoint.pt"))
    assert _snapshot(run) == before, "a failed resume changed the folder"
    with pytest.raises(ck.CheckpointError, match="c.pt"):
        (tmp_path / "c.pt").write_bytes(b"not a zip")
        ck.load(tmp_path / "c.pt")


# --- kills -----------------------------------------------------------------------------


def _start(run: Path, *argv) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gradzip", "train", *FLAGS, "--out", str(run), *map(str, argv)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _step(run: Path) -> int:
    try:
        return int(torch.load(run / "checkpoint.pt", weights_only=True)["step"])
    except Exception:  # not there yet
        return 0


def _wait(p: subprocess.Popen, until, what: str, limit: float = 300.0) -> None:
    t0 = time.monotonic()
    while not until():
        assert p.poll() is None, f"the run ended before {what}: {p.stderr.read()}"
        assert time.monotonic() - t0 < limit, f"no {what} within {limit} s"
        time.sleep(0.001)


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_and_sigterm_resume_bit_identical(tmp_path, capsys):
    """A ``gradzip train`` process checkpointing every step is SIGKILLed while a
    checkpoint is being written, its resume is SIGTERMed (a final checkpoint, exit 143,
    one line), and the last resume ends bit-identical to an uninterrupted run."""
    steps, ref, run = 150, tmp_path / "ref", tmp_path / "run"
    assert _train("--steps", steps, "--out", ref) == 0
    rng = random.Random(17)
    p = _start(run, "--steps", steps, "--checkpoint-every", 1)
    tmp = ck.tmp_path(run / "checkpoint.pt")
    _wait(p, lambda: _step(run) >= 1, "a first checkpoint")
    for _ in range(rng.randint(1, 20)):  # the k-th write from here, k random
        _wait(p, tmp.exists, "a checkpoint write")
        _wait(p, lambda: not tmp.exists(), "the end of a write")
    _wait(p, tmp.exists, "a checkpoint write")
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = ck.load(run / "checkpoint.pt")["step"]  # readable: the previous one
    assert 1 <= killed_at < steps

    p = _start(run, "--resume", "--checkpoint-every", 1)  # the saved configuration's steps
    _wait(p, lambda: _step(run) >= killed_at + 5, "progress after the resume")
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert "interrupted by SIGTERM" in last and "--resume" in last and "Traceback" not in err
    stopped = ck.load(run / "checkpoint.pt")["step"]
    assert f"after step {stopped}" in last and killed_at < stopped < steps

    capsys.readouterr()
    assert _train("--resume", "--out", run) == 0
    assert_same_run(ref, run)


# --- metrics ---------------------------------------------------------------------------


def test_metrics_after_the_checkpoint_and_a_cut_line_are_dropped(tmp_path, capsys):
    """A run killed after its checkpoint at step 6 wrote rows 6, 7 and half a line:
    the resume keeps the eval row at step 6, drops the rest with a note, and matches."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _train("--steps", 12, "--eval-every", 3, "--out", ref) == 0
    assert _train("--steps", 6, "--eval-every", 3, "--out", run) == 0
    (run / "summary.json").unlink()  # as if killed after its checkpoint at step 6
    later = (ref / "metrics.jsonl").read_text().splitlines()[9:12]  # steps 6, 7, 8
    with open(run / "metrics.jsonl", "a") as f:
        f.write(later[0] + "\n" + later[1] + "\n" + later[2][:17])  # the last one cut
    capsys.readouterr()
    assert _train("--steps", 12, "--eval-every", 3, "--resume", "--out", run) == 0
    err = capsys.readouterr().err
    assert "dropped a damaged last line" in err and "metrics.jsonl" in err
    assert_same_run(ref, run)

    (run / "metrics.jsonl").write_text("{}\n" + (run / "metrics.jsonl").read_text())
    before = _snapshot(run)
    rc = _train("--steps", 14, "--resume", "--out", run)
    _one_line_error(capsys, rc, "metrics.jsonl, line 1")
    assert _snapshot(run) == before


# --- resume as users expect ----------------------------------------------------------------


def test_readme_resume_line_in_a_moved_folder(tmp_path, capsys):
    """`gradzip train --out R --steps N --resume`: the saved configuration (not the
    defaults), only --steps changed (and said so), in a folder moved since."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert (
        _train("--steps", 10, "--schedule", "memsgd", "--lam", 0.1, "--lr", 0.5, "--out", ref) == 0
    )
    assert (
        _train("--steps", 6, "--schedule", "memsgd", "--lam", 0.1, "--lr", 0.5, "--out", run) == 0
    )
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(run, moved)
    capsys.readouterr()
    assert main(["train", "--out", str(moved), "--steps", "10", "--resume", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "changed: steps 6 -> 10" in err and "out" not in err.split("changed:")[1]
    assert_same_run(ref, moved, end_eval=6)
    saved = json.loads((moved / "config.json").read_text())["config"]
    assert (saved["out"], saved["steps"], saved["schedule"]) == (str(moved), 10, "memsgd")


def test_refusals_are_one_line_and_change_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("--steps", 6, "--checkpoint-every", 2, "--out", run) == 0
    before = _snapshot(run)
    cases = [
        (["--steps", 4, "--resume"], "--steps 4 is below the step of"),
        (["--method", "fosgd", "--resume"], "'method' cannot change on --resume"),
        (["--steps", 8], "holds a finished run"),
        (["--steps", 8, "--resume", "--overwrite"], "pick one"),
    ]
    for argv, needle in cases:
        capsys.readouterr()
        rc = main(["train", "--quiet", "--out", str(run), *map(str, argv)])
        _one_line_error(capsys, rc, needle)
        assert _snapshot(run) == before, f"{argv} changed the folder"
    (run / "summary.json").unlink()  # an interrupted run (its checkpoint kept)
    before = _snapshot(run)
    rc = main(["train", "--quiet", "--out", str(run)])
    _one_line_error(capsys, rc, "holds an interrupted run", "--resume")
    assert _snapshot(run) == before
    empty = tmp_path / "empty"
    rc = main(["train", "--quiet", "--resume", "--out", str(empty)])
    _one_line_error(capsys, rc, "nothing to resume")
    assert not empty.exists()
    # --overwrite starts over: no trace of the old run
    assert _train("--steps", 3, "--overwrite", "--out", run) == 0
    assert ck.load(run / "checkpoint.pt")["step"] == 3
    assert [r["step"] for r in _rows(run) if "eval" not in r] == [0, 1, 2]


def test_resume_at_the_checkpoint_step_finishes_the_run(tmp_path, capsys):
    """Killed between its last checkpoint and its summary: resuming writes the summary,
    repeating no row."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _train("--steps", 5, "--out", ref) == 0
    assert _train("--steps", 5, "--out", run) == 0
    (run / "summary.json").unlink()
    assert _train("--resume", "--out", run) == 0
    assert_same_run(ref, run)


def test_default_cadence_is_by_time(tmp_path, monkeypatch):
    """checkpoint_every 0 (the default) checkpoints every checkpoint_seconds (60), and
    always at the end."""
    from gradzip.experiments import runner
    from gradzip.experiments.config import RunConfig

    assert (RunConfig().checkpoint_every, RunConfig().checkpoint_seconds) == (0, 60.0)
    steps, real = [], runner.checkpoint.save
    monkeypatch.setattr(
        runner.checkpoint, "save", lambda obj, path: (steps.append(obj["step"]), real(obj, path))
    )
    assert _train("--steps", 5, "--checkpoint-seconds", 1e-9, "--out", tmp_path / "a") == 0
    assert steps == [1, 2, 3, 4, 5]
    steps.clear()
    assert _train("--steps", 5, "--checkpoint-seconds", 0, "--out", tmp_path / "b") == 0
    assert steps == [5]


# --- the DDP example ---------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_example_save_resume(tmp_path):
    """examples/ddp_fashion_mnist.py: --save (atomic, every --save-every steps) and
    --resume continue a 2-rank gloo run bit for bit (one DDP bucket: a small width)."""
    data = Path("/usr/share/datasets/fashion-mnist")
    if not data.exists():
        pytest.skip("Fashion-MNIST not installed")
    example = Path(__file__).resolve().parents[1] / "examples" / "ddp_fashion_mnist.py"
    common = ["--nproc", "2", "--backend", "gloo", "--compress", "fp16", "--uplink-rule", "ef",
              "--width", "64", "--eval-every", "0", "--eval-size", "200", "--threads", "1",
              "--data", str(data)]  # fmt: skip

    def run(*argv):
        r = subprocess.run([sys.executable, str(example), *common, *argv], capture_output=True,
                           text=True, timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]

    whole, part = tmp_path / "whole.pt", tmp_path / "part.pt"
    run("--steps", "6", "--save", str(whole))
    run("--steps", "3", "--save", str(part), "--save-every", "2")
    assert ck.load(part)["step"] == 3 and not ck.tmp_path(part).exists()
    run("--steps", "6", "--resume", str(part), "--save", str(part))
    a, b = ck.load(whole), ck.load(part)
    assert b["step"] == 6
    assert _equal(a["model"], b["model"]), "the resumed example differs from the whole run"
    assert _equal(a["gradzip"], b["gradzip"])


# --- torchrun --max-restarts ------------------------------------------------------------------


def test_a_restarted_attempt_resumes_only_its_own_run(tmp_path, monkeypatch):
    """Under torchrun, attempt > 0 of the same command resumes from the checkpoint; a
    first attempt, another rank, or another configuration does not."""
    from gradzip.experiments.config import RunConfig
    from gradzip.experiments.runfolder import elastic_restart

    run = tmp_path / "r"
    assert _train("--steps", 4, "--out", run) == 0
    cfg = RunConfig().replace(**json.loads((run / "config.json").read_text())["config"])
    assert not elastic_restart(cfg)  # not under a restart
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert elastic_restart(cfg)
    assert not elastic_restart(cfg.replace(lr=0.5))
    assert not elastic_restart(cfg.replace(out=str(tmp_path / "elsewhere")))
    monkeypatch.setenv("RANK", "1")
    assert not elastic_restart(cfg)


@pytest.mark.slow
def test_torchrun_restart_resumes_from_the_checkpoint(tmp_path):
    """``torchrun --max-restarts 2`` with a worker SIGKILLed mid-run: the restarted
    attempt (the same command) resumes from the latest checkpoint by itself and the job
    ends bit-identical to an uninterrupted run."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    flags = ["--steps", "40", "--checkpoint-every", "4", "--framing", "payload"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", GRADZIP_THREADS="1", GRADZIP_DIST_TIMEOUT="60")
    env["GRADZIP_TEST_JOB"] = str(run)  # finds the job's processes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "3", "--max-restarts", "2", "-m", "gradzip", "train", "--engine", "torchdist",
           *FLAGS, *flags, "--out", str(run)]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, start_new_session=True)  # fmt: skip
    try:
        _wait(p, lambda: _step(run) >= 8, "a checkpoint at step 8")
        victim = rank_pid(f"GRADZIP_TEST_JOB={run}", 2, 0)
        assert victim is not None, "no rank 2 found"
        os.kill(victim, signal.SIGKILL)
        killed_at = _step(run)
        _, err = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0, err[-3000:]
    assert "torchrun restart: resuming" in err, err[-3000:]
    assert killed_at < 40
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran
    try:
        assert _train(*flags, "--out", ref) == 0  # the simulated engine, uninterrupted
    finally:
        torch.set_num_threads(threads)
    assert_same_run(ref, run)
