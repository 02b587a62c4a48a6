"""Kernels of the ``uniform`` (DQ-GD) quantizer; :mod:`gradzip.compressors.uniform` holds the
torch reference they are tested against.

Coordinate i has ``b_i = floor((i+1) R) - floor(i R)`` bits (``lo`` or ``lo + 1``). The
coordinates with ``lo + 1`` bits before i number ``floor(i R) - lo i``, so each coordinate
knows its slot in the ``lo`` and ``hi`` code arrays without a scan, and the pieces of
``[0, d)`` run independently on the thread pool.
"""

from __future__ import annotations

import numba
import numpy as np

from .parallel import run

_HALF = np.float32(0.5)


@numba.njit(nogil=True, cache=True)
def _encode(y, rate, lo, r, codes_lo, codes_hi, start, stop):
    cell_lo = np.float32(2.0) * r / np.float32(1 << lo)
    cell_hi = np.float32(2.0) * r / np.float32(2 << lo)
    top_lo, top_hi = np.float32((1 << lo) - 1), np.float32((2 << lo) - 1)
    for i in range(start, stop):
        f0 = np.floor(i * rate)
        b = np.int64(np.floor((i + 1) * rate) - f0)
        before_hi = np.int64(f0) - lo * i
        hi = b > lo
        if b == 0:
            continue
        v = min(max(y[i], -r), r)
        t = np.floor((v + r) / (cell_hi if hi else cell_lo))
        t = max(min(t, top_hi if hi else top_lo), np.float32(0.0))
        if hi:
            codes_hi[before_hi] = np.int32(t)
        else:
            codes_lo[i - before_hi] = np.int32(t)


@numba.njit(nogil=True, cache=True)
def _decode(codes_lo, codes_hi, rate, lo, r, out, start, stop):
    cell_lo = np.float32(2.0) * r / np.float32(1 << lo)
    cell_hi = np.float32(2.0) * r / np.float32(2 << lo)
    for i in range(start, stop):
        f0 = np.floor(i * rate)
        b = np.int64(np.floor((i + 1) * rate) - f0)
        before_hi = np.int64(f0) - lo * i
        if b == 0:
            out[i] = np.float32(0.0)
        elif b > lo:
            out[i] = (np.float32(codes_hi[before_hi]) + _HALF) * cell_hi - r
        else:
            out[i] = (np.float32(codes_lo[i - before_hi]) + _HALF) * cell_lo - r


@numba.njit(nogil=True, cache=True)
def _encode_whole(y, b, r, codes, start, stop):
    """The same when every coordinate has ``b`` bits (integer R): a branch-free loop."""
    cell = np.float32(2.0) * r / np.float32(1 << b)
    top = np.int32((1 << b) - 1)
    for i in range(start, stop):
        v = min(max(y[i], -r), r)
        # v + r >= 0, so truncation is the floor (and vectorizes, unlike a floor call)
        codes[i] = min(np.int32((v + r) / cell), top)


@numba.njit(nogil=True, cache=True)
def _decode_whole(codes, b, r, out, start, stop):
    cell = np.float32(2.0) * r / np.float32(1 << b)
    for i in range(start, stop):
        out[i] = (np.float32(codes[i]) + _HALF) * cell - r


def encode(y, rate: float, lo: int, r, codes_lo, codes_hi) -> None:
    """Cell indices of float32 ``y`` into the int32 arrays ``codes_lo`` and ``codes_hi``."""
    if codes_hi.size == 0 and lo > 0:  # integer R: all coordinates in codes_lo
        run(_encode_whole, y.size, y, lo, np.float32(r), codes_lo)
    else:
        run(_encode, y.size, y, float(rate), lo, np.float32(r), codes_lo, codes_hi)


def decode(codes_lo, codes_hi, rate: float, lo: int, r, out) -> None:
    """Cell centres (float32 ``out``) from the code arrays; 0 where a coordinate has no bits."""
    if codes_hi.size == 0 and lo > 0:
        run(_decode_whole, out.size, codes_lo, lo, np.float32(r), out)
    else:
        run(_decode, out.size, codes_lo, codes_hi, float(rate), lo, np.float32(r), out)


# --- integer R <= 8: quantize and pack in one pass ------------------------------------------
# Eight b-bit codes fill exactly b bytes of pack_uints' LSB-first stream. Per chunk (in L1):
# the codes go to one byte each (a loop LLVM vectorizes), then each group of eight bytes,
# read as a little-endian uint64, is squeezed to 8b bits in three shift-and-mask steps
# (pairs of bytes, pairs of 16-bit lanes, the two 32-bit halves; also vectorized), and its
# b bytes are written out. Decoding runs the same steps backwards. No code array of the
# whole vector is ever written or read back.

MAX_PACKED_BITS = 8
_PCH = 1 << 12  # elements per chunk: a multiple of 64, scratch stays in L1
_M8 = np.uint64(0x00FF00FF00FF00FF)
_M16 = np.uint64(0x0000FFFF0000FFFF)
_M32 = np.uint64(0x00000000FFFFFFFF)
_U8, _U16, _U32 = np.uint64(8), np.uint64(16), np.uint64(32)
_LANES32 = np.uint64(0x0000000100000001)
_LANES16 = np.uint64(0x0001000100010001)


@numba.njit(inline="always", cache=True)
def _squeeze(w, b):
    """Eight codes < 2**b in the bytes of ``w`` -> the 8b-bit LSB-first stream of them."""
    w = (w & _M8) | (((w >> _U8) & _M8) << np.uint64(b))
    w = (w & _M16) | (((w >> _U16) & _M16) << np.uint64(2 * b))
    return (w & _M32) | ((w >> _U32) << np.uint64(4 * b))


@numba.njit(inline="always", cache=True)
def _spread(a, b):
    """Inverse of :func:`_squeeze`: eight b-bit codes, one per byte."""
    a = (a & ((np.uint64(1) << np.uint64(4 * b)) - np.uint64(1))) | (
        (a >> np.uint64(4 * b)) << _U32
    )
    m2 = ((np.uint64(1) << np.uint64(2 * b)) - np.uint64(1)) * _LANES32
    a = (a & m2) | (((a >> np.uint64(2 * b)) & m2) << _U16)
    m1 = ((np.uint64(1) << np.uint64(b)) - np.uint64(1)) * _LANES16
    return (a & m1) | (((a >> np.uint64(b)) & m1) << _U8)


@numba.njit(nogil=True, cache=True)
def _encode_packed(y, b, r, out, start, stop):
    cell = np.float32(2.0) * r / np.float32(1 << b)
    top = np.int32((1 << b) - 1)
    tmp = np.zeros(_PCH, np.uint8)
    t64 = tmp.view(np.uint64)
    acc = np.empty(_PCH // 8, np.uint64)
    for base in range(start, stop, _PCH):
        ys = y[base : min(stop, base + _PCH)]
        m = ys.size
        for i in range(m):
            v = min(max(ys[i], -r), r)
            # v + r >= 0, so truncation is the floor (and vectorizes, unlike a floor call)
            tmp[i] = np.uint8(min(np.int32((v + r) / cell), top))
        for i in range(m, (m + 7) // 8 * 8):  # a partial last group (the vector's tail)
            tmp[i] = 0
        ng = (m + 7) // 8
        for g in range(ng):
            acc[g] = _squeeze(t64[g], b)
        os = out[(base * b) >> 3 : ((base + m) * b + 7) >> 3]
        for g in range(m // 8):
            a = acc[g]
            for k in range(b):
                os[g * b + k] = np.uint8((a >> np.uint64(8 * k)) & np.uint64(0xFF))
        if m % 8:
            a = acc[m // 8]
            for k in range(os.size - (m // 8) * b):
                os[(m // 8) * b + k] = np.uint8((a >> np.uint64(8 * k)) & np.uint64(0xFF))


@numba.njit(nogil=True, cache=True)
def _decode_packed(data, b, r, out, start, stop):
    cell = np.float32(2.0) * r / np.float32(1 << b)
    tmp = np.zeros(_PCH, np.uint8)
    t64 = tmp.view(np.uint64)
    for base in range(start, stop, _PCH):
        os = out[base : min(stop, base + _PCH)]
        m = os.size
        ds = data[(base * b) >> 3 : ((base + m) * b + 7) >> 3]
        for g in range((m + 7) // 8):
            a = np.uint64(0)
            for k in range(min(b, ds.size - g * b)):
                a |= np.uint64(ds[g * b + k]) << np.uint64(8 * k)
            t64[g] = _spread(a, b)
        for i in range(m):
            os[i] = (np.float32(tmp[i]) + _HALF) * cell - r


def encode_packed(y, b: int, r, out) -> None:
    """Quantize float32 ``y`` with ``b`` bits each (1 <= b <= 8) straight into the packed
    bytes ``out`` (``pack_uints``' layout)."""
    run(_encode_packed, y.size, y, b, np.float32(r), out, align=64)


def decode_packed(data, b: int, r, out) -> None:
    """Inverse of :func:`encode_packed`: the cell centres into float32 ``out``."""
    run(_decode_packed, out.size, data, b, np.float32(r), out, align=64)
