"""Kernels of the ``uniform`` (DQ-GD) quantizer; :mod:`gradzip.compressors.uniform` holds the
torch reference they are tested against.

Coordinate i has ``b_i = floor((i+1) R) - floor(i R)`` bits (``lo`` or ``lo + 1``). The
coordinates with ``lo + 1`` bits before i number ``floor(i R) - lo i``, so each coordinate
knows its slot in the ``lo`` and ``hi`` code arrays without a scan, and the pieces of
``[0, d)`` run independently on the thread pool.

Three routes: :func:`encode` fills int32 code arrays (the plain form, tested against the
torch reference); :func:`encode_packed` quantizes and packs integer R <= 8 in groups of
eight codes; :func:`encode_streams` quantizes any R straight into the two packed sections.
The compressor uses the last two; each has its decoder.
"""

from __future__ import annotations

import numba
import numpy as np

from .bits import _pack_uints_group, _pack_uints_range, _unpack_uints_range
from .cache import CACHE
from .parallel import run

_HALF = np.float32(0.5)


@numba.njit(nogil=True, cache=CACHE)
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


@numba.njit(nogil=True, cache=CACHE)
def _encode_whole(y, b, r, codes, start, stop):
    """The same when every coordinate has ``b`` bits (integer R): a branch-free loop."""
    cell = np.float32(2.0) * r / np.float32(1 << b)
    top = np.int32((1 << b) - 1)
    for i in range(start, stop):
        v = min(max(y[i], -r), r)
        # v + r >= 0, so truncation is the floor (and vectorizes, unlike a floor call)
        codes[i] = min(np.int32((v + r) / cell), top)


def encode(y, rate: float, lo: int, r, codes_lo, codes_hi) -> None:
    """Cell indices of float32 ``y`` into the int32 arrays ``codes_lo`` and ``codes_hi``."""
    if codes_hi.size == 0 and lo > 0:  # integer R: all coordinates in codes_lo
        run(_encode_whole, y.size, y, lo, np.float32(r), codes_lo)
    else:
        run(_encode, y.size, y, float(rate), lo, np.float32(r), codes_lo, codes_hi)


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


@numba.njit(inline="always", cache=CACHE)
def _squeeze(w, b):
    """Eight codes < 2**b in the bytes of ``w`` -> the 8b-bit LSB-first stream of them."""
    w = (w & _M8) | (((w >> _U8) & _M8) << np.uint64(b))
    w = (w & _M16) | (((w >> _U16) & _M16) << np.uint64(2 * b))
    return (w & _M32) | ((w >> _U32) << np.uint64(4 * b))


@numba.njit(inline="always", cache=CACHE)
def _spread(a, b):
    """Inverse of :func:`_squeeze`: eight b-bit codes, one per byte."""
    a = (a & ((np.uint64(1) << np.uint64(4 * b)) - np.uint64(1))) | (
        (a >> np.uint64(4 * b)) << _U32
    )
    m2 = ((np.uint64(1) << np.uint64(2 * b)) - np.uint64(1)) * _LANES32
    a = (a & m2) | (((a >> np.uint64(2 * b)) & m2) << _U16)
    m1 = ((np.uint64(1) << np.uint64(b)) - np.uint64(1)) * _LANES16
    return (a & m1) | (((a >> np.uint64(b)) & m1) << _U8)


@numba.njit(nogil=True, cache=CACHE)
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


@numba.njit(nogil=True, cache=CACHE)
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


# --- any R: quantized straight into the two bit streams ----------------------------------------
# The lo codes form section 0 and the hi codes section 1, each pack_uints' LSB-first stream
# of fixed width w. Codes 8g .. 8g + 7 of a stream fill exactly bytes w g .. w g + w - 1, so
# groups of eight are packed as in the integer case. A piece [start, stop) knows where its
# codes start in both streams (``_n_hi_before``) and runs independently. Per chunk (in L1):
# 1. the widths, the codes, and each code's index in its stream, from the floors of i R (a
#    loop LLVM vectorizes: no scan, no loop-carried counter);
# 2. each code is stored at its index in both streams' staging buffers (a wide code's slot
#    in the lo buffer is the next lo code's, which overwrites it; and the other way round);
# 3. whole groups of eight are packed and written; the rest waits for the next chunk.
# A group that a piece shares with its neighbour (its first one when it starts inside a
# group, its last one when it ends inside one) is not written but returned, packed with
# zeros for the codes the piece does not have; :func:`encode_streams` ORs those together.

_GROUPS = _PCH // 8 + 2  # staging: a chunk's codes plus the part group before them


@numba.njit(inline="always", cache=CACHE)
def _n_hi_before(i, rate, lo):
    """How many of the coordinates before ``i`` have ``lo + 1`` bits."""
    return np.int64(np.floor(i * rate)) - lo * i


@numba.njit(inline="always", cache=CACHE)
def _chunk_scratch():
    """Per-piece scratch: floors, widths, stream indices, codes, the two staging buffers
    (int64, as the group packing kernels of :mod:`gradzip._numba.bits` read and write them)."""
    return (
        np.empty(_PCH + 1, np.float64),
        np.empty(_PCH, np.uint32),
        np.empty(_PCH, np.int64),
        np.empty(_PCH, np.int64),
        np.empty(_PCH, np.uint32),
        np.zeros(8 * _GROUPS, np.int64),
        np.zeros(8 * _GROUPS, np.int64),
    )


@numba.njit(inline="always", cache=CACHE)
def _chunk_layout(base, m, rate, lo, flo, wide, idx_lo, idx_hi):
    """For coordinates ``base .. base + m``: ``wide`` (1 if it has lo + 1 bits), its index
    among the chunk's lo codes and among its hi codes; returns how many hi codes there are."""
    for j in range(m + 1):
        flo[j] = np.floor((base + j) * rate)
    f0 = flo[0]
    for j in range(m):
        nh = np.int64(flo[j] - f0) - lo * j  # hi codes before j in the chunk
        wide[j] = np.uint32(flo[j + 1] - flo[j] > lo)
        idx_hi[j] = nh
        idx_lo[j] = j - nh
    return np.int64(flo[m] - f0) - lo * m


@numba.njit(inline="always", cache=CACHE)
def _edge_group(g, w, st, q, edges, s, k):
    """Group ``g`` of stream ``s`` from codes ``st[q : q + 8]`` into ``edges[s, k]`` as (its
    first byte index, its w bytes), for :func:`encode_streams` to merge."""
    edges[s, k, 0] = g * w
    _pack_uints_group(st, q, w, edges[s, k], 1)


@numba.njit(inline="always", cache=CACHE)
def _flush(out, st, fill, g, w, first_g, last, edges, s, st8, acc):
    """Write the whole groups among ``st[:fill]`` (group ``g`` first); with ``last`` also the
    final part group, zero-padded. Moves the leftover codes to the front of ``st``."""
    q = 0
    if g == first_g and fill >= 8:  # the group shared with the previous piece
        _edge_group(g, w, st, 0, edges, s, 0)
        q, g = 8, g + 1
    nfull = (fill - q) // 8
    if w <= 8:  # as in the integer kernel: bytes, squeeze (vectorized), write
        for j in range(8 * nfull):
            st8[j] = np.uint8(st[q + j])
        s64 = st8.view(np.uint64)
        for t in range(nfull):
            acc[t] = _squeeze(s64[t], w)
        os = out[g * w : (g + nfull) * w]
        for t in range(nfull):
            v = acc[t]
            for b in range(w):
                os[t * w + b] = np.uint8((v >> np.uint64(8 * b)) & np.uint64(0xFF))
    else:
        _pack_uints_range(st[q : q + 8 * nfull], w, out[g * w : (g + nfull) * w], 0, nfull)
    q += 8 * nfull
    g += nfull
    if last and fill - q > 0:  # the final part group, shared with the next piece
        for j in range(fill, q + 8):
            st[j] = 0
        _edge_group(g, w, st, q, edges, s, 0 if g == first_g else 1)
        q, g = fill, g + 1
    rest = fill - q
    for j in range(rest):
        st[j] = st[q + j]
    return rest, g


@numba.njit(nogil=True, cache=CACHE)
def _encode_streams(y, rate, lo, r, out_lo, out_hi, start, stop):
    """Returns ``edges``: ``edges[s, k] = (first byte, w bytes)`` of stream s's group shared
    with the previous (k = 0) or next (k = 1) piece, or first byte -1."""
    hi_w = lo + 1
    cell_lo = np.float32(2.0) * r / np.float32(1 << lo)
    cell_hi = np.float32(2.0) * r / np.float32(2 << lo)
    top_lo, top_hi = np.float32((1 << lo) - 1), np.float32((2 << lo) - 1)
    flo, wide, idx_lo, idx_hi, codes, st_lo, st_hi = _chunk_scratch()
    st8 = np.zeros(8 * _GROUPS, np.uint8)
    acc = np.empty(_GROUPS, np.uint64)
    edges = np.empty((2, 2, 2 + lo), np.int64)
    edges[:, :, 0] = -1
    nh0 = _n_hi_before(start, rate, lo)
    k_lo, k_hi = start - nh0, nh0  # the piece's first index in each stream
    g_lo, g_hi = k_lo // 8, k_hi // 8  # the group being filled
    first_lo = g_lo if k_lo % 8 else -1  # a group shared with the previous piece
    first_hi = g_hi if k_hi % 8 else -1
    f_lo, f_hi = k_lo % 8, k_hi % 8  # codes staged (the previous piece's count as zeros)
    for j in range(f_lo):
        st_lo[j] = 0
    for j in range(f_hi):
        st_hi[j] = 0
    for base in range(start, stop, _PCH):
        m = min(_PCH, stop - base)
        kh = _chunk_layout(base, m, rate, lo, flo, wide, idx_lo, idx_hi)
        ys = y[base : base + m]
        for j in range(m):
            # v + r >= 0, so truncation is the floor (and vectorizes, unlike a floor call).
            # Both quotients, then an integer blend: dividing by a selected cell kept LLVM
            # from vectorizing the loop (4x slower).
            v = min(max(ys[j], -r), r) + r
            a = np.int32(min(v / cell_lo, top_lo))
            b = np.int32(min(v / cell_hi, top_hi))
            codes[j] = np.uint32(a + (b - a) * np.int32(wide[j]))
        # unsigned indices: a signed one costs a wraparound check that made this loop 5x slower
        for j in range(m):
            c = codes[j]
            st_lo[np.uint64(f_lo + idx_lo[j])] = c
            st_hi[np.uint64(f_hi + idx_hi[j])] = c
        last = base + m >= stop
        if lo:
            f_lo, g_lo = _flush(
                out_lo, st_lo, f_lo + m - kh, g_lo, lo, first_lo, last, edges, 0, st8, acc
            )
        f_hi, g_hi = _flush(
            out_hi, st_hi, f_hi + kh, g_hi, hi_w, first_hi, last, edges, 1, st8, acc
        )
    return edges


@numba.njit(nogil=True, cache=CACHE)
def _decode_streams(data_lo, data_hi, rate, lo, r, out, start, stop):
    hi_w = lo + 1
    cell_lo = np.float32(2.0) * r / np.float32(1 << lo)
    cell_hi = np.float32(2.0) * r / np.float32(2 << lo)
    flo, wide, idx_lo, idx_hi, codes, st_lo, st_hi = _chunk_scratch()
    for base in range(start, stop, _PCH):
        m = min(_PCH, stop - base)
        kh = _chunk_layout(base, m, rate, lo, flo, wide, idx_lo, idx_hi)
        nh0 = _n_hi_before(base, rate, lo)
        k_lo, k_hi = base - nh0, nh0
        # the groups holding the chunk's codes, whole (bits' kernel: zeros past the end)
        if lo:
            g0, g1 = k_lo // 8, (k_lo + m - kh + 7) // 8
            _unpack_uints_range(data_lo[g0 * lo :], lo, st_lo, 0, 8 * (g1 - g0))
        g0, g1 = k_hi // 8, (k_hi + kh + 7) // 8
        _unpack_uints_range(data_hi[g0 * hi_w :], hi_w, st_hi, 0, 8 * (g1 - g0))
        s_lo, s_hi = k_lo % 8, k_hi % 8
        for j in range(m):  # both loads, then a select (unsigned indices, as in encoding)
            c_lo = st_lo[np.uint64(s_lo + idx_lo[j])]
            c_hi = st_hi[np.uint64(s_hi + idx_hi[j])]
            codes[j] = c_hi if wide[j] else c_lo
        os = out[base : base + m]
        for j in range(m):  # both centres, then a select (vectorizes; see encoding)
            c = np.float32(codes[j]) + _HALF
            a = c * cell_lo - r if lo else np.float32(0.0)
            b = c * cell_hi - r
            os[j] = b if wide[j] else a


def encode_streams(y, rate: float, lo: int, r, out_lo, out_hi, pieces=None) -> None:
    """Quantize float32 ``y`` (any R, ``lo + 1 <= 25`` bits) straight into the two packed
    sections ``out_lo`` and ``out_hi`` (``pack_uints``' layout, every byte written).
    ``pieces`` (a list of ``(start, stop)`` covering ``[0, y.size)`` in order) overrides the
    split across threads (for tests)."""
    args = (y, float(rate), lo, np.float32(r), out_lo, out_hi)
    edges = np.stack(run(_encode_streams, y.size, *args, parts=pieces))
    for s, (out, w) in enumerate(((out_lo, lo), (out_hi, lo + 1))):
        shared = edges[:, s].reshape(-1, edges.shape[-1])
        shared = shared[shared[:, 0] >= 0]
        if not shared.size:
            continue
        pos = (shared[:, :1] + np.arange(w)).reshape(-1)
        val = shared[:, 1 : 1 + w].reshape(-1).astype(np.uint8)
        keep = pos < out.size  # a stream's last group may be cut short
        out[pos[keep]] = 0
        np.bitwise_or.at(out, pos[keep], val[keep])


def decode_streams(data_lo, data_hi, rate: float, lo: int, r, out, pieces=None) -> None:
    """Inverse of :func:`encode_streams`: the cell centres into float32 ``out`` (0 where a
    coordinate has no bits); ``pieces`` as there."""
    args = (data_lo, data_hi, float(rate), lo, np.float32(r), out)
    run(_decode_streams, out.size, *args, parts=pieces)
