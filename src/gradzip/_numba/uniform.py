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
    top = np.float32((1 << b) - 1)
    for i in range(start, stop):
        v = min(max(y[i], -r), r)
        t = np.floor((v + r) / cell)
        codes[i] = np.int32(max(min(t, top), np.float32(0.0)))


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
