"""The sharded torch.distributed engine (``torchdist-sharded``): every rank is a worker
and the server of one shard, running :class:`gradzip.engines.sharded.ShardLayout`'s step.
See :mod:`gradzip.engines.torchdist` for the protocol. Non-finite steps
(:mod:`gradzip.engines.policy`): each rank's finding travels with the sizes every rank
gathers (``[kind, NaN, inf, first coordinate]``), so every rank words the same message and
takes the same decision without another message.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from ..compressors.base import NonFiniteError
from .cluster import (
    FAILED,
    GET_STATE,
    NONFINITE,
    OK,
    SET_STATE,
    STEP,
    STOP,
    T_MSG,
    WorkerError,
    _bits_of,
    _Cluster,
    _describe,
    _floats,
    _tensor_text,
    _text_tensor,
)
from .core import Algorithm, ServerState, WorkerState, state_from_tensors, state_tensors
from .faults import Fault
from .links import Links, down_channel, up_channel
from .policy import PARAMETERS, UPDATE, NonFiniteStep, describe, finding, message, worker_half
from .sharded import ShardLayout, check_state_dict
from .simulated import StepStats

# --- the sharded server (every rank) ---------------------------------------------------------


_LENS = 9  # [status, message length, loss, t_grad, t_enc, kind, NaN, inf, first, lens...]


class _RunFailed(Exception):
    """Some rank failed inside a sharded step; every rank knows it and leaves."""

    def __init__(self, own: BaseException | None, texts: dict[int, str]):
        super().__init__("a rank failed")
        self.own, self.texts = own, texts


class _ShardedReplica:
    """One rank of the sharded layout: worker r and server of shard r."""

    def __init__(self, seed: int, cl: _Cluster, problem, algo: Algorithm, framing: str):
        self.seed, self.cl, self.problem = seed, cl, problem
        self.r, self.n = cl.rank, cl.world
        self.layout = ShardLayout(algo, self.n)
        self.links = Links(framing, max_numel=max(self.layout.sizes))
        self.x = problem.initial_point()
        self.worker = WorkerState()
        self.server = ServerState()  # of shard r
        self.pending: str | None = None  # an apply error, reported at the next command
        self.nonfinite: str | None = None  # a non-finite step under "error": the message
        self.fault = Fault(cl.rank, cl.rank)

    def _gather(self, meta: torch.Tensor, what: str) -> list[torch.Tensor]:
        out = [torch.empty_like(meta) for _ in range(self.n)]
        self.cl.wait([dist.all_gather(out, meta, group=self.cl.group, async_op=True)], what)
        return out

    def _agree(self, metas, own: BaseException | None, msg: torch.Tensor | None, what: str):
        """Raise _RunFailed on every rank if any rank failed (messages go to rank 0)."""
        failed = [i for i, m in enumerate(metas) if int(m[0]) == FAILED]
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
        """The step on this rank; on rank 0 returns what StepStats needs and the message of
        a skipped step (None if it was not); a non-finite step under ``error`` raises
        NonFiniteStep on rank 0 and is kept in ``self.nonfinite`` on the others."""
        n, r, lay, cl = self.n, self.r, self.layout, self.cl
        own, msg, ups, vals = None, None, [], (0.0, 0.0, 0.0)
        f, new = [OK, 0, 0, -1], None
        if self.pending is not None:
            msg = _text_tensor(self.pending)
        else:
            try:
                self.fault.maybe_exit(t)
                cl.at(t, "computing its uplink")
                loss, f, ups, new, tc, tz = worker_half(
                    lay.full, lay.encode_uplink, self.problem, self.seed, t, r, self.x, lr,
                    self.worker, self.fault,
                )  # fmt: skip
                # what goes to rank j: framed on the channel (r, j); shard r stays here
                ups = [u if j == r else self.links.pack(up_channel(r, j, n), u)
                       for j, u in enumerate(ups or [])]  # fmt: skip
                vals = (loss, tc, tz)
            except Exception as e:
                own, msg = e, _text_tensor(_describe(e, f"at step {t}"))
        status = FAILED if msg is not None else OK if f[0] == OK else NONFINITE
        lens = [u.numel() for u in ups] if ups else [0] * n
        meta = torch.tensor(
            [status, 0 if msg is None else msg.numel(), *_bits_of(*vals), *f, *lens],
            dtype=torch.int64,
        )
        metas = self._gather(meta, "exchanging uplink sizes")
        self._agree(metas, own, msg, f"at step {t}")
        bad = self._found(metas, 5, "")
        if bad and lay.full.nonfinite == "error":
            return self._verdict(t, bad)
        # uplink: shard j of every worker to rank j (a rank keeps its own shard); what was
        # packed is sent and unpacked, also in a step to skip (framed channels stay in step)
        none = torch.empty(0, dtype=torch.uint8)
        sends = [u if j != r else none for j, u in enumerate(ups)] if ups else [none] * n
        sizes = [int(metas[i][_LENS + r]) if i != r else 0 for i in range(n)]
        mine = self._a2a(sends, sizes, "sending uplinks")
        mine[r] = ups[r] if ups else mine[r]
        t1 = time.perf_counter()
        own, msg, down, server = None, None, torch.empty(0, dtype=torch.uint8), None
        sent, f = down, [OK, 0, 0, -1]
        try:
            cl.at(t, f"aggregating shard {r}")
            mine = [u if i == r else self.links.unpack(up_channel(i, r, n), u, t)
                    for i, u in enumerate(mine) if u.numel() or i == r]  # fmt: skip
            if not bad:
                try:
                    down, server = lay.aggregate(r, t, mine, lr, self.server)
                    sent = self.links.pack(down_channel(r), down)
                except NonFiniteError:
                    f = [UPDATE, 0, 0, -1]
        except Exception as e:
            own, msg = e, _text_tensor(_describe(e, f"at step {t}"))
        if bad:  # skip: every rank knows, from the exchanged sizes
            return self._verdict(t, bad, metas)
        t2 = time.perf_counter()
        status = FAILED if msg is not None else OK if f[0] == OK else NONFINITE
        meta2 = torch.tensor(
            [status, 0 if msg is None else msg.numel(), sent.numel(), *f], dtype=torch.int64
        )
        metas2 = self._gather(meta2, "exchanging downlink sizes")
        self._agree(metas2, own, msg, f"at step {t}")
        bad = self._found(metas2, 3, "shard")
        if bad and lay.full.nonfinite == "error":
            return self._verdict(t, bad)
        # downlink: shard r to every other rank
        dlens = [int(m[2]) for m in metas2]
        downs = self._a2a(
            [sent if j != r else sent[:0] for j in range(n)],
            [dlens[i] if i != r else 0 for i in range(n)],
            "sending downlinks",
        )
        downs[r] = down
        downs = [self.fault.maybe_corrupt(t, dj) if j != r else dj for j, dj in enumerate(downs)]
        t3 = time.perf_counter()
        try:
            cl.at(t, "applying the downlinks")
            downs = [dj if j == r or not dj.numel() else self.links.unpack(down_channel(j), dj, t)
                     for j, dj in enumerate(downs)]  # fmt: skip
            if not bad:
                x = lay.apply(self.x, downs, lr, t)
                f = finding(x, PARAMETERS)
                if f[0] == OK:
                    self.x, self.worker, self.server = x, new, server
                else:  # every replica finds the same
                    bad = [describe(f, "every replica", self.problem)]
        except Exception as e:
            if r == 0:
                raise
            self.pending = _describe(e, f"at step {t}")
        t4 = time.perf_counter()
        if bad:
            return self._verdict(t, bad, metas, dlens)
        lens_all = [[int(v) for v in m[_LENS:]] for m in metas]
        return [_floats(m[2:5]) for m in metas], lens_all, dlens, (t2 - t1) + (t4 - t3), None

    def _found(self, metas, at: int, what: str) -> list[str]:
        """The non-finite findings in the exchanged sizes, in words (the same on every
        rank): each rank's ``[kind, NaN, inf, first]`` from ``metas[i][at:at + 4]``."""
        out = []
        for i, m in enumerate(metas):
            if int(m[0]) == NONFINITE:
                f = [int(v) for v in m[at : at + 4]]
                who = f"shard {i} (rank {i})" if what else self.cl.name(i)
                if what and f[3] >= 0:  # a coordinate of the shard: of the vector
                    f[3] += self.layout.bounds[i]
                out.append(describe(f, who, self.problem))
        return out

    def _verdict(self, t: int, bad: list[str], metas=None, dlens=None):
        """A non-finite step: raise on rank 0 under ``error`` (the others keep the message
        for the end), or what rank 0's StepStats needs, with the message, under ``skip``."""
        policy = self.layout.full.nonfinite
        text = message(t, bad, policy)
        if policy == "error":
            if self.r == 0:
                raise NonFiniteStep(text, t)
            self.nonfinite = text
            return None
        n = self.n
        vals = [[math.nan, 0.0, 0.0]] * n
        lens = [[0] * n] * n
        if metas is not None:
            vals = [_floats(m[2:5]) for m in metas]
            lens = [[int(v) for v in m[_LENS:]] for m in metas]
        return vals, lens, dlens or [0] * n, 0.0, text

    # state, as seen from a rank r > 0 (rank 0 assembles it in ShardedTorchDistEngine)
    def values(self) -> list[torch.Tensor | None]:
        """x, the worker's memories, the server's (of shard r): what a checkpoint takes."""
        return [self.x, *state_tensors(self.worker), *state_tensors(self.server)]

    def set_values(self, values) -> None:
        self.x, self.worker, self.server = _replica_state(values)

    def reply_state(self) -> None:
        self.cl.reply(OK)
        self.cl.send_state(self.values())

    def recv_state(self) -> None:
        self.set_values(self.cl.recv_state(_REPLICA_VALUES))
        self.cl.reply(OK)


_REPLICA_VALUES = 1 + len(state_tensors(WorkerState())) + len(state_tensors(ServerState()))


def _replica_state(values) -> tuple[torch.Tensor, WorkerState, ServerState]:
    """(x, worker state, server state) from :meth:`_ShardedReplica.values`."""
    it = iter(values)
    x = next(it)
    return x, state_from_tensors(WorkerState(), it), state_from_tensors(ServerState(), it)


class ShardedTorchDistEngine:
    """Rank 0 of the sharded layout: worker 0, server of shard 0, and the run's driver."""

    def __init__(
        self,
        problem,
        algorithm: Algorithm,
        cluster: _Cluster,
        seed: int = 0,
        framing: str = "stream",
    ):
        self.problem = problem
        self.algo = algorithm
        self.cluster = cluster
        self.n = cluster.world
        self.rep = _ShardedReplica(seed, cluster, problem, algorithm, framing)
        cluster.await_started(problem.dim, "rank 0")
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
        stopped = None
        with cl.command():
            cl.at(t, "sending the command")
            cl.send_ctrl(STEP, t, lr)
            try:
                vals, lens, dlens, t_serve, skipped = self.rep.step(t, lr)
            except _RunFailed as f:
                cl.live.clear()  # every rank has left its loop
                if f.own is not None:
                    raise f.own from None
                raise cl.failure(f.texts) from None
            except NonFiniteStep as e:  # every rank knows: they end at STOP
                stopped = e
        if stopped is not None:
            raise stopped
        t4 = time.perf_counter()
        up, down = ShardLayout.bits(lens, dlens)
        tc = max(v[1] for v in vals)
        tz = max(v[2] for v in vals) + t_serve
        loss = math.nan if skipped else sum(v[0] for v in vals) / self.n
        return StepStats(loss, up, down, tc, tz, max(0.0, t4 - t0 - tc - tz), skipped)

    def state_dict(self) -> dict:
        cl, rep = self.cluster, self.rep
        with cl.command():
            cl.send_ctrl(GET_STATE)
            cl.replies("collecting the ranks' state")
            got = cl.gather_states("collecting the ranks' state", _REPLICA_VALUES)
        states = {0: (rep.x, rep.worker, rep.server)}
        for r, values in got.items():
            states[r] = _replica_state(values)
            if not torch.equal(states[r][0], rep.x):
                raise WorkerError(
                    f"{cl.name(r)}'s parameters differ from rank 0's: the replicas drifted"
                )
        ranks = range(self.n)
        return {
            "x": rep.x.clone(),
            "workers": [states[r][1].state_dict() for r in ranks],
            "server": rep.layout.server_state_dict([states[r][2] for r in ranks]),
        }

    def load_state_dict(self, sd: dict) -> None:
        check_state_dict(sd, self.n, self.problem.dim)
        cl, rep = self.cluster, self.rep
        x = sd["x"].clone().float()
        workers = [WorkerState.from_state_dict(w) for w in sd["workers"]]
        servers = rep.layout.server_states(sd["server"])
        values = {
            r: [x, *state_tensors(workers[r]), *state_tensors(servers[r])] for r in range(self.n)
        }
        with cl.command():
            cl.send_ctrl(SET_STATE)
            cl.exchange(
                "sending the ranks' state", cl.state_sends({r: values[r] for r in cl.peers})
            )
            cl.replies("sending the ranks' state")
        rep.set_values(values[0])

    def close(self) -> None:
        self.cluster.close()


def _sharded_worker(
    seed: int, cl: _Cluster, problem, algo: Algorithm, framing: str = "stream"
) -> tuple[int, int | str]:
    """A sharded rank's loop; returns (exit code, steps done), or (1, the message) after a
    non-finite step under the ``error`` policy."""
    rep, steps = _ShardedReplica(seed, cl, problem, algo, framing), 0
    while True:
        cmd, t, lr = cl.recv_ctrl()
        if rep.nonfinite is not None:  # the run ended at a non-finite step: STOP is expected
            if cmd == STOP:
                cl.reply(OK)
            else:
                cl.reply_failed(f"at step {t}: the run stopped earlier: {rep.nonfinite}")
            return 1, rep.nonfinite
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
        else:  # STOP, or a command this loop does not know
            return cl.leave(cmd), steps
