"""gradzip.ddp: the comm hook in real DistributedDataParallel processes over gloo.

Each world size runs in one spawn (process start-up dominates the cost); the ranks run
every scenario in turn and fail the test with their own assertion when one goes wrong.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import gradzip as gz
import gradzip.methods
from gradzip import ddp


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 40)
        self.b = nn.Linear(40, 30)
        self.c = nn.Linear(30, 4)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 12, generator=g), torch.randint(4, (16,), generator=g)


def _model(bucket_cap_mb=None):
    torch.manual_seed(0)
    kw = {} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}
    return nn.parallel.DistributedDataParallel(_Net(), **kw)


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _train(model, opt, rank, steps, start=0, grads=None):
    for t in range(start, start + steps):
        x, y = _batch(rank, t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if grads is not None:
            grads.append(_grads(model).clone())
        opt.step()


def _same_everywhere(v: torch.Tensor, what: str) -> None:
    out = [torch.empty_like(v) for _ in range(dist.get_world_size())]
    dist.all_gather(out, v)
    for i, o in enumerate(out):
        assert torch.equal(o, v), f"{what}: rank {i} differs from rank {dist.get_rank()}"


def _differential(rank: int) -> None:
    """Identity compressor == DDP without a hook (dense fallback and the sharded path)."""
    for cap in (None, 0.001):  # one bucket; one bucket per parameter or so
        ref, got = [], {}
        m = _model(cap)
        _train(m, torch.optim.SGD(m.parameters(), lr=0.1), rank, 4, grads=ref)
        variants = {
            "dense": dict(),
            "sharded": dict(allreduce_identity=False, min_numel=0),
            "allgather": dict(allreduce_identity=False, min_numel=0, layout="allgather"),
        }
        for name, kw in variants.items():
            m = _model(cap)
            st = ddp.register(m, "identity", **kw)
            got[name] = []
            _train(m, torch.optim.SGD(m.parameters(), lr=0.1), rank, 4, grads=got[name])
            tr = st.traffic()
            if name == "dense":
                assert tr["compressed_buckets"] == 0 and tr["dense_sent"] > 0
            else:
                assert tr["compressed_buckets"] > 0 and tr["sent"] > 0 and tr["dense_sent"] == 0
            for t, (a, b) in enumerate(zip(ref, got[name], strict=True)):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (
                    f"{name} (bucket_cap_mb={cap}) step {t}: max diff {(a - b).abs().max()}"
                )


def _compressed(rank: int) -> None:
    """Compressed methods: replicas agree, bytes are counted, warm-up and small buckets."""
    n = dist.get_world_size()
    for spec in ("fosgd", "memsgd-topk", "ef-signsgd", "topk:k=0.1"):
        m = _model(0.001)
        st = ddp.register(m, spec, min_numel=0)
        _train(m, torch.optim.SGD(m.parameters(), lr=0.05), rank, 4)
        _same_everywhere(_params(m), spec)
        tr = st.traffic()
        dense = 4 * sum(p.numel() for p in m.parameters()) * 4 * 2 * (n - 1) / n
        assert tr["sent"] > 0, (spec, tr)
        if spec == "fosgd":  # ~1 bit/coordinate both ways, but headers weigh on tiny buckets
            assert tr["sent"] < dense / 2, (spec, tr)
        assert tr["received"] > 0 and tr["framing_sent"] == 0  # sizes fixed: no lengths sent
    for spec in ("memsgd-topk", "fosgd:rotation=shared"):  # the latter: one inverse rotation
        m = _model(0.001)  # no server: every rank decodes every rank's payload
        st = ddp.register(m, spec, min_numel=0, layout="allgather")
        _train(m, torch.optim.SGD(m.parameters(), lr=0.05), rank, 3)
        _same_everywhere(_params(m), f"allgather {spec}")
        assert not torch.equal(_params(m), _params(_model(0.001))), spec
        assert bool(st.worker_error) == (spec == "memsgd-topk") and not st.server_error
    m = _model()
    st = ddp.register(m, "fosgd", start_step=2, min_numel=0)
    _train(m, torch.optim.SGD(m.parameters(), lr=0.05), rank, 3)
    tr = st.traffic()
    assert tr["dense_buckets"] == 2 and tr["compressed_buckets"] == 1, tr
    m = _model()
    st = ddp.register(m, "fosgd", min_numel=10**6)
    _train(m, torch.optim.SGD(m.parameters(), lr=0.05), rank, 2)
    assert st.traffic()["compressed_buckets"] == 0
    assert st.config.uplink_rule == "none" and st.config.downlink_rule == "none"
    st = ddp.GradzipState(_model(), "topk:k=0.1")  # biased and contractive: ef both ways
    assert (st.config.uplink_rule, st.config.downlink_rule) == ("ef", "ef")


def _overlapped(rank: int) -> None:
    """The communication thread (overlap=True, the default) gives the synchronous hook's
    parameters bit for bit, on every rank, with several buckets and a dense fallback."""
    for spec, kw in (("fosgd", {}), ("memsgd-topk", {"min_numel": 1000}), ("fosgd-ef", {})):
        got = {}
        for overlap in (False, True):
            m = _model(0.001)
            kw.setdefault("min_numel", 0)
            st = ddp.register(m, spec, overlap=overlap, **kw)
            _train(m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), rank, 4)
            got[overlap] = _params(m)
            tr = st.traffic()
            assert tr["compressed_buckets"] > 0, (spec, tr)
            assert kw["min_numel"] == 0 or tr["dense_buckets"] > 0, (spec, tr)
            assert all(v > 0 for v in st.timings().values()), st.timings()
        _same_everywhere(got[True], f"{spec} overlapped")
        assert torch.equal(got[True], got[False]), f"{spec}: overlap changed the result"


def _framed(rank: int) -> None:
    """Stream framing (the default) gives the results of standalone payloads; after each
    channel's opener every message is 8 bytes plus the payload's sections."""
    n = dist.get_world_size()
    for spec in ("fosgd", "memsgd-topk"):
        got, sent = {}, {}
        for framing in ("payload", "stream"):
            m = _model()  # one bucket
            st = ddp.register(m, spec, min_numel=0, framing=framing)
            _train(m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), rank, 4)
            got[framing], sent[framing] = _params(m), st.traffic()["sent"]
        assert torch.equal(got["stream"], got["payload"]), spec
        ((lay, _),) = st._layouts.values()
        up, down = lay.probes()
        h_up, h_down = up[0].header.size, down[0].header.size
        # per step this rank sends n - 1 uplink and n - 1 downlink messages
        opened = 8 * 2 * (n - 1)
        framed = 3 * (n - 1) * ((h_up - 8) + (h_down - 8))
        assert sent["stream"] - sent["payload"] == opened - framed, (spec, sent, h_up, h_down)


def _unbound(rank: int, made: ddp.GradzipState) -> None:
    """A state built before the process group without the model (``made``, pickled by
    spawn) names the parameters at the first step; it trains like a bound one, and its
    checkpoint resumes bit for bit in a fresh unbound state."""
    m = _model(0.001)
    m.register_comm_hook(made, ddp.hook)
    _train(m, torch.optim.SGD(m.parameters(), lr=0.05), rank, 3)
    _same_everywhere(_params(m), "unbound")
    assert made.names == [f"param.{i}" for i in range(6)] and made.step == 3
    assert made.traffic()["compressed_buckets"] > 0
    runs = {}
    for resumed in (False, True):
        m = _model()
        st = ddp.GradzipState(spec="memsgd-topk", min_numel=0)
        m.register_comm_hook(st, ddp.hook)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        _train(m, opt, rank, 3)
        if resumed:
            sd, params = st.state_dict(), [p.detach().clone() for p in m.parameters()]
            m = _model()
            with torch.no_grad():
                for p, q in zip(m.parameters(), params, strict=True):
                    p.copy_(q)
            st = ddp.GradzipState(spec="memsgd-topk", min_numel=0)
            st.load_state_dict(sd)  # names checked at the end of the first step
            m.register_comm_hook(st, ddp.hook)
            opt = torch.optim.SGD(m.parameters(), lr=0.05)
        _train(m, opt, rank, 3, start=3)
        runs[resumed] = _params(m)
    assert torch.equal(runs[True], runs[False]), "an unbound state did not resume exactly"


def _checkpoint(rank: int, path: str) -> None:
    """Checkpoint and restart mid-training: memories restored, the run continues exactly.

    Exactly: with one bucket (as here) the restarted DDP groups the parameters as before.
    With several buckets DDP's first step after a restart uses its initial grouping, so
    that one step's compression draws differ (the memories are still whole: migrated)."""
    for spec, cap in (("topk:k=0.1", None), ("memsgd-topk", None), ("topk:k=0.1", 0.001)):
        # uninterrupted
        m = _model(cap)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        ddp.register(m, spec, min_numel=0)
        _train(m, opt, rank, 8)
        straight = _params(m)
        # 4 steps, checkpoint (rank 0 writes one file), a new model, hook and optimizer
        m = _model(cap)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        st = ddp.register(m, spec, min_numel=0)
        _train(m, opt, rank, 4)
        sd = st.state_dict()  # a collective
        assert sd["step"] == 4, sd["step"]
        assert sd["worker_error"] and bool(sd["server_error"]) == spec.startswith("topk")
        if rank == 0:
            torch.save({"model": m.module.state_dict(), "opt": opt.state_dict(), "gz": sd}, path)
        dist.barrier()
        del m, opt, st
        for restore in (True, False):
            ck = torch.load(path, weights_only=True)
            m = _model(cap)
            m.module.load_state_dict(ck["model"])
            opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
            opt.load_state_dict(ck["opt"])
            st = ddp.register(m, spec, min_numel=0)
            if restore:
                st.load_state_dict(ck["gz"])
                for nm, e in ck["gz"]["worker_error"].items():
                    assert torch.equal(st.worker_error[nm], e[rank])
                again = st.state_dict()  # round trip, before any step
                for key in ("worker_error", "server_error"):
                    for nm, v in ck["gz"][key].items():
                        assert torch.equal(again[key][nm], v), (key, nm)
            else:
                st.step = ck["gz"]["step"]  # same seeds, memories lost
            _train(m, opt, rank, 4, start=4)
            resumed = _params(m)
            _same_everywhere(resumed, f"{spec} after restart")
            if restore and cap is None:
                assert torch.allclose(resumed, straight, rtol=0, atol=1e-6), (
                    f"{spec}: restarted run differs by {(resumed - straight).abs().max()}"
                )
            elif not restore:  # without its memories the run goes elsewhere: they matter
                assert (resumed - straight).abs().max() > 1e-4, spec


def _preconditioned(rank: int) -> None:
    """precondition_with(gradzip.optim.Adam): lossless compression stays plain DDP + Adam
    (g / s, then times s: float rounding only); with fosgd the replicas stay identical."""
    import gradzip.optim

    ref, got = [], []
    m = _model()
    _train(m, gradzip.optim.Adam(m.parameters(), lr=1e-2), rank, 5, grads=ref)
    m = _model()
    st = ddp.register(m, "identity", allreduce_identity=False, min_numel=0)
    opt = gradzip.optim.Adam(m.parameters(), lr=1e-2)
    st.precondition_with(opt)
    _train(m, opt, rank, 5, grads=got)
    for t, (a, b) in enumerate(zip(ref, got, strict=True)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (t, (a - b).abs().max())
    m = _model()
    st = ddp.register(m, "fosgd", min_numel=0)
    opt = gradzip.optim.Adam(m.parameters(), lr=1e-2, freeze_after=2)
    st.precondition_with(opt)
    _train(m, opt, rank, 5)
    _same_everywhere(_params(m), "fosgd preconditioned by Adam")
    with pytest.raises(TypeError, match="no preconditioner"):
        st.precondition_with(torch.optim.Adam(m.parameters()))
    with pytest.raises(ValueError, match="does not hold the parameters"):
        st.precondition_with(gradzip.optim.Adam(list(m.parameters())[:1]))


# the hook against the engines' sharded step: a preset with worker EF, the default 1-bit
# method, its shared rotation (the server in the rotated domain), and a compressor spec that
# takes EF on both sides (the server's memory too)
VERSUS = {
    "memsgd-topk": gradzip.methods.method("memsgd-topk"),
    "fosgd": gradzip.methods.method("fosgd"),
    "fosgd:rotation=shared": gradzip.methods.Method(*["fosgd:rotation=shared", "none"] * 2),
    "topk:k=0.1": gradzip.methods.Method("topk:k=0.1", "auto", "topk:k=0.1", "auto"),
}
VERSUS_LR, VERSUS_STEPS = 0.5, 4  # a power of two: EF in update units scales exactly


def _versus_engine(rank: int, tmp: str) -> None:
    """Train with the hook (plain SGD, one bucket); rank 0 saves the parameters in the
    hook's canonical order (the engine's vector) for the parent to compare."""
    for spec in VERSUS:
        m = _model()
        st = ddp.register(m, spec, min_numel=0, seed=7)
        _train(m, torch.optim.SGD(m.parameters(), lr=VERSUS_LR), rank, VERSUS_STEPS)
        if rank == 0:
            x = torch.cat([p.detach().reshape(-1) for p in reversed(list(m.parameters()))])
            torch.save({"x": x, "step": st.step}, os.path.join(tmp, f"versus-{spec}.pt"))


class _NetProblem:
    """_Net as an engine problem: x is the parameters in the hook's canonical order
    (decreasing index), worker i's batch at step t is rank i's."""

    def __init__(self):
        torch.manual_seed(0)
        self.net = _Net()
        self.params = list(reversed(list(self.net.parameters())))
        self.sizes = [p.numel() for p in self.params]

    def initial_point(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def batch(self, seed, t, worker):
        return _batch(worker, t)

    def gradient(self, x, batch):
        with torch.no_grad():
            for p, part in zip(self.params, x.split(self.sizes), strict=True):
                p.copy_(part.view_as(p))
        self.net.zero_grad()
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        loss.backward()
        return loss.item(), torch.cat([p.grad.reshape(-1) for p in self.params])


def _check_versus_engine(world: int, tmp: str) -> None:
    from gradzip import rng
    from gradzip.engines.core import Algorithm
    from gradzip.engines.sharded import ShardedSimulatedEngine

    torch.set_num_threads(1)
    for spec, method in VERSUS.items():
        hooked = torch.load(os.path.join(tmp, f"versus-{spec}.pt"))
        problem = _NetProblem()
        # the hook's bucket seed: its run seed folded with the bucket's first parameter
        bucket_seed = rng.fold(7, len(problem.sizes), rng.BUCKET_MIX)
        algo = Algorithm(method, sum(problem.sizes), seed=bucket_seed)
        engine = ShardedSimulatedEngine(problem, algo, world)
        for t in range(VERSUS_STEPS):
            engine.step(t, VERSUS_LR)
        assert hooked["step"] == VERSUS_STEPS
        assert not torch.equal(engine.x, problem.initial_point()), spec
        assert torch.equal(hooked["x"], engine.x), (
            f"{spec}: the hook and simulated-sharded differ by "
            f"{(hooked['x'] - engine.x).abs().max().item():.3g}"
        )


def _worker(rank: int, world: int, port: int, tmp: str, made: ddp.GradzipState) -> None:
    faulthandler.enable()  # a crash in a rank prints every thread's Python stack
    os.environ["GRADZIP_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        _differential(rank)
        _compressed(rank)
        _preconditioned(rank)
        _overlapped(rank)
        _framed(rank)
        _unbound(rank, made)
        _versus_engine(rank, tmp)
        if world == 2:
            _checkpoint(rank, os.path.join(tmp, "ckpt.pt"))
    finally:
        dist.destroy_process_group()
    _exit_quietly()


def _exit_quietly() -> None:
    """Leave a rank that succeeded without interpreter teardown.

    Once a DDP model has existed, gloo's process group outlives destroy_process_group
    (its threads still run after ``del`` and ``gc.collect()``; plain torch, no hook
    needed). When a worker thread drops the last reference to a Python tensor of the
    final collective while the interpreter is finalizing, it cannot take the GIL and the
    process aborts ("terminate called without an active exception"): about 1 run in 10
    here. A failing rank still raises, so spawn reports its traceback."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_hook_gloo(world, tmp_path, monkeypatch):
    # one thread per rank for numba as for torch: oversubscribed pools spin
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "GRADZIP_THREADS"):
        monkeypatch.setenv(var, "1")
    made = ddp.GradzipState(spec="fosgd", min_numel=0)  # no process group, no model yet
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), made), nprocs=world)
    _check_versus_engine(world, str(tmp_path))


def test_bad_specs():
    with pytest.raises(ValueError) as ours:
        ddp.GradzipState(nn.Linear(2, 2), "nosuch")
    with pytest.raises(ValueError) as registry:
        gz.compressor("nosuch")
    assert str(ours.value) == str(registry.value)
    with pytest.raises(ValueError, match="dq"):
        ddp.GradzipState(nn.Linear(2, 2), "dqgd")
    with pytest.raises(ValueError, match="layout"):
        ddp.GradzipState(nn.Linear(2, 2), "fosgd", layout="ring")
    with pytest.raises(ValueError, match="uplink_rule"):
        ddp.GradzipState(nn.Linear(2, 2), "fosgd", uplink_rule="sometimes")
    st = ddp.GradzipState(spec="fosgd")  # before the process group, without the model
    with pytest.raises(RuntimeError, match="process group"):
        st.state_dict()


def test_state_pickles_its_configuration():
    import pickle

    st = ddp.GradzipState(nn.Linear(3, 2), "topk:k=0.1", start_step=3, seed=9, overlap=False)
    st.step = 5
    back = pickle.loads(pickle.dumps(st))
    assert back.config == st.config and back.start_step == 3 and back.seed == 9
    assert back.overlap is False and back.step == 0 and back.names == []  # nothing bound
