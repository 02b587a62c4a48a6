"""The sharded torch.distributed engine (``torchdist-sharded``): every rank is a worker
and the server of one shard, running :class:`gradzip.engines.sharded.ShardLayout`'s step.
See :mod:`gradzip.engines.torchdist` for the protocol."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..feedback import FeedbackState
from .cluster import (
    FAILED,
    GET_STATE,
    OK,
    SET_STATE,
    STEP,
    STOP,
    T_DATA,
    T_ERR,
    T_META,
    T_MOM,
    T_MSG,
    T_SEC,
    T_SFB,
    WorkerError,
    _bits_of,
    _Cluster,
    _describe,
    _Fault,
    _floats,
    _tensor_text,
    _text_tensor,
)
from .core import Algorithm, ServerState, WorkerState
from .sharded import ShardLayout, check_state_dict
from .simulated import StepStats

# --- the sharded server (every rank) ---------------------------------------------------------


class _RunFailed(Exception):
    """Some rank failed inside a sharded step; every rank knows it and leaves."""

    def __init__(self, own: BaseException | None, texts: dict[int, str]):
        super().__init__("a rank failed")
        self.own, self.texts = own, texts


class _ShardedReplica:
    """One rank of the sharded layout: worker r and server of shard r."""

    def __init__(self, seed: int, cl: _Cluster, problem, algo: Algorithm):
        self.seed, self.cl, self.problem = seed, cl, problem
        self.r, self.n = cl.rank, cl.world
        self.layout = ShardLayout(algo, self.n)
        self.x = problem.initial_point()
        self.worker = WorkerState()
        self.server = ServerState()  # of shard r
        self.pending: str | None = None  # an apply error, reported at the next command
        self.fault = _Fault(cl.rank)

    def _gather(self, meta: torch.Tensor, what: str) -> list[torch.Tensor]:
        out = [torch.empty_like(meta) for _ in range(self.n)]
        self.cl.wait([dist.all_gather(out, meta, group=self.cl.group, async_op=True)], what)
        return out

    def _agree(self, metas, own: BaseException | None, msg: torch.Tensor | None, what: str):
        """Raise _RunFailed on every rank if any rank failed (messages go to rank 0)."""
        failed = [i for i, m in enumerate(metas) if int(m[0]) != OK]
        if not failed:
            return
        cl, texts = self.cl, {}
        if self.r != 0 and self.r in failed:
            cl.exchange(what, [(msg, 0, T_MSG)])
        if self.r == 0:
            bufs = {i: torch.empty(int(metas[i][1]), dtype=torch.uint8) for i in failed if i}
            cl.exchange(what, recvs=[(b, i, T_MSG) for i, b in bufs.items()])
            texts = {i: _tensor_text(b) for i, b in bufs.items()}
        raise _RunFailed(own, texts)

    def _a2a(self, sends: list[torch.Tensor], sizes: list[int], what: str) -> list[torch.Tensor]:
        """Exact-size all-to-all: sends[j] goes to rank j, sizes[i] bytes come from rank i."""
        out = torch.empty(sum(sizes), dtype=torch.uint8)
        inp = torch.cat(sends) if sends else torch.empty(0, dtype=torch.uint8)
        work = dist.all_to_all_single(
            out, inp, sizes, [s.numel() for s in sends], group=self.cl.group, async_op=True
        )
        self.cl.wait([work], what)
        return list(out.split(sizes))

    def step(self, t: int, lr: float):
        """The step on this rank; on rank 0 returns what StepStats needs."""
        n, r, lay = self.n, self.r, self.layout
        own, msg, ups, vals = None, None, [], (0.0, 0.0, 0.0)
        if self.pending is not None:
            msg = _text_tensor(self.pending)
        else:
            try:
                self.fault.maybe_exit(t)
                loss, ups, self.worker, tc, tz = lay.uplink(
                    self.problem, self.seed, t, r, self.x, lr, self.worker
                )
                vals = (loss, tc, tz)
            except Exception as e:
                own, msg = e, _text_tensor(_describe(e, f"at step {t}"))
        status = OK if msg is None else FAILED
        lens = [u.numel() for u in ups] if ups else [0] * n
        meta = torch.tensor(
            [status, 0 if msg is None else msg.numel(), *_bits_of(*vals), *lens], dtype=torch.int64
        )
        metas = self._gather(meta, f"exchanging uplink sizes at step {t}")
        self._agree(metas, own, msg, f"at step {t}")
        # uplink: shard j of every worker to rank j (a rank keeps its own shard)
        sends = [u if j != r else u[:0] for j, u in enumerate(ups)]
        sizes = [int(metas[i][5 + r]) if i != r else 0 for i in range(n)]
        mine = self._a2a(sends, sizes, f"sending uplinks at step {t}")
        mine[r] = ups[r]
        t1 = time.perf_counter()
        own, msg, down = None, None, torch.empty(0, dtype=torch.uint8)
        try:
            down, self.server = lay.aggregate(r, t, mine, lr, self.server)
        except Exception as e:
            own, msg = e, _text_tensor(_describe(e, f"at step {t}"))
        t2 = time.perf_counter()
        meta2 = torch.tensor(
            [OK if msg is None else FAILED, 0 if msg is None else msg.numel(), down.numel()],
            dtype=torch.int64,
        )
        metas2 = self._gather(meta2, f"exchanging downlink sizes at step {t}")
        self._agree(metas2, own, msg, f"at step {t}")
        # downlink: shard r to every other rank
        dlens = [int(m[2]) for m in metas2]
        downs = self._a2a(
            [down if j != r else down[:0] for j in range(n)],
            [dlens[i] if i != r else 0 for i in range(n)],
            f"sending downlinks at step {t}",
        )
        downs[r] = down
        downs = [self.fault.maybe_corrupt(t, dj) if j != r else dj for j, dj in enumerate(downs)]
        t3 = time.perf_counter()
        try:
            self.x = lay.apply(self.x, downs, lr)
        except Exception as e:
            if r == 0:
                raise
            self.pending = _describe(e, f"at step {t}")
        t4 = time.perf_counter()
        lens_all = [[int(v) for v in m[5:]] for m in metas]
        return [_floats(m[2:5]) for m in metas], lens_all, dlens, (t2 - t1) + (t4 - t3)

    # state, as seen from a rank r > 0 (rank 0 assembles it in ShardedTorchDistEngine)
    def reply_state(self) -> None:
        e, sfb, m = self.worker.feedback.error, self.server.feedback.error, self.server.momentum
        sec = self.server.second
        flags = [int(v is not None) for v in (e, sfb, m, sec)]
        body = [(self.x, T_DATA)] + [
            (v, tag)
            for v, tag in ((e, T_ERR), (sfb, T_SFB), (m, T_MOM), (sec, T_SEC))
            if v is not None
        ]
        meta = torch.tensor([OK, *flags], dtype=torch.int64)
        dist.send(meta, 0, group=self.cl.group, tag=T_META)
        for t, tag in body:
            dist.send(t.contiguous(), 0, group=self.cl.group, tag=tag)

    def recv_state(self) -> None:
        d, dr, cl = self.problem.dim, self.layout.sizes[self.r], self.cl
        head = cl.recv(torch.empty(4, dtype=torch.int64), T_META)
        self.x = cl.recv(torch.empty(d), T_DATA)
        e = cl.recv(torch.empty(d), T_ERR) if int(head[0]) else None
        sfb = cl.recv(torch.empty(dr), T_SFB) if int(head[1]) else None
        m = cl.recv(torch.empty(dr), T_MOM) if int(head[2]) else None
        sec = cl.recv(torch.empty(dr), T_SEC) if int(head[3]) else None
        self.worker = WorkerState(FeedbackState(e))
        self.server = ServerState(FeedbackState(sfb), m, sec)
        cl.reply(OK)


class ShardedTorchDistEngine:
    """Rank 0 of the sharded layout: worker 0, server of shard 0, and the run's driver."""

    def __init__(self, problem, algorithm: Algorithm, cluster: _Cluster, seed: int = 0):
        self.problem = problem
        self.algo = algorithm
        self.cluster = cluster
        self.n = cluster.world
        self.rep = _ShardedReplica(seed, cluster, problem, algorithm)
        cl = cluster
        metas = cl.replies("starting the workers")
        for r, m in metas.items():
            if int(m[1]) != problem.dim:
                raise ValueError(
                    f"{cl.name(r)} built a model of size {int(m[1])}, "
                    f"rank 0 one of size {problem.dim}"
                )
        # every rank starts from rank 0's point, with empty memories
        empty = {"feedback": {"error": None}}
        self.load_state_dict(
            {"x": self.rep.x, "workers": [empty] * self.n, "server": ServerState().state_dict()}
        )

    @property
    def x(self) -> torch.Tensor:
        return self.rep.x

    def step(self, t: int, lr: float) -> StepStats:
        cl = self.cluster
        t0 = time.perf_counter()
        with cl.command():
            cl.send_ctrl(STEP, t, lr)
            try:
                vals, lens, dlens, t_serve = self.rep.step(t, lr)
            except _RunFailed as f:
                cl.live.clear()  # every rank has left its loop
                if f.own is not None:
                    raise f.own from None
                raise cl.failure(f.texts) from None
        t4 = time.perf_counter()
        up, down = ShardLayout.bits(lens, dlens)
        tc = max(v[1] for v in vals)
        tz = max(v[2] for v in vals) + t_serve
        loss = sum(v[0] for v in vals) / self.n
        return StepStats(loss, up, down, tc, tz, max(0.0, t4 - t0 - tc - tz))

    def state_dict(self) -> dict:
        cl, rep, d = self.cluster, self.rep, self.problem.dim
        sizes = rep.layout.sizes
        with cl.command():
            cl.send_ctrl(GET_STATE)
            metas = cl.replies("collecting the ranks' state")
            bufs, recvs = {}, []
            for r in cl.peers:
                f = [int(v) for v in metas[r][1:5]]
                b = {"x": torch.empty(d)}
                b["e"] = torch.empty(d) if f[0] else None
                b["sfb"] = torch.empty(sizes[r]) if f[1] else None
                b["m"] = torch.empty(sizes[r]) if f[2] else None
                b["v"] = torch.empty(sizes[r]) if f[3] else None
                bufs[r] = b
                recvs += [
                    (v, r, tag)
                    for v, tag in (
                        (b["x"], T_DATA),
                        (b["e"], T_ERR),
                        (b["sfb"], T_SFB),
                        (b["m"], T_MOM),
                        (b["v"], T_SEC),
                    )
                    if v is not None
                ]
            cl.exchange("collecting the ranks' state", recvs=recvs)
        for r, b in bufs.items():
            if not torch.equal(b["x"], rep.x):
                raise WorkerError(
                    f"{cl.name(r)}'s parameters differ from rank 0's: the replicas drifted"
                )
        errs = [rep.worker.feedback.error] + [bufs[r]["e"] for r in cl.peers]
        servers = [rep.server] + [
            ServerState(FeedbackState(bufs[r]["sfb"]), bufs[r]["m"], bufs[r]["v"]) for r in cl.peers
        ]
        return {
            "x": rep.x.clone(),
            "workers": [WorkerState(FeedbackState(e)).state_dict() for e in errs],
            "server": rep.layout.server_state_dict(servers),
        }

    def load_state_dict(self, sd: dict) -> None:
        check_state_dict(sd, self.n, self.problem.dim)
        cl, rep = self.cluster, self.rep
        x = sd["x"].clone().float()
        errs = [w["feedback"]["error"] for w in sd["workers"]]
        servers = rep.layout.server_states(sd["server"])
        with cl.command():
            cl.send_ctrl(SET_STATE)
            sends = []
            for r in cl.peers:
                e, s = errs[r], servers[r]
                vals = (e, s.feedback.error, s.momentum, s.second)
                head = torch.tensor([int(v is not None) for v in vals], dtype=torch.int64)
                sends += [(head, r, T_META), (x, r, T_DATA)]
                sends += [
                    (v.float(), r, tag)
                    for v, tag in zip(vals, (T_ERR, T_SFB, T_MOM, T_SEC), strict=True)
                    if v is not None
                ]
            cl.exchange("sending the ranks' state", sends)
            cl.replies("sending the ranks' state")
        rep.x = x
        rep.worker = WorkerState(FeedbackState(None if errs[0] is None else errs[0].clone()))
        rep.server = servers[0]

    def close(self) -> None:
        self.cluster.close()


def _sharded_worker(seed: int, cl: _Cluster, problem, algo: Algorithm) -> tuple[int, int]:
    rep, steps = _ShardedReplica(seed, cl, problem, algo), 0
    while True:
        cmd, t, lr = cl.recv_ctrl()
        if cmd == STEP:
            try:
                rep.step(t, lr)
            except _RunFailed:
                return 1, steps
            steps += 1
            continue
        if rep.pending is not None:
            cl.reply_failed(rep.pending)
            return 1, steps
        if cmd == GET_STATE:
            rep.reply_state()
        elif cmd == SET_STATE:
            rep.recv_state()
        elif cmd == STOP:
            cl.reply(OK)
            return 0, steps
        else:
            cl.reply_failed(f"at a command: unknown command {cmd}")
            return 1, steps
