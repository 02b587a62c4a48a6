"""Large CPU buffers that do not drown in page faults.

A fresh 64 MiB ``torch.empty`` costs about 40 ms of page faults here on first touch
(4 KiB pages), while numpy's allocator asks the kernel for transparent huge pages and the
same buffer costs about 6 ms: more than the whole compression budget of a 2^24 vector.
So large buffers come from numpy and are wrapped as tensors (no copy).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

_NP = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.uint8: np.uint8,
    torch.int64: np.int64,
    torch.int32: np.int32,
}
_LARGE = 1 << 20  # bytes


def empty(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 1-D CPU tensor of ``n`` uninitialized elements."""
    np_dtype = _NP.get(dtype)
    if np_dtype is None or n * np.dtype(np_dtype).itemsize < _LARGE:
        return torch.empty(n, dtype=dtype)
    return torch.from_numpy(np.empty(n, np_dtype))


_scratch = threading.local()


def scratch(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 1-D CPU work buffer of at least ``n`` elements, reused by later calls in this thread.

    For intermediate results that never leave the call (the rotated vector an encoder
    quantizes): reusing one buffer saves the page faults of fresh memory on every call
    (about 8 ms for 64 MiB). The contents are garbage and the next call overwrites them.
    """
    size = n * torch.empty(0, dtype=dtype).element_size()
    if size < _LARGE:
        return torch.empty(n, dtype=dtype)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < size:
        buf = _scratch.buf = empty(size, torch.uint8)
    return buf[:size].view(dtype)
