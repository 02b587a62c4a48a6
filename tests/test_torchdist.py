"""The torch.distributed engines against the simulated ones: real processes over gloo.

Each multi-process test starts its own processes (spawn, or torchrun) on localhost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradzip.compressors.registry import names as compressor_names
from gradzip.engines import Algorithm, SimulatedEngine
from gradzip.engines import torchdist as td
from gradzip.engines.sharded import ShardLayout
from gradzip.experiments.config import RunConfig
from gradzip.experiments.runner import make_algorithm, make_job, make_problem, read_metrics, train
from gradzip.methods import PRESETS, method
from gradzip.problems import build

STEPS = 20


@pytest.fixture
def one_thread(monkeypatch):
    """Bitwise equality needs the same thread count on both sides: torch's CPU backward
    (MKL sgemm) differs at ~1e-7 between 1 and 2 threads, which error feedback carries on.
    Workers read these variables (as under torchrun); the in-process reference is set."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("GRADZIP_THREADS", "1")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _build(cfg: RunConfig):
    problem = make_problem(cfg)
    return problem, make_algorithm(cfg, problem.dim)


def _needs(name: str) -> None:
    """Skip, naming the compressor, while a preset's compressor is not registered yet."""
    spec = PRESETS[name][0]
    missing = [c for c in ("topk", "randk") if spec.startswith(c) and c not in compressor_names()]
    if missing:
        pytest.skip(f"compressor {missing[0]!r} is not registered yet (needed by {name})")


def _proc_stat(pid: int) -> list[str] | None:
    try:
        s = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return s[s.rindex(")") + 2 :].split()  # state, ppid, pgrp, session, ...


def _children() -> set[int]:
    """Live children of this process, less multiprocessing's resource tracker."""
    out = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        st = _proc_stat(int(d.name))
        if st is None or int(st[1]) != os.getpid() or st[0] == "Z":
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmd:
            out.add(int(d.name))
    return out


def _in_session(sid: int) -> list[int]:
    return [
        int(d.name)
        for d in Path("/proc").iterdir()
        if d.name.isdigit()
        and (st := _proc_stat(int(d.name))) is not None
        and int(st[3]) == sid
        and st[0] != "Z"
    ]


def _same_state(a: dict, b: dict) -> None:
    assert torch.equal(a["x"], b["x"])
    for wa, wb in zip(a["workers"], b["workers"], strict=True):
        ea, eb = wa["feedback"]["error"], wb["feedback"]["error"]
        assert (ea is None and eb is None) or torch.equal(ea, eb)
    for key in ("momentum", "second"):
        va, vb = a["server"][key], b["server"][key]
        assert (va is None and vb is None) or torch.equal(va, vb)
    ea, eb = a["server"]["feedback"]["error"], b["server"]["feedback"]["error"]
    assert (ea is None and eb is None) or torch.equal(ea, eb)


def _headers(engine_name: str, algo: Algorithm, n: int) -> tuple[list[int], list[int]]:
    """The header bytes of every uplink and downlink message of a step (what stream
    framing leaves out after a channel's opener; a header's size is fixed by the codec)."""

    def size(c, d):
        return c.encode(torch.linspace(-1.0, 1.0, d)).header.size

    if engine_name == "torchdist":  # n workers up; the downlink to each of them
        return [size(algo.up, algo.dim)] * n, [size(algo.down, algo.dim)] * n
    lay = ShardLayout(algo, n)  # shard j: from and to the n - 1 other ranks
    ups = [size(a.up, d) for a, d in zip(lay.algos, lay.sizes, strict=True)]
    downs = [size(a.down, d) for a, d in zip(lay.algos, lay.sizes, strict=True)]
    return ups * (n - 1), downs * (n - 1)


def framed_bits(bits: tuple[int, int], t: int, headers: tuple[list[int], list[int]]):
    """Standalone-payload bits of a step as stream framing sends them: at step 0 every
    message is an opener (8 bytes more), later ones a frame (8 bytes instead of the
    header)."""
    return tuple(
        b + sum(64 if t == 0 else 64 - 8 * h for h in hs)
        for b, hs in zip(bits, headers, strict=True)
    )


def _check_against(engine_name: str, ref_cls, cfg: RunConfig) -> None:
    """T steps on both engines: same losses, parameters and memories, and the same bytes
    (bits) up to the framing (``cfg.framing``); then a checkpoint from the reference
    loaded into the distributed engine continues the same trajectory."""
    problem, algo = _build(cfg)
    ref = ref_cls(*_build(cfg), cfg.workers, seed=cfg.seed)
    headers = _headers(engine_name, algo, cfg.workers)
    before = _children()
    eng = td.make_engine(make_job(cfg.replace(engine=engine_name)), problem, algo)
    try:
        mid = None
        for t in range(STEPS):
            lr = cfg.lr
            a, b = eng.step(t, lr), ref.step(t, lr)
            want = (b.bits_up, b.bits_down)
            if cfg.framing == "stream":
                want = framed_bits(want, t, headers)
                if t:  # 8 bytes of overhead a message, whatever the header was
                    assert all(h > 8 for hs in headers for h in hs)
            assert (a.bits_up, a.bits_down) == want, t
            assert a.loss == b.loss, t
            assert a.bits_up > 0 and a.bits_down > 0
            if t == STEPS // 2 - 1:
                mid = ref.state_dict()
        assert torch.equal(eng.x, ref.x), float((eng.x - ref.x).abs().max())
        end = ref.state_dict()
        _same_state(eng.state_dict(), end)
        if any(w["feedback"]["error"] is not None for w in end["workers"]):
            assert float(end["workers"][0]["feedback"]["error"].abs().sum()) > 0
        eng.load_state_dict(mid)  # scatter: parameters and every memory
        for t in range(STEPS // 2, STEPS):
            eng.step(t, cfg.lr)
        _same_state(eng.state_dict(), end)
    finally:
        eng.close()
    assert _children() <= before


@pytest.mark.parametrize("name, framing", [("fosgd", "stream"), ("memsgd-topk", "payload")])
def test_parameter_server_equals_simulated(name, framing, one_thread):
    _needs(name)
    cfg = RunConfig(
        problem="softmax-digits", method=name, workers=3, lr=0.2, seed=3, framing=framing
    )
    _check_against("torchdist", SimulatedEngine, cfg)


@pytest.mark.parametrize(
    "opt", [{"momentum": 0.5}, {"optimizer": "adamw", "weight_decay": 0.01, "lr": 0.01}]
)
def test_sharded_server_equals_its_simulation(opt, one_thread):
    _needs("memsgd-topk")
    # worker memories (ef), server memories (ef downlink) and the server optimizer's state
    # (momentum; Adam's two moments), per shard
    cfg = RunConfig(
        problem="softmax-digits",
        method="memsgd-topk",
        downlink="scaled_sign",
        downlink_rule="ef",
        workers=3,
        lr=0.2,
        seed=5,
    ).replace(**opt)
    _check_against("torchdist-sharded", td.ShardedSimulatedEngine, cfg)


def test_sharded_layout_with_identity_is_sgd():
    problem = build("softmax-digits", workers=3, batch_size=16)
    sgd = method("sgd")
    a = td.ShardedSimulatedEngine(problem, Algorithm(sgd, problem.dim), 3)
    b = SimulatedEngine(problem, Algorithm(sgd, problem.dim), 3)
    x = problem.initial_point()
    for t in range(STEPS):
        a.step(t, 0.5)
        b.step(t, 0.5)
        gs = [problem.gradient(x, problem.batch(0, t, i))[1] for i in range(3)]
        x = x - 0.5 * sum(gs) / 3
    assert torch.equal(a.x, b.x)  # per coordinate the same arithmetic
    assert torch.allclose(a.x, x, atol=1e-6)


def test_one_shard_is_the_plain_step():
    """Shard 0 keeps the run's seed: one shard is the parameter server, byte for byte."""
    problem = build("softmax-digits", workers=1, batch_size=16)
    m = method("fosgd")
    a = td.ShardedSimulatedEngine(problem, Algorithm(m, problem.dim, seed=2), 1, seed=2)
    b = SimulatedEngine(problem, Algorithm(m, problem.dim, seed=2), 1, seed=2)
    for t in range(5):
        a.step(t, 0.3)
        b.step(t, 0.3)
    assert torch.equal(a.x, b.x)


@pytest.mark.parametrize(
    "kind, message",
    [
        # the first byte of the downlink's frame is its step's: refused as the wrong step
        (
            "corrupt",
            r"worker 0 \(rank 1\) failed at step 3: PayloadError: stream message on "
            r"channel 1 is for step 252, expected step 3",
        ),
        ("exit", r"lost contact .* worker 0 \(rank 1\) exited with code 3"),
    ],
)
def test_failing_worker_is_a_clean_error_without_orphans(kind, message, tmp_path, monkeypatch):
    monkeypatch.setenv(td.FAULT_ENV, f"rank=1,step=3,kind={kind}")
    cfg = RunConfig(
        problem="softmax-digits",
        method="fosgd",
        workers=1,
        steps=10,
        engine="torchdist",
        out=str(tmp_path / "run"),
    )
    before = _children()
    t0 = time.perf_counter()
    with pytest.raises(td.WorkerError, match=message):
        train(cfg, progress=False)
    assert time.perf_counter() - t0 < 60  # not a hang until some timeout
    assert _children() <= before


def test_wrong_world_size_under_torchrun_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = RunConfig(engine="torchdist", workers=5)
    with pytest.raises(ValueError, match=r"torchrun started 4 processes.*pass --workers 3"):
        td.make_engine(make_job(cfg), None, None)


def test_torchrun_launch(tmp_path, one_thread):
    out = tmp_path / "tr"
    flags = [
        "--problem",
        "softmax-digits",
        "--method",
        "fosgd",
        "--workers",
        "3",
        "--steps",
        "12",
        "--eval-every",
        "6",
        "--seed",
        "4",
        "--quiet",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "4",
        "-m",
        "gradzip",
        "train",
        "--engine",
        "torchdist",
        *flags,
        "--out",
        str(out),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", td.FAULT_ENV)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('"role": "worker"') == 3  # ranks 1..3 served and stopped
    ref = train(
        RunConfig(
            problem="softmax-digits",
            method="fosgd",
            workers=3,
            steps=12,
            eval_every=6,
            seed=4,
            out=str(tmp_path / "sim"),
        ),
        progress=False,
    )
    got = json.loads((out / "summary.json").read_text())
    assert got["test_loss"] == ref["test_loss"]
    xa = torch.load(out / "checkpoint.pt", weights_only=True)["engine"]["x"]
    xb = torch.load(tmp_path / "sim" / "checkpoint.pt", weights_only=True)["engine"]["x"]
    assert torch.equal(xa, xb)
    sa, _ = read_metrics(out)
    sb, _ = read_metrics(tmp_path / "sim")
    assert [r["loss"] for r in sa] == [r["loss"] for r in sb]
    cfg = RunConfig(problem="softmax-digits", method="fosgd", workers=3, seed=4)
    headers = _headers("torchdist", _build(cfg)[1], 3)  # stream framing: the default
    got = [(r["bits_up"], r["bits_down"]) for r in sa]
    assert got == [framed_bits((r["bits_up"], r["bits_down"]), r["step"], headers) for r in sb]


def test_ctrl_c_stops_every_process(tmp_path):
    out = tmp_path / "int"
    cmd = [
        sys.executable,
        "-m",
        "gradzip",
        "train",
        "--engine",
        "torchdist",
        "--workers",
        "2",
        "--problem",
        "softmax-digits",
        "--steps",
        "1000000",
        "--eval-every",
        "1000000",
        "--checkpoint-every",
        "3",
        "--quiet",
        "--out",
        str(out),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", td.FAULT_ENV)}
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists():  # training is under way
            assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.1)
        assert len(_in_session(p.pid)) >= 3  # the server and its two workers
        os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130, err[-3000:]
        assert "interrupted" in err
        deadline = time.monotonic() + 10
        while _in_session(p.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _in_session(p.pid) == []
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
