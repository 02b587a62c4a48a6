"""numba twin of :mod:`gradzip.rng`: the same streams, bit for bit, for use inside kernels."""

from __future__ import annotations

import numba
import numpy as np

from ..rng import MASK32

U32 = np.uint32
_LB1 = U32(0x7FEB352D)
_LB2 = U32(0x846CA68B)
_SCALE = np.float32(2.0**-23)
_SCALE16 = np.float32(2.0**-16)
_LOW16 = U32(0xFFFF)

# All arithmetic is in uint32 (each result cast back), so LLVM vectorizes it with 32-bit
# lanes (vpmulld): with 64-bit lanes the multiplies are emulated and 3x slower.


@numba.njit(inline="always", cache=True)
def _lowbias32(x):
    x = U32(x ^ (x >> U32(16)))
    x = U32(x * _LB1)
    x = U32(x ^ (x >> U32(15)))
    x = U32(x * _LB2)
    return U32(x ^ (x >> U32(16)))


@numba.njit(inline="always", cache=True)
def hash32(i, k0, k1):
    """``hash32(i, key)`` with ``k0, k1`` the key's 32-bit halves (uint32); i < 2**32."""
    return _lowbias32(U32(_lowbias32(U32(U32(i) + k0)) ^ k1))


@numba.njit(inline="always", cache=True)
def symmetric_uniform_at(i, k0, k1):
    """The ``i``-th value of :func:`gradzip.rng.symmetric_uniform`."""
    h = hash32(i, k0, k1)
    return np.float32(U32(U32(h >> U32(9)) * U32(2) + U32(1))) * _SCALE - np.float32(1.0)


@numba.njit(inline="always", cache=True)
def dither16_of(t):
    """``(2 t + 1) 2**-16 - 1`` for a 16-bit ``t`` (uint32): one value of ``dither16``."""
    return np.float32(U32(U32(t) * U32(2) + U32(1))) * _SCALE16 - np.float32(1.0)


@numba.njit(inline="always", cache=True)
def dither16_group(g, k0, k1, u, j0):
    """``u[j0 : j0 + 32]`` <- the 32 values of group ``g`` of :func:`gradzip.rng.dither16`.

    The 16 hashes are computed once and split: low halves to the first 16 elements, high
    halves to the next 16 (a loop LLVM vectorizes with no shuffles).
    """
    c = U32(U32(g) * U32(16))
    for j in range(16):
        h = hash32(U32(c + U32(j)), k0, k1)
        u[j0 + j] = dither16_of(U32(h & _LOW16))
        u[j0 + 16 + j] = dither16_of(U32(h >> U32(16)))


def split_key(key: int) -> tuple[np.uint32, np.uint32]:
    return U32(key & MASK32), U32(key >> 32)


@numba.njit(parallel=True, cache=True)
def _symmetric_uniform(n, k0, k1, out):
    for i in numba.prange(n):
        out[i] = symmetric_uniform_at(i, k0, k1)


@numba.njit(parallel=True, cache=True)
def _rademacher(n, k0, k1, out):
    nw = (n + 31) // 32
    for w in numba.prange(nw):
        h = hash32(w, k0, k1)
        base = w * 32
        for j in range(min(32, n - base)):
            bit = U32(U32(h >> U32(j)) & U32(1))
            out[base + j] = np.float32(1.0) - np.float32(2.0) * np.float32(bit)


@numba.njit(cache=True)
def _dither16(n, k0, k1, out):
    tmp = np.empty(32, np.float32)
    for g in range((n + 31) // 32):
        dither16_group(g, k0, k1, tmp, 0)
        for j in range(min(32, n - 32 * g)):
            out[32 * g + j] = tmp[j]


def dither16(key: int, n: int) -> np.ndarray:
    out = np.empty(n, np.float32)
    _dither16(n, *split_key(key), out)
    return out


def symmetric_uniform(key: int, n: int) -> np.ndarray:
    out = np.empty(n, np.float32)
    _symmetric_uniform(n, *split_key(key), out)
    return out


def rademacher(key: int, n: int) -> np.ndarray:
    out = np.empty(n, np.float32)
    _rademacher(n, *split_key(key), out)
    return out
