"""The process group of the torch.distributed engines, as seen from one rank: messages
(commands, statuses, tags), the processes behind it (spawned locally or started by
torchrun), failures named by rank (:mod:`.liveness`: every wait has a deadline, and a rank
that does not answer is named from the heartbeats), and teardown. See
:mod:`gradzip.engines.torchdist`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from .._log import get as _logger
from .faults import FAULT_ENV, Fault
from .liveness import SLACK, Heartbeat, RankTimeout, WorkerError, deadline_wait

STEP, GET_STATE, SET_STATE, STOP = 1, 2, 3, 4  # commands
OK, FAILED, ABORT, NONFINITE = 0, 1, 2, 3  # statuses
META = 5  # int64 reply: [status, length, a, b, c]
# message tags (one per kind of message between two ranks, so they can never be confused)
T_CTRL, T_META, T_DATA, T_MSG, T_LENS, T_STATE = range(6)

TIMEOUT_ENV = "GRADZIP_DIST_TIMEOUT"
IDLE = timedelta(days=7)  # how long a worker waits for the next command
SHORT = timedelta(seconds=10)  # stopping, at the end
STARTUP = 180.0  # seconds starting may take at least (imports, data), whatever the timeout
_MAX_MSG = 1 << 16

__all__ = ["FAULT_ENV", "Fault", "RankTimeout", "WorkerError"]  # from .faults, .liveness


# --- small helpers -------------------------------------------------------------------------


def _timeout(seconds: float | None = None) -> timedelta:
    """The liveness timeout: ``seconds`` (the ``timeout`` config key), else
    GRADZIP_DIST_TIMEOUT, else 180 s."""
    if seconds is not None:
        if not seconds > 0:
            raise ValueError(f"the timeout must be > 0 seconds, got {seconds!r}")
        return timedelta(seconds=seconds)
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        s = float(raw) if raw else 180.0
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not s > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0, got {raw!r}")
    return timedelta(seconds=s)


def _group_timeout(timeout: timedelta) -> timedelta:
    """gloo's own timeout: later than every deadline of ours (which name the rank), early
    enough that a group torn down after a failure is not held for long."""
    return timeout + timedelta(seconds=2 * SLACK)


def name_process(rank: int) -> None:
    """Linux: call this process ``gradzip-rank-R`` (``ps``, ``/proc/PID/comm``)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").prctl(15, f"gradzip-rank-{rank}".encode()[:15])  # NAME
        except (OSError, AttributeError):
            pass


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


def state_message(values: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Optional float32 tensors as two messages: int64 lengths (-1 for None) and their
    concatenation (checkpoint state between ranks; see core.state_tensors)."""
    lens = torch.tensor([-1 if v is None else v.numel() for v in values], dtype=torch.int64)
    present = [v.reshape(-1).float() for v in values if v is not None]
    return lens, torch.cat(present) if present else torch.empty(0)


def state_values(lens: torch.Tensor, flat: torch.Tensor) -> list[torch.Tensor | None]:
    """The inverse of :func:`state_message`."""
    out, off = [], 0
    for n in lens.tolist():
        out.append(None if n < 0 else flat[off : off + n].clone())
        off += max(n, 0)
    return out


def _state_size(lens: torch.Tensor) -> int:
    return int(lens.clamp(min=0).sum())


def _describe(e: BaseException, where: str) -> str:
    """First line: the summary; then the traceback."""
    return f"{where}: {type(e).__name__}: {e}\n" + "".join(traceback.format_exception(e))


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def worker_rank() -> int:
    """This process's rank under torchrun (0 elsewhere): ranks > 0 run :func:`serve`."""
    return int(os.environ["RANK"]) if launched_by_torchrun() else 0


def exit_now(code: int) -> None:
    """End this process after flushing stdout and stderr, without interpreter finalization:
    where gloo's threads outlive the process group, finalizing can abort a finished process
    (gradzip.ddp.shutdown), and a spawned worker has nothing left to clean up."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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


# --- the process group and the processes behind it ----------------------------------------


class _Cluster:
    """The process group as seen from one rank, the spawned processes (rank 0 of a local
    run), which ranks are still in their loop, its heartbeat, and teardown."""

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
        timeout: timedelta | None = None,
    ):
        self.rank, self.world, self.sharded = rank, world, sharded
        self.own_group, self.group = own_group, group
        self.procs = list(procs)  # rank r is procs[r - 1]
        self.store = store
        self.live = set(range(1, world)) if rank == 0 else set()
        self.dirty = False  # inside a command: stopping politely is no longer possible
        self.closed = False
        self.t_comm = 0.0
        self.timeout = (timeout or _timeout()).total_seconds()
        # rank 0 decides first; a worker's deadlines leave it the time to
        self.deadline = self.timeout + (SLACK if rank else 0.0)
        self.step = -1
        self.steps = 0  # steps begun: the first one may compile kernels, it waits longer
        self.hb: Heartbeat | None = None

    # who is who
    def worker_of(self, r: int) -> int:
        return r if self.sharded else r - 1

    def name(self, r: int) -> str:
        if r == 0 and not self.sharded:
            return "the server (rank 0)"
        return f"worker {self.worker_of(r)} (rank {r})"

    @property
    def peers(self) -> list[int]:
        return list(range(1, self.world))

    def beat(self, store, host: int | None = None) -> None:
        """Start this rank's heartbeat in ``store``, served by rank ``host``'s process where
        one does (a local run: rank 0); see :mod:`.liveness`."""
        if store is None:
            return
        try:
            store = store.clone()  # the heartbeat thread's own connection
            store.set_timeout(timedelta(seconds=min(self.timeout, 2.0)))
        except (AttributeError, RuntimeError):
            pass
        self.hb = Heartbeat(store, self.rank, self.world, self.timeout, self.name, host)
        self.hb.start(watch_server=self.rank != 0)

    def at(self, t: int, phase: str, waiting: bool = False) -> None:
        """Where this rank is (its heartbeat says it)."""
        self.steps += t != self.step
        self.step = t
        if self.hb is not None:
            self.hb.at(t, phase, waiting)

    # starting
    @classmethod
    def spawn(cls, job, world: int, target: Callable) -> _Cluster:
        """Rank 0 of a local run: start ranks 1..world-1 as processes running
        ``target(rank, world, port, job, parent_pid)`` and join them."""
        if dist.is_initialized():
            raise ValueError(
                "a default torch.distributed process group already exists in this process; "
                "run under torchrun (RANK/WORLD_SIZE set) or destroy it first"
            )
        timeout = _timeout(job.timeout)
        start = max(timeout, timedelta(seconds=STARTUP))
        store = dist.TCPStore(
            "127.0.0.1", 0, world, is_master=True, timeout=start, wait_for_workers=False
        )
        cl = cls(
            0, world, sharded=job.engine != "torchdist", own_group=True, store=store,
            timeout=timeout,
        )  # fmt: skip
        ctx = torch.multiprocessing.get_context("spawn")
        try:
            with _worker_threads(world):
                for r in range(1, world):
                    p = ctx.Process(
                        target=target,
                        args=(r, world, store.port, job, os.getpid()),
                        name=f"gradzip-rank-{r}",
                        daemon=True,
                    )
                    p.start()
                    cl.procs.append(p)
            cl._await_join(start)
            dist.init_process_group(
                "gloo", store=store, rank=0, world_size=world, timeout=_group_timeout(start)
            )
            cl.beat(store, host=0)
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
    def from_env(cls, job, world: int) -> _Cluster:
        """A rank started by torchrun (RANK, WORLD_SIZE and the rendezvous in the
        environment), in the caller's process group if there is one."""
        rank = int(os.environ["RANK"])
        timeout = _timeout(job.timeout)
        pg_timeout = _group_timeout(max(timeout, timedelta(seconds=STARTUP)))
        own = not dist.is_initialized()
        if own:
            dist.init_process_group("gloo", timeout=pg_timeout)
            group = None
        elif dist.get_backend() == "gloo":
            group = None
        else:  # the caller's group runs NCCL, say: a gloo group over the same ranks
            group = dist.new_group(backend="gloo", timeout=pg_timeout)
        if dist.get_world_size(group) != world:
            raise ValueError(f"process group has {dist.get_world_size(group)} ranks, need {world}")
        cl = cls(
            rank, world, sharded=job.engine != "torchdist", own_group=own, group=group,
            timeout=timeout,
        )  # fmt: skip
        name_process(rank)
        try:
            store = dist.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError, ValueError):
            store = None  # no heartbeats: a silent rank is then named by its messages only
        cl.beat(store)
        return cl

    # moving bytes, with a deadline
    @contextmanager
    def command(self):
        self.dirty = True
        yield
        self.dirty = False

    def wait(self, works, what: str, timeout: timedelta | None = None, peers=None) -> None:
        """Wait for ``works`` until this rank's deadline (``timeout`` where given);
        ``peers[i]``: the rank work i waits on (None: a collective). A work that fails
        or does not complete in time raises :class:`RankTimeout` naming who did not
        answer (:meth:`Heartbeat.blame`)."""
        secs = self.deadline if timeout is None else timeout.total_seconds()
        if self.steps <= 1 and timeout is None:  # starting, or its first step (compiles)
            secs = max(secs, STARTUP)
        if self.hb is not None:
            self.hb.at(self.step, what, True)
        t0 = time.perf_counter()
        try:
            got = deadline_wait(works, secs)
        finally:
            self.t_comm += time.perf_counter() - t0
            if self.hb is not None:
                self.hb.waiting = False
        if got is not None:
            i, e = got
            expired = time.perf_counter() - t0 >= secs - 0.05
            waited = [peers[i]] if peers and peers[i] is not None else []
            raise self._lost(what, e, expired, waited, secs) from e

    def exchange(self, what: str, sends=(), recvs=(), timeout=None) -> None:
        """Post every (tensor, rank, tag) send and recv, then wait for all of them."""
        g = self.group
        recvs = [(t, r, tag) for t, r, tag in recvs if t.numel()]
        sends = [(t, r, tag) for t, r, tag in sends if t.numel()]
        works = [dist.irecv(t, r, group=g, tag=tag) for t, r, tag in recvs]
        works += [dist.isend(t.contiguous(), r, group=g, tag=tag) for t, r, tag in sends]
        self.wait(works, what, timeout, peers=[r for _, r, _ in recvs + sends])

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
        failed = [r for r, m in metas.items() if int(m[0]) == FAILED]
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

    def _lost(
        self, what: str, e: Exception, expired: bool, waited: list[int], secs: float = 0.0
    ) -> WorkerError:
        self.dirty = True
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if self.hb is None:
            return RankTimeout(f"lost contact while {what} at step {self.step}: {cause}", waited)
        err = self.hb.blame(what, waited, expired, cause, secs)
        # a spawned process that exited says so (the heartbeats named it already)
        codes = [
            f"{self.name(r)} exited with code {p.exitcode}"
            for r, p in zip(self.peers, self.procs, strict=False)
            if r in err.ranks and p.exitcode is not None
        ]
        if codes:
            err = RankTimeout(f"{err}; {', '.join(codes)}", err.ranks)
        return err

    # worker side
    def recv_ctrl(self) -> tuple[int, int, float]:
        """The next command, without a deadline (the server may evaluate for long; the
        heartbeat thread watches that the server is alive)."""
        ctrl = torch.empty(3, dtype=torch.float64)
        self.at(self.step, "waiting for a command", True)
        dist.irecv(ctrl, 0, group=self.group, tag=T_CTRL).wait(IDLE)
        c, t, lr = ctrl.tolist()
        return int(c), int(t), lr

    def recv(self, t: torch.Tensor, tag: int, what: str = "receiving from the server"):
        self.exchange(what, recvs=[(t, 0, tag)])
        return t

    def reply(self, status: int = OK, a: int = 0, floats=(), body=(), what: str = "replying"):
        meta = torch.tensor([status, a, *_bits_of(*floats), 0, 0, 0][:META], dtype=torch.int64)
        self.exchange(what, [(meta, 0, T_META), *((t, 0, tag) for t, tag in body)])

    def await_started(self, dim: int, who: str) -> None:
        """Rank 0: every worker's start-up reply, which carries the size of its model."""
        start = timedelta(seconds=max(self.timeout, STARTUP))
        for r, m in self.replies("starting the workers", timeout=start).items():
            if int(m[1]) != dim:
                raise ValueError(
                    f"{self.name(r)} built a model of size {int(m[1])}, {who} one of size {dim}"
                )

    # state (checkpoints): lists of optional float32 tensors of a known count
    def send_state(self, values: list[torch.Tensor | None]) -> None:
        """A rank > 0: its state to rank 0 (after its reply)."""
        lens, flat = state_message(values)
        self.exchange("sending its state", [(lens, 0, T_LENS), (flat, 0, T_STATE)])

    def recv_state(self, count: int) -> list[torch.Tensor | None]:
        """A rank > 0: the state rank 0 sends it."""
        lens = self.recv(torch.empty(count, dtype=torch.int64), T_LENS, "receiving its state")
        flat = self.recv(torch.empty(_state_size(lens)), T_STATE, "receiving its state")
        return state_values(lens, flat)

    def gather_states(self, what: str, count: int) -> dict[int, list[torch.Tensor | None]]:
        """Rank 0: every peer's state (``count`` values each)."""
        lens = {r: torch.empty(count, dtype=torch.int64) for r in self.peers}
        self.exchange(what, recvs=[(v, r, T_LENS) for r, v in lens.items()])
        flats = {r: torch.empty(_state_size(v)) for r, v in lens.items()}
        self.exchange(what, recvs=[(v, r, T_STATE) for r, v in flats.items()])
        return {r: state_values(lens[r], flats[r]) for r in self.peers}

    def state_sends(self, states: dict[int, list[torch.Tensor | None]]) -> list[tuple]:
        """Rank 0: the (tensor, rank, tag) sends of each peer's state, for exchange()."""
        sends = []
        for r, values in states.items():
            lens, flat = state_message(values)
            sends += [(lens, r, T_LENS), (flat, r, T_STATE)]
        return sends

    def leave(self, cmd: int) -> int:
        """A worker's loop ends on ``cmd``: STOP is acknowledged (exit code 0), anything else
        refused as an unknown command (1)."""
        if cmd == STOP:
            self.reply(OK)
            return 0
        self.reply_failed(f"at a command: unknown command {cmd}")
        return 1

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
            if self.hb is not None:
                self.hb.stop()
            self._reap(graceful=not self.live)
            if self.own_group and dist.is_initialized():
                try:
                    dist.destroy_process_group()
                except Exception:
                    pass
            self.store = None
        for n in notes:
            _logger("engines").warning(f"gradzip: while stopping the workers: {n}")

    def _reap(self, graceful: bool) -> None:
        procs, self.procs = self.procs, []
        try:
            for p in procs:
                p.join(SHORT.total_seconds() if graceful else 0.5)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    try:  # a stopped process (SIGSTOP) gets the SIGTERM once continued
                        os.kill(p.pid, signal.SIGCONT)
                    except OSError:
                        pass
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join()
