"""CPU kernels of the one-bit quantizers (references in :mod:`gradzip.compressors.onebit`).

Bit convention (as in :mod:`gradzip.bits`): bit ``j`` of byte ``i`` (LSB first) is 1 iff
element ``8*i + j`` is negative. Dither ``u_i = dither16(key)[i]`` in (-1, 1): four values per
64-bit word (see :func:`gradzip.rng.dither16`; resolution ``2**-15``), which cuts the hashing
that dominates these kernels.

The dithered quantizer takes 32 elements at a time with the vector kernel of the fused
encoder (:func:`gradzip._numba.simd.quant32`: the words in vector lanes, each output byte
one vector compare mask). The other kernels, and the quantizer's last partial group, work
on chunks that fit in L1/L2: they first compute one 0/1 byte per element in a small scratch
array (a loop LLVM vectorizes, hash included), then pack 8 such bytes into one with a
multiply: for a little-endian uint64 ``w`` of eight 0/1 bytes,
``(w * 0x0102040810204080) >> 56`` puts byte j's bit at bit j (the partial products land
on distinct bit positions, so nothing carries into the top byte).

No fastmath in the quantizers: the fast path must round exactly like the torch reference.
"""

from __future__ import annotations

import numba
import numpy as np

from .cache import CACHE
from .parallel import run
from .rng import U32, U64, dither16_group, dither16_word
from .simd import prescale, quant32, quant32_sum

CHUNK = 1 << 12  # elements per work item: a multiple of 64; scratch stays in L1
_MAGIC = np.uint64(0x0102040810204080)
_S56 = np.uint64(56)
_ABS = U32(0x7FFFFFFF)
# fastmath without nnan/ninf: sums may be reordered (vectorized), NaN and inf still propagate
_REASSOC = {"reassoc", "contract", "nsz"}

# Loops index slices from 0 (``xs = x[a:b]; for i in range(xs.size)``): with an index that
# might be negative numba emits a wraparound check per access, and LLVM then gathers
# element by element instead of loading vectors (3-5x slower).


@numba.njit(nogil=True, cache=CACHE, fastmath=_REASSOC)
def _stats32(x, bits, start, stop):
    xs = x[start:stop]
    bs = bits[start:stop]
    s = 0.0
    a1 = 0.0
    m = U32(0)
    for i in range(xs.size):
        v = np.float64(xs[i])
        s += v * v
        a1 += abs(v)
        b = U32(bs[i] & _ABS)
        m = b if b > m else m
    return s, a1, m


def stats32(x: np.ndarray) -> tuple[float, float, float]:
    """(sum of squares, max |x|, sum |x|) of float32 ``x``, in float64, one pass.

    max |x| is the integer max of the bit patterns ``& 0x7FFFFFFF`` (IEEE order agrees with
    integer order on non-negative floats): it vectorizes where a float max does not, and it
    is >= 0x7F800000 exactly when some value is NaN or inf, so this is also the finiteness
    check.
    """
    parts = run(_stats32, x.size, x, x.view(np.uint32))
    top = np.array([max(p[2] for p in parts)], np.uint32).view(np.float32)[0]
    return sum(p[0] for p in parts), float(top), sum(p[1] for p in parts)


@numba.njit(inline="always", cache=CACHE)
def _pack_chunk(tmp, m, out):
    """Pack ``m`` 0/1 bytes of ``tmp`` into ``out`` (ceil(m/8) bytes)."""
    t64 = tmp.view(np.uint64)
    full = m // 8
    for b in range(full):
        out[b] = (t64[b] * _MAGIC) >> _S56
    if m % 8:
        byte = 0
        for j in range(m % 8):
            byte |= np.int64(tmp[8 * full + j]) << j
        out[full] = byte


@numba.njit(inline="always", cache=CACHE)
def dither_sign_pack_chunk(ys, e0, lam, key, out, u, tmp):
    """``out[e0//8 :]`` <- the packed bits ``ys[i] + lam * u[e0 + i] < 0``, ``i < ys.size``.

    ``e0`` (the stream index of ``ys[0]``) is a multiple of 32 and ``ys.size <= u.size``;
    ``u`` (float32) and ``tmp`` (uint8, ``>= u.size``) are scratch. (The rotation-fused
    encoder of :mod:`gradzip._numba.fused_onebit` does the same on its column chunks.)
    """
    g0 = e0 // 32
    for g in range((ys.size + 31) // 32):
        dither16_group(g0 + g, key, u, 32 * g)
    for i in range(ys.size):
        tmp[i] = ys[i] + lam * u[i] < np.float32(0)
    _pack_chunk(tmp, ys.size, out[e0 // 8 : (e0 + ys.size + 7) // 8])


@numba.njit(nogil=True, cache=CACHE)
def _dither_sign_pack(y, lam, key, out, start, stop):
    """Elements ``start .. stop`` (``start`` a multiple of 32): whole groups of 32 with
    :func:`~gradzip._numba.simd.quant32` (faster than 0/1 bytes packed by multiplies:
    docs/perf.md), the last partial group with :func:`dither_sign_pack_chunk`."""
    lam16, exact = prescale(lam)
    whole = start + (stop - start) // 32 * 32
    for e in range(start, whole, 32):
        quant32(y, e, dither16_word(key, e // 4), lam, lam16, exact, out, e // 8)
    if whole < stop:
        u = np.empty(32, np.float32)
        tmp = np.zeros(32, np.uint8)
        dither_sign_pack_chunk(y[whole:stop], whole, lam, key, out, u, tmp)


@numba.njit(nogil=True, cache=CACHE)
def _dither_sign_pack_sum(y, lam, key, out, start, stop):
    """:func:`_dither_sign_pack`, returning ``sum y_e b_e`` (``b = -1`` where the bit is
    set): float32 lanes over 1024 elements at a time, then float64."""
    lam16, exact = prescale(lam)
    whole = start + (stop - start) // 32 * 32
    acc = np.zeros(8, np.float32)
    total = 0.0
    for e in range(start, whole, 32):
        quant32_sum(y, e, dither16_word(key, e // 4), lam, lam16, exact, out, e // 8, acc)
        if (e - start) % 1024 == 992 or e + 32 == whole:
            for j in range(8):
                total += np.float64(acc[j])
            acc[:] = 0
    if whole < stop:
        u = np.empty(32, np.float32)
        tmp = np.zeros(32, np.uint8)
        dither_sign_pack_chunk(y[whole:stop], whole, lam, key, out, u, tmp)
        for i in range(whole, stop):
            bit = (out[i >> 3] >> (i & 7)) & 1
            total += np.float64(y[i]) * (1.0 - 2.0 * bit)
    return total


@numba.njit(nogil=True, cache=CACHE)
def _sign_pack(y, out, start, stop):
    tmp = np.zeros(CHUNK, np.uint8)
    for base in range(start, stop, CHUNK):
        ys = y[base : min(stop, base + CHUNK)]
        for i in range(ys.size):
            tmp[i] = ys[i] < np.float32(0)
        _pack_chunk(tmp, ys.size, out[base // 8 : (base + ys.size + 7) // 8])


@numba.njit(nogil=True, cache=CACHE)
def _unpack_subtract_dither(data, lam, key, out, start, stop):
    u = np.empty(CHUNK, np.float32)
    for base in range(start, stop, CHUNK):
        os = out[base : min(stop, base + CHUNK)]
        ds = data[base // 8 : (base + os.size + 7) // 8]
        g0 = base // 32
        for g in range((os.size + 31) // 32):
            dither16_group(g0 + g, key, u, 32 * g)
        for i in range(os.size):
            os[i] = -lam * u[i]
        for i in range(os.size):
            bit = (ds[i >> 3] >> (i & 7)) & 1
            os[i] += lam * (np.float32(1.0) - np.float32(2.0) * np.float32(bit))


@numba.njit(nogil=True, cache=CACHE)
def _mean_signs(data, lam, out, start, stop):
    m = data.shape[0]
    two = np.float32(2.0) * lam
    n = np.float32(m)
    for base in range(start, stop, CHUNK):
        os = out[base : min(stop, base + CHUNK)]
        b0 = base // 8
        for i in range(os.size):
            os[i] = np.float32(0.0)
        for j in range(m):  # in sender order, as the reference adds them
            ds = data[j, b0 : (base + os.size + 7) // 8]
            lj, tj = lam[j], two[j]
            for i in range(os.size):
                os[i] += lj - tj * np.float32((ds[i >> 3] >> (i & 7)) & 1)
        for i in range(os.size):
            os[i] /= n


def dither_sign_pack(y, lam, key, out) -> None:
    """out packs the bits ``y[e] + lam * u[e] < 0`` (standard dither); float32 ``y``."""
    y = np.ascontiguousarray(y)  # the vector kernel reads y[e : e + 32] as 4 vectors
    run(_dither_sign_pack, y.size, y, np.float32(lam), U64(key), out, align=CHUNK)


def dither_sign_pack_sum(y, lam, key, out) -> float:
    """:func:`dither_sign_pack`, and return ``<b, y>`` (float64) from the same pass: the
    fitted scales of ``rescale`` without reading ``y`` again."""
    y = np.ascontiguousarray(y)
    return sum(run(_dither_sign_pack_sum, y.size, y, np.float32(lam), U64(key), out, align=CHUNK))


def sign_pack(y, out) -> None:
    """out packs the bits ``y[e] < 0`` (no dither)."""
    run(_sign_pack, y.size, y, out, align=CHUNK)


def mean_signs(data, lam, out) -> None:
    """out = (1/m) sum_j lam[j] * (+1 or -1 by bit e of data[j]), added in order j = 0, 1,
    ... (data: m rows of packed bits; lam: m float32 scales)."""
    run(_mean_signs, out.size, data, lam, out, align=CHUNK)


def unpack_subtract_dither(data, lam, key, out) -> None:
    """out[e] = lam * (+1 or -1 by bit e) - lam * u[e] (subtractive dither decoding)."""
    run(_unpack_subtract_dither, out.size, data, np.float32(lam), U64(key), out, align=CHUNK)
