"""The simulated engine: n workers and the server in one process.

It runs exactly the step of :mod:`gradzip.engines.core`, passing payload bytes between
the parties in memory; bits are counted from those bytes. Non-finite steps follow
``Algorithm.nonfinite`` as in every engine (:mod:`gradzip.engines.policy`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ..compressors.base import NonFiniteError
from .core import Algorithm, ServerState, WorkerState
from .faults import faults
from .policy import OK, PARAMETERS, UPDATE, NonFiniteStep, describe, finding, message, worker_half


@dataclass
class StepStats:
    loss: float  # mean mini-batch loss over workers
    bits_up: int  # bits sent by all workers this step
    bits_down: int  # bits sent by the server this step (one copy per worker)
    t_compute: float  # seconds in gradients
    t_compress: float  # seconds in encode/decode and aggregation
    t_comm: float  # seconds moving bytes (0 here)
    skipped: str | None = None  # a step skipped under nonfinite="skip": the message


def nonfinite(t: int, bad: list[str], policy: str, *bits_and_times) -> StepStats:
    """A non-finite step of a one-process engine: NonFiniteStep under ``error``; under
    ``skip``, its StepStats (bits up, bits down, t_compute, t_compress) and message."""
    text = message(t, bad, policy)
    if policy == "error":
        raise NonFiniteStep(text, t)
    return StepStats(math.nan, *bits_and_times, 0.0, text)


class SimulatedEngine:
    def __init__(self, problem, algorithm: Algorithm, workers: int, seed: int = 0):
        self.problem = problem
        self.algo = algorithm
        self.n = workers
        self.seed = seed
        self.x = problem.initial_point()
        self.workers = [WorkerState() for _ in range(workers)]
        self.server = ServerState()
        self.faults = faults(workers)  # the GRADZIP_TEST_FAULT hook

    def step(self, t: int, lr: float) -> StepStats:
        tc = tz = 0.0
        ups, losses, new, bad = [], [], [], []
        for i in range(self.n):
            loss, f, data, st, a, b = worker_half(
                self.algo, self.algo.encode_uplink, self.problem, self.seed, t, i, self.x, lr,
                self.workers[i], self.faults[i],
            )  # fmt: skip
            tc, tz = tc + a, tz + b
            if f[0] != OK:
                bad.append(describe(f, f"worker {i}", self.problem))
                continue
            ups.append(data)
            losses.append(loss)
            new.append(st)
        bits_up = sum(8 * u.numel() for u in ups)
        policy = self.algo.nonfinite
        if bad:
            return nonfinite(t, bad, policy, bits_up, 0, tc, tz)
        t0 = time.perf_counter()
        try:
            down, server = self.algo.aggregate(t, ups, lr, self.server)
        except NonFiniteError:
            bad = [describe([UPDATE, 0, 0, -1], "the server")]
            return nonfinite(t, bad, policy, bits_up, 0, tc, tz + time.perf_counter() - t0)
        x = self.algo.apply(self.x, down, lr, t)
        tz += time.perf_counter() - t0
        bits_down = 8 * down.numel() * self.n
        f = finding(x, PARAMETERS)
        if f[0] != OK:  # every replica would find the same
            bad = [describe(f, "every replica", self.problem)]
            return nonfinite(t, bad, policy, bits_up, bits_down, tc, tz)
        self.x, self.workers, self.server = x, new, server
        return StepStats(sum(losses) / self.n, bits_up, bits_down, tc, tz, 0.0)

    def state_dict(self) -> dict:
        return {
            "x": self.x.clone(),
            "workers": [w.state_dict() for w in self.workers],
            "server": self.server.state_dict(),
        }

    def load_state_dict(self, sd: dict) -> None:
        if len(sd["workers"]) != self.n or sd["x"].shape != self.x.shape:
            raise ValueError("checkpoint does not match this run (workers or model size differ)")
        self.x = sd["x"].clone()
        self.workers = [WorkerState.from_state_dict(w) for w in sd["workers"]]
        self.server = ServerState.from_state_dict(sd["server"])
