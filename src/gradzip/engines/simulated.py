"""The simulated engine: n workers and the server in one process.

It runs exactly the step of :mod:`gradzip.engines.core`, passing payload bytes between
the parties in memory; bits are counted from those bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .core import Algorithm, ServerState, WorkerState


@dataclass
class StepStats:
    loss: float  # mean mini-batch loss over workers
    bits_up: int  # bits sent by all workers this step
    bits_down: int  # bits sent by the server this step (one copy per worker)
    t_compute: float  # seconds in gradients
    t_compress: float  # seconds in encode/decode and aggregation
    t_comm: float  # seconds moving bytes (0 here)


class SimulatedEngine:
    def __init__(self, problem, algorithm: Algorithm, workers: int, seed: int = 0):
        self.problem = problem
        self.algo = algorithm
        self.n = workers
        self.seed = seed
        self.x = problem.initial_point()
        self.workers = [WorkerState() for _ in range(workers)]
        self.server = ServerState()

    def step(self, t: int, lr: float) -> StepStats:
        tc = tz = 0.0
        ups, losses = [], []
        for i in range(self.n):
            t0 = time.perf_counter()
            z = self.algo.gradient_point(self.x, lr, self.workers[i])
            loss, g = self.problem.gradient(z, self.problem.batch(self.seed, t, i))
            t1 = time.perf_counter()
            data, self.workers[i] = self.algo.encode_uplink(t, i, g, lr, self.workers[i])
            t2 = time.perf_counter()
            tc, tz = tc + t1 - t0, tz + t2 - t1
            ups.append(data)
            losses.append(loss)
        t0 = time.perf_counter()
        down, self.server = self.algo.aggregate(t, ups, lr, self.server)
        self.x = self.algo.apply(self.x, down, lr, t)
        tz += time.perf_counter() - t0
        bits_up = sum(8 * u.numel() for u in ups)
        return StepStats(sum(losses) / self.n, bits_up, 8 * down.numel() * self.n, tc, tz, 0.0)

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
