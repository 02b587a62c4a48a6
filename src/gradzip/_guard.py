"""The DDP hook's non-finite policy and liveness timeout (issue 17 items 3 and 5).

Non-finite values follow the engines' policy (:mod:`gradzip.engines.policy`), decided the
same way on every rank at the same bucket, without an extra message in a finite step:

- a rank whose bucket gradient is not finite (or whose compressor refuses it with the
  error memory added) sends the payloads of a zero vector instead, with its finding in a
  16-byte trailer (:func:`trailer`) that every message of the hook carries; a server
  appends the first bad finding of its shard (or its own: its downlink compressor refused
  the average) to its downlink, which every rank receives; every rank also checks the
  decoded average, the same bytes everywhere;
- a dense bucket (below ``min_numel``, the warm-up, identity) is allreduced as before and
  the result checked; only when it is not finite do the ranks all-gather their findings
  (taken before the allreduce) to name the rank.

So every rank learns the same first finding of a step at the same bucket. ``error``: every
rank raises :class:`~gradzip.engines.policy.NonFiniteStep` there (one message naming the
step, the rank, the parameter and the bucket); ``skip``: the step's later buckets skip
their exchanges, every bucket of the step returns zeros, the step's memory updates are
dropped (error feedback is committed only at the end of a finite step), and the state
counts it (``skipped_steps``); :meth:`gradzip.ddp.GradzipState.optimizer_step` then skips
the optimizer's step, as AMP's GradScaler does.

Timeout (``timeout`` seconds, None: off): the hook's collectives are issued asynchronously
and waited with a deadline (:func:`gradzip.engines.liveness.deadline_wait`), every rank
beats in the process group's store (:class:`gradzip.engines.liveness.Heartbeat`, on its own
connection), and an expired deadline raises
:class:`~gradzip.engines.liveness.RankTimeout` naming the rank that did not answer, the
step and the phase. A step that compiles kernels (the first step, a bucket's first
compressed step) waits at least :data:`STARTUP` seconds.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from .compressors.base import NonFiniteError
from .engines.core import SERVER, WorkerState
from .engines.liveness import Heartbeat, RankTimeout, deadline_wait
from .engines.policy import (
    GRADIENT,
    OK,
    UPDATE,
    NonFiniteStep,
    check_policy,
    describe,
    finding,
    refused_input,
)
from .feedback import FeedbackState

#: bytes of the finding every message of the hook carries: int32 kind + 8 rank, NaN, inf,
#: first bad coordinate of the bucket
TRAILER = 16
STARTUP = 180.0  # seconds a step that compiles kernels may take, whatever the timeout
OUTSIDE = "outside the hook (forward, backward, optimizer)"
_I32 = (1 << 31) - 1


def check(values: torch.Tensor, kind: int = GRADIENT) -> list[int]:
    """:func:`~gradzip.engines.policy.finding` of ``values``, after a one-pass sum (NaN
    or inf make it non-finite; a finite vector whose sum overflows is then found OK)."""
    if torch.isfinite(values.sum()):
        return [OK, 0, 0, -1]
    return finding(values, kind)


def trailer(f: list[int], rank: int) -> torch.Tensor:
    """A finding ``[kind, nan, inf, first]`` of ``rank`` as the 16 bytes of a message."""
    kind, nan, inf, first = (int(v) for v in f)
    v = [kind + 8 * rank, min(nan, _I32), min(inf, _I32), min(first, _I32)]
    return torch.tensor(v, dtype=torch.int32).view(torch.uint8)


def read_trailer(msg: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """(the message without its trailer, ``[kind, nan, inf, first, rank]``)."""
    head, tail = msg[:-TRAILER], msg[-TRAILER:].cpu().clone().view(torch.int32).tolist()
    return head, [tail[0] % 8, tail[1], tail[2], tail[3], tail[0] // 8]


def first_bad(found: list[list[int]]) -> list[int] | None:
    return next((f for f in found if f[0] != OK), None)


class Where:
    """A bucket's parameter names and sizes (in the order of its vector), for messages;
    what :func:`~gradzip.engines.policy.describe` reads as a problem's."""

    def __init__(self, names: list[str], sizes: list[int]):
        self._names, self._sizes = names, sizes

    def bucket(self) -> str:
        shown = ", ".join(self._names[:3]) + (", ..." if len(self._names) > 3 else "")
        return f"the bucket of {sum(self._sizes)} coordinates holding {shown}"


def names_of(state, bucket) -> Where:
    """A dense bucket's parameters as the state knows them (no naming: an unbound state
    names its parameters by the compressed buckets only, as before)."""
    names = []
    for k, p in enumerate(bucket.parameters()):
        i = state._index.get(id(p))
        names.append(state.names[i] if i is not None else f"<parameter {k} of the bucket>")
    return Where(names, [p.numel() for p in bucket.parameters()])


class Guard:
    """One state's policy, timeout and the current step's findings and deferred updates."""

    def __init__(self, policy: str, timeout: float | None):
        self.policy = check_policy(policy)
        if isinstance(timeout, timedelta):  # as init_process_group takes it
            timeout = timeout.total_seconds()
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout}")
        self.timeout = None if timeout is None else float(timeout)
        self.hb: Heartbeat | None = None
        self.skipped_steps = 0
        self.skipped_at = -1  # the last step skipped
        self.last_message: str | None = None  # the last non-finite step's message
        self._first: int | None = None  # the first step this guard ran (it compiles)
        self._long = -1  # a step that makes a new layout (compiles): waits STARTUP
        self._reset(None)

    def _reset(self, t) -> None:
        self._t, self._bad, self._commits, self._buffers = t, None, [], []

    # --- liveness -----------------------------------------------------------------------
    def start(self, group, rank: int, n: int) -> None:
        """Beat in the process group's store (a clone of it: the heartbeat's own
        connection), under keys of this group and restart attempt."""
        if self.timeout is None or self.hb is not None or n < 2:
            return
        try:
            store = dist.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError, ValueError):
            return  # no store: the deadline still holds, the rank is named by the wait
        try:
            store = store.clone()
            store.set_timeout(timedelta(seconds=min(self.timeout, 2.0)))
        except (AttributeError, RuntimeError):
            pass
        ranks = dist.get_process_group_ranks(group)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"gradzip/ddp/{attempt}/{ranks[0]}-{len(ranks)}", store)
        # the process that serves the store (tcp:// or env:// rendezvous: global rank 0)
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        host = None if agent or 0 not in ranks else ranks.index(0)
        self.hb = Heartbeat(store, rank, n, self.timeout, store_host=host).start()

    def stop(self) -> None:
        if self.hb is not None:
            self.hb.stop()
            self.hb = None

    def fresh(self, t: int) -> None:
        """A layout was made at step t: its first encode and decode compile."""
        self._long = t

    def wait(self, work, phase: str, t: int) -> None:
        """Wait for ``work`` (a collective issued with ``async_op`` when there is a
        timeout) until the deadline; else raise RankTimeout naming who did not answer."""
        if self.timeout is None:
            if work is not None:
                work.wait()
            return
        secs = self.timeout if t not in (self._first, self._long) else max(self.timeout, STARTUP)
        if self.hb is not None:
            self.hb.at(t, phase, True)
        t0 = time.perf_counter()
        try:
            got = deadline_wait([work], secs)
        finally:
            if self.hb is not None:
                self.hb.waiting = False
        if got is None:
            return
        _, e = got
        expired = time.perf_counter() - t0 >= secs - 0.05
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = f"waiting in the {phase} exchange"
        if self.hb is None:
            err = RankTimeout(f"lost contact while {what} at step {t}: {cause}", [])
        else:
            err = self.hb.blame(what, [], expired, cause, secs)
        raise RankTimeout(f"gradzip.ddp: {err}", err.ranks) from e

    def clock(self, totals: dict, t: int) -> _Clock:
        return _Clock(totals, self.hb, t)

    # --- a step's buckets ---------------------------------------------------------------
    def job(self, t: int, last: bool, buf: torch.Tensor, work):
        """The bucket's work under the policy: ``work()`` reduces the bucket into ``buf``
        and returns a message (its step is not finite) or None; skipped once the step
        is found non-finite."""

        def run() -> torch.Tensor:
            if self._t != t:
                self._reset(t)
                if self._first is None:
                    self._first = t
            self._buffers.append(buf)
            try:
                if self._bad is None:
                    if self.hb is not None:
                        self.hb.at(t, "encode")
                    self._bad = work()
                    if self._bad is not None and self.policy == "error":
                        self.last_message = self._bad
                        raise NonFiniteStep(self._bad, t)
                if last:
                    self._end(t)
            except BaseException:
                self._reset(None)
                raise
            return buf

        return run

    def commit(self, fn) -> None:
        """Run ``fn`` (a memory update) at the end of the step, if it is finite."""
        self._commits.append(fn)

    def _end(self, t: int) -> None:
        if self._bad is None:
            for fn in self._commits:
                fn()
        else:
            for b in self._buffers:
                b.zero_()
            self.skipped_steps += 1
            self.skipped_at = t
            self.last_message = self._bad
            warnings.warn(self._bad, RuntimeWarning, stacklevel=2)
        if self.hb is not None:
            self.hb.at(t + 1, OUTSIDE)
        self._reset(None)

    def message(self, t: int, f: list[int], who: str, where: Where) -> str:
        """The one message of a non-finite step, the same on every rank."""
        what = describe(f[:4], who, where)
        head = f"gradzip.ddp: non-finite values at step {t}: {what} ({where.bucket()})"
        if self.policy == "skip":
            return head + "; step skipped on every rank"
        return head + '; nonfinite="skip" would skip such steps (a smaller lr may help)'

    def verdict(self, t, where: Where, found: list[list[int]], decoded=None) -> str | None:
        """The bucket's message from its findings (each ``[kind, nan, inf, first, rank]``,
        in the order every rank sees them), else from the decoded average."""
        f = first_bad(found)
        if f is not None:
            return self.message(t, f, f"rank {f[4]}", where)
        if decoded is not None:
            f = check(decoded, UPDATE)
            if f[0] != OK:
                return self.message(t, f, "the decoded average (every rank)", where)
        return None


def dense(state, buf: torch.Tensor, where: Where, t: int) -> str | None:
    """A dense bucket: averaged by an allreduce, checked; only if the sum is not finite,
    all-gather the ranks' findings (taken before) to name the first bad rank."""
    g, n = state._guard, state.n
    ring = math.ceil(2 * (n - 1) * buf.numel() * buf.element_size() / n)  # counted as a ring
    for k, v in (("dense_sent", ring), ("dense_received", ring), ("dense_buckets", 1)):
        state._traffic[k] += v
    mine = check(buf.div_(n), GRADIENT)  # the average of the sums
    work = dist.all_reduce(buf, group=state.group, async_op=g.timeout is not None)
    g.wait(work, "allreduce", t)
    if check(buf, UPDATE)[0] == OK:
        return None
    mine = torch.tensor([*mine, state.rank], dtype=torch.int64)
    every = [torch.empty_like(mine) for _ in range(state.n)]
    work = dist.all_gather(every, mine, group=state.group, async_op=g.timeout is not None)
    g.wait(work, "allreduce", t)
    found = [e.tolist() for e in every]
    if first_bad(found) is not None:
        return g.verdict(t, where, found)
    f = finding(buf, UPDATE)
    return g.message(t, f, "the allreduced sum (every rank; no rank's gradient)", where)


def encode_up(state, lay, t: int, g: torch.Tensor, e):
    """(this rank's uplink payloads, its new worker state or None, its finding): the
    payloads of zeros, no new state, when g (or g plus the memory) is not finite."""
    f = check(g, GRADIENT)
    if f[0] == OK:
        try:
            ups, ws = lay.encode_uplink(t, state.rank, g, 1.0, WorkerState(FeedbackState(e)))
            return [u.reshape(-1) for u in ups], ws, f
        except NonFiniteError:  # g plus the memory overflowed
            f = refused_input()
    zero = WorkerState(FeedbackState(None))
    ups, _ = lay.encode_uplink(t, state.rank, torch.zeros_like(g), 1.0, zero)
    return [u.reshape(-1) for u in ups], None, f


class _Clock:
    """Adds the time since the last mark to ``totals[phase]``; tells the heartbeat the
    phase that follows."""

    NEXT = {"encode": "uplink", "uplink": "serve", "serve": "downlink", "downlink": "decode"}

    def __init__(self, totals: dict, hb: Heartbeat | None, t: int):
        self.totals, self.hb, self.t = totals, hb, t
        self.last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.totals[phase] += now - self.last
        self.last = now
        if self.hb is not None and phase in self.NEXT:
            self.hb.at(self.t, self.NEXT[phase])


def zero_down(lay, j: int, t: int, dev) -> torch.Tensor:
    """Shard j's downlink payload of zeros at step t (its server's average was refused)."""
    a = lay.algos[j]
    zero = torch.zeros(lay.bounds[j + 1] - lay.bounds[j], device=dev)
    return a.down.encode(zero, seed=a.seed, step=t, worker=SERVER).data
