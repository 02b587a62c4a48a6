"""numba twin of :mod:`gradzip.rng`: the same streams, bit for bit, for use inside kernels."""

from __future__ import annotations

import numba
import numpy as np

from ..rng import GAMMA, MASK32, MIX_M1, MIX_M2
from .cache import CACHE

U32 = np.uint32
U64 = np.uint64
_LB1 = U32(0x7FEB352D)
_LB2 = U32(0x846CA68B)
_SCALE = np.float32(2.0**-23)
_SCALE16 = np.float32(2.0**-16)
_LOW16 = U32(0xFFFF)
_GAMMA = U64(GAMMA)
_M1 = U64(MIX_M1)
_M2 = U64(MIX_M2)

# The 32-bit hash is in uint32 arithmetic (each result cast back), so LLVM vectorizes it
# with 32-bit lanes (vpmulld); dither16's words are uint64: one vpmullq per multiply with
# AVX-512DQ (Zen 4), three vpmuludq and four shifts and adds without it (Zen 3, AVX2). In
# the fused quantizer (simd.quant32) the words are faster than two hash32 per 32 bits on
# Zen 4 and cost nothing on Zen 3, where the 64-bit multiply is emulated (docs/perf.md).


@numba.njit(inline="always", cache=CACHE)
def _lowbias32(x):
    x = U32(x ^ (x >> U32(16)))
    x = U32(x * _LB1)
    x = U32(x ^ (x >> U32(15)))
    x = U32(x * _LB2)
    return U32(x ^ (x >> U32(16)))


@numba.njit(inline="always", cache=CACHE)
def hash32(i, k0, k1):
    """``hash32(i, key)`` with ``k0, k1`` the key's 32-bit halves (uint32); i < 2**32."""
    return _lowbias32(U32(_lowbias32(U32(U32(i) + k0)) ^ k1))


@numba.njit(inline="always", cache=CACHE)
def symmetric_uniform_at(i, k0, k1):
    """The ``i``-th value of :func:`gradzip.rng.symmetric_uniform`."""
    h = hash32(i, k0, k1)
    return np.float32(U32(U32(h >> U32(9)) * U32(2) + U32(1))) * _SCALE - np.float32(1.0)


@numba.njit(inline="always", cache=CACHE)
def dither16_of(t):
    """``(2 t + 1) 2**-16 - 1`` for a 16-bit ``t`` (uint32): one value of ``dither16``."""
    return np.float32(U32(U32(t) * U32(2) + U32(1))) * _SCALE16 - np.float32(1.0)


@numba.njit(inline="always", cache=CACHE)
def mix64(z):
    """SplitMix64's output function (:func:`gradzip.rng.mix64`) on a uint64."""
    z = U64(U64(z ^ (z >> U64(30))) * _M1)
    z = U64(U64(z ^ (z >> U64(27))) * _M2)
    return U64(z ^ (z >> U64(31)))


@numba.njit(inline="always", cache=CACHE)
def dither16_word(key, j):
    """``key + j GAMMA`` (mod 2**64): the input of ``mix64`` for word ``j`` of ``dither16``."""
    return U64(U64(key) + U64(U64(j) * _GAMMA))


@numba.njit(inline="always", cache=CACHE)
def dither16_group(g, key, u, j0):
    """``u[j0 : j0 + 32]`` <- the 32 values of group ``g`` of :func:`gradzip.rng.dither16`
    (``key`` uint64): the 8 words split into 16 halves, their low 16 bits to the first 16
    elements, their high 16 bits to the next 16."""
    for j in range(8):
        z = mix64(dither16_word(key, U64(8 * g + j)))
        for h in range(2):
            w = U32(U64(z >> U64(32 * h)) & U64(MASK32))
            u[j0 + 2 * j + h] = dither16_of(U32(w & _LOW16))
            u[j0 + 16 + 2 * j + h] = dither16_of(U32(w >> U32(16)))


def split_key(key: int) -> tuple[np.uint32, np.uint32]:
    return U32(key & MASK32), U32(key >> 32)


@numba.njit(parallel=True, cache=CACHE)
def _symmetric_uniform(n, k0, k1, out):
    for i in numba.prange(n):
        out[i] = symmetric_uniform_at(i, k0, k1)


@numba.njit(parallel=True, cache=CACHE)
def _rademacher(n, k0, k1, out):
    nw = (n + 31) // 32
    for w in numba.prange(nw):
        h = hash32(w, k0, k1)
        base = w * 32
        for j in range(min(32, n - base)):
            bit = U32(U32(h >> U32(j)) & U32(1))
            out[base + j] = np.float32(1.0) - np.float32(2.0) * np.float32(bit)


@numba.njit(cache=CACHE)
def _dither16(n, key, out):
    tmp = np.empty(32, np.float32)
    for g in range((n + 31) // 32):
        dither16_group(g, key, tmp, 0)
        for j in range(min(32, n - 32 * g)):
            out[32 * g + j] = tmp[j]


def dither16(key: int, n: int) -> np.ndarray:
    out = np.empty(n, np.float32)
    _dither16(n, U64(key), out)
    return out


def symmetric_uniform(key: int, n: int) -> np.ndarray:
    out = np.empty(n, np.float32)
    _symmetric_uniform(n, *split_key(key), out)
    return out


def rademacher(key: int, n: int) -> np.ndarray:
    out = np.empty(n, np.float32)
    _rademacher(n, *split_key(key), out)
    return out


from .parallel import launch_numba_threads  # noqa: E402

launch_numba_threads()  # numba's pool, without changing torch's thread count
