"""Large CPU buffers that do not drown in page faults.

A fresh 64 MiB ``torch.empty`` costs about 40 ms of page faults here on first touch
(4 KiB pages), while numpy's allocator asks the kernel for transparent huge pages and the
same buffer costs about 6 ms; inside a multi-threaded kernel that writes it, measured up
to 12 ms. That is more than the whole compression budget of a 2^24 vector, so:

- Large buffers come from numpy (huge pages) and are wrapped as tensors (no copy).
- Like PyTorch's CUDA caching allocator, blocks whose tensors have all died are kept and
  handed out again: a training loop that decodes a same-sized gradient every step touches
  fresh memory only on its first steps. A block is reused only when nothing refers to it
  any more (every numpy view and every tensor made from it holds a reference to its
  owning array, which the pool checks by reference count), so a tensor you still hold is
  never overwritten. The pool holds at most ``GRADZIP_CACHE_MB`` MiB (default 512; 0
  turns it off) and at most ``MAX_PER_SIZE`` blocks of one size; :func:`empty_cache`
  returns what it holds.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict

import numpy as np
import torch

_LARGE = 1 << 20  # bytes
ALIGN = 64  # bytes: blocks start on a cache line (aligned vector loads and stores)
MAX_PER_SIZE = 8


def _cache_limit() -> int:
    raw = os.environ.get("GRADZIP_CACHE_MB", "512")
    try:
        mb = int(raw)
    except ValueError:
        raise ValueError(f"GRADZIP_CACHE_MB must be a whole number of MiB, got {raw!r}") from None
    return max(0, mb) << 20


_limit = _cache_limit()
_lock = threading.Lock()
# size in bytes -> owning arrays, least recently handed out first
_pool: OrderedDict[int, list[np.ndarray]] = OrderedDict()
_held = 0  # bytes the pool holds


def _owner_refs_when_free() -> int:
    """``sys.getrefcount`` of a pooled owner that nothing outside the pool refers to, seen
    from the loop in :func:`_take` (the list slot, the loop variable, the call's argument)."""
    probe = [np.empty(1, np.uint8)]
    for arr in probe:
        return sys.getrefcount(arr)
    raise AssertionError


_FREE_REFS = _owner_refs_when_free()


def _fresh(nbytes: int) -> np.ndarray:
    """A new owning uint8 array of ``nbytes + ALIGN`` bytes (room to align a view in it)."""
    return np.empty(nbytes + ALIGN, np.uint8)


def _aligned(owner: np.ndarray, nbytes: int) -> np.ndarray:
    skip = -owner.ctypes.data % ALIGN
    return owner[skip : skip + nbytes]


def _evict(need: int) -> None:
    """Drop free blocks (least recently used sizes first) until ``need`` more bytes fit."""
    global _held
    for size in list(_pool):
        if _held + need <= _limit:
            return
        blocks = _pool[size]
        keep = []
        for arr in blocks:
            if _held + need > _limit and sys.getrefcount(arr) == _FREE_REFS:
                _held -= arr.size
            else:
                keep.append(arr)
        if keep:
            _pool[size] = keep
        else:
            del _pool[size]


def _take(nbytes: int) -> np.ndarray:
    """An aligned uint8 block of ``nbytes``: a free pooled one, else a new one (pooled if
    the limits allow)."""
    global _held
    with _lock:
        blocks = _pool.get(nbytes)
        if blocks is not None:
            _pool.move_to_end(nbytes)
            for arr in blocks:
                if sys.getrefcount(arr) == _FREE_REFS:
                    return _aligned(arr, nbytes)
        owner = _fresh(nbytes)
        if owner.size <= _limit and (blocks is None or len(blocks) < MAX_PER_SIZE):
            _evict(owner.size)
            if _held + owner.size <= _limit:
                _pool.setdefault(nbytes, []).append(owner)
                _held += owner.size
        return _aligned(owner, nbytes)


def aligned_numpy(n: int, dtype) -> np.ndarray:
    """A new (not pooled) numpy array of ``n`` elements starting on an ``ALIGN`` boundary."""
    nbytes = n * np.dtype(dtype).itemsize
    return _aligned(_fresh(nbytes), nbytes).view(dtype)


def empty_cache() -> int:
    """Release the free blocks the pool holds (blocks still in use stay); returns the bytes
    released. Memory goes back to the system once nothing refers to it."""
    global _held
    with _lock:
        before = _held
        _evict(_limit + 1)  # more than any limit: everything free goes
        return before - _held


def cached_bytes() -> int:
    """Bytes the pool holds, free or in use."""
    return _held


def empty(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 1-D CPU tensor of ``n`` uninitialized elements (large ones from the pool)."""
    nbytes = n * dtype.itemsize
    if nbytes < _LARGE:
        return torch.empty(n, dtype=dtype)
    return torch.from_numpy(_take(nbytes)).view(dtype)


def empty_bytes(n: int) -> np.ndarray:
    """``n`` uninitialized bytes as a numpy array (large ones from the pool, like
    :func:`empty`), for code that fills them through numpy before any tensor exists."""
    return np.empty(n, np.uint8) if n < _LARGE else _take(n)


_scratch = threading.local()


def scratch(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 1-D CPU work buffer of at least ``n`` elements, reused by later calls in this thread.

    For intermediate results that never leave the call (the rotated vector an encoder
    quantizes): reusing one buffer saves the page faults of fresh memory on every call
    (about 8 ms for 64 MiB). The contents are garbage and the next call overwrites them.
    """
    size = n * dtype.itemsize
    if size < _LARGE:
        return torch.empty(n, dtype=dtype)
    return torch.from_numpy(_scratch_bytes(size)).view(dtype)


def scratch_array(n: int, dtype=np.float32) -> np.ndarray:
    """:func:`scratch` as a numpy array of exactly ``n`` elements (``ALIGN``-aligned), for
    kernels that take numpy: no tensor is made (each torch call costs tens of microseconds
    when a large pass has left the caches cold)."""
    size = n * np.dtype(dtype).itemsize
    if size < _LARGE:
        return aligned_numpy(n, dtype)
    return _scratch_bytes(size).view(dtype)


def _scratch_bytes(size: int) -> np.ndarray:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < size:
        buf = _scratch.buf = aligned_numpy(size, np.uint8)
    return buf[:size]
