"""The torch.distributed engines: a parameter server, and a sharded server (DESIGN 3.4).

Both run exactly the step of :mod:`gradzip.engines.core`; they differ from the simulated
engine only in how the payload bytes move. What crosses the process group is 1-D ``uint8``
payloads, the ``int64`` lengths that frame them, a ``float64`` control tensor
``[command, t, lr]``, and ``float32`` vectors for checkpoints (parameters and memories).
No pickle, no object collectives.

Layouts (``Job.engine``):

``torchdist``: a parameter server. Rank 0 is the server (the process running
``train()``, which holds this engine); ranks 1..n are workers 0..n-1. Each step the server
sends the control tensor; worker i evaluates its gradient on its shard, runs
``Algorithm.encode_uplink`` (seed from (t, i)) and sends ``int64 [status, length, loss,
t_compute, t_compress]`` (floats as their float64 bits) and then the payload bytes; the
server runs ``aggregate`` and sends ``int64 [status, length]`` and the downlink bytes to
every worker; every replica, the server's included, runs ``apply`` on the same bytes.

``torchdist-sharded``: no dedicated server. Every rank r is worker r and also serves
shard r, a contiguous 1/n of the vector (``torch.tensor_split`` boundaries). Worker i
compresses each shard j of its uplink vector separately and sends it to rank j (an
all-to-all with exact, variable sizes: lengths are all-gathered first); rank j decodes
and averages its shard, re-compresses it and sends it to every rank (an all-to-all used
as an all-gather, again exact sizes); every rank decodes all shards and applies the same
update. Per shard the step is the ``Algorithm``'s own (``ShardLayout``): shard j runs an
``Algorithm`` of dimension d_j whose seed is ``shard_seed(seed, j)``; the payload headers
therefore read (shard seed, t, worker) up and (shard seed, t, SERVER) down. The shard is
folded into the seed rather than the worker id so that ``Algorithm.aggregate`` (which
seeds its downlink from the fixed id SERVER) is reused unchanged, and so that shards never
share rotation signs or dither; shard 0 keeps the run's seed. Feedback rules and server
momentum are coordinate-wise, so memories are kept as full vectors (workers) and shards
(servers), and a checkpoint has the same layout as the simulated engine's.
``simulated-sharded`` (:class:`ShardedSimulatedEngine`) is the same layout in one process,
for checking the multi-process trajectory.

Framing (``Job.framing``, the ``framing`` config key): with ``"stream"`` (the default)
each channel (worker i's uplink of shard j; shard j's downlink, see
:mod:`gradzip.engines.links`) sends its static header once and then 8 bytes a message
(:mod:`gradzip.stream`); the receiver checks the step and the channel and hands the
decoders the sender's payload byte for byte, so the trajectory is the one of ``"payload"``
framing (every message a standalone payload), which the simulated engines count. A run
restarted from a checkpoint opens its channels again.

Bits: ``8 * len(message)`` for every message that carries a payload, counted from the
tensors actually sent; the parameter server's downlink counts once per receiving worker. In
the sharded layout the shard a rank keeps for itself crosses no network and is not counted:
up, each worker sends n-1 shard payloads; down, each shard goes to n-1 ranks. The rest of
the protocol (lengths, control, status) is not counted, as in the simulated engine.

Time: ``t_compute`` is the slowest worker's gradient time and ``t_compress`` the slowest
worker's encode time plus the serving rank's aggregate and apply (the workers run in
parallel); ``t_comm`` is the rest of the step's wall time on rank 0, i.e. the time spent in
send/recv beyond waiting for that work. So ``t_compute + t_compress + t_comm`` is the
step's wall time.

Launching. On one machine, ``gradzip train --engine torchdist --workers 4`` spawns the
workers (``torch.multiprocessing``, start method ``spawn``: numba's OpenMP layer is not
fork-safe) with gloo on a free localhost port (a ``TCPStore`` on port 0), and tears them
down at the end, on an exception and on Ctrl-C (workers ignore SIGINT and are stopped by
the server; they also die with it, PR_SET_PDEATHSIG). Under ``torchrun`` (RANK and
WORLD_SIZE in the environment) the same command runs on every rank: rank 0 runs
``train()`` as the server, the other ranks run the worker loop (:func:`serve`). The
parameter server needs WORLD_SIZE = workers + 1; the sharded server WORLD_SIZE = workers.
On two machines, 6 processes (one server and five workers), HOST being the first one's
address and the command run on both with ``--node-rank`` 0 and 1 (rank 0, the server,
writes the run folder on node 0)::

    torchrun --nnodes 2 --nproc-per-node 3 --node-rank 0 --master-addr HOST \\
        --master-port 29500 -m gradzip train --engine torchdist --workers 5 \\
        --problem mlp-digits --method fosgd --steps 300 --out results/run

(or ``--rdzv-backend c10d --rdzv-endpoint HOST:29500`` instead of the last four flags,
where any node may get rank 0). One machine: ``torchrun --standalone --nproc-per-node 4
-m gradzip train --engine torchdist --workers 3 ...``. Every rank builds the problem from
the same configuration (same seed, same shards), so data paths must exist on every node;
set ``GLOO_SOCKET_IFNAME`` where the default interface is not the one to use.

Failures. Every command is answered with a status; a worker's exception (say a
``PayloadError``) travels to rank 0 as utf-8 bytes and is raised there as
:class:`WorkerError` naming the worker, the step and the cause (the remote traceback is
attached as a note); the other workers are told to stop. Liveness
(:mod:`gradzip.engines.liveness`): every wait of a step has a deadline, ``Job.timeout``
seconds (the ``timeout`` config key; else ``GRADZIP_DIST_TIMEOUT``, else 180; starting
waits at least 180 s), and every rank beats in the store; a rank that dies or does not
answer in time is named by rank 0 from the heartbeats, with the step and the phase of both
(:class:`RankTimeout`), and at once where its connection closes. Workers wait for
commands without a deadline, so long evaluations on the server are fine; they watch the
server's heartbeat instead, and name it and exit when it stops for ``timeout`` seconds.
Spawned ranks are called ``gradzip-rank-R`` (``ps``). Non-finite values follow
``Algorithm.nonfinite`` (:mod:`gradzip.engines.policy`): every rank errs, or skips the
step, together. Every process pins torch's thread count to ``Job.threads``.
``GRADZIP_TEST_FAULT`` (:mod:`gradzip.engines.faults`) makes a rank corrupt a downlink,
exit, stop itself or put a NaN in its gradient at a given step: a test hook for those
paths.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from .._log import get as _logger
from .cluster import (
    FAULT_ENV,
    OK,
    STARTUP,
    TIMEOUT_ENV,
    RankTimeout,
    WorkerError,
    _Cluster,
    _describe,
    _die_with_parent,
    _group_timeout,
    _timeout,
    exit_now,
    launched_by_torchrun,
    name_process,
    worker_rank,
)
from .core import Algorithm
from .links import check_framing
from .policy import NonFiniteStep
from .ps import TorchDistEngine, _ps_worker
from .sharded import ShardedSimulatedEngine, ShardLayout
from .sharded_dist import ShardedTorchDistEngine, _sharded_worker

__all__ = [
    "ALL", "ENGINES", "FAULT_ENV", "TIMEOUT_ENV", "Job", "NonFiniteStep", "RankTimeout",
    "ShardedSimulatedEngine", "ShardedTorchDistEngine", "TorchDistEngine", "WorkerError",
    "launched_by_torchrun",
    "exit_now", "make_engine", "serve", "worker_rank", "world_size",
]  # fmt: skip

ENGINES = ("torchdist", "torchdist-sharded")  # multi-process engines
ALL = (*ENGINES, "simulated-sharded")  # every engine this module makes


@dataclass(frozen=True)
class Job:
    """What every rank of a run needs, and nothing of the experiment layer.

    ``build(config)`` makes a worker's ``(problem, algorithm)`` from ``config``, the run's
    configuration as text; it must be a module-level function, since spawned processes
    import it by name (``gradzip.experiments.runner.build_from_config``)."""

    engine: str  # one of ALL
    workers: int  # n
    seed: int  # the run's seed: batches and payload randomness
    config: str = ""  # handed to build
    build: Callable[[str], tuple] | None = None
    framing: str = "stream"  # stream | payload (see the module docstring)
    timeout: float | None = None  # liveness, seconds (None: GRADZIP_DIST_TIMEOUT or 180)
    threads: int = 1  # torch's thread count in every process (0: as the environment says)


def world_size(job: Job) -> int:
    """Processes a run needs: the server and n workers, or n sharded ranks."""
    if job.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {job.workers}")
    return job.workers + 1 if job.engine == "torchdist" else job.workers


def _check_world(job: Job) -> int:
    if job.engine not in ENGINES:
        raise ValueError(f"engine {job.engine!r} is not a torch.distributed engine: {ENGINES}")
    need = world_size(job)
    if launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if world != need:
            what = (
                f"one server and {job.workers} workers"
                if job.engine == "torchdist"
                else f"{job.workers} sharded ranks"
            )
            fix = world - 1 if job.engine == "torchdist" else world
            raise ValueError(
                f"torchrun started {world} processes, but --engine {job.engine} with "
                f"--workers {job.workers} needs {need} ({what}); pass --workers {fix}"
            )
    return need


# --- entry points -----------------------------------------------------------------------------


def _worker_main(job: Job, cl: _Cluster) -> tuple[int, int | str]:
    """A rank > 0: build the problem, say ready (or why not), run the loop. Returns (exit
    code, steps done), or (1, the message) after a non-finite step under ``error``."""
    try:
        problem, algo = job.build(job.config)
    except Exception as e:
        cl.reply_failed(_describe(e, "while starting"))
        return 1, 0
    cl.reply(OK, problem.dim)
    loop = _sharded_worker if cl.sharded else _ps_worker
    try:
        return loop(job.seed, cl, problem, algo, job.framing)
    except RuntimeError as e:  # the server went away (it reports the run's own error)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, RankTimeout):
            first = f"lost the server: {first}"
        _logger("engines").error(f"gradzip worker (rank {cl.rank}): {first}")
        return 1, 0
    finally:
        if cl.hb is not None:
            cl.hb.stop()


def _pin_threads(job: Job) -> None:
    """A worker process: torch's thread count, as every process of the run has it."""
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)


def _spawned_main(rank: int, world: int, port: int, job: Job, parent: int) -> None:
    """Entry point of a spawned worker process."""
    _die_with_parent(parent)
    name_process(rank)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    _pin_threads(job)
    timeout = _timeout(job.timeout)
    start = max(timeout, timedelta(seconds=STARTUP))
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=start)
    store.set(f"gradzip/joined/{rank}", "1")
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=_group_timeout(start)
    )
    cl = _Cluster(rank, world, sharded=job.engine != "torchdist", own_group=True, timeout=timeout)
    cl.beat(store, host=0)
    code = 1
    try:
        code, _ = _worker_main(job, cl)
    finally:
        if not cl.dirty:  # after a failure, gloo may hold a dead peer's collective
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        exit_now(code)  # nothing else to clean up; skipping teardown saves 1-4 s per worker


def serve(job: Job) -> dict:
    """A torchrun rank > 0: the worker loop until the server says stop."""
    _pin_threads(job)
    cl = _Cluster.from_env(job, _check_world(job))
    try:
        code, steps = _worker_main(job, cl)
    finally:
        if cl.own_group and dist.is_initialized() and not cl.dirty:
            dist.destroy_process_group()
    if isinstance(steps, str):  # every rank raises the same non-finite error
        raise NonFiniteStep(steps, -1)
    if code:
        raise SystemExit(code)  # the server reports the cause
    return {"role": "worker", "rank": cl.rank, "engine": job.engine, "steps": steps}


def make_engine(job: Job, problem, algorithm: Algorithm):
    """The engine ``job.engine`` names (one of :data:`ALL`), processes started and joined.

    The caller must ``close()`` it (``train`` does, in a ``finally``)."""
    if job.engine == "simulated-sharded":
        return ShardedSimulatedEngine(problem, algorithm, job.workers, seed=job.seed)
    _timeout(job.timeout)  # a clear error before any process starts
    world = _check_world(job)
    check_framing(job.framing)
    if job.engine == "torchdist-sharded":
        ShardLayout(algorithm, world)  # a clear error before any process starts
    if launched_by_torchrun():
        cluster = _Cluster.from_env(job, world)
    else:
        cluster = _Cluster.spawn(job, world, _spawned_main)
    try:
        if job.engine == "torchdist":
            return TorchDistEngine(problem, algorithm, cluster, job.seed, job.framing)
        return ShardedTorchDistEngine(problem, algorithm, cluster, job.seed, job.framing)
    except BaseException:
        cluster.close()
        raise
