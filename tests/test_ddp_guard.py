"""gradzip.ddp's non-finite policy and timeout (issue 17 items 3 and 5), in real
DistributedDataParallel processes over gloo (helpers from test_ddp.py).

The model of test_ddp.py with ``bucket_cap_mb=0.001`` and ``min_numel=1000`` has two
buckets from the second step on: the first (c.*, b.*, 1354 coordinates) compressed, the
last (a.*, 520) a dense fallback; a NaN or inf is injected at step K on rank 1 into one
coordinate of b.weight (the compressed bucket) or a.weight (the dense one, after the
compressed bucket of the same step has been reduced: ``skip`` must still zero and roll it
back).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from gradzip import ddp
from test_ddp import _batch, _free_port, _model, _params, _same_everywhere

K = 3  # the step whose gradient is poisoned (after DDP's bucket rebuild at step 1)
STEPS = 6
SPEC = "topk:k=0.1"  # error feedback both ways: worker and server memories to roll back
TARGETS = {"compressed": ("b.weight", float("nan")), "dense": ("a.weight", float("inf"))}


def _poison(value: float):
    def hook(g):
        g = g.clone()
        g.view(-1)[5] = value
        return g

    return hook


def _train(rank, policy, overlap, target=None, reference=False):
    """STEPS steps; at step K rank 1's gradient of ``target`` gets a NaN or inf (or, with
    ``reference``, no rank computes step K at all: only the hook's step counter moves).
    Returns (model, state, the error raised or None)."""
    m = _model(0.001)
    st = ddp.register(m, SPEC, min_numel=1000, overlap=overlap, nonfinite=policy)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    params = dict(m.module.named_parameters())
    for t in range(STEPS):
        if t == K and reference:
            st.step += 1
            continue
        handle = None
        if t == K and rank == 1 and target is not None:
            name, value = TARGETS[target]
            handle = params[name].register_hook(_poison(value))
        x, y = _batch(rank, t)
        opt.zero_grad()
        try:
            F.cross_entropy(m(x), y).backward()
        except ddp.NonFiniteStep as e:
            assert t == K, f"raised at step {t}: {e}"
            return m, st, e
        finally:
            if handle is not None:
                handle.remove()
        stepped = st.optimizer_step(opt)
        assert stepped == (t != K or policy == "error"), (t, stepped)
    return m, st, None


def _same_text(text: str) -> None:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, text)
    assert all(o == text for o in out), out


def _nonfinite(rank: int) -> None:
    ref, _, _ = _train(rank, "skip", True, reference=True)
    for overlap in (True, False):
        for target, (name, value) in TARGETS.items():
            what = f"{target} bucket, overlap={overlap}"
            # error: every rank raises the same NonFiniteStep at step K, the group stays in step
            m, st, err = _train(rank, "error", overlap, target)
            assert err is not None, f"{what}: no error"
            msg = str(err)
            assert err.step == K and f"step {K}: rank 1:" in msg, msg
            assert f"parameter {name}[5]" in msg, msg
            kind = "1 NaN and 0 inf" if value != value else "0 NaN and 1 inf"
            assert kind in msg and 'nonfinite="skip"' in msg, msg
            _same_text(msg)
            # skip: every rank zeroes step K and skips the optimizer; identical replicas,
            # finite, and the parameters of a run that never computed step K
            with pytest.warns(RuntimeWarning, match=f"step {K}: rank 1"):
                m, st, err = _train(rank, "skip", overlap, target)
            assert err is None and st.skipped_steps == 1 and st.step == STEPS, what
            assert "step skipped on every rank" in st._guard.last_message
            _same_text(st._guard.last_message)
            sd = st.state_dict()  # the count is checkpointed with the memories
            st._guard.skipped_steps = 0
            st.load_state_dict(sd)
            assert sd["skipped_steps"] == 1 and st.skipped_steps == 1, what
            p = _params(m)
            assert torch.isfinite(p).all(), what
            _same_everywhere(p, what)
            assert torch.equal(p, _params(ref)), (
                f"{what}: differs from the run without step {K} by "
                f"{(p - _params(ref)).abs().max().item():.3g}"
            )


def _nonfinite_worker(rank: int, world: int, port: int) -> None:
    os.environ["GRADZIP_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        _nonfinite(rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see test_ddp._exit_quietly


def test_nonfinite_policies_every_rank(monkeypatch):
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "GRADZIP_THREADS"):
        monkeypatch.setenv(var, "1")
    mp.spawn(_nonfinite_worker, args=(2, _free_port()), nprocs=2)


# --- timeout --------------------------------------------------------------------------------
TIMEOUT = 3.0
STOP_AT = 3


def _timeout_worker(rank, world, port, stopped, overlap, out):
    os.environ["GRADZIP_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    m = _model(0.001)
    ddp.register(m, "fosgd", min_numel=1000, overlap=overlap, timeout=TIMEOUT)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for t in range(STEPS):
        if t == STOP_AT and rank == stopped:
            with open(os.path.join(out, "stopped"), "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGSTOP)
        x, y = _batch(rank, t)
        opt.zero_grad()
        try:
            F.cross_entropy(m(x), y).backward()
        except ddp.RankTimeout as e:
            with open(os.path.join(out, f"rank{rank}"), "w") as f:
                f.write(f"{time.time()!r}\n{e.ranks}\n{e}")
            break
        opt.step()
    os._exit(0)  # the group is broken: no teardown


def _stop_one(world: int, stopped: int, overlap: bool, out: str) -> dict:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_timeout_worker, args=(r, world, port, stopped, overlap, out))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    try:
        for r, p in enumerate(procs):
            if r != stopped:
                p.join(TIMEOUT + 120)
                assert p.exitcode == 0, f"rank {r} exit code {p.exitcode}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    t_stop = float(open(os.path.join(out, "stopped")).read())
    got = {}
    for r in range(world):
        if r != stopped:
            when, ranks, msg = open(os.path.join(out, f"rank{r}")).read().split("\n", 2)
            got[r] = (float(when) - t_stop, ranks, msg)
    return got


@pytest.mark.parametrize(
    "stopped, overlap",
    [(2, True), pytest.param(0, False, marks=pytest.mark.slow)],  # 0 serves the store
)
def test_timeout_names_the_stopped_rank(stopped, overlap, tmp_path, monkeypatch):
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "GRADZIP_THREADS"):
        monkeypatch.setenv(var, "1")
    got = _stop_one(3, stopped, overlap, str(tmp_path))
    for r, (secs, ranks, msg) in got.items():
        print(f"rank {r}: {secs:.2f} s after SIGSTOP: {msg}")
        assert ranks == f"[{stopped}]", (r, ranks, msg)
        assert msg.startswith(f"gradzip.ddp: rank {stopped} did not answer within 3 s"), msg
        assert f"at step {STOP_AT} (rank {r} was waiting in the uplink exchange)" in msg, msg
        # the waiting rank's deadline may start a little before the stopped rank wrote its
        # time and stopped (it waits for it there): not sooner than TIMEOUT less that margin
        assert TIMEOUT - 1 <= secs < TIMEOUT + 10, (r, secs)


# --- without processes ------------------------------------------------------------------------
def test_options_pickle_and_are_checked():
    import pickle

    import torch.nn as nn

    st = ddp.GradzipState(nn.Linear(3, 2), "fosgd", nonfinite="skip", timeout=7.5)
    back = pickle.loads(pickle.dumps(st))
    assert back._guard.policy == "skip" and back._guard.timeout == 7.5
    assert back.skipped_steps == 0 and back._guard.hb is None  # nothing bound or started
    with pytest.raises(ValueError, match="non-finite policy"):
        ddp.GradzipState(spec="fosgd", nonfinite="ignore")
    with pytest.raises(ValueError, match="timeout"):
        ddp.GradzipState(spec="fosgd", timeout=0)


def test_trailer_round_trip():
    from gradzip._guard import TRAILER, read_trailer, trailer

    msg = torch.cat([torch.arange(5, dtype=torch.uint8), trailer([1, 3, 2, 1159], 6)])
    head, found = read_trailer(msg)
    assert msg.numel() == 5 + TRAILER and torch.equal(head, torch.arange(5, dtype=torch.uint8))
    assert found == [1, 3, 2, 1159, 6]


def test_pipeline_runs_the_last_job_here_and_raises_as_itself():
    import threading

    from gradzip._pipeline import Pipeline

    p, seen = Pipeline(), []

    def job(i, fail=False):
        def run():
            time.sleep(0.01)
            seen.append((i, threading.get_ident()))
            if fail:
                raise ddp.NonFiniteStep(f"bucket {i}", 4)
            return torch.tensor([float(i)])

        return run

    fut = p.submit(job(0))
    assert p.run_here(job(1)).item() == 1.0 and fut.wait().item() == 0.0
    assert [i for i, _ in seen] == [0, 1] and seen[1][1] == threading.get_ident()
    p.submit(job(2, fail=True))
    with pytest.raises(ddp.NonFiniteStep, match="bucket 2"):  # itself, not a RuntimeError
        p.run_here(job(3))
    assert [i for i, _ in seen] == [0, 1, 2]  # job 3 never ran
    p.close()
