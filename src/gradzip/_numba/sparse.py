"""CPU kernels of the sparsifiers (references in :mod:`gradzip.compressors.sparse`).

Exact selection of the n largest uint32 keys (ties to the lower index, or to the higher one)
without sorting d values:

1. guess a threshold ``t`` a little below the n-th largest key: for ``|x|`` from a sample of
   ``SAMPLES`` keys at positions drawn by the counter hash; for rand-k's hashes, which are
   uniform, from the target fraction directly;
2. collect, in one parallel pass, the indices whose key is ``>= t`` (the candidates, in
   ascending order: each thread scans a contiguous piece);
3. if there are at least n candidates, the n largest keys are all among them (the n-th
   largest key is ``>= t``, and so is every key tied with it), and ``np.partition`` on the
   candidates' keys finds the n-th largest ``v``; one pass over the candidates keeps the keys
   ``> v`` and the first (or last) ones equal to ``v``. Fewer candidates: collect again with
   ``t = 0`` (every index), still exact.

Keys: for ``|x|`` the float32 bit pattern ``& 0x7FFFFFFF`` (integer order equals the order of
``|x|`` on finite values, and ``-0.0`` is 0); for rand-k ``hash32(i) ^ mask``. Keys are
flipped by an xor with the all-ones mask of their range to select the smallest instead.

Kernels are serial ``(start, stop)`` functions split by :func:`gradzip._numba.parallel.run`
(see that module for why not ``prange``); loops index slices from 0.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba.cpython.unsafe.numbers import trailing_zeros

from .cache import CACHE
from .parallel import ranges, run
from .rng import U32, hash32

U64 = np.uint64
ABS = U32(0x7FFFFFFF)
ALL = U32(0xFFFFFFFF)
SAMPLES = 1 << 15  # keys sampled to place the threshold of top-k
SMALL = 1 << 15  # below this many elements: no sampling, every index is a candidate
CHUNK = 1 << 12  # elements per inner chunk: a multiple of 64; scratch stays in L1
_MAGIC = U64(0x0102040810204080)
_S56 = U64(56)
_REASSOC = {"reassoc", "contract", "nsz"}


# --- collecting candidates ------------------------------------------------------------------


@numba.njit(inline="always", cache=CACHE)
def _emit(tmp, m, base, words, out, n):
    """Append ``base + i`` to ``out`` for each i < m with ``tmp[i] == 1``; returns the count.

    The 0/1 bytes are packed 64 to a word (eight bytes at a time with one multiply, as in
    :mod:`gradzip._numba.onebit`) and the set bits found by trailing-zero counts, so the
    cost per element is a vector compare, not a branch. Appends beyond ``out.size`` are
    counted but not written.
    """
    for i in range(m, (m + 63) // 64 * 64):
        tmp[i] = 0
    t64 = tmp.view(np.uint64)
    nw = (m + 63) // 64
    for wi in range(nw):
        w = U64(0)
        for b in range(8):
            w |= ((t64[wi * 8 + b] * _MAGIC) >> _S56) << U64(8 * b)
        words[wi] = w
    cap = out.size
    for wi in range(nw):
        w = words[wi]
        while w:
            if n < cap:
                out[n] = base + wi * 64 + trailing_zeros(w)
            n += 1
            w &= w - U64(1)
    return n


@numba.njit(nogil=True, cache=CACHE)
def _collect_abs(xb, fm, t, out, start, stop):
    tmp = np.zeros(CHUNK, np.uint8)
    words = np.zeros(CHUNK // 64, np.uint64)
    n = 0
    for base in range(start, stop, CHUNK):
        xs = xb[base : min(stop, base + CHUNK)]
        for i in range(xs.size):
            tmp[i] = ((xs[i] & ABS) ^ fm) >= t
        n = _emit(tmp, xs.size, base, words, out, n)
    return n


@numba.njit(nogil=True, cache=CACHE)
def _collect_hash(k0, k1, hm, t, out, start, stop):
    buf = np.empty(CHUNK, np.uint32)
    tmp = np.zeros(CHUNK, np.uint8)
    words = np.zeros(CHUNK // 64, np.uint64)
    n = 0
    for base in range(start, stop, CHUNK):
        m = min(stop, base + CHUNK) - base
        b32 = U32(base)
        for i in range(m):
            buf[i] = hash32(U32(b32 + U32(i)), k0, k1) ^ hm
        for i in range(m):
            tmp[i] = buf[i] >= t
        n = _emit(tmp, m, base, words, out, n)
    return n


def _collect(kernel, d: int, args: tuple, expected: float) -> np.ndarray:
    """Ascending indices where ``kernel`` finds key >= t, pieces collected concurrently."""
    parts = ranges(d)
    bufs = {}
    for a, b in parts:
        cap = min(b - a, int(expected * (b - a) / d * 1.25) + 4096)
        bufs[a] = np.empty(cap, np.int64)

    def piece(a, b):
        return kernel(*args, bufs[a], a, b)

    counts = run(piece, d)
    out = []
    for (a, b), n in zip(parts, counts, strict=True):
        if n > bufs[a].size:  # the guess was short: this piece again, with room for all
            bufs[a] = np.empty(n, np.int64)
            kernel(*args, bufs[a], a, b)
        out.append(bufs[a][:n])
    return out[0] if len(out) == 1 else np.concatenate(out)


@numba.njit(nogil=True, cache=CACHE)
def _keys_abs(xb, fm, idx, out):
    for j in range(idx.size):
        out[j] = (xb[idx[j]] & ABS) ^ fm


@numba.njit(nogil=True, cache=CACHE)
def _keys_hash(k0, k1, hm, idx, out):
    for j in range(idx.size):
        out[j] = hash32(U32(idx[j]), k0, k1) ^ hm


@numba.njit(nogil=True, cache=CACHE)
def _sample_abs(xb, fm, k0, k1, out):
    d = U64(xb.size)
    for j in range(out.size):
        pos = (U64(hash32(U32(j), k0, k1)) * d) >> U64(32)
        out[j] = (xb[pos] & ABS) ^ fm


# --- exact choice among the candidates ------------------------------------------------------


@numba.njit(nogil=True, cache=CACHE)
def _pick(idx, keys, v, skip, need, out):
    o = 0
    eq = 0
    for j in range(idx.size):
        kk = keys[j]
        if kk > v:
            out[o] = idx[j]
            o += 1
        elif kk == v:
            if eq >= skip and eq < skip + need:
                out[o] = idx[j]
                o += 1
            eq += 1
    return o


def pick_largest(idx: np.ndarray, keys: np.ndarray, n: int, prefer_low: bool) -> np.ndarray:
    """The ``n`` entries of ascending ``idx`` with the largest ``keys``, in ascending order.

    Ties at the n-th largest key go to the lower indices (``prefer_low``) or the higher ones.
    """
    c = idx.size
    if n >= c:
        return idx.copy()
    if n <= 0:
        return np.empty(0, np.int64)
    v = np.partition(keys, c - n)[c - n]
    above = int(np.count_nonzero(keys > v))
    need = n - above
    skip = 0 if prefer_low else int(np.count_nonzero(keys == v)) - need
    out = np.empty(n, np.int64)
    got = _pick(idx, keys, v, skip, need, out)
    assert got == n
    return out


# --- complement: [0, d) minus a sorted index set ----------------------------------------------


@numba.njit(nogil=True, cache=CACHE)
def _complement(drop, lo, out, start, stop):
    """out[i - (drops before i)] = i for the i in [start, stop) not in ``drop``.

    ``drop`` is padded with a sentinel >= stop; ``lo`` is its first entry >= start. Branch
    free: a dropped i is written to the spare last slot of ``out`` (garbage, shared).
    """
    spare = out.size - 1
    j = lo
    o = start - lo
    for i in range(start, stop):
        hit = drop[j] == i
        out[spare if hit else o] = i
        o += np.int64(1 - hit)
        j += np.int64(hit)


def complement(drop: np.ndarray, d: int) -> np.ndarray:
    """Ascending ``[0, d)`` minus the ascending, distinct ``drop``."""
    out = np.empty(d - drop.size + 1, np.int64)
    padded = np.append(drop, np.int64(d))

    def piece(a, b):
        _complement(padded, int(np.searchsorted(drop, a)), out, a, b)

    run(piece, d)
    return out[:-1]


# --- top-k of |x| and rand-k's k smallest hashes --------------------------------------------


def _largest_abs(xb: np.ndarray, n: int, fm, prefer_low: bool, k0, k1) -> np.ndarray:
    d = xb.size
    if d <= SMALL:
        idx = np.arange(d, dtype=np.int64)
        return pick_largest(idx, (xb & ABS) ^ fm, n, prefer_low)
    s = np.empty(SAMPLES, np.uint32)
    _sample_abs(xb, fm, k0, k1, s)
    q = n / d
    r = math.ceil(SAMPLES * q + 5.0 * math.sqrt(SAMPLES * q) + 8)  # rank from the top
    if r >= SAMPLES:
        idx = np.arange(d, dtype=np.int64)
    else:
        t = np.partition(s, SAMPLES - r)[SAMPLES - r]
        idx = _collect(_collect_abs, d, (xb, fm, t), r / SAMPLES * d)
        if idx.size < n:  # the sample misled: every index is a candidate
            idx = np.arange(d, dtype=np.int64)
    keys = np.empty(idx.size, np.uint32)
    _keys_abs(xb, fm, idx, keys)
    return pick_largest(idx, keys, n, prefer_low)


def topk_indices(x: np.ndarray, k: int, k0, k1) -> np.ndarray:
    """Ascending indices of the k largest ``|x|`` (float32), ties to the lower index.

    ``k0, k1`` key the sample that places the threshold: they change the speed, never the
    result. For k > d/2 the d - k smallest are found (ties to the higher index) and dropped.
    """
    d = x.size
    if k >= d:
        return np.arange(d, dtype=np.int64)
    if k <= 0:
        return np.empty(0, np.int64)
    xb = x.view(np.uint32)
    if 2 * k > d:
        return complement(_largest_abs(xb, d - k, ABS, False, k0, k1), d)
    return _largest_abs(xb, k, U32(0), True, k0, k1)


def _largest_hash(d: int, n: int, k0, k1, hm) -> np.ndarray:
    if d <= SMALL:
        idx = np.arange(d, dtype=np.int64)
    else:
        # the keys are uniform on [0, 2**32): aim a few standard deviations above n
        frac = min(1.0, (n + 6.0 * math.sqrt(n) + 16) / d)
        t = U32(max(0, min(0xFFFFFFFF, int(2.0**32 * (1.0 - frac)))))
        idx = _collect(_collect_hash, d, (k0, k1, hm, t), frac * d)
        if idx.size < n:
            idx = np.arange(d, dtype=np.int64)
    keys = np.empty(idx.size, np.uint32)
    _keys_hash(k0, k1, hm, idx, keys)
    return pick_largest(idx, keys, n, True)  # hash32 is a bijection of i: no ties


def randk_indices(d: int, k: int, k0, k1) -> np.ndarray:
    """Ascending indices of the k smallest ``hash32(i, key)`` over ``[0, d)``."""
    if k >= d:
        return np.arange(d, dtype=np.int64)
    if k <= 0:
        return np.empty(0, np.int64)
    if 2 * k > d:  # drop the d - k largest hashes
        return complement(_largest_hash(d, d - k, k0, k1, U32(0)), d)
    return _largest_hash(d, k, k0, k1, ALL)


# --- adaptive sparsification: integer weights, water-filling, systematic sampling -------------


@numba.njit(nogil=True, cache=CACHE, fastmath=_REASSOC)
def _weight_sums(x, scale, wsat, start, stop):
    """(sum of the weights < wsat, count of weights >= wsat, count of non-zeros)."""
    xs = x[start:stop]
    s = 0.0
    nsat = 0
    nnz = 0
    for i in range(xs.size):
        w = np.ceil(abs(np.float64(xs[i])) * scale)
        sat = w >= wsat
        s += 0.0 if sat else w
        nsat += sat
        nnz += w > 0.0
    return s, nsat, nnz


def weight_sums(x: np.ndarray, scale: float, wsat: float) -> list[tuple[float, int, int]]:
    """Per piece of :func:`ranges` (``x.size``): see ``_weight_sums``."""
    return run(_weight_sums, x.size, x, np.float64(scale), np.float64(wsat))


@numba.njit(nogil=True, cache=CACHE)
def _weights_at(x, idx, scale, out):
    for j in range(idx.size):
        out[j] = np.ceil(abs(np.float64(x[idx[j]])) * scale)


def weights_at(x: np.ndarray, idx: np.ndarray, scale: float) -> np.ndarray:
    out = np.empty(idx.size, np.float64)
    _weights_at(x, idx, np.float64(scale), out)
    return out


_BLOCK = 16


@numba.njit(nogil=True, cache=CACHE, fastmath=_REASSOC)
def _systematic(x, scale, wsat, m, total, rem, out_idx, out_val, start, stop):
    """Keep i where ``rem = (m * (weights so far) + R) mod total`` wraps, or W_i >= wsat;
    ``out_val`` gets ``x_i / p_i`` (``x_i`` where saturated, else ``x_i total / (m W_i)``,
    in float64 then rounded to float32, as the reference does).

    Each chunk's weights are computed once (a vectorized loop). Without saturated weights
    (``wsat`` infinite) the chunk's blocks of ``_BLOCK`` weights are summed, and blocks that
    do not wrap ``rem`` are skipped whole: most of them, when a small fraction is kept. Sums
    are of integers below 2**53 in total, exact in any order: reassociation changes nothing
    but the speed.
    """
    xs = x[start:stop]
    o = 0
    w = np.empty(CHUNK, np.float64)
    sums = np.empty(CHUNK // _BLOCK, np.float64)
    ft = np.float64(total)
    fm = np.float64(m)
    for cbase in range(0, xs.size, CHUNK):
        n = min(cbase + CHUNK, xs.size) - cbase
        for j in range(n):
            w[j] = np.ceil(abs(np.float64(xs[cbase + j])) * scale)
        nb = n // _BLOCK if wsat == np.inf else 0
        for b in range(nb):
            sw = 0.0
            for j in range(_BLOCK):
                sw += w[b * _BLOCK + j]
            sums[b] = sw
        for b in range(nb + 1):
            lo = b * _BLOCK
            hi = min(lo + _BLOCK, n) if b < nb else n
            if b < nb:
                inc = m * np.int64(sums[b])
                if rem + inc < total:
                    rem += inc
                    continue
            for i in range(lo, hi):
                wi = w[i]
                xi = np.float64(xs[cbase + i])
                if wi >= wsat:
                    out_idx[o] = start + cbase + i
                    out_val[o] = np.float32(xi)
                    o += 1
                else:
                    rem += m * np.int64(wi)
                    if rem >= total:
                        rem -= total
                        out_idx[o] = start + cbase + i
                        out_val[o] = np.float32(xi * ft / (fm * wi))
                        o += 1
    return o


def systematic(x, scale, wsat, m, total, rems, counts, out_idx, out_val) -> None:
    """Fill ``out_idx`` and ``out_val``: piece p starts at ``sum(counts[:p])`` with
    remainder rems[p]."""
    parts = ranges(x.size)
    offs = {}
    o = 0
    for (a, _), r, c in zip(parts, rems, counts, strict=True):
        offs[a] = (o, c, r)
        o += c

    def piece(a, b):
        o, c, r = offs[a]
        got = _systematic(
            x, np.float64(scale), np.float64(wsat), np.int64(m), np.int64(total), np.int64(r),
            out_idx[o : o + c], out_val[o : o + c], a, b,
        )  # fmt: skip
        if got != c:
            raise RuntimeError(f"adaptive_sparse: piece kept {got} coordinates, expected {c}")

    run(piece, x.size)


# --- decode: zero-filled output and scatter ---------------------------------------------------


@numba.njit(nogil=True, cache=CACHE)
def _fill_zero(out, start, stop):
    os = out[start:stop]
    for i in range(os.size):
        os[i] = 0.0


@numba.njit(nogil=True, cache=CACHE)
def _scatter(out, idx, vals):
    for j in range(idx.size):
        out[idx[j]] = vals[j]


def scatter(out: np.ndarray, idx: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """``out`` (float32) <- zeros with ``vals`` at ``idx`` (validated by the caller).

    The zeros are written in parallel. ``out`` comes from the caller (a pooled block: a
    fresh 64 MiB array costs its page faults on every call, measured 22 ms per decode at
    2**24 against 13, and up to 90 ms when the kernel compacts memory for huge pages).
    """
    run(_fill_zero, out.size, out)
    _scatter(out, idx, vals)
    return out


@numba.njit(nogil=True, cache=CACHE)
def _check_indices(idx, d):
    """-1 if ``idx`` is strictly increasing in [0, d), else the first bad position."""
    prev = -1
    for j in range(idx.size):
        v = idx[j]
        if v <= prev or v >= d:
            return j
        prev = v
    return -1


def check_indices(idx: np.ndarray, d: int) -> int:
    return int(_check_indices(idx, np.int64(d)))
