"""Liveness of the torch.distributed engines: a timeout, and the rank that did not answer.

Every rank runs a :class:`Heartbeat`: a daemon thread that writes, every ``period``
seconds (``min(0.5, timeout / 8)``), ``"<beat> <step> <waiting> <phase>"`` under
``gradzip/hb/<rank>`` in the process group's store, and records when each other rank's
beat last moved. ``beat`` counts up while the process runs (a stopped or dead process
stops counting); ``step`` and ``phase`` are where the rank's main thread is (set by the
engines at every phase, a plain attribute write); ``waiting`` says whether it is blocked
on a message (1) or working (0).

Each wait of a step has a deadline, ``timeout`` seconds (the ``timeout`` config key;
workers ``timeout + SLACK``, so that rank 0 decides first). The rank that noticed names

- first, itself, if it stood still for ``0.75 timeout`` seconds lately (a pulse thread that
  only sleeps ticked that late: the process was stopped, paused or starved; woken, it
  would find every other rank silent, since its own record stood still too);
- when its deadline passed: the ranks whose heartbeat had not moved for ``0.75 timeout``
  seconds before (the record, not a new look: gloo closes connections when a wait times
  out, and peers that go down *after* that are not the cause);
- when a connection broke before the deadline: the ranks whose heartbeat does not move
  within ``settle`` seconds from then (a dead process);
- where the store is served by a rank's process (a local run: rank 0) and has not
  answered for as long, that rank;
- else the ranks alive but working, not waiting (a hung computation), with their phase;
- else, every rank alive and waiting, the ranks whose messages it was waiting for.

The error (:class:`RankTimeout`, a :class:`WorkerError`) says who, the step and the phase
of the rank that noticed and the last step and phase of the rank named. Exit codes are not
used (the engines add a spawned process's exit code where it has one).

Workers also run a watchdog (``Heartbeat.start(watch_server=True)``): a worker waits for
its next command without a deadline (rank 0 may evaluate for long), so a server whose
heartbeat, or whose store, stops for ``timeout`` seconds is named by the workers, which
then exit. The heartbeat thread is the only one that talks to the store (a store op can
block for good when the store's process is stopped); everything else reads its record.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta

from .._log import get as _logger

KEY = "gradzip/hb/"
SLACK = 8.0  # seconds a worker's deadline adds to the timeout (rank 0 decides first)


class WorkerError(RuntimeError):
    """A worker failed or was lost; the message names the worker, the step and the cause."""


class RankTimeout(WorkerError):
    """A rank did not answer within the timeout (or its connection broke): the message
    names it, the step and the phase; ``ranks`` holds the ranks named."""

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


class Beat:
    """One rank's heartbeat as read from the store."""

    def __init__(self, text: str):
        beat, step, waiting, phase = (text.split(" ", 3) + ["", "", ""])[:4]
        self.beat, self.step = int(beat), int(step)
        self.waiting, self.phase = waiting == "1", phase

    def where(self) -> str:
        return f"step {self.step}, {self.phase}" if self.step >= 0 else self.phase


class Heartbeat:
    """This rank's heartbeat thread and its record of the others' (see the module
    docstring). ``name(r)`` names rank r in messages (``"worker 2 (rank 3)"``)."""

    def __init__(self, store, rank: int, world: int, timeout: float, name=None, store_host=None):
        self.store, self.rank, self.world = store, rank, world
        self.store_host = store_host  # the rank whose process serves the store, if one does
        self.timeout = timeout
        self.period = min(0.5, timeout / 8)
        self.settle = max(3.0, 6 * self.period)
        # silent this long when a deadline passes: stopped before it (not a rank that went
        # down after, e.g. because gloo closed its connections on the timeout)
        self.silent = max(4 * self.period, 0.75 * timeout)
        self.name = name or (lambda r: f"rank {r}")
        self.step, self.phase, self.waiting = -1, "starting", False
        self.others = [r for r in range(world) if r != rank]
        self.seen: dict[int, tuple[Beat | None, float]] = {}  # r: (last beat, when it moved)
        self.store_ok = time.monotonic()  # the last answer of the store
        self._lock = threading.Lock()  # guards seen
        self._stop = threading.Event()
        self._pulse = time.monotonic()  # the pulse thread's last tick
        self._paused = (0.0, 0.0)  # (seconds, when it ended): this process's last stall
        self._beat = 0
        self._threads: list[threading.Thread] = []
        self._write()

    # --- this rank ----------------------------------------------------------------------
    def at(self, step: int, phase: str, waiting: bool = False) -> None:
        """Where the main thread is (read by the heartbeat thread)."""
        self.step, self.phase, self.waiting = step, phase, waiting

    def _write(self) -> None:
        self._beat += 1
        text = f"{self._beat} {self.step} {int(self.waiting)} {self.phase}"
        self.store.set(f"{KEY}{self.rank}", text)

    def start(self, watch_server: bool = False) -> Heartbeat:
        """Start beating; with ``watch_server`` (a worker), also watch rank 0's beat."""
        now = time.monotonic()
        self.seen = {r: (None, now) for r in self.others}
        self._pulse = now
        self._threads = [
            threading.Thread(target=self._run, name="gradzip-heartbeat", daemon=True),
            threading.Thread(target=self._tick, name="gradzip-pulse", daemon=True),
        ]
        if watch_server and self.rank != 0:
            self._threads.append(
                threading.Thread(target=self._watch, name="gradzip-watchdog", daemon=True)
            )
        for th in self._threads:
            th.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for th in self._threads:
            if th is not threading.current_thread():
                th.join(2 * self.period + 1)

    def _run(self) -> None:
        """Beat, and record the others' beats. A store op may block for good (a stopped
        store server): nothing else waits on this thread, whose silence shows as
        ``store_ok`` growing old."""
        while not self._stop.wait(self.period):
            try:
                self._write()
                beats, now = self.read(self.others), time.monotonic()
            except Exception:  # the store is unreachable (its host stopped?)
                continue
            self.store_ok = now
            with self._lock:
                for r, b in beats.items():
                    old, since = self.seen.get(r, (None, now))
                    moved = old is None or old.beat != b.beat
                    self.seen[r] = (b, now if moved else since)

    def _tick(self) -> None:
        """Notice this process's own stalls (SIGSTOP, a debugger, a starved host): a
        thread that only sleeps, so its ticks are late only when the process is."""
        while not self._stop.wait(self.period):
            now = time.monotonic()
            if now - self._pulse > self.period + self.silent:
                self._paused = (now - self._pulse - self.period, now)
            self._pulse = now

    def stalled(self) -> float:
        """Seconds this process stood still lately (0 if not): the pulse is late now, or
        it was, within the last ``timeout + settle`` seconds."""
        now = time.monotonic()
        late = now - self._pulse - self.period if self._threads else 0.0
        secs, when = self._paused
        recent = secs if now - when < self.timeout + self.settle else 0.0
        return max(late if late > self.silent else 0.0, recent)

    def _watch(self) -> None:
        """A worker's watchdog: the server's heartbeat, and the store, from the record."""
        while not self._stop.wait(self.period):
            now = time.monotonic()
            with self._lock:
                server, since = self.seen.get(0, (None, now))
            if now - self.store_ok > self.timeout:
                self._exit(f"the store has not answered for {now - self.store_ok:.0f} s"
                           + (" (rank 0 serves it)" if self.store_host == 0 else ""))  # fmt: skip
            elif server is not None and now - since > self.timeout:
                self._exit(f"its heartbeat stopped {now - since:.0f} s ago ({server.where()})")

    def _exit(self, why: str) -> None:
        """A worker whose server stopped answering: say so and end the process."""
        if self._stop.is_set():
            return
        _logger("engines").error(
            f"gradzip worker (rank {self.rank}): {self.name(0)} did not answer at step "
            f"{self.step} while this rank was {self.phase}: {why}"
        )  # a process with no handler configured: logging's last resort, on stderr
        sys.stderr.flush()  # os._exit skips the interpreter's flush
        os._exit(1)

    # --- the others -----------------------------------------------------------------------
    def read(self, ranks) -> dict[int, Beat]:
        """The beats in the store now (the heartbeat thread's; may block, see _run)."""
        keys = [f"{KEY}{r}" for r in ranks]
        present = [(r, k) for r, k in zip(ranks, keys, strict=True) if self.store.check([k])]
        values = self.store.multi_get([k for _, k in present]) if present else []
        return {r: Beat(bytes(v).decode()) for (r, _), v in zip(present, values, strict=True)}

    def _record(self) -> tuple[dict[int, Beat], dict[int, float]]:
        with self._lock:
            seen = dict(self.seen)
        return {r: b for r, (b, _) in seen.items() if b is not None}, {
            r: since for r, (_, since) in seen.items()
        }

    def _before(self) -> tuple[dict[int, Beat], list[int]]:
        """From the record: (the last beats, the ranks silent for ``silent`` seconds)."""
        beats, since = self._record()
        now = time.monotonic()
        return beats, [r for r in self.others if now - since.get(r, 0.0) > self.silent]

    def _after(self) -> tuple[dict[int, Beat], list[int]]:
        """From the record as it goes on: (the last beats, the ranks whose beat did not
        move within ``settle`` seconds from now)."""
        _, first = self._record()
        deadline = time.monotonic() + self.settle
        while True:
            beats, since = self._record()
            moved = [r for r in self.others if since.get(r, 0.0) > first.get(r, 0.0)]
            if len(moved) == len(self.others) or time.monotonic() > deadline:
                return beats, [r for r in self.others if r not in moved]
            time.sleep(self.period / 2)

    def blame(
        self, what: str, waited: list[int], expired: bool, cause: str = "", secs: float = 0.0
    ) -> RankTimeout:
        """The error naming the rank(s) that did not answer this rank, which was ``what``
        at ``self.step`` and waited for ``waited``: ``expired``, its deadline passed (the
        ranks silent since before, from the record); else a connection broke, ``cause``
        (the ranks whose heartbeat does not move now)."""
        where = f"at step {self.step}" if self.step >= 0 else "while starting"
        stalled = self.stalled()
        if stalled:  # its own record of the others stood still too: they are not to blame
            msg = (
                f"{self.name(self.rank)} itself stood still for {stalled:.0f} s {where} (it "
                f"was {what}; stopped (SIGSTOP), paused in a debugger or starved of CPU), "
                "longer than the timeout: the others gave up on it"
            )
            return RankTimeout(msg + (f" [{cause}]" if cause else ""), [self.rank])
        if not self._threads:
            beats, stopped = {}, []
        else:
            beats, stopped = self._before() if expired else self._after()
        busy = [r for r in self.others if r not in stopped and r in beats and not beats[r].waiting]
        mute = time.monotonic() - self.store_ok
        if self.store_host is not None and self.store_host != self.rank and mute > self.silent:
            named = [self.store_host]  # its process serves the store: it stopped with it
            why = [f"{self.name(self.store_host)}: the store it serves has not answered for "
                   f"{mute:.0f} s: stopped, dead or unreachable"]  # fmt: skip
        elif stopped:
            named = stopped
            why = [
                f"{self.name(r)}: heartbeat stopped"
                + (f" (last: {beats[r].where()})" if r in beats else "")
                + ": stopped, dead or unreachable"
                for r in stopped
            ]
        elif busy:
            named = busy
            why = [f"{self.name(r)}: alive, busy at {beats[r].where()}" for r in busy]
        else:
            named = sorted(waited)
            why = ["every rank is alive and waiting (a network problem?)"]
        who = ", ".join(self.name(r) for r in named)
        head = (
            f"{who} did not answer within {secs or self.timeout:g} s"
            if expired
            else f"lost contact with {who}"
        )
        msg = f"{head} {where} ({self.name(self.rank)} was {what}): {'; '.join(why)}"
        if cause:
            msg += f" [{cause}]"
        return RankTimeout(msg, named)


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def deadline_wait(works, seconds: float) -> tuple[int, BaseException] | None:
    """Wait for every work until ``seconds`` from now; None when all completed, else
    (index of the work that failed or timed out, its error)."""
    deadline = time.monotonic() + seconds
    for i, w in enumerate(works):
        left = max(deadline - time.monotonic(), 0.001)
        try:
            w.wait(timedelta(seconds=left))
        except RuntimeError as e:  # DistBackendError, gloo's timeouts and closed pairs
            return i, e
    return None
