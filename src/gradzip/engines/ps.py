"""The parameter-server engine (``torchdist``): rank 0 serves, ranks 1..n are workers.
See :mod:`gradzip.engines.torchdist` for the protocol and
:mod:`gradzip.engines.policy` for non-finite steps: a worker whose loss or gradient is not
finite replies ``NONFINITE`` (what it found, as integers) instead of its uplink; rank 0
answers every worker with the step's verdict (``OK`` and the downlink, or ``NONFINITE``
and the message), and every replica checks the parameters it computes.
"""

from __future__ import annotations

import math
import time

import torch

from ..compressors.base import NonFiniteError
from .cluster import (
    ABORT,
    GET_STATE,
    NONFINITE,
    OK,
    SET_STATE,
    SHORT,
    STEP,
    STOP,
    T_DATA,
    T_META,
    T_MSG,
    WorkerError,
    _Cluster,
    _describe,
    _floats,
    _tensor_text,
    _text_tensor,
)
from .core import Algorithm, ServerState, WorkerState, state_from_tensors, state_tensors
from .faults import Fault
from .links import Links, down_channel, up_channel
from .policy import (
    OK as FINITE,
)
from .policy import (
    PARAMETERS,
    UPDATE,
    NonFiniteStep,
    describe,
    finding,
    message,
    worker_half,
)
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
            cl.at(t, "sending the command")
            cl.send_ctrl(STEP, t, lr)
            metas, texts = cl.replies("receiving the workers' replies", collect=True)
            ups = {
                r: torch.empty(int(m[1]) if int(m[0]) == OK else 0, dtype=torch.uint8)
                for r, m in metas.items()
            }
            cl.exchange("receiving the uplinks", recvs=[(u, r, T_DATA) for r, u in ups.items()])
            if texts:  # the others wait for a downlink: tell them the run is over
                self._abort(t)
                raise cl.failure(texts)
            cl.at(t, "aggregating")
            t1 = time.perf_counter()
            bad = [
                describe([int(v) for v in _floats(m[2:5])] + [int(m[1])], cl.name(r), self.problem)
                for r, m in metas.items()
                if int(m[0]) == NONFINITE
            ]
            server = self.server
            try:  # every uplink received is unpacked, also in a skipped step (framing)
                got = {r: self.links.unpack(up_channel(cl.worker_of(r)), u, t)
                       for r, u in ups.items() if int(metas[r][0]) == OK}  # fmt: skip
                if not bad:
                    try:
                        down, server = self.algo.aggregate(t, list(got.values()), lr, server)
                    except NonFiniteError:
                        bad = [describe([UPDATE, 0, 0, -1], "the server (rank 0)")]
                msg = None if bad else self.links.pack(down_channel(), down)
            except Exception:
                self._abort(t)
                raise
            t2 = time.perf_counter()
            cl.at(t, "sending the downlink")
            if bad:  # every worker learns the verdict, and the message
                text = message(t, bad, self.algo.nonfinite)
                note = _text_tensor(text)
                head = torch.tensor([NONFINITE, note.numel()], dtype=torch.int64)
                sends = [(head, r, T_META) for r in cl.peers] + [(note, r, T_MSG) for r in cl.peers]
            else:
                head = torch.tensor([OK, msg.numel()], dtype=torch.int64)
                sends = [(head, r, T_META) for r in cl.peers] + [(msg, r, T_DATA) for r in cl.peers]
            cl.exchange("sending the downlink", sends)
        # bits from the bytes actually sent: one copy of the downlink per worker
        bits_down = sum(8 * x.numel() for x, _, tag in sends if tag == T_DATA)
        bits_up = sum(8 * u.numel() for u in ups.values())
        t3 = time.perf_counter()
        if not bad:
            cl.at(t, "applying the downlink")
            x = self.algo.apply(self.x, down, lr, t)
            f = finding(x, PARAMETERS)
            if f[0] == FINITE:
                self.x, self.server = x, server
            else:  # every replica finds the same
                bad = [describe(f, "every replica", self.problem)]
                text = message(t, bad, self.algo.nonfinite)
        t4 = time.perf_counter()
        vals = {r: _floats(m[2:5]) for r, m in metas.items() if int(m[0]) == OK}
        loss = sum(v[0] for v in vals.values()) / self.n if not bad else math.nan
        tc = max((v[1] for v in vals.values()), default=0.0)
        tz = max((v[2] for v in vals.values()), default=0.0) + (t2 - t1) + (t4 - t3)
        if bad and self.algo.nonfinite == "error":
            raise NonFiniteStep(text, t)  # the workers end with it at STOP
        stats = StepStats(loss, bits_up, bits_down, tc, tz, max(0.0, t4 - t0 - tc - tz))
        stats.skipped = text if bad else None
        return stats

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
) -> tuple[int, int | str]:
    """A parameter-server worker's loop; returns (exit code, steps done), or (1, the
    message) after a non-finite step under the ``error`` policy."""
    i, steps = cl.rank - 1, 0
    links = Links(framing, max_numel=max(problem.dim, 1))
    x, state, pending, nonfinite = problem.initial_point(), WorkerState(), None, None
    fault = Fault(cl.rank, i)
    while True:
        cmd, t, lr = cl.recv_ctrl()
        if nonfinite is not None:  # the run ended at a non-finite step: STOP is expected
            if cmd == STOP:
                cl.reply(OK)
            else:
                cl.reply_failed(f"at step {t}: the run stopped earlier: {nonfinite}")
            return 1, nonfinite
        if pending is not None:
            cl.reply_failed(pending)
            return 1, steps
        if cmd == STEP:
            try:
                fault.maybe_exit(t)
                cl.at(t, "computing its uplink")
                loss, f, data, new, tc, tz = worker_half(
                    algo, algo.encode_uplink, problem, seed, t, i, x, lr, state, fault
                )
                if f[0] == FINITE:
                    data = links.pack(up_channel(i), data)
            except Exception as e:
                cl.reply_failed(_describe(e, f"at step {t}"))
                return 1, steps
            if f[0] == FINITE:
                cl.reply(OK, data.numel(), (loss, tc, tz), body=[(data, T_DATA)],
                         what="sending its uplink")  # fmt: skip
            else:  # what it found, as integers: [kind, NaN, inf] and the first coordinate
                cl.reply(NONFINITE, f[3], f[:3], what="sending its uplink")
            head = cl.recv(torch.empty(2, dtype=torch.int64), T_META, "receiving the downlink")
            if int(head[0]) == NONFINITE:  # the step's verdict: skip it, or end with it
                note = cl.recv(torch.empty(int(head[1]), dtype=torch.uint8), T_MSG)
                if algo.nonfinite == "error":
                    nonfinite = _tensor_text(note)
                steps += 1
                continue
            if int(head[0]) != OK:  # the server aborted the run
                return 1, steps
            down = fault.maybe_corrupt(
                t, cl.recv(torch.empty(int(head[1]), dtype=torch.uint8), T_DATA)
            )
            cl.at(t, "applying the downlink")
            try:
                y = algo.apply(x, links.unpack(down_channel(), down, t), lr, t)
                f = finding(y, PARAMETERS)
                if f[0] == FINITE:
                    x, state = y, new
                elif algo.nonfinite == "error":  # every replica finds the same
                    nonfinite = message(t, [describe(f, "every replica", problem)], "error")
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
