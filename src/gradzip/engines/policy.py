"""What every engine does with non-finite values, and the thread count it runs torch with.

Non-finite values (``Algorithm.nonfinite``, the ``nonfinite`` config key), one policy for
the simulated, simulated-sharded, torchdist and torchdist-sharded engines:

A step is *non-finite* when, at step t,

1. a worker's loss or gradient holds NaN or inf, or its compressor refuses its input
   (the gradient plus its error memory; ``NonFiniteError``), found before anything is
   sent: worker i's own check;
2. a server's (a shard's) update is refused by the downlink compressor;
3. the update decoded by every replica leaves non-finite parameters (every replica
   computes the same bytes the same way, so every rank finds it, without a message).

The ranks that find it tell the others (a status in the reply or the exchanged sizes),
so every rank takes the same decision at the same step:

- ``error`` (the default): :class:`NonFiniteStep`, one message naming the step, the
  worker and its rank (or the shard), what was non-finite (how many NaN and inf) and the
  first coordinate with the parameter that holds it; raised on rank 0 (the run records
  it and stops: ``summary.json`` written, exit status 1) and, under torchrun, by every
  other rank too (its worker loop ends with it after rank 0's STOP);
- ``skip``: every rank drops the step's updates together (parameters, error memories,
  server momentum and moments: the state of step t - 1 is kept), as AMP's GradScaler does,
  and the step's :class:`StepStats` carries ``skipped`` (the same message); the run counts
  it (``skipped_steps``). What was already sent is still received and checked (so framed
  channels stay in step); bits count it.

Threads: torch's CPU kernels give results that depend on the thread count (a backward pass
at 1 and 2 threads differs at ~1e-7, which error feedback carries on), so every process of
a run pins it to the ``threads`` config key (:func:`pinned_threads`; 1 by default), restored
after the run: the torch.distributed engines equal the simulated ones whatever the
environment says, and gradzip never changes the count as a side effect.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch

from ..compressors.base import NonFiniteError

POLICIES = ("error", "skip")

# what a rank found (kinds travel as integers between ranks)
OK, GRADIENT, LOSS, INPUT, UPDATE, PARAMETERS = range(6)
_WHAT = {
    GRADIENT: "gradient",
    LOSS: "loss",
    INPUT: "compressor input (gradient plus error memory)",
    UPDATE: "server update",
    PARAMETERS: "parameters after the update",
}


class NonFiniteStep(NonFiniteError):
    """A step met NaN or inf under the ``error`` policy (see the module docstring); the
    message names the step, where (worker and rank, or shard) and the first coordinate."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"unknown non-finite policy {policy!r}; valid: {', '.join(POLICIES)}")
    return policy


def finding(values: torch.Tensor | None, kind: int, offset: int = 0) -> list[int]:
    """``[kind, NaN count, inf count, first bad coordinate + offset]`` of ``values``, or
    ``[OK, 0, 0, -1]`` when they are all finite (or None)."""
    if values is None:
        return [OK, 0, 0, -1]
    bad = ~torch.isfinite(values.reshape(-1))
    if not bool(bad.any()):
        return [OK, 0, 0, -1]
    nan = int(torch.isnan(values).sum())
    first = int(bad.nonzero()[0, 0]) + offset
    return [kind, nan, int(bad.sum()) - nan, first]


def worker_finding(loss: float, g: torch.Tensor) -> list[int]:
    """What worker's check 1 found in its loss and gradient."""
    f = finding(g, GRADIENT)
    if f[0] == OK and not math.isfinite(loss):
        return [LOSS, int(math.isnan(loss)), int(math.isinf(loss)), -1]
    return f


def refused_input() -> list[int]:
    """The finding of a compressor's NonFiniteError (its input is not at hand)."""
    return [INPUT, 0, 0, -1]


def parameter_at(problem, i: int) -> str:
    """``"coordinate i (parameter NAME)"`` where the problem names its parameters."""
    names, sizes = getattr(problem, "_names", None), getattr(problem, "_sizes", None)
    if i < 0:
        return ""
    if names and sizes:
        start = 0
        for name, size in zip(names, sizes, strict=True):
            if i < start + size:
                return f"coordinate {i} (parameter {name}[{i - start}])"
            start += size
    return f"coordinate {i}"


def describe(f: list[int], who: str, problem=None) -> str:
    """One finding in words: ``"worker 1 (rank 2): gradient has 3 NaN and 0 inf, the
    first at coordinate 17 (parameter 0.weight[17])"``."""
    kind, nan, inf, first = (int(v) for v in f)
    what = _WHAT.get(kind, "values")
    if kind == INPUT or (nan == inf == 0 and first < 0):  # found by a compressor's check
        return f"{who}: its {what} is not finite"
    if kind == LOSS:
        return f"{who}: loss is {'NaN' if nan else 'inf'}"
    at = parameter_at(problem, first)
    return f"{who}: {what} has {nan} NaN and {inf} inf" + (f", the first at {at}" if at else "")


def message(t: int, parts: list[str], policy: str) -> str:
    """The one message of a non-finite step, the same on every rank."""
    head = f"non-finite values at step {t}: " + "; ".join(parts)
    if policy == "skip":
        return head + " (step skipped)"
    return head + " (--nonfinite skip would skip such steps; a smaller --lr may help)"


@contextmanager
def pinned_threads(n: int | None):
    """torch's intra-op thread count set to ``n`` inside, restored after (None or 0: left
    as it is)."""
    if not n:
        yield
        return
    old = torch.get_num_threads()
    if old != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def worker_half(algo, encode, problem, seed: int, t: int, i: int, x, lr: float, state, fault):
    """Worker i's half of step t with check 1: ``(loss, finding, payload(s), new state,
    t_grad, t_enc)``; payload(s) and new state are None when the finding is not OK.
    ``encode`` is ``Algorithm.encode_uplink`` or ``ShardLayout.encode_uplink``; ``fault``
    a :class:`~gradzip.engines.faults.Fault` (its ``nan``/``inf`` kinds poison g)."""
    t0 = time.perf_counter()
    z = algo.gradient_point(x, lr, state)
    loss, g = problem.gradient(z, problem.batch(seed, t, i))
    g = fault.maybe_poison(t, g)
    t1 = time.perf_counter()
    f, data, new = worker_finding(loss, g), None, None
    if f[0] == OK:
        try:
            data, new = encode(t, i, g, lr, state)
        except NonFiniteError:  # the gradient plus the error memory overflowed
            f = refused_input()
    return loss, f, data, new, t1 - t0, time.perf_counter() - t1
