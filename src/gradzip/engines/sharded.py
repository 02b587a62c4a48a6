"""The sharded step: every worker also serves one contiguous shard of the vector.

One implementation for the three places that run it: the simulated sharded engine
(:class:`ShardedSimulatedEngine`, here), the torch.distributed sharded engine and the DDP
comm hook (:mod:`gradzip.ddp`, one :class:`ShardLayout` per gradient bucket). They differ
only in how the payloads move.

A d-vector on n shards is cut at ``torch.tensor_split`` boundaries (:func:`shard_sizes`).
Shard j runs the :class:`~gradzip.engines.core.Algorithm`'s own step on its d_j
coordinates, with the seed ``shard_seed(seed, j)`` (:func:`gradzip.rng.fold`; shard 0
keeps the seed); the payload headers therefore read (shard seed, t, worker) up and
(shard seed, t, SERVER) down. The shard is folded into the seed rather than the worker id
so that ``Algorithm.aggregate`` (which seeds its downlink from the fixed id SERVER) is
reused unchanged, and so that shards never share rotation signs or dither. Feedback rules
and server optimizers are coordinate-wise, so a worker's memory is one full vector and
the shards' server memories put side by side are one full vector too: a checkpoint has
the layout of the unsharded engine's.

Per step, with worker i and shard j:

1. worker i: :meth:`ShardLayout.encode_uplink`: the uplink vector by its rule, one
   payload per shard;
2. shard j's server: :meth:`ShardLayout.aggregate` of the n payloads of shard j: the
   downlink payload of shard j;
3. every replica: :meth:`ShardLayout.apply` of the n downlink payloads (the hook decodes
   them into the bucket with each shard's ``Algorithm.decode_downlink``).
"""

from __future__ import annotations

import time

import torch

from .. import rng
from ..compressors.base import NonFiniteError
from ..feedback import FeedbackState
from .core import Algorithm, ServerState, WorkerState, state_from_tensors, state_tensors
from .faults import faults
from .policy import OK, PARAMETERS, UPDATE, describe, finding, worker_half
from .simulated import StepStats, nonfinite


def shard_sizes(d: int, n: int) -> list[int]:
    """The shards of a d-vector on n ranks (``torch.tensor_split`` boundaries)."""
    return [d // n + (j < d % n) for j in range(n)]


def shard_seed(seed: int, j: int) -> int:
    """The seed of shard j's payloads (shard 0 keeps the run's seed)."""
    return rng.fold(seed, j)


class ShardLayout:
    """The step of an :class:`Algorithm` on n contiguous shards of the vector."""

    def __init__(self, algorithm: Algorithm, shards: int):
        d = algorithm.dim
        if not 1 <= shards <= d:
            raise ValueError(f"cannot split a vector of {d} into {shards} shards")
        self.full = algorithm
        self.n = shards
        self.sizes = shard_sizes(d, shards)
        self.bounds = [sum(self.sizes[:j]) for j in range(shards + 1)]
        self.algos = [
            Algorithm(
                algorithm.method,
                s,
                seed=shard_seed(algorithm.seed, j),
                device=algorithm.device,
                **algorithm.options(),
            )
            for j, s in enumerate(self.sizes)
        ]
        self._probes: tuple[list, list] | None = None

    def probes(self) -> tuple[list, list]:
        """One uplink and one downlink payload per shard, of arbitrary values. A payload's
        header and sections are fixed by its codec, parameters and length (``decode``
        refuses any other), so these tell every payload's size and layout; cached. (A rule
        whose compressor changes with the step, ``dq``, is not for this.)"""
        if self._probes is None:
            up, down = [], []
            for a, s in zip(self.algos, self.sizes, strict=True):
                x = torch.linspace(-1.0, 1.0, s)
                up.append(a.up.encode(x))
                down.append(a.down.encode(x))
            self._probes = (up, down)
        return self._probes

    def payload_sizes(self) -> tuple[list[int], list[int]]:
        """Bytes of each shard's uplink and downlink payload (from :meth:`probes`)."""
        up, down = self.probes()
        return [p.nbytes for p in up], [p.nbytes for p in down]

    def split(self, v: torch.Tensor | None) -> list[torch.Tensor | None]:
        return [None] * self.n if v is None else list(v.split(self.sizes))

    @staticmethod
    def cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if parts[0] is None else torch.cat(parts)

    # --- 1. worker ----------------------------------------------------------------------
    def encode_uplink(
        self, t: int, worker: int, g: torch.Tensor, lr: float, state: WorkerState
    ) -> tuple[list[torch.Tensor], WorkerState]:
        """Worker ``worker``'s payloads, one per shard, and its new state."""
        out, errs = [], []
        for a, gj, ej in zip(
            self.algos, self.split(g), self.split(state.feedback.error), strict=True
        ):
            data, st = a.encode_uplink(t, worker, gj, lr, WorkerState(FeedbackState(ej)))
            out.append(data)
            errs.append(st.feedback.error)
        if errs[0] is not None:
            state = WorkerState(FeedbackState(torch.cat(errs)))
        return out, state

    def uplink(
        self,
        problem,
        seed: int,
        t: int,
        worker: int,
        x: torch.Tensor,
        lr: float,
        state: WorkerState,
    ) -> tuple[float, list[torch.Tensor], WorkerState, float, float]:
        """Worker ``worker``'s step on a problem: (loss, one payload per shard, new state,
        t_grad, t_enc)."""
        t0 = time.perf_counter()
        z = self.full.gradient_point(x, lr, state)
        loss, g = problem.gradient(z, problem.batch(seed, t, worker))
        t1 = time.perf_counter()
        out, state = self.encode_uplink(t, worker, g, lr, state)
        return loss, out, state, t1 - t0, time.perf_counter() - t1

    # --- 2. shard j's server ------------------------------------------------------------
    def aggregate(
        self, j: int, t: int, uplinks: list[torch.Tensor], lr: float, state: ServerState
    ) -> tuple[torch.Tensor, ServerState]:
        """Shard j's downlink payload from the n workers' payloads of shard j."""
        return self.algos[j].aggregate(t, uplinks, lr, state)

    # --- 3. every replica ---------------------------------------------------------------
    def apply(
        self, x: torch.Tensor, downs: list[torch.Tensor], lr: float, t: int | None = None
    ) -> torch.Tensor:
        return torch.cat(
            [
                a.apply(xj, dj, lr, t)
                for a, xj, dj in zip(self.algos, self.split(x), downs, strict=True)
            ]
        )

    # --- checkpoints and bits -----------------------------------------------------------
    def server_state_dict(self, states: list[ServerState]) -> dict:
        """The shards' server memories as one full-vector ServerState state_dict."""
        columns = zip(*(state_tensors(s) for s in states), strict=True)
        return state_from_tensors(ServerState(), [self.cat(list(c)) for c in columns]).state_dict()

    def server_states(self, sd: dict) -> list[ServerState]:
        """The full-vector ServerState of ``sd`` cut into the shards' states."""
        parts = [self.split(v) for v in state_tensors(ServerState.from_state_dict(sd))]
        return [state_from_tensors(ServerState(), [p[j] for p in parts]) for j in range(self.n)]

    @staticmethod
    def bits(lens: list[list[int]], down: list[int]) -> tuple[int, int]:
        """Bits that cross the network: lens[i][j] bytes from worker i for shard j."""
        n = len(down)
        up = sum(8 * lens[i][j] for i in range(n) for j in range(n) if i != j)
        return up, sum(8 * b * (n - 1) for b in down)


def check_state_dict(sd: dict, n: int, d: int) -> None:
    """Raise ValueError unless ``sd`` is an engine checkpoint for n workers and d
    coordinates."""
    if len(sd["workers"]) != n or sd["x"].shape != (d,):
        raise ValueError("checkpoint does not match this run (workers or model size differ)")
    vecs = [w["feedback"]["error"] for w in sd["workers"]]
    vecs += [sd["server"]["feedback"]["error"], sd["server"].get("momentum")]
    vecs += [sd["server"].get("second")]
    if any(v is not None and v.shape != (d,) for v in vecs):
        raise ValueError("checkpoint does not match this run (a memory has the wrong size)")


class ShardedSimulatedEngine:
    """The sharded layout with n workers in one process (the reference for the sharded
    torch.distributed engine and the DDP hook: same bytes, same trajectory, same bits)."""

    def __init__(self, problem, algorithm: Algorithm, workers: int, seed: int = 0):
        self.problem = problem
        self.algo = algorithm
        self.n = workers
        self.seed = seed
        self.layout = ShardLayout(algorithm, workers)
        self.x = problem.initial_point()
        self.workers = [WorkerState() for _ in range(workers)]
        self.servers = [ServerState() for _ in range(workers)]
        self.faults = faults(workers)  # the GRADZIP_TEST_FAULT hook

    def step(self, t: int, lr: float) -> StepStats:
        """The sharded step; non-finite values as in every engine (engines/policy.py)."""
        n, lay, policy = self.n, self.layout, self.algo.nonfinite
        tc = tz = 0.0
        ups, losses, workers, bad = [], [], [], []
        for i in range(n):
            loss, f, data, st, a, b = worker_half(
                self.algo, lay.encode_uplink, self.problem, self.seed, t, i, self.x, lr,
                self.workers[i], self.faults[i],
            )  # fmt: skip
            tc, tz = tc + a, tz + b
            if f[0] != OK:
                bad.append(describe(f, f"worker {i}", self.problem))
            ups.append(data or [torch.empty(0, dtype=torch.uint8)] * n)
            losses.append(loss)
            workers.append(st)
        lens = [[u.numel() for u in row] for row in ups]
        if bad:
            return nonfinite(t, bad, policy, *ShardLayout.bits(lens, [0] * n), tc, tz)
        t0 = time.perf_counter()
        downs, servers = [], []
        for j in range(n):
            try:
                down, sj = lay.aggregate(j, t, [u[j] for u in ups], lr, self.servers[j])
            except NonFiniteError:
                bad.append(describe([UPDATE, 0, 0, -1], f"shard {j}"))
                down, sj = torch.empty(0, dtype=torch.uint8), None
            downs.append(down)
            servers.append(sj)
        dlens = [d.numel() for d in downs]
        if bad:
            tz += time.perf_counter() - t0
            return nonfinite(t, bad, policy, *ShardLayout.bits(lens, dlens), tc, tz)
        x = lay.apply(self.x, downs, lr, t)
        tz += time.perf_counter() - t0
        f = finding(x, PARAMETERS)
        if f[0] != OK:  # every replica would find the same
            bad = [describe(f, "every replica", self.problem)]
            return nonfinite(t, bad, policy, *ShardLayout.bits(lens, dlens), tc, tz)
        self.x, self.workers, self.servers = x, workers, servers
        return StepStats(sum(losses) / n, *ShardLayout.bits(lens, dlens), tc, tz, 0.0)

    def state_dict(self) -> dict:
        return {
            "x": self.x.clone(),
            "workers": [w.state_dict() for w in self.workers],
            "server": self.layout.server_state_dict(self.servers),
        }

    def load_state_dict(self, sd: dict) -> None:
        check_state_dict(sd, self.n, self.x.numel())
        self.x = sd["x"].clone()
        self.workers = [WorkerState.from_state_dict(w) for w in sd["workers"]]
        self.servers = self.layout.server_states(sd["server"])
