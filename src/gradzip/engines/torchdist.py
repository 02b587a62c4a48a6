"""The torch.distributed engines: a parameter server, and a sharded server (DESIGN 3.4).

Both run exactly the step of :mod:`gradzip.engines.core`; they differ from the simulated
engine only in how the payload bytes move. What crosses the process group is 1-D ``uint8``
payloads, the ``int64`` lengths that frame them, a ``float64`` control tensor
``[command, t, lr]``, and ``float32`` vectors for checkpoints (parameters and memories).
No pickle, no object collectives.

Layouts (``cfg.engine``):

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

Bits: ``8 * len(payload)`` for every payload sent, counted from the tensors actually
sent; the parameter server's downlink counts once per receiving worker. In the sharded
layout the shard a rank keeps for itself crosses no network and is not counted: up, each
worker sends n-1 shard payloads; down, each shard goes to n-1 ranks. The framing (lengths,
control, status) is not counted, as in the simulated engine.

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
attached as a note); the other workers are told to stop. A worker that dies is seen at
once (gloo reports the closed connection); one that hangs, after the process group's
timeout (``GRADZIP_DIST_TIMEOUT`` seconds, default 180). Workers wait for commands
without that timeout, so long evaluations on the server are fine.
``GRADZIP_TEST_FAULT="rank=R,step=S,kind=corrupt|exit"`` makes rank R corrupt the
downlink it received at step S (a ``PayloadError`` when it decodes) or exit abruptly
before sending its uplink: a test hook for those paths.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from ..feedback import FeedbackState
from .core import Algorithm, ServerState, WorkerState
from .sharded import ShardedSimulatedEngine, ShardLayout, check_state_dict
from .simulated import StepStats

ENGINES = ("torchdist", "torchdist-sharded")  # multi-process engines
ALL = (*ENGINES, "simulated-sharded")  # every engine this module makes

STEP, GET_STATE, SET_STATE, STOP = 1, 2, 3, 4  # commands
OK, FAILED, ABORT = 0, 1, 2  # statuses
META = 5  # int64 reply: [status, length, a, b, c]
# message tags (one per kind of message between two ranks, so they can never be confused)
T_CTRL, T_META, T_DATA, T_ERR, T_SFB, T_MOM, T_MSG, T_SEC = range(8)

TIMEOUT_ENV = "GRADZIP_DIST_TIMEOUT"
FAULT_ENV = "GRADZIP_TEST_FAULT"
IDLE = timedelta(days=7)  # how long a worker waits for the next command
SHORT = timedelta(seconds=10)  # stopping, at the end
_MAX_MSG = 1 << 16


class WorkerError(RuntimeError):
    """A worker failed or was lost; the message names the worker, the step and the cause."""


# --- small helpers -------------------------------------------------------------------------


def _timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        s = float(raw) if raw else 180.0
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not s > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0, got {raw!r}")
    return timedelta(seconds=s)


def _bits_of(*values: float) -> list[int]:
    """Floats as the int64 views of their float64 bits (exact on the wire)."""
    return torch.tensor(values, dtype=torch.float64).view(torch.int64).tolist()


def _floats(t: torch.Tensor) -> list[float]:
    return t.clone().view(torch.float64).tolist()


def _text_tensor(text: str) -> torch.Tensor:
    b = text.encode("utf-8", "replace")[:_MAX_MSG] or b"?"
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def _tensor_text(t: torch.Tensor) -> str:
    return t.numpy().tobytes().decode("utf-8", "replace")


def _describe(e: BaseException, where: str) -> str:
    """First line: the summary; then the traceback."""
    return f"{where}: {type(e).__name__}: {e}\n" + "".join(traceback.format_exception(e))


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def worker_rank() -> int:
    """This process's rank under torchrun (0 elsewhere): ranks > 0 run :func:`serve`."""
    return int(os.environ["RANK"]) if launched_by_torchrun() else 0


def world_size(cfg) -> int:
    """Processes a run needs: the server and n workers, or n sharded ranks."""
    if cfg.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {cfg.workers}")
    return cfg.workers + 1 if cfg.engine == "torchdist" else cfg.workers


def _check_world(cfg) -> int:
    if cfg.engine not in ENGINES:
        raise ValueError(f"engine {cfg.engine!r} is not a torch.distributed engine: {ENGINES}")
    need = world_size(cfg)
    if launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if world != need:
            what = (
                f"one server and {cfg.workers} workers"
                if cfg.engine == "torchdist"
                else f"{cfg.workers} sharded ranks"
            )
            fix = world - 1 if cfg.engine == "torchdist" else world
            raise ValueError(
                f"torchrun started {world} processes, but --engine {cfg.engine} with "
                f"--workers {cfg.workers} needs {need} ({what}); pass --workers {fix}"
            )
    return need


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this process when the parent dies (no orphans even on SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


THREAD_VARS = ("OMP_NUM_THREADS", "GRADZIP_THREADS", "NUMBA_NUM_THREADS")


@contextmanager
def _worker_threads(world: int):
    """The environment spawned workers start with: like torchrun, which gives each of its
    processes OMP_NUM_THREADS=1, each gets its share of the cores for torch's and
    gradzip's thread pools (oversubscribed OpenMP threads spin: on 2 cores, 4 processes of
    2 threads made a step 10x slower). Variables the user set are kept."""
    share = str(max(1, (os.cpu_count() or 1) // world))
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    try:
        for k in THREAD_VARS:
            os.environ.setdefault(k, share)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Fault:
    """The GRADZIP_TEST_FAULT hook (see the module docstring)."""

    def __init__(self, rank: int):
        self.step, self.kind = -1, ""
        raw = os.environ.get(FAULT_ENV, "")
        if not raw:
            return
        try:
            spec = dict(kv.split("=", 1) for kv in raw.split(","))
            if int(spec["rank"]) == rank:
                self.step, self.kind = int(spec["step"]), spec["kind"]
        except (KeyError, ValueError):
            raise ValueError(f"{FAULT_ENV}: expected rank=R,step=S,kind=corrupt|exit") from None

    def maybe_exit(self, t: int) -> None:
        if self.kind == "exit" and t == self.step:
            os._exit(3)

    def maybe_corrupt(self, t: int, data: torch.Tensor) -> torch.Tensor:
        if self.kind == "corrupt" and t == self.step:
            data = data.clone()
            data[0] ^= 0xFF  # the magic: decode raises PayloadError
        return data


# --- the process group and the processes behind it ----------------------------------------


class _Cluster:
    """The process group as seen from one rank, the spawned processes (rank 0 of a local
    run), which ranks are still in their loop, and teardown."""

    def __init__(
        self,
        rank: int,
        world: int,
        *,
        sharded: bool,
        own_group: bool,
        group=None,
        procs=(),
        store=None,
    ):
        self.rank, self.world, self.sharded = rank, world, sharded
        self.own_group, self.group = own_group, group
        self.procs = list(procs)  # rank r is procs[r - 1]
        self.store = store
        self.live = set(range(1, world)) if rank == 0 else set()
        self.dirty = False  # inside a command: stopping politely is no longer possible
        self.closed = False
        self.t_comm = 0.0

    # who is who
    def worker_of(self, r: int) -> int:
        return r if self.sharded else r - 1

    def name(self, r: int) -> str:
        return f"worker {self.worker_of(r)} (rank {r})"

    @property
    def peers(self) -> list[int]:
        return list(range(1, self.world))

    # starting
    @classmethod
    def spawn(cls, cfg, world: int) -> _Cluster:
        from ..experiments.config import as_dict

        if dist.is_initialized():
            raise ValueError(
                "a default torch.distributed process group already exists in this process; "
                "run under torchrun (RANK/WORLD_SIZE set) or destroy it first"
            )
        timeout = _timeout()
        store = dist.TCPStore(
            "127.0.0.1", 0, world, is_master=True, timeout=timeout, wait_for_workers=False
        )
        cl = cls(0, world, sharded=cfg.engine != "torchdist", own_group=True, store=store)
        ctx = torch.multiprocessing.get_context("spawn")
        text = json.dumps(as_dict(cfg))
        try:
            with _worker_threads(world):
                for r in range(1, world):
                    p = ctx.Process(
                        target=_spawned_main,
                        args=(r, world, store.port, text, os.getpid()),
                        name=f"gradzip-rank-{r}",
                        daemon=True,
                    )
                    p.start()
                    cl.procs.append(p)
            cl._await_join(timeout)
            dist.init_process_group("gloo", store=store, rank=0, world_size=world, timeout=timeout)
        except BaseException:
            cl.dirty = True
            cl.close()
            raise
        return cl

    def _await_join(self, timeout: timedelta) -> None:
        keys = [f"gradzip/joined/{r}" for r in self.peers]
        deadline = time.monotonic() + timeout.total_seconds()
        while not self.store.check(keys):
            for r, p in zip(self.peers, self.procs, strict=True):
                if p.exitcode is not None:
                    raise WorkerError(
                        f"{self.name(r)} exited with code {p.exitcode} before joining the "
                        "process group (its error is printed above)"
                    )
            if time.monotonic() > deadline:
                raise WorkerError(f"workers did not start within {timeout.total_seconds():g} s")
            time.sleep(0.02)

    @classmethod
    def from_env(cls, cfg) -> _Cluster:
        world = _check_world(cfg)
        rank = int(os.environ["RANK"])
        own = not dist.is_initialized()
        if own:
            dist.init_process_group("gloo", timeout=_timeout())
            group = None
        elif dist.get_backend() == "gloo":
            group = None
        else:  # the caller's group runs NCCL, say: a gloo group over the same ranks
            group = dist.new_group(backend="gloo", timeout=_timeout())
        if dist.get_world_size(group) != world:
            raise ValueError(f"process group has {dist.get_world_size(group)} ranks, need {world}")
        return cls(rank, world, sharded=cfg.engine != "torchdist", own_group=own, group=group)

    # moving bytes (rank 0's side of a command)
    @contextmanager
    def command(self):
        self.dirty = True
        yield
        self.dirty = False

    def wait(self, works, what: str, timeout: timedelta | None = None) -> None:
        t0 = time.perf_counter()
        try:
            for w in works:
                w.wait() if timeout is None else w.wait(timeout)
        except RuntimeError as e:  # DistBackendError and gloo's errors
            raise self._lost(what, e) from e
        finally:
            self.t_comm += time.perf_counter() - t0

    def exchange(self, what: str, sends=(), recvs=(), timeout=None) -> None:
        """Post every (tensor, rank, tag) send and recv, then wait for all of them."""
        g = self.group
        works = [dist.irecv(t, r, group=g, tag=tag) for t, r, tag in recvs if t.numel()]
        works += [
            dist.isend(t.contiguous(), r, group=g, tag=tag) for t, r, tag in sends if t.numel()
        ]
        self.wait(works, what, timeout)

    def send_ctrl(self, cmd: int, t: int = 0, lr: float = 0.0, ranks=None, timeout=None):
        ctrl = torch.tensor([cmd, t, lr], dtype=torch.float64)
        ranks = sorted(self.live) if ranks is None else ranks
        self.exchange("sending a command", [(ctrl, r, T_CTRL) for r in ranks], timeout=timeout)

    def replies(
        self, what: str, ranks=None, timeout=None, collect: bool = False
    ) -> dict[int, torch.Tensor] | tuple[dict[int, torch.Tensor], dict[int, str]]:
        """Every rank's META reply. Failed ranks' messages are received and raised as
        WorkerError, or, with ``collect``, returned: (metas of the others, texts)."""
        ranks = sorted(self.live) if ranks is None else ranks
        metas = {r: torch.empty(META, dtype=torch.int64) for r in ranks}
        self.exchange(what, recvs=[(m, r, T_META) for r, m in metas.items()], timeout=timeout)
        failed = [r for r, m in metas.items() if int(m[0]) != OK]
        texts = {}
        if failed:
            msgs = {r: torch.empty(int(metas[r][1]), dtype=torch.uint8) for r in failed}
            self.exchange(what, recvs=[(m, r, T_MSG) for r, m in msgs.items()], timeout=timeout)
            self.live -= set(failed)  # a failed worker has left its loop
            texts = {r: _tensor_text(m) for r, m in msgs.items()}
            metas = {r: m for r, m in metas.items() if r not in texts}
        if collect:
            return metas, texts
        if texts:
            raise self.failure(texts)
        return metas

    def failure(self, texts: dict[int, str]) -> WorkerError:
        heads, notes = [], []
        for r, text in sorted(texts.items()):
            first, _, rest = text.partition("\n")
            heads.append(f"{self.name(r)} failed {first}")
            if rest:
                notes.append(f"--- on {self.name(r)} ---\n{rest.rstrip()}")
        err = WorkerError("; ".join(heads))
        for n in notes:
            err.add_note(n)
        return err

    def _lost(self, what: str, e: Exception) -> WorkerError:
        self.dirty = True
        dead = []
        deadline = time.monotonic() + 1.0
        while self.procs and time.monotonic() < deadline and not dead:
            dead = [
                (r, p.exitcode)
                for r, p in zip(self.peers, self.procs, strict=True)
                if p.exitcode is not None
            ]
            time.sleep(0.05)
        who = ", ".join(f"{self.name(r)} exited with code {c}" for r, c in dead)
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return WorkerError(
            f"lost contact with the workers while {what}: {who + '; ' if who else ''}{cause}"
        )

    # worker side
    def recv_ctrl(self) -> tuple[int, int, float]:
        ctrl = torch.empty(3, dtype=torch.float64)
        dist.irecv(ctrl, 0, group=self.group, tag=T_CTRL).wait(IDLE)
        c, t, lr = ctrl.tolist()
        return int(c), int(t), lr

    def recv(self, t: torch.Tensor, tag: int) -> torch.Tensor:
        if t.numel():
            dist.recv(t, 0, group=self.group, tag=tag)
        return t

    def reply(self, status: int = OK, a: int = 0, floats=(), body=()) -> None:
        meta = torch.tensor([status, a, *_bits_of(*floats), 0, 0, 0][:META], dtype=torch.int64)
        dist.send(meta, 0, group=self.group, tag=T_META)
        for t, tag in body:
            if t.numel():
                dist.send(t.contiguous(), 0, group=self.group, tag=tag)

    def reply_failed(self, text: str) -> None:
        msg = _text_tensor(text)
        self.reply(FAILED, msg.numel(), body=[(msg, T_MSG)])

    # stopping
    def close(self) -> None:
        """Stop the workers (politely if possible), reap spawned processes, drop the group."""
        if self.closed:
            return
        self.closed = True
        notes = []
        try:
            if self.rank == 0 and self.live and not self.dirty and dist.is_initialized():
                try:
                    self.send_ctrl(STOP, timeout=SHORT)
                    self.replies("stopping", timeout=SHORT)
                    self.live.clear()
                except WorkerError as e:  # e.g. an apply error reported at stop
                    notes.append(str(e))
                except Exception:
                    pass
        finally:
            self._reap(graceful=not self.live)
            if self.own_group and dist.is_initialized():
                try:
                    dist.destroy_process_group()
                except Exception:
                    pass
            self.store = None
        for n in notes:
            print(f"gradzip: while stopping the workers: {n}", file=sys.stderr)

    def _reap(self, graceful: bool) -> None:
        procs, self.procs = self.procs, []
        try:
            for p in procs:
                p.join(SHORT.total_seconds() if graceful else 0.5)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join()


# --- the parameter server (rank 0) ----------------------------------------------------------


class TorchDistEngine:
    """Parameter server on rank 0 of a gloo process group; workers on ranks 1..n.

    The interface of :class:`~gradzip.engines.simulated.SimulatedEngine`: ``step``, ``x``,
    ``state_dict``/``load_state_dict`` (which gather and scatter the workers' memories as
    float32 tensors), plus ``close``.
    """

    def __init__(self, problem, algorithm: Algorithm, cluster: _Cluster, seed: int = 0):
        self.problem = problem
        self.algo = algorithm
        self.cluster = cluster
        self.n = cluster.world - 1
        self.seed = seed
        self.x = problem.initial_point()
        self.server = ServerState()
        cl = cluster
        metas = cl.replies("starting the workers")
        for r, m in metas.items():
            if int(m[1]) != problem.dim:
                raise ValueError(
                    f"{cl.name(r)} built a model of size {int(m[1])}, "
                    f"the server one of size {problem.dim}"
                )
        # every replica starts from the server's point (not from its own initialization)
        self._scatter(self.x, [None] * self.n)

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
                down, self.server = self.algo.aggregate(t, list(ups.values()), lr, self.server)
            except Exception:
                self._abort(t)
                raise
            t2 = time.perf_counter()
            head = torch.tensor([OK, down.numel()], dtype=torch.int64)
            sends = [(head, r, T_META) for r in cl.peers] + [(down, r, T_DATA) for r in cl.peers]
            cl.exchange(f"sending the downlink at step {t}", sends)
        # bits from the bytes actually sent: one copy of the downlink per worker
        bits_down = sum(8 * x.numel() for x, _, tag in sends if tag == T_DATA)
        t3 = time.perf_counter()
        self.x = self.algo.apply(self.x, down, lr)
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
        cl, d = self.cluster, self.problem.dim
        with cl.command():
            cl.send_ctrl(GET_STATE)
            metas = cl.replies("collecting the workers' state")
            xs = {r: torch.empty(d) for r in cl.peers}
            errs = {r: torch.empty(d) for r in cl.peers if int(metas[r][1])}
            cl.exchange(
                "collecting the workers' state",
                recvs=[(x, r, T_DATA) for r, x in xs.items()]
                + [(e, r, T_ERR) for r, e in errs.items()],
            )
        for r, x in xs.items():
            if not torch.equal(x, self.x):
                raise WorkerError(
                    f"{cl.name(r)}'s parameters differ from the server's "
                    f"(max |diff| {float((x - self.x).abs().max()):.3g}): "
                    "the replicas drifted"
                )
        workers = [WorkerState(FeedbackState(errs.get(r))).state_dict() for r in cl.peers]
        return {"x": self.x.clone(), "workers": workers, "server": self.server.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        check_state_dict(sd, self.n, self.problem.dim)
        self.x = sd["x"].clone().float()
        self.server = ServerState.from_state_dict(sd["server"])
        self._scatter(self.x, [w["feedback"]["error"] for w in sd["workers"]])

    def _scatter(self, x: torch.Tensor, errs: list[torch.Tensor | None]) -> None:
        cl = self.cluster
        with cl.command():
            cl.send_ctrl(SET_STATE)
            sends = []
            for r, e in zip(cl.peers, errs, strict=True):
                head = torch.tensor([int(e is not None), 0, 0, 0], dtype=torch.int64)
                sends += [(head, r, T_META), (x, r, T_DATA)]
                if e is not None:
                    sends.append((e.float(), r, T_ERR))
            cl.exchange("sending the workers' state", sends)
            cl.replies("sending the workers' state")

    def close(self) -> None:
        self.cluster.close()


def _ps_worker(cfg, cl: _Cluster, problem, algo: Algorithm) -> tuple[int, int]:
    """A parameter-server worker's loop; returns (exit code, steps done)."""
    i, d, steps = cl.rank - 1, problem.dim, 0
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
                loss, g = problem.gradient(z, problem.batch(cfg.seed, t, i))
                t1 = time.perf_counter()
                data, state = algo.encode_uplink(t, i, g, lr, state)
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
                x = algo.apply(x, down, lr)
            except Exception as e:  # reported with the next command
                pending = _describe(e, f"at step {t}")
            steps += 1
        elif cmd == GET_STATE:
            e = state.feedback.error
            cl.reply(
                OK, int(e is not None), body=[(x, T_DATA)] + ([(e, T_ERR)] if e is not None else [])
            )
        elif cmd == SET_STATE:
            head = cl.recv(torch.empty(4, dtype=torch.int64), T_META)
            x = cl.recv(torch.empty(d), T_DATA)
            e = cl.recv(torch.empty(d), T_ERR) if int(head[0]) else None
            state = WorkerState(FeedbackState(e))
            cl.reply(OK)
        elif cmd == STOP:
            cl.reply(OK)
            return 0, steps
        else:
            cl.reply_failed(f"at a command: unknown command {cmd}")
            return 1, steps


# --- the sharded server (every rank) ---------------------------------------------------------


class _RunFailed(Exception):
    """Some rank failed inside a sharded step; every rank knows it and leaves."""

    def __init__(self, own: BaseException | None, texts: dict[int, str]):
        super().__init__("a rank failed")
        self.own, self.texts = own, texts


class _ShardedReplica:
    """One rank of the sharded layout: worker r and server of shard r."""

    def __init__(self, cfg, cl: _Cluster, problem, algo: Algorithm):
        self.cfg, self.cl, self.problem = cfg, cl, problem
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
                    self.problem, self.cfg.seed, t, r, self.x, lr, self.worker
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

    def __init__(self, cfg, problem, algorithm: Algorithm, cluster: _Cluster):
        self.problem = problem
        self.algo = algorithm
        self.cluster = cluster
        self.n = cluster.world
        self.rep = _ShardedReplica(cfg, cluster, problem, algorithm)
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


def _sharded_worker(cfg, cl: _Cluster, problem, algo: Algorithm) -> tuple[int, int]:
    rep, steps = _ShardedReplica(cfg, cl, problem, algo), 0
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


# --- entry points -----------------------------------------------------------------------------


def _build(cfg):
    from ..experiments.runner import make_algorithm, make_problem

    problem = make_problem(cfg)
    algo = make_algorithm(cfg, problem.dim)
    return problem, algo


def _worker_main(cfg, cl: _Cluster) -> tuple[int, int]:
    """A rank > 0: build the problem, say ready (or why not), run the loop."""
    try:
        problem, algo = _build(cfg)
    except Exception as e:
        cl.reply_failed(_describe(e, "while starting"))
        return 1, 0
    cl.reply(OK, problem.dim)
    loop = _sharded_worker if cl.sharded else _ps_worker
    try:
        return loop(cfg, cl, problem, algo)
    except RuntimeError as e:  # the server went away (it reports the run's own error)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"gradzip worker (rank {cl.rank}): lost the server: {first}", file=sys.stderr)
        return 1, 0


def _spawned_main(rank: int, world: int, port: int, cfg_json: str, parent: int) -> None:
    """Entry point of a spawned worker process."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    from ..experiments.config import RunConfig

    cfg = RunConfig().replace(**json.loads(cfg_json))
    timeout = _timeout()
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
    store.set(f"gradzip/joined/{rank}", "1")
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    cl = _Cluster(rank, world, sharded=cfg.engine != "torchdist", own_group=True)
    code = 1
    try:
        code, _ = _worker_main(cfg, cl)
    finally:
        try:
            dist.destroy_process_group()
        except Exception:
            pass
        # nothing else to clean up; skipping interpreter teardown saves 1-4 s per worker
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(cfg) -> dict:
    """A torchrun rank > 0: the worker loop until the server says stop."""
    cl = _Cluster.from_env(cfg)
    try:
        code, steps = _worker_main(cfg, cl)
    finally:
        if cl.own_group and dist.is_initialized():
            dist.destroy_process_group()
    if code:
        raise SystemExit(code)  # the server reports the cause
    return {"role": "worker", "rank": cl.rank, "engine": cfg.engine, "steps": steps}


def make_engine(cfg, problem, algorithm: Algorithm):
    """The engine ``cfg.engine`` names (one of :data:`ALL`), processes started and joined.

    The caller must ``close()`` it (``train`` does, in a ``finally``)."""
    if cfg.engine == "simulated-sharded":
        return ShardedSimulatedEngine(problem, algorithm, cfg.workers, seed=cfg.seed)
    world = _check_world(cfg)
    if cfg.engine == "torchdist-sharded":
        ShardLayout(algorithm, world)  # a clear error before any process starts
    cluster = _Cluster.from_env(cfg) if launched_by_torchrun() else _Cluster.spawn(cfg, world)
    try:
        if cfg.engine == "torchdist":
            return TorchDistEngine(problem, algorithm, cluster, seed=cfg.seed)
        return ShardedTorchDistEngine(cfg, problem, algorithm, cluster)
    except BaseException:
        cluster.close()
        raise
