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
# Eight b-bit codes fill exactly b bytes of pack_uints' LSB-first stream, so a group of eight
# coordinates is quantized into one 64-bit accumulator and written out as b bytes: no code
# array is ever written or read back.

MAX_PACKED_BITS = 8


@numba.njit(nogil=True, cache=True)
def _encode_packed(y, b, r, out, start, stop):
    cell = np.float32(2.0) * r / np.float32(1 << b)
    top = (1 << b) - 1
    n = y.size
    for i in range(start, stop, 8):
        m = min(8, n - i)
        acc = np.uint64(0)
        for j in range(m):
            v = min(max(y[i + j], -r), r)
            c = min(np.int64((v + r) / cell), top)  # v + r >= 0: truncation is the floor
            acc |= np.uint64(c) << np.uint64(j * b)
        base = (i * b) >> 3
        for k in range((m * b + 7) >> 3):
            out[base + k] = np.uint8((acc >> np.uint64(8 * k)) & np.uint64(0xFF))


@numba.njit(nogil=True, cache=True)
def _decode_packed(data, b, r, out, start, stop):
    cell = np.float32(2.0) * r / np.float32(1 << b)
    mask = np.uint64((1 << b) - 1)
    n = out.size
    for i in range(start, stop, 8):
        m = min(8, n - i)
        base = (i * b) >> 3
        acc = np.uint64(0)
        for k in range((m * b + 7) >> 3):
            acc |= np.uint64(data[base + k]) << np.uint64(8 * k)
        for j in range(m):
            c = (acc >> np.uint64(j * b)) & mask
            out[i + j] = (np.float32(c) + _HALF) * cell - r


def encode_packed(y, b: int, r, out) -> None:
    """Quantize float32 ``y`` with ``b`` bits each (1 <= b <= 8) straight into the packed
    bytes ``out`` (``pack_uints``' layout)."""
    run(_encode_packed, y.size, y, b, np.float32(r), out, align=64)


def decode_packed(data, b: int, r, out) -> None:
    """Inverse of :func:`encode_packed`: the cell centres into float32 ``out``."""
    run(_decode_packed, out.size, data, b, np.float32(r), out, align=64)
