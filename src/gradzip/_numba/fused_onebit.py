"""The fused one-bit codec of FO-SGD on the CPU (float32, ``n = 2**m >= 2**16``): the
rotation, the norm and the dithered one-bit quantizer in two passes over memory; the
inverse rotation straight from the packed bits. Behind :func:`gradzip.hadamard.rotate_quantize_`
and :func:`gradzip.hadamard.unrotate_signs`, which check the tensors; both equal their
unfused composition of references bit for bit.

Encoder
-------
The one-bit FO-SGD encoder with the ``norm`` scale rule needs only ``||x||_2`` (the rotation
preserves it) to quantize ``Phi x``. Done one after the other, the norm, the rotation and
the quantizer cost five passes over memory (read x; rows; columns read and written back;
read Phi x). :func:`rotate_quantize` does it in two:

1. Pass 1 (:func:`rotate_stats`) takes the sum of squares of x (float64; non-finite iff some
   x is) from the registers that load it for the first stages of the transform
   (``_hgroup_stats``): no pass of its own. Each row is done in L2 and streamed out with
   non-temporal stores spread over the next row's work, into column blocks
   (:func:`_layout`): the part of row r in the block of columns ``Q S .. Q S + S`` goes to
   ``Q R T + r T``, with ``T = S + P``, ``S`` = 1024 floats at 2**24 and a pad ``P`` of
   one cache line.
2. The caller's ``scale_of`` picks lambda from the norm (or refuses non-finite input)
   between the passes.
3. Pass 2 (:func:`cols_quantize`) reads each column chunk (``C <= S`` columns) once into a
   per-thread buffer, finishes its stages there and quantizes it from L2, eight elements
   to a vector compare whose mask is the payload's byte (``_quant32``: dither hash, sign,
   packing in registers). The chunk is never written back: the rotated vector is never
   stored, and no dirty line of the intermediate goes back to memory.

Decoder
-------
:func:`unrotate_signs` computes the inverse rotation of ``lam * b``. Its pass 1
(:func:`unrotate_signs_rows`) builds its input from the payload's bits in registers
(``_hgroup_bits``) instead of unpacking them into a float vector first: one pass over
``4 n`` bytes less in each direction. From ``2**CHUNKED_DECODE_FROM`` its pass 1 streams
into a scratch buffer in the same layout and its pass 2 (:func:`cols_unrotate`) finishes
each chunk in L2 and streams it to the output rows with non-temporal stores; below, both
passes work in place in the output (pass 2 is :func:`gradzip._numba.fwht.cols_pass`).

Both run their passes as plain ``nogil`` kernels on pieces of the work that the calling
thread and the pool pull one after another (:func:`gradzip._numba.parallel.run_pieces`),
not with ``prange``: the statistics and the quantizer are loops that LLVM vectorizes, which
it does much worse inside numba's parallel regions; and with a few pieces per thread, a
thread that the OS deschedules on a busy machine leaves its remaining pieces to the others
instead of holding up the pass.

The timings behind the layout, the streaming stores and the routes are in ``docs/perf.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numba
import numpy as np

from .. import _alloc
from .bits import _load_u64
from .cache import CACHE
from .fwht import (
    _ZERO,
    L2_BYTES,
    LINE,
    _budgets,
    _grid,
    _group_bits,
    _sweeps,
    cols_pass,
    grid,
)
from .parallel import run_pieces, worker_buffers
from .rng import _GAMMA, U64, dither16_word
from .simd import (
    _bfly,
    _bfly_to,
    _copy8,
    _fence,
    _hgroup_bits,
    _hgroup_stats,
    _lanes,
    _prefetch,
    _signs,
    _stream8,
    prescale,
    quant32,
    quant32_sum,
)

SEGMENT_BYTES = 1 << 12  # the fused passes' intermediate: rows stored in runs of this
#: log2 of the smallest length the decoder takes through scratch (pass 1 streams its rows
#: into it in column blocks, pass 2 reads column chunks and streams them into the output).
#: Below, the data stays in L3 and working in place is faster (docs/perf.md).
CHUNKED_DECODE_FROM = 24


def fused_ok(n: int) -> bool:
    """Whether the fused codec takes a float32 vector of ``n`` elements: a power of two
    longer than a pass-1 row (the two-pass route of :func:`gradzip._numba.fwht.transform`)."""
    return n >= 1 and n & (n - 1) == 0 and 4 * n > L2_BYTES


def scaled_sign_table(scale: float) -> np.ndarray:
    """``stab[r, c]``: ``-scale`` if bit ``c`` of ``r`` is set, else ``scale`` (float32,
    ``r < 256``): the sign flip and the scale of 8 float32 lanes in one multiply, for
    :func:`rotate_stats` (``fl(x (-s)) = -fl(x s)``, so the products are the same)."""
    bits = (np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1
    return np.where(bits == 1, -np.float32(scale), np.float32(scale)).astype(np.float32)


def layout(m: int) -> tuple[int, int]:
    """``(S, P)``: the column blocks of the fused passes' intermediate for ``n = 2**m`` (see
    :func:`_layout`)."""
    L, _, C = grid(m, 4)
    return _layout(L, C)


def scratch_size(m: int) -> int:
    """Elements of the fused passes' intermediate for ``n = 2**m`` (``n`` and the padding
    of :func:`_layout`)."""
    L, R, _ = grid(m, 4)
    S, P = layout(m)
    return (L // S) * R * (S + P)


@numba.njit(inline="always", cache=CACHE)
def _layout(L, C):
    """``(S, P)`` of the intermediate that pass 1 of the fused encoder and decoder writes
    and pass 2 reads: the ``R x L`` matrix in column blocks of ``S`` columns (a multiple of
    the chunk width ``C``), block ``Q`` at ``Q R (S + P)``, its row ``r`` at ``+ r (S + P)``.

    Pass 1 streams each row out in runs of ``S`` floats (``SEGMENT_BYTES``; runs of one
    chunk's 512 bytes, 256 KiB apart, were slower: docs/perf.md). Pass 2 reads a chunk
    from rows ``S + P`` apart; the pad of one cache line staggers them over the L2's sets
    (``4 S`` bytes is a multiple of its set stride).
    """
    S = max(C, min(L, SEGMENT_BYTES // 4))
    return S, LINE // 4


@numba.njit(inline="always", cache=CACHE)
def _block_base(c0, R, S, P):
    """Offset of column ``c0`` of row 0 in the layout of :func:`_layout`."""
    return (c0 // S) * (R * (S + P)) + c0 % S


@numba.njit(inline="always", cache=CACHE)
def _stream_groups(prev, dst, rp, R, S, P, s, t):
    """Register groups ``s .. t`` of row ``rp`` (held in ``prev``) out to ``dst`` in the
    layout of :func:`_layout`, with non-temporal stores; returns ``t``."""
    G = 8 * _lanes(prev)
    for k in range(s, t):
        g = k * G
        _stream8(prev, g, dst, _block_base(g, R, S, P) + rp * (S + P))
    return t


@numba.njit(inline="always", cache=CACHE)
def _sweeps_streaming(a, off, n, h, prev, dst, rp, R, S, P, s, ng, per):
    """:func:`_sweeps` (no post-transform signs) that also streams ``per`` register groups
    of the previous row (see :func:`_row_streaming`) after each group of butterflies;
    returns the groups streamed so far."""
    W = _lanes(a)
    G = 8 * W
    while h < n:
        radix = 8 if 8 * h <= n else n // h
        for b in range(off, off + n, radix * h):
            for jg in range(b, b + h, G):
                for j in range(jg, jg + G, W):
                    _bfly(a, j, h, radix)
                if s < ng:
                    s = _stream_groups(prev, dst, rp, R, S, P, s, min(ng, s + per))
        h *= radix
    return s


@numba.njit(cache=CACHE)
def _row_streaming(src, data, r, row, rp, prev, dst, m, k0, k1, stab, sq, tab, c, enc):
    """Pass 1 of the fused encoder or decoder on row ``r`` (in ``row``, in L2), while row
    ``rp`` (in ``prev``; none if ``rp < 0``) goes out to ``dst`` (:func:`_layout`).

    The encoder (``enc``) reads ``src`` and adds the squares to ``sq[0:8]``
    (``_hgroup_stats``); the decoder builds its input from the packed bits ``data``
    (``_hgroup_bits``). The other's arguments are unused.

    The ``4 L`` bytes of non-temporal stores are spread over the first two thirds of the
    row's work: a register group after each input group and two after each group of
    butterflies in L1, none in the L2 sweep. Streamed after the row, they stall the core
    until they drain; spread over the whole row or packed into its first half, pass 1
    measured slower (docs/perf.md).
    """
    W = _lanes(row)
    G = 8 * W
    m1, m2 = _budgets(4)
    mr, L, R, C = _grid(m, m1, m2, G, 4)
    S, P = _layout(L, C)
    nb = 1 << m1
    ng = L // G
    i = r * L
    s = ng if rp < 0 else 0
    per_line = LINE // 4
    for q in range(0, L, nb):
        for g in range(q, q + nb, G):
            if enc:
                for p in range(i + g + nb, i + g + nb + G, per_line):
                    _prefetch(src, p)
                _hgroup_stats(src, i + g, row, g, _group_bits(i + g, G, k0, k1), stab, sq)
            else:
                _hgroup_bits(row, g, _load_u64(data, (i + g) // 8), tab, c)
            if s < ng:
                s = _stream_groups(prev, dst, rp, R, S, P, s, s + 1)
        s = _sweeps_streaming(row, q, nb, G, prev, dst, rp, R, S, P, s, ng, 2)
    _stream_groups(prev, dst, rp, R, S, P, s, ng)  # at 2**24 all are out by now
    if nb < L:  # the stages between L1 blocks, on the whole row (in L2)
        _sweeps(row, 0, L, nb, False, _ZERO, _ZERO, 0, tab)


@numba.njit(cache=CACHE)
def _rows_streaming(src, data, dst, rows2, m, k0, k1, stab, sq, tab, c, enc, start, stop):
    """:func:`_row_streaming` on the rows of elements ``start .. stop``, alternating between
    the halves of ``rows2`` (2 L floats); the last row is streamed after its compute. The
    encoder's sums of squares go to ``sq[r]``."""
    m1, m2 = _budgets(4)
    mr, L, R, C = _grid(m, m1, m2, 8 * _lanes(rows2), 4)
    S, P = _layout(L, C)
    r0 = start // L
    r1 = (stop + L - 1) // L
    part = np.empty(8, np.float64)
    for r in range(r0, r1):
        row = rows2[(r % 2) * L : (r % 2) * L + L]
        prev = rows2[((r + 1) % 2) * L : ((r + 1) % 2) * L + L]
        rp = r - 1 if r > r0 else -1
        part[:] = 0.0
        _row_streaming(src, data, r, row, rp, prev, dst, m, k0, k1, stab, part, tab, c, enc)
        if enc:
            sq[r] = part.sum()
    if r1 > r0:
        last = ((r1 - 1) % 2) * L
        _stream_groups(rows2[last : last + L], dst, r1 - 1, R, S, P, 0, L // (8 * _lanes(rows2)))
    _fence()


@numba.njit(nogil=True, cache=CACHE)
def rotate_stats(src, dst, rows2, m, key0, key1, stab, sq, start, stop):
    """Pass 1 of the fused encoder (float32, ``n = 2**m``, ``fused_ok(n)``) on elements
    ``start .. stop`` (whole rows of ``L``; one piece of the work, called from threads).

    For each row ``r``: its pass 1 of the ROTATE transform, done in half of ``rows2`` (2 L
    floats, in L2) and streamed out to ``dst`` (32-byte aligned, :func:`scratch_size`
    elements) in the layout of :func:`_layout` with non-temporal stores, spread over the
    next row's work (:func:`_row_streaming`): plain stores would first read each line of
    ``dst`` from memory (read-for-ownership), 64 MiB of traffic at 2**24 for nothing.
    On the way, from the registers that load ``src`` (``_hgroup_stats``): ``sq[r]``, the
    float64 sum of squares of the row (non-finite iff some value of the row is),
    :func:`gradzip._numba.onebit.stats32`'s value up to summation order, without a pass
    of its own over the row. ``stab = scaled_sign_table(scale)`` (the signs and the
    ``1/sqrt(n)`` scale).
    """
    nothing = np.empty(0, np.uint8)  # the decoder's bits; stab stands in for its sign table
    k0, k1 = np.uint64(key0), np.uint64(key1)
    _rows_streaming(
        src, nothing, dst, rows2, m, k0, k1, stab, sq, stab, np.float32(0), True, start, stop
    )


@numba.njit(inline="always", cache=CACHE)
def _chunk_sweeps(a, R, base, T, C, buf):
    """``buf`` (R x C) <- ``H_R`` across the rows of a column chunk of the R-row matrix in
    ``a``, its row ``r`` at ``a[base + r T : + C]`` (see :func:`_layout`).

    Like :func:`_cols`, but the first sweep reads the chunk from ``a`` and writes it to the
    thread's ``buf`` (in L2) and the other sweeps work in ``buf``: ``a`` is only read, so
    no dirty cache line of the intermediate goes back to memory.
    """
    W = _lanes(a)
    h = 1
    while h < R:
        radix = 8 if 8 * h <= R else R // h
        for b in range(0, R, radix * h):
            for r in range(b, b + h):
                j = r * C
                if h == 1:
                    i = base + r * T
                    for c in range(0, C, W):
                        _bfly_to(a, i + c, T, buf, j + c, C, radix)
                else:
                    for c in range(j, j + C, W):
                        _bfly(buf, c, h * C, radix)
        h *= radix


@numba.njit(inline="always", cache=CACHE)
def _prefetch_row(a, i, C):
    """Hint: ``a[i : i + C]`` into cache (a row of the next column chunk). Issued while a
    chunk is finished from L2, not during its first sweep (where these loads compete with
    the chunk's own; docs/perf.md)."""
    for p in range(i, i + C, LINE // 4):
        _prefetch(a, p)


@numba.njit(inline="always", cache=CACHE)
def _quantize_chunk(a, buf, L, R, c0, C, nxt, T, lam, key, out, acc):
    """Row ``r`` of ``buf`` (R x C) holds elements ``r L + c0 ..``: ``out`` <- their bits
    ``y + lam * u < 0``, ``u = dither16`` of ``key`` (uint64; four values per 64-bit word,
    see :func:`gradzip.rng.dither16`), 32 elements at a time (:func:`_quant32`). ``C`` is
    a multiple of 32. Meanwhile row ``r`` of the next chunk (``a[nxt + r T:]``; none if
    ``nxt < 0``) is prefetched."""
    gpr = C // 32
    ip = 0.0
    lam16, exact = prescale(lam)
    step = U64(U64(8) * _GAMMA)  # from one group's first word to the next's
    for r in range(R):
        if nxt >= 0:
            _prefetch_row(a, nxt + r * T, C)
        z0 = dither16_word(key, (r * L + c0) // 4)
        o = (r * L + c0) // 8
        if acc.size:  # <b, y> of the row: float32 lanes, summed in float64 per row
            acc[:] = 0
            for g in range(gpr):
                quant32_sum(buf, (r * gpr + g) * 32, z0, lam, lam16, exact, out, o + 4 * g, acc)
                z0 = U64(z0 + step)
            for j in range(8):
                ip += np.float64(acc[j])
            continue
        for g in range(gpr):
            quant32(buf, (r * gpr + g) * 32, z0, lam, lam16, exact, out, o + 4 * g)
            z0 = U64(z0 + step)
    return ip


@numba.njit(inline="always", cache=CACHE)
def _chunk_at(q, L, R, C):
    """``(c0, base, nxt, T)`` of column chunk ``q`` in the layout of :func:`_layout`: its
    first column, the offsets of its row 0 and of the next chunk's (-1 after the last
    chunk) and the row stride."""
    S, P = _layout(L, C)
    c0 = q * C
    nxt = _block_base(c0 + C, R, S, P) if c0 + C < L else -1
    return c0, _block_base(c0, R, S, P), nxt, S + P


@numba.njit(nogil=True, cache=CACHE)
def cols_quantize(a, m, lam, key, out, buf, start, stop, ip):
    """Pass 2 of the fused encoder: ``out`` <- the packed bits of ``Phi x + lam * u < 0``.

    ``a`` holds pass 1's result (:func:`rotate_stats`, in the layout of :func:`_layout`)
    for ``n = 2**m``, ``u`` is ``dither16`` of the key ``key`` (uint64) and ``lam`` a
    float32. Each column chunk is read once into ``buf`` (:func:`_chunk_sweeps`),
    finished there and quantized from L2: the rotated vector is never stored. Does the
    column chunks ``start // (n / nchunks) ..`` up to ``stop``'s (a kernel over ``n``
    elements aligned to ``n / nchunks``), with the chunk buffer ``buf`` (float32, at least
    ``R * C`` elements; see :func:`grid`). Where ``ip`` (float64, one per chunk) is not
    empty, ``ip[q]`` <- ``<b, y>`` over chunk q, summed in the quantizer's registers
    (:func:`quant32_sum`), for the scale fitted after the bits.
    """
    acc = np.zeros(8 if ip.size else 0, np.float32)
    W = _lanes(a)
    m1, m2 = _budgets(4)
    mr, L, R, C = _grid(m, m1, m2, 8 * W, 4)
    per = (1 << m) // (L // C)
    for q in range(start // per, (stop + per - 1) // per):
        c0, base, nxt, T = _chunk_at(q, L, R, C)
        _chunk_sweeps(a, R, base, T, C, buf)
        s = _quantize_chunk(a, buf, L, R, c0, C, nxt, T, lam, U64(key), out, acc)
        if ip.size:
            ip[q] = s


@numba.njit(nogil=True, cache=CACHE)
def unrotate_signs_rows(data, dst, rows2, m, c, tab, chunked, start, stop):
    """Pass 1 of the fused decoder (float32, ``n = 2**m``, ``fused_ok(n)``) on elements
    ``start .. stop`` (whole rows; one piece of the work, called from threads).

    ``dst`` <- pass 1 of the UNROTATE transform of ``v = lam * b`` (``b = +-1`` from the
    packed bits ``data``), given ``c = fl(lam * scale)``: since ``fl(+-lam * scale) =
    +-c``, the scaled input of each register group is built from 8W bits in registers
    (:func:`_hgroup_bits`). The decoded vector is never unpacked into memory: pass 1 reads
    ``n / 8`` bytes instead of ``4 n``. With ``chunked``, each row is done in half of
    ``rows2`` (2 L floats, in L2) and streamed to ``dst`` (32-byte aligned,
    :func:`scratch_size` elements) in the layout of :func:`_layout` during the next row's
    work (:func:`_row_streaming`), for :func:`cols_unrotate`; else it is done in place in
    ``dst`` (row-major) for :func:`cols_pass`.
    """
    if chunked:
        nothing = np.empty(0, np.float32)
        sq = np.empty(0, np.float64)
        stab = np.empty((0, 8), np.float32)
        _rows_streaming(
            nothing, data, dst, rows2, m, _ZERO, _ZERO, stab, sq, tab, c, False, start, stop
        )
        return
    W = _lanes(dst)
    G = 8 * W
    m1, m2 = _budgets(4)
    mr, L, R, C = _grid(m, m1, m2, G, 4)
    nb = 1 << m1
    for r in range(start // L, (stop + L - 1) // L):
        off = r * L
        for q in range(0, L, nb):
            for g in range(q, q + nb, G):
                _hgroup_bits(dst, off + g, _load_u64(data, (off + g) // 8), tab, c)
            _sweeps(dst, off + q, nb, G, False, _ZERO, _ZERO, 0, tab)
        if nb < L:
            _sweeps(dst, off, L, nb, False, _ZERO, _ZERO, 0, tab)


@numba.njit(nogil=True, cache=CACHE)
def cols_unrotate(a, out, m, key0, key1, tab, buf, stream, start, stop):
    """Pass 2 of the fused decoder: ``out`` <- ``s * H_R`` across the rows of pass 1's
    result ``a`` (:func:`unrotate_signs_rows`, in the layout of :func:`_layout`), ``s`` the
    rotation's signs of the key ``(key0, key1)``. Each column chunk is read once into
    ``buf`` (:func:`_chunk_sweeps`), finished there, multiplied by its signs and written
    to its place in ``out`` (row-major): with non-temporal stores if ``stream`` (``out``
    32-byte aligned; no line of ``out`` is read first), else plain ones. ``a`` is never
    written. Does the column chunks that elements ``start .. stop`` select, as
    :func:`cols_quantize`.
    """
    W = _lanes(a)
    G = 8 * W
    m1, m2 = _budgets(4)
    mr, L, R, C = _grid(m, m1, m2, G, 4)
    per = (1 << m) // (L // C)
    k0 = np.uint64(key0)
    k1 = np.uint64(key1)
    for q in range(start // per, (stop + per - 1) // per):
        c0, base, nxt, T = _chunk_at(q, L, R, C)
        _chunk_sweeps(a, R, base, T, C, buf)
        for r in range(R):
            if nxt >= 0:
                _prefetch_row(a, nxt + r * T, C)
            e = r * L + c0
            for g in range(0, C, G):
                _signs(buf, r * C + g, _group_bits(e + g, G, k0, k1), tab)
                if stream:
                    _stream8(buf, r * C + g, out, e + g)
                else:
                    _copy8(buf, r * C + g, out, e + g)
    if stream:
        _fence()


# ---------------------------------------------------------------------------------------
# The two passes on the pool
# ---------------------------------------------------------------------------------------

_SCALED_TABLES: dict[int, np.ndarray] = {}


def _scaled_table(m: int) -> np.ndarray:
    """:func:`scaled_sign_table` of the float32 scale ``2**(-m/2)``."""
    tab = _SCALED_TABLES.get(m)
    if tab is None:
        scale = np.float32(1.0 / math.sqrt(1 << m))
        tab = _SCALED_TABLES[m] = scaled_sign_table(scale)
    return tab


def rotate_quantize(
    x: np.ndarray,
    scratch: np.ndarray,
    m: int,
    key0: int,
    key1: int,
    scale_of: Callable[[float, bool], float],
    dither_key: np.uint64,
    out: np.ndarray,
    with_inner: bool,
) -> float | tuple[float, float]:
    """The encoder: ``out`` <- the packed bits of ``Phi x + lam * u < 0``; returns lambda
    (with ``with_inner``: ``(lambda, <b, Phi x>)``).

    ``x``: float32, ``2**m`` elements, ``fused_ok``; ``scratch``: pass 1's result,
    :func:`scratch_size` ``(m)`` float32 elements, 32-byte aligned; ``(key0, key1)``: the
    rotation's key; ``lam = scale_of(||x||_2**2, finite)`` (a float32 value) is called
    between the passes and may raise to refuse ``x``, leaving ``out`` untouched; ``u`` is
    ``dither16`` of ``dither_key``; ``out``: ``2**m / 8`` bytes.
    """
    n = 1 << m
    L, R, C = grid(m, 4)
    sq = np.empty(R, np.float64)
    stab = _scaled_table(m)
    rows = worker_buffers("rows", 2 * L, np.float32)
    bufs = worker_buffers("chunks", R * C, np.float32)

    def pass1(w: int, i: int, j: int) -> None:
        rotate_stats(x, scratch, rows[w], m, key0, key1, stab, sq, i, j)

    run_pieces(n, L, pass1)
    total = float(sq.sum())
    finite = math.isfinite(total)  # a float64 sum of float32 squares cannot overflow
    lam = scale_of(total, finite)
    lam32 = np.float32(lam)
    ip = np.zeros(L // C if with_inner else 0, np.float64)
    run_pieces(
        n,
        n // (L // C),
        lambda w, i, j: cols_quantize(scratch, m, lam32, dither_key, out, bufs[w], i, j, ip),
    )
    return (lam, float(ip.sum())) if with_inner else lam


def unrotate_signs(
    data: np.ndarray, out: np.ndarray, m: int, lam: float, key0: int, key1: int, tab: np.ndarray
) -> None:
    """The decoder: ``out`` (float32, ``2**m`` elements, ``fused_ok``) <- ``Phi^T (lam * b)``
    for the signs ``b`` packed in ``data`` (``b = -1`` where the bit is set); ``lam`` a
    float32 value, ``(key0, key1)`` the rotation's key, ``tab = sign_table(float32)``.
    Pass 2 streams into ``out`` with non-temporal stores where it is 32-byte aligned."""
    n = 1 << m
    L, R, C = grid(m, 4)
    c = np.float32(lam) * np.float32(1.0 / math.sqrt(n))
    chunked = m >= CHUNKED_DECODE_FROM
    rows = worker_buffers("rows", 2 * L, np.float32)  # the encoder's: used by the chunked route
    a = _alloc.scratch_array(scratch_size(m)) if chunked else out
    run_pieces(
        n,
        L,
        lambda w, i, j: unrotate_signs_rows(data, a, rows[w], m, c, tab, chunked, i, j),
    )
    if chunked:
        bufs = worker_buffers("chunks", R * C, np.float32)
        stream = out.ctypes.data % 32 == 0  # else pass 2 writes with plain stores

        def pass2(w: int, i: int, j: int) -> None:
            cols_unrotate(a, out, m, key0, key1, tab, bufs[w], stream, i, j)
    else:

        def pass2(w: int, i: int, j: int) -> None:
            cols_pass(out, 0, m, True, key0, key1, 0, tab, i, j)

    run_pieces(n, n // (L // C), pass2)
