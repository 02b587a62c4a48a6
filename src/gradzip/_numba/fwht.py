"""Fast CPU Walsh-Hadamard transform (numba), the kernel behind :mod:`gradzip.hadamard`.

What is computed
----------------
:func:`transform` applies, to each of ``nseg`` segments of length ``n = 2**m``, the
unnormalized Walsh-Hadamard transform ``H`` in natural (Sylvester) order, optionally fused
with the sign flips and the ``1/sqrt(n)`` scale of the randomized rotation:

- ``PLAIN``:    ``dst <- H src``
- ``ROTATE``:   ``dst <- H (scale * s * src)``   (signs before the transform)
- ``UNROTATE``: ``dst <- s * H (scale * src)``   (signs after the transform)

where ``s[p] = rademacher(key)[sbase + p]`` is generated on the fly from the counter-based
hash of :mod:`gradzip._numba.rng` (no sign vector is materialized).

Every stage is the butterfly ``(a, b) -> (a + b, a - b)``, done stride 1, 2, 4, ... in that
order like the pure-torch reference, without fast-math; signs and scale are the same single
multiply. The results are therefore bit-for-bit those of the reference path.

How it is fast
--------------
Unblocked, each of the ``m`` stages would stream the whole vector through memory. Here a
large segment is transformed in place in ``dst`` in two passes over memory:

1. *Rows* (pass 1). View the segment as ``R x L`` with a row of ``L`` elements (128 KiB)
   fitting in L2. Each row is transformed completely: first L1-sized blocks (16 KiB, all
   their stages while in L1; the input is read, sign-flipped and scaled on the way in, and
   the next block is prefetched meanwhile), then the few stages between blocks while the
   row is still in L2.
2. *Columns* (pass 2). The remaining ``log2 R`` stages act across rows. A chunk of ``C``
   adjacent columns of all ``R`` rows fits in L2 (256 KiB, leaving room for the next chunk,
   prefetched during the first sweep), where butterflies between rows are contiguous
   vector operations. Post-transform signs are applied before the chunk leaves L2.

The arithmetic is in the vector intrinsics of :mod:`gradzip._numba.simd`.

Routes
------
- :func:`transform`: rows (pass 1) and column chunks (pass 2) spread over numba's threads
  with ``prange``; many small segments are spread one segment per work item instead.
- :func:`transform_serial`: the same work on the calling thread, for small calls (below
  ``gradzip.hadamard.SERIAL_BELOW`` elements): waking numba's pool costs more than their
  whole transform, and under CPU contention a call can wait milliseconds for a worker.
- :func:`rows_pass` and :func:`cols_pass`: the two passes of one large segment as plain
  ``nogil`` kernels on pieces of the work, run on gradzip's pool
  (``gradzip.hadamard._transform_threaded``).

Timings behind the cache budgets and the routes: ``docs/perf.md``.
"""

from __future__ import annotations

import numba
import numpy as np

from .cache import CACHE
from .rng import hash32
from .simd import (
    _bfly,
    _fence,
    _hgroup,
    _hgroup_signed,
    _lanes,
    _prefetch,
    _signs,
    _stream8,
)

PLAIN, ROTATE, UNROTATE = 0, 1, 2

# Cache budgets (bytes), for a 2-core AMD EPYC (32 KiB L1d, 512 KiB L2 per core); anything
# of this order works on current x86 and ARM server cores. A float32 row of 2**15 has
# 15 = 6 + 3 + 3 + 3 stages (register group, two L1 sweeps, one L2 sweep), all radix 8; a
# row of 2**16 would need a lone radix-2 sweep over the whole row for its 16th stage, which
# measured slower (docs/perf.md).
L1_BYTES = 1 << 14  # a block transformed entirely in L1 (half of a 32 KiB L1d)
L2_BYTES = 1 << 17  # a pass-1 row (a quarter of a 512 KiB L2)
CHUNK_BYTES = 1 << 18  # a pass-2 column chunk (room is left for the prefetched next one)
MIN_CHUNKS = 8  # pass 2 keeps at least this many column chunks, for the threads
LINE = 64  # cache line, bytes

_U5 = np.uint64(5)
_U31 = np.uint64(31)
_U32 = np.uint64(32)
_ONE = np.uint64(1)
_ZERO = np.uint64(0)


@numba.njit(inline="always", cache=CACHE)
def _group_bits(e, G, k0, k1):
    """The G (32 or 64) sign bits of elements ``e .. e + G - 1`` (``e`` a multiple of 32)."""
    w = np.uint64(e) >> _U5
    bits = hash32(w, k0, k1)
    if G == 64:
        bits |= hash32(w + _ONE, k0, k1) << _U32
    return bits


@numba.njit(inline="always", cache=CACHE)
def _negative(e, k0, k1):
    """True iff sign ``e`` of the stream is -1."""
    u = np.uint64(e)
    return (hash32(u >> _U5, k0, k1) >> (u & _U31)) & _ONE == _ONE


@numba.njit(cache=CACHE)
def _tiny(src, soff, dst, doff, m, mode, k0, k1, sbase, scale):
    """Scalar version for segments shorter than one register group (n < 8W)."""
    n = 1 << m
    for p in range(n):
        v = src[soff + p]
        if mode != PLAIN:
            if mode == ROTATE and _negative(sbase + p, k0, k1):
                v = -v
            v = v * scale
        dst[doff + p] = v
    h = 1
    while h < n:
        for b in range(0, n, 2 * h):
            for j in range(doff + b, doff + b + h):
                x = dst[j]
                y = dst[j + h]
                dst[j] = x + y
                dst[j + h] = x - y
        h *= 2
    if mode == UNROTATE:
        for p in range(n):
            if _negative(sbase + p, k0, k1):
                dst[doff + p] = -dst[doff + p]


@numba.njit(cache=CACHE)
def _post_signs(a, off, n, k0, k1, sbase, tab):
    """``a[off + p] *= s[sbase + p]`` for ``p < n`` (``n`` a multiple of 8W)."""
    G = 8 * _lanes(a)
    for p in range(0, n, G):
        _signs(a, off + p, _group_bits(sbase + p, G, k0, k1), tab)


@numba.njit(cache=CACHE)
def _sweeps(a, off, n, h, post, k0, k1, sbase, tab):
    """The stages of stride ``h, 2h, ..., n/2`` (``h >= 8W``) on ``a[off : off + n]``.

    If ``post``, each piece is multiplied by its signs (stream index ``sbase`` at ``off``)
    as soon as its last stage is done, while it is still in L1.
    """
    W = _lanes(a)
    G = 8 * W
    if post and h >= n:
        _post_signs(a, off, n, k0, k1, sbase, tab)
    while h < n:
        radix = 8 if 8 * h <= n else n // h  # the last sweep does the last 1 or 2 stages
        last = radix * h == n
        for b in range(off, off + n, radix * h):
            for jg in range(b, b + h, G):
                for j in range(jg, jg + G, W):
                    _bfly(a, j, h, radix)
                if post and last:  # these radix groups are final
                    for k in range(radix):
                        e = jg + k * h
                        _signs(a, e, _group_bits(sbase + e - off, G, k0, k1), tab)
        h *= radix


@numba.njit(cache=CACHE)
def _blocks(src, soff, dst, doff, n, nb, mode, post, k0, k1, sbase, scale, tab):
    """``dst[doff : doff + n] <-`` the transform of each L1 block of ``nb`` elements.

    Per block: its lowest log2(8W) stages in registers as the input is read (with the sign
    flip and scale), while the same group of the next block is prefetched; then its other
    stages while it is in L1 (and the post-transform signs if ``post``).
    """
    W = _lanes(dst)
    G = 8 * W
    per_line = LINE // (32 // W)
    for q in range(0, n, nb):
        for g in range(q, q + nb, G):
            for p in range(soff + g + nb, soff + g + nb + G, per_line):
                _prefetch(src, p)
            if mode == ROTATE:
                bits = _group_bits(sbase + g, G, k0, k1)
                _hgroup_signed(src, soff + g, dst, doff + g, bits, tab, scale)
            elif mode == UNROTATE:
                _hgroup_signed(src, soff + g, dst, doff + g, _ZERO, tab, scale)
            else:
                _hgroup(src, soff + g, dst, doff + g)
        _sweeps(dst, doff + q, nb, G, post, k0, k1, sbase + q, tab)


@numba.njit(cache=CACHE)
def _row(src, soff, dst, doff, m, m1, mode, post, k0, k1, sbase, scale, tab):
    """``dst[doff : doff + n] <- H (pre(src[soff : soff + n]))``, n = 2**m, in place in dst.

    ``8W <= n`` and the row fits in L2; the work is blocked for L1. With ``post`` the
    post-transform signs are applied too.
    """
    n = 1 << m
    nb = 1 << min(m, m1)
    _blocks(src, soff, dst, doff, n, nb, mode, post and nb == n, k0, k1, sbase, scale, tab)
    if nb < n:  # the stages between L1 blocks, on the whole row (in L2)
        _sweeps(dst, doff, n, nb, post, k0, k1, sbase, tab)


@numba.njit(cache=CACHE)
def _cols(a, off, L, R, c0, C, post, k0, k1, sbase, tab):
    """Pass 2: H_R across the R rows of length L at ``a[off:]``, on columns ``c0 .. c0 + C``.

    While the rows are first read, the same rows of the next chunk are prefetched; with
    ``post``, rows are multiplied by their signs right after their last stage.
    """
    W = _lanes(a)
    per_line = LINE // (32 // W)
    h = 1  # butterfly stride, in rows
    while h < R:
        radix = 8 if 8 * h <= R else R // h  # the last sweep does the last 1 or 2 stages
        for b in range(0, R, radix * h):
            if h == 1:
                for r in range(b, b + radix):
                    i = off + r * L + c0 + C
                    for p in range(i, i + C, per_line):
                        _prefetch(a, p)
            for r in range(b, b + h):
                i = off + r * L + c0
                for c in range(i, i + C, W):
                    _bfly(a, c, h * L, radix)
                if post and radix * h == R:
                    for k in range(radix):
                        rk = r + k * h
                        _post_signs(a, off + rk * L + c0, C, k0, k1, sbase + rk * L + c0, tab)
        h *= radix


@numba.njit(inline="always", cache=CACHE)
def _budgets(itemsize):
    """``(m1, m2)``: log2 of an L1 block and of a pass-1 row, in elements."""
    m1 = 0
    while (2 << m1) * itemsize <= L1_BYTES:
        m1 += 1
    m2 = 0
    while (2 << m2) * itemsize <= L2_BYTES:
        m2 += 1
    return m1, m2


@numba.njit(inline="always", cache=CACHE)
def _grid(m, m1, m2, G, itemsize):
    """``(log2 L, L, R, C)`` of a large segment (2**m): R rows of L, column chunks of C."""
    m_row = m1 if m <= m2 else m2
    L = 1 << m_row
    R = 1 << (m - m_row)
    C = max(G, min(L // MIN_CHUNKS, CHUNK_BYTES // (R * itemsize)))
    return m_row, L, R, C


@numba.njit(parallel=True, cache=CACHE)
def transform(src, soff, sstride, dst, doff, dstride, nseg, m, mode, key0, key1, sbase, scale, tab):
    """For each segment t < nseg, with n = 2**m:

    ``dst[doff + t*dstride : ... + n] <- op(src[soff + t*sstride : ... + n])``, op by ``mode``
    (see the module docstring); ``sbase`` is the index of the segment's first sign in the
    stream ``(key0, key1)`` (the halves of the key). ``src`` may be ``dst`` with equal
    offsets (in place; PLAIN mode must be); segments must not otherwise overlap. ``scale``
    has the arrays' dtype and ``tab = sign_table(dtype)``.
    """
    W = _lanes(dst)
    G = 8 * W
    itemsize = 32 // W
    m1, m2 = _budgets(itemsize)
    n = 1 << m
    k0 = np.uint64(key0)
    k1 = np.uint64(key1)
    post = mode == UNROTATE

    if n < G:
        for t in numba.prange(nseg):
            _tiny(src, soff + t * sstride, dst, doff + t * dstride, m, mode, k0, k1, sbase, scale)
    elif m <= m1 or (m <= m2 and nseg > 1):
        # Segments that fit in L2: one work item each.
        for t in numba.prange(nseg):
            do = doff + t * dstride
            _row(src, soff + t * sstride, dst, do, m, m1, mode, post, k0, k1, sbase, scale, tab)
    else:
        # Large segments: rows of L in parallel (pass 1), then column chunks (pass 2).
        mr, L, R, C = _grid(m, m1, m2, G, itemsize)
        for t in range(nseg):
            so = soff + t * sstride
            do = doff + t * dstride
            for r in numba.prange(R):
                i, j, sb = so + r * L, do + r * L, sbase + r * L
                _row(src, i, dst, j, mr, m1, mode, False, k0, k1, sb, scale, tab)
            for c in numba.prange(L // C):
                _cols(dst, do, L, R, c * C, C, post, k0, k1, sbase, tab)


@numba.njit(cache=CACHE)
def transform_serial(
    src, soff, sstride, dst, doff, dstride, nseg, m, mode, key0, key1, sbase, scale, tab
):
    """:func:`transform` on the calling thread only, with the same results bit for bit.

    For small work (``nseg * 2**m`` below about 2**16 elements): entering a numba thread
    region costs a wake-up of the pool, and under CPU contention each call then waits
    milliseconds for a descheduled worker, far longer than the transform itself.
    """
    W = _lanes(dst)
    G = 8 * W
    itemsize = 32 // W
    m1, m2 = _budgets(itemsize)
    k0 = np.uint64(key0)
    k1 = np.uint64(key1)
    post = mode == UNROTATE
    for t in range(nseg):
        so = soff + t * sstride
        do = doff + t * dstride
        if (1 << m) < G:
            _tiny(src, so, dst, do, m, mode, k0, k1, sbase, scale)
        elif m <= m2:
            _row(src, so, dst, do, m, m1, mode, post, k0, k1, sbase, scale, tab)
        else:
            mr, L, R, C = _grid(m, m1, m2, G, itemsize)
            for r in range(R):
                i, j, sb = so + r * L, do + r * L, sbase + r * L
                _row(src, i, dst, j, mr, m1, mode, False, k0, k1, sb, scale, tab)
            for c in range(L // C):
                _cols(dst, do, L, R, c * C, C, post, k0, k1, sbase, tab)


def sign_table(dtype) -> np.ndarray:
    """``tab[r, c]``: the float sign bit if bit ``c`` of ``r`` is set, else 0 (``r < 2**W``)."""
    dtype = np.dtype(dtype)
    W = 32 // dtype.itemsize
    itype = np.dtype(f"u{dtype.itemsize}")
    r = np.arange(1 << W)[:, None]
    c = np.arange(W)[None, :]
    sign = itype.type(1) << itype.type(8 * dtype.itemsize - 1)
    return np.where((r >> c) & 1, sign, itype.type(0)).astype(itype)


def grid(m: int, itemsize: int) -> tuple[int, int, int]:
    """``(L, R, C)`` of :func:`transform`'s two-pass route for one segment of ``2**m``."""
    m1, m2 = _budgets(itemsize)
    return _grid(m, m1, m2, 8 * (32 // itemsize), itemsize)[1:]


def two_pass(m: int, itemsize: int) -> bool:
    """Whether :func:`transform` takes one segment of ``2**m`` by rows, then columns."""
    m1, _ = _budgets(itemsize)
    return (1 << m) >= 8 * (32 // itemsize) and m > m1


@numba.njit(inline="always", cache=CACHE)
def _row_streamed(src, soff, dst, doff, row, m, m1, mode, k0, k1, sbase, scale, tab):
    """:func:`_row` (no post-transform signs) done in ``row`` (in L2), then streamed out to
    ``dst[doff:]`` (32-byte aligned) with non-temporal stores: the lines of ``dst`` are
    never read first (no read-for-ownership)."""
    _row(src, soff, row, 0, m, m1, mode, False, k0, k1, sbase, scale, tab)
    for g in range(0, 1 << m, 8 * _lanes(row)):
        _stream8(row, g, dst, doff + g)


@numba.njit(nogil=True, cache=CACHE)
def cols_pass(a, off, m, post, key0, key1, sbase, tab, start, stop):
    """Pass 2 of :func:`transform`'s two-pass route for one segment of ``n = 2**m`` at
    ``a[off:]`` (post-transform signs if ``post``), on the column chunks that elements
    ``start .. stop`` select (a kernel over ``n`` elements aligned to ``n / nchunks``)."""
    W = _lanes(a)
    itemsize = 32 // W
    m1, m2 = _budgets(itemsize)
    mr, L, R, C = _grid(m, m1, m2, 8 * W, itemsize)
    per = (1 << m) // (L // C)
    k0 = np.uint64(key0)
    k1 = np.uint64(key1)
    for c in range(start // per, (stop + per - 1) // per):
        _cols(a, off, L, R, c * C, C, post, k0, k1, sbase, tab)


@numba.njit(nogil=True, cache=CACHE)
def rows_pass(
    src, soff, dst, doff, row, stream, m, mode, key0, key1, sbase, scale, tab, start, stop
):
    """Pass 1 of :func:`transform`'s two-pass route for one segment of ``n = 2**m`` (no
    post-transform signs), on the rows that elements ``start .. stop`` select. With
    ``stream`` (out of place, ``dst + doff`` 32-byte aligned) each row is transformed in
    ``row`` (L elements, in L2) and streamed out with non-temporal stores, so the lines of
    ``dst`` are never read first."""
    W = _lanes(dst)
    G = 8 * W
    itemsize = 32 // W
    m1, m2 = _budgets(itemsize)
    mr, L, R, C = _grid(m, m1, m2, G, itemsize)
    k0 = np.uint64(key0)
    k1 = np.uint64(key1)
    for r in range(start // L, (stop + L - 1) // L):
        sb = sbase + r * L
        if stream:
            _row_streamed(
                src, soff + r * L, dst, doff + r * L, row, mr, m1, mode, k0, k1, sb, scale, tab
            )
        else:
            _row(src, soff + r * L, dst, doff + r * L, mr, m1, mode, False, k0, k1, sb, scale, tab)
    if stream:
        _fence()
