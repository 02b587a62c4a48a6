"""Run a serial, GIL-free numba kernel over ``[0, n)`` split across the cores.

numba's ``prange`` lowers loop bodies into gufuncs that LLVM vectorizes far worse than
the same loop in a plain function (measured here: 4-7x slower for the reductions and the
dither kernel). So kernels are plain ``@njit(nogil=True)`` functions of ``(start, stop)``
and this module hands pieces of the work to a small thread pool: :func:`run` in equal,
aligned pieces, :func:`run_pieces` in pieces pulled one after another (guided scheduling,
for the passes of the transform and of the fused one-bit codec), with per-worker buffers
from :func:`worker_buffers`.

:func:`launch_numba_threads` starts numba's own pool (used by the few ``parallel=True``
kernels) without the side effect numba's OpenMP layer has on torch: its launch calls
``omp_set_num_threads(NUMBA_NUM_THREADS)`` in the OpenMP runtime torch shares, which
changed ``torch.get_num_threads()`` (2 -> 1 with NUMBA_NUM_THREADS=1; 1 -> 2 with
OMP_NUM_THREADS=1, on 2 cores). The modules holding such kernels call it when imported.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import _alloc

_THREADS = max(1, min(int(os.environ.get("GRADZIP_THREADS", os.cpu_count() or 1)), 64))
_MIN_PIECE = 1 << 16  # below this, threads cost more than they save
_pool: ThreadPoolExecutor | None = None
#: :func:`run_pieces`: each piece takes ``1 / (SHARE * threads)`` of the work not yet taken
#: (guided scheduling: large pieces first, small ones at the end), and at least
#: ``1 / (MIN_PIECES * threads)`` of all of it.
SHARE = 2
MIN_PIECES = 32
#: Below this many elements :func:`run_pieces` runs on the calling thread alone: handing
#: pieces to the pool and waiting for them costs more than the second thread saves
#: (docs/perf.md).
POOLED_PIECES_FROM = 1 << 19
_buffers = threading.local()


_numba_launched = False


def launch_numba_threads() -> None:
    """Launch numba's thread pool now (once per process), keeping torch's thread count as
    it was: gradzip never changes ``torch.get_num_threads()`` as a side effect."""
    global _numba_launched
    if _numba_launched:
        return
    import numba
    import torch

    before = torch.get_num_threads()
    numba.get_num_threads()  # launches the pool (the threading layer is chosen here)
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)
    _numba_launched = True


def threads() -> int:
    return _THREADS


def ranges(n: int, align: int = 64) -> list[tuple[int, int]]:
    """Split [0, n) into at most ``threads()`` pieces whose starts are multiples of ``align``."""
    if n <= 0:
        return [(0, 0)]
    pieces = max(1, min(_THREADS, n // _MIN_PIECE))
    step = -(-n // pieces)
    step = -(-step // align) * align
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def thread_pool() -> ThreadPoolExecutor:
    """The shared pool (created on first use)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(_THREADS, thread_name_prefix="gradzip")
    return _pool


def run(kernel, n: int, *args, align: int = 64, parts=None) -> list:
    """``[kernel(*args, start, stop) for each piece]``, the pieces run concurrently.

    ``parts`` (``(start, stop)`` pairs) overrides the split (tests use it)."""
    parts = ranges(n, align) if parts is None else list(parts)
    if len(parts) == 1:
        return [kernel(*args, *parts[0])]
    futures = [thread_pool().submit(kernel, *args, a, b) for a, b in parts[1:]]
    first = kernel(*args, *parts[0])  # the calling thread does a share of the work
    return [first] + [f.result() for f in futures]


def run_pieces(n: int, unit: int, call: Callable[[int, int, int], object]) -> None:
    """``call(w, start, stop)`` over ``[0, n)`` in pieces of whole units of ``unit`` elements.

    The calling thread (``w = 0``) and up to ``threads() - 1`` threads of the shared pool
    (``w = 1, 2, ...``) pull the pieces in order until none is left, each a fixed share of
    the work left (see ``SHARE``): on a machine shared with other jobs, a thread that gets
    less of its core leaves its share to the others instead of holding up the whole pass,
    and the small last pieces leave little to wait for (against equal pieces: docs/perf.md).
    ``call`` runs a ``nogil`` numba kernel.
    """
    units = -(-n // unit)
    workers = min(threads(), units)
    if workers <= 1 or n < POOLED_PIECES_FROM:
        call(0, 0, n)
        return
    least = max(1, units // (MIN_PIECES * workers))
    taken = 0
    lock = threading.Lock()

    def work(w: int) -> None:
        nonlocal taken
        while True:
            with lock:
                start = taken
                taken = min(units, start + max(least, -(-(units - start) // (SHARE * workers))))
            if start == taken:
                return
            call(w, start * unit, min(n, taken * unit))

    futures = [thread_pool().submit(work, w) for w in range(1, workers)]
    try:
        work(0)
    finally:
        for f in futures:
            f.result()


def worker_buffers(name: str, n: int, dtype) -> list[np.ndarray]:
    """One buffer of ``n`` elements of ``dtype`` per worker of :func:`run_pieces` (``w``
    indexes them), aligned to a cache line (a buffer 16 bytes off, as ``np.empty`` gives,
    splits half its vectors across cache lines: docs/perf.md).

    Kept by the calling thread under ``name`` and made again only when the size, the dtype
    or the thread count changes: fresh memory would cost page faults on every call, and
    other calling threads get their own."""
    key = ((n, np.dtype(dtype).str), threads())
    held = getattr(_buffers, name, None)
    if held is None or held[0] != key:
        held = (key, [_alloc.aligned_numpy(n, dtype) for _ in range(threads())])
        setattr(_buffers, name, held)
    return held[1]
