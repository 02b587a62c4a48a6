"""The parameter-server engine (``torchdist``): rank 0 serves, ranks 1..n are workers.
See :mod:`gradzip.engines.torchdist` for the protocol."""

from __future__ import annotations

import time

import torch

from .cluster import (
    ABORT,
    GET_STATE,
    OK,
    SET_STATE,
    SHORT,
    STEP,
    T_DATA,
    T_META,
    WorkerError,
    _Cluster,
    _describe,
    _Fault,
    _floats,
)
from .core import Algorithm, ServerState, WorkerState, state_from_tensors, state_tensors
from .links import Links, down_channel, up_channel
from .sharded import check_state_dict
from .simulated import StepStats

# --- the parameter server (rank 0) ----------------------------------------------------------


class TorchDistEngine:
    """Parameter server on rank 0 of a gloo process group; workers on ranks 1..n.

    The interface of :class:`~gradzip.engines.simulated.SimulatedEngine`: ``step``, ``x``,
    ``state_dict``/``load_state_dict`` (which gather and scatter the workers' memories as
    float32 tensors), plus ``close``.
    """

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
        self.n = cluster.world - 1
        self.seed = seed
        self.links = Links(framing, max_numel=max(problem.dim, 1))
        self.x = problem.initial_point()
        self.server = ServerState()
        cluster.await_started(problem.dim, "the server")
        # every replica starts from the server's point (not from its own initialization)
        self._scatter(self.x, [WorkerState()] * self.n)

    def step(self, t: int, lr: float) -> StepStats:
        cl = self.cluster
        if cl.live != set(cl.peers):
            raise WorkerError("the workers have left (an earlier failure); start a new engine")
        t0 = time.perf_counter()
        with cl.command():
            cl.send_ctrl(STEP, t, lr)
            metas, texts = cl.replies(f"at step {t}", collect=True)
            ups = {r: torch.empty(int(m[1]), dtype=torch.uint8) for r, m in metas.items()}
            cl.exchange(
                f"receiving uplinks at step {t}", recvs=[(u, r, T_DATA) for r, u in ups.items()]
            )
            if texts:  # the others wait for a downlink: tell them the run is over
                self._abort(t)
                raise cl.failure(texts)
            t1 = time.perf_counter()
            try:
                got = [self.links.unpack(up_channel(cl.worker_of(r)), u, t) for r, u in ups.items()]
                down, self.server = self.algo.aggregate(t, got, lr, self.server)
                msg = self.links.pack(down_channel(), down)
            except Exception:
                self._abort(t)
                raise
            t2 = time.perf_counter()
            head = torch.tensor([OK, msg.numel()], dtype=torch.int64)
            sends = [(head, r, T_META) for r in cl.peers] + [(msg, r, T_DATA) for r in cl.peers]
            cl.exchange(f"sending the downlink at step {t}", sends)
        # bits from the bytes actually sent: one copy of the downlink per worker
        bits_down = sum(8 * x.numel() for x, _, tag in sends if tag == T_DATA)
        t3 = time.perf_counter()
        self.x = self.algo.apply(self.x, down, lr, t)
        t4 = time.perf_counter()
        vals = [_floats(metas[r][2:5]) for r in cl.peers]  # loss, t_compute, t_compress
        loss = sum(v[0] for v in vals) / self.n
        tc = max(v[1] for v in vals)
        tz = max(v[2] for v in vals) + (t2 - t1) + (t4 - t3)
        bits_up = sum(8 * u.numel() for u in ups.values())
        return StepStats(loss, bits_up, bits_down, tc, tz, max(0.0, t4 - t0 - tc - tz))

    def _abort(self, t: int) -> None:
        """Inside a failed step, with every uplink read: the workers still waiting for a
        downlink get ABORT and leave their loops."""
        cl = self.cluster
        head = torch.tensor([ABORT, 0], dtype=torch.int64)
        try:
            cl.exchange(
                f"aborting step {t}", [(head, r, T_META) for r in sorted(cl.live)], timeout=SHORT
            )
            cl.live.clear()
        except Exception:
            cl.dirty = True

    def state_dict(self) -> dict:
        cl = self.cluster
        with cl.command():
            cl.send_ctrl(GET_STATE)
            cl.replies("collecting the workers' state")
            got = cl.gather_states("collecting the workers' state", _WORKER_VALUES)
        for r, (x, *_) in got.items():
            if not torch.equal(x, self.x):
                raise WorkerError(
                    f"{cl.name(r)}'s parameters differ from the server's "
                    f"(max |diff| {float((x - self.x).abs().max()):.3g}): "
                    "the replicas drifted"
                )
        workers = [state_from_tensors(WorkerState(), got[r][1:]).state_dict() for r in cl.peers]
        return {"x": self.x.clone(), "workers": workers, "server": self.server.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        check_state_dict(sd, self.n, self.problem.dim)
        self.x = sd["x"].clone().float()
        self.server = ServerState.from_state_dict(sd["server"])
        self._scatter(self.x, [WorkerState.from_state_dict(w) for w in sd["workers"]])

    def _scatter(self, x: torch.Tensor, workers: list[WorkerState]) -> None:
        """Every worker's parameters and memories (SET_STATE)."""
        cl = self.cluster
        with cl.command():
            cl.send_ctrl(SET_STATE)
            states = {r: [x, *state_tensors(w)] for r, w in zip(cl.peers, workers, strict=True)}
            cl.exchange("sending the workers' state", cl.state_sends(states))
            cl.replies("sending the workers' state")

    def close(self) -> None:
        self.cluster.close()


_WORKER_VALUES = 1 + len(state_tensors(WorkerState()))  # x and the worker's memories


def _ps_worker(
    seed: int, cl: _Cluster, problem, algo: Algorithm, framing: str = "stream"
) -> tuple[int, int]:
    """A parameter-server worker's loop; returns (exit code, steps done)."""
    i, steps = cl.rank - 1, 0
    links = Links(framing, max_numel=max(problem.dim, 1))
    x, state, pending = problem.initial_point(), WorkerState(), None
    fault = _Fault(cl.rank)
    while True:
        cmd, t, lr = cl.recv_ctrl()
        if pending is not None:
            cl.reply_failed(pending)
            return 1, steps
        if cmd == STEP:
            try:
                fault.maybe_exit(t)
                t0 = time.perf_counter()
                z = algo.gradient_point(x, lr, state)
                loss, g = problem.gradient(z, problem.batch(seed, t, i))
                t1 = time.perf_counter()
                data, state = algo.encode_uplink(t, i, g, lr, state)
                data = links.pack(up_channel(i), data)
                t2 = time.perf_counter()
            except Exception as e:
                cl.reply_failed(_describe(e, f"at step {t}"))
                return 1, steps
            cl.reply(OK, data.numel(), (loss, t1 - t0, t2 - t1), body=[(data, T_DATA)])
            head = cl.recv(torch.empty(2, dtype=torch.int64), T_META)
            if int(head[0]) != OK:  # the server aborted the run
                return 1, steps
            down = fault.maybe_corrupt(
                t, cl.recv(torch.empty(int(head[1]), dtype=torch.uint8), T_DATA)
            )
            try:
                x = algo.apply(x, links.unpack(down_channel(), down, t), lr, t)
            except Exception as e:  # reported with the next command
                pending = _describe(e, f"at step {t}")
            steps += 1
        elif cmd == GET_STATE:
            cl.reply(OK)
            cl.send_state([x, *state_tensors(state)])
        elif cmd == SET_STATE:
            x, *values = cl.recv_state(_WORKER_VALUES)
            state = state_from_tensors(WorkerState(), values)
            cl.reply(OK)
        else:  # STOP, or a command this loop does not know
            return cl.leave(cmd), steps
