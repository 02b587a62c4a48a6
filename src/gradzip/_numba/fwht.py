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

1. *Rows* (pass 1). View the segment as ``R x L`` with a row of ``L`` elements (256 KiB)
   fitting in L2. Each row is transformed completely: first L1-sized blocks (16 KiB, all
   their stages while in L1; the input is read, sign-flipped and scaled on the way in, and
   the next block is prefetched meanwhile), then the few stages between blocks while the
   row is still in L2.
2. *Columns* (pass 2). The remaining ``log2 R`` stages act across rows. A chunk of ``C``
   adjacent columns of all ``R`` rows fits in L2 (128 KiB, leaving room for the next chunk,
   prefetched during the first sweep), where butterflies between rows are contiguous
   vector operations. Post-transform signs are applied before the chunk leaves L2.

Rows (pass 1) and column chunks (pass 2) are spread over the threads with ``prange``;
many small segments are spread one segment per work item instead.

Vector code
-----------
numba's auto-vectorizer handles butterflies with a run-time stride poorly (it needs alias
checks that fail for short strides) and the strides 1, 2, 4 not at all, so the arithmetic
is spelled out in a handful of tiny LLVM "intrinsics" on 32-byte vectors of ``W`` lanes
(8 float32 or 4 float64):

- ``_hgroup*``: the lowest ``log2(8 W)`` stages on ``8 W`` contiguous elements, in
  registers. Inside a vector, stage ``t`` is ``shuffle(x, c -> c ^ t) + sign_t * x`` (one
  shuffle and one exact FMA, ``sign_t`` being +-1); then a radix-8 butterfly across the 8
  vectors.
- ``_bfly8/4/2(a, i, s)``: 3/2/1 stages across 8/4/2 vectors at ``a[i + k s]`` (``s >= W``).
- ``_signs``: flip the signs of ``8 W`` elements given ``8 W`` bits (xor of the sign bit,
  with masks looked up ``W`` bits at a time in ``sign_table``).
- ``_prefetch``: the LLVM prefetch hint for one cache line.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .rng import hash32

PLAIN, ROTATE, UNROTATE = 0, 1, 2

# Cache budgets (bytes). Measured on a 2-core AMD EPYC (32 KiB L1d, 512 KiB L2 per core);
# anything of this order works on current x86 and ARM server cores.
L1_BYTES = 1 << 14  # a block transformed entirely in L1 (half of a 32 KiB L1d)
L2_BYTES = 1 << 18  # a pass-1 row (half of a 512 KiB L2)
CHUNK_BYTES = 1 << 17  # a pass-2 column chunk (room is left for the prefetched next one)
MIN_CHUNKS = 8  # pass 2 keeps at least this many column chunks, for the threads
LINE = 64  # cache line, bytes
PREFETCH_LOCALITY = 2  # llvm.prefetch locality: 3 = t0 (L1), 2 = t1, 1 = t2, 0 = nta

# ---------------------------------------------------------------------------------------
# LLVM vector intrinsics
# ---------------------------------------------------------------------------------------

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _lanes_of(dtype) -> int:
    return 256 // dtype.bitwidth  # 32-byte (AVX2) vectors


def _is_float_array(t) -> bool:
    return isinstance(t, types.Array) and t.ndim == 1 and t.dtype in (types.float32, types.float64)


class _Vec:
    """Codegen helpers for one float dtype: pointers, loads/stores, in-register stages."""

    def __init__(self, context, builder, aryty):
        self.context, self.builder = context, builder
        self.W = _lanes_of(aryty.dtype)
        self.bitwidth = aryty.dtype.bitwidth
        self.vty = ir.VectorType(context.get_value_type(aryty.dtype), self.W)
        self.ivty = ir.VectorType(ir.IntType(self.bitwidth), self.W)
        self.align = self.bitwidth // 8

    def data(self, aryty, ary):
        return self.context.make_array(aryty)(self.context, self.builder, ary).data

    def index(self, val, ty):
        return self.context.cast(self.builder, val, ty, types.int64)

    def ptr(self, data, i, k=0):
        """Pointer to the vector at element ``i + k * W``."""
        b = self.builder
        if k:
            i = b.add(i, ir.Constant(_I64, k * self.W))
        return b.bitcast(b.gep(data, [i]), self.vty.as_pointer())

    def load(self, p):
        return self.builder.load(p, align=self.align)

    def store(self, v, p):
        self.builder.store(v, p, align=self.align)

    def const(self, values):
        return ir.Constant(self.vty, [float(v) for v in values])

    def splat(self, x):
        b = self.builder
        v = b.insert_element(ir.Constant(self.vty, ir.Undefined), x, ir.Constant(_I64, 0))
        return b.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, self.W), [0] * self.W))

    def h_in_register(self, v):
        """H_W inside one vector: stage t is ``shuffle(v, c -> c ^ t) + sign_t * v``."""
        b, W = self.builder, self.W
        fnty = ir.FunctionType(self.vty, [self.vty] * 3)
        fma = cgutils.get_or_insert_function(b.module, fnty, f"llvm.fma.v{W}f{self.bitwidth}")
        t = 1
        while t < W:
            swapped = b.shuffle_vector(
                v, v, ir.Constant(ir.VectorType(_I32, W), [c ^ t for c in range(W)])
            )
            signs = self.const([-1.0 if c & t else 1.0 for c in range(W)])
            v = b.call(fma, [v, signs, swapped])
            t *= 2
        return v

    def butterflies(self, v):
        """In place on the list ``v`` (length 2, 4 or 8): all radix-2 stages across it."""
        b, h = self.builder, 1
        while h < len(v):
            for base in range(0, len(v), 2 * h):
                for j in range(base, base + h):
                    v[j], v[j + h] = b.fadd(v[j], v[j + h]), b.fsub(v[j], v[j + h])
            h *= 2

    def flip(self, v, tdata, bits, k):
        """Flip the signs of ``v`` (vector k of a group) per bits ``k W .. k W + W - 1``."""
        b = self.builder
        row = b.and_(
            b.lshr(bits, ir.Constant(_I64, k * self.W)), ir.Constant(_I64, (1 << self.W) - 1)
        )
        tp = b.bitcast(
            b.gep(tdata, [b.mul(row, ir.Constant(_I64, self.W))]), self.ivty.as_pointer()
        )
        mask = b.load(tp, align=self.align)
        return b.bitcast(b.xor(b.bitcast(v, self.ivty), mask), self.vty)


def _same_float_arrays(src, dst) -> bool:
    return _is_float_array(src) and _is_float_array(dst) and src.dtype == dst.dtype


def _all_ints(*ts) -> bool:
    return all(isinstance(t, types.Integer) for t in ts)


@intrinsic
def _lanes(typingctx, a):
    """W, the number of lanes of a 32-byte vector of ``a``'s dtype (a compile-time constant)."""
    if not _is_float_array(a):
        return None
    W = _lanes_of(a.dtype)

    def codegen(context, builder, sig, args):
        return ir.Constant(_I64, W)

    return types.int64(a), codegen


def _make_bfly(radix: int):
    @intrinsic
    def bfly(typingctx, a, i, s):
        if not (_is_float_array(a) and _all_ints(i, s)):
            return None

        def codegen(context, builder, sig, args):
            V = _Vec(context, builder, sig.args[0])
            data = V.data(sig.args[0], args[0])
            i0 = V.index(args[1], sig.args[1])
            st = V.index(args[2], sig.args[2])
            ptrs = [
                V.ptr(data, builder.add(i0, builder.mul(st, ir.Constant(_I64, k))))
                for k in range(radix)
            ]
            v = [V.load(p) for p in ptrs]
            V.butterflies(v)
            for p, x in zip(ptrs, v, strict=True):
                V.store(x, p)
            return context.get_dummy_value()

        return types.void(a, i, s), codegen

    return bfly


# bfly<r>(a, i, s): log2(r) stages across the r vectors a[i + k s : i + k s + W], k < r.
_bfly8 = _make_bfly(8)
_bfly4 = _make_bfly(4)
_bfly2 = _make_bfly(2)


def _hgroup_codegen(signed: bool):
    def codegen(context, builder, sig, args):
        V = _Vec(context, builder, sig.args[0])
        sdata = V.data(sig.args[0], args[0])
        ddata = V.data(sig.args[2], args[2])
        i0 = V.index(args[1], sig.args[1])
        j0 = V.index(args[3], sig.args[3])
        if signed:
            bits = context.cast(builder, args[4], sig.args[4], types.uint64)
            tdata = context.make_array(sig.args[5])(context, builder, args[5]).data
            scale = V.splat(args[6])
        v = []
        for k in range(8):
            x = V.load(V.ptr(sdata, i0, k))
            if signed:
                x = builder.fmul(V.flip(x, tdata, bits, k), scale)
            v.append(V.h_in_register(x))
        V.butterflies(v)
        for k in range(8):
            V.store(v[k], V.ptr(ddata, j0, k))
        return context.get_dummy_value()

    return codegen


@intrinsic
def _hgroup(typingctx, src, i, dst, j):
    """``dst[j : j + 8W] <- H_{8W} src[i : i + 8W]``."""
    if not (_same_float_arrays(src, dst) and _all_ints(i, j)):
        return None
    return types.void(src, i, dst, j), _hgroup_codegen(False)


@intrinsic
def _hgroup_signed(typingctx, src, i, dst, j, bits, tab, scale):
    """The same on ``scale * s * src``: ``s_c = -1`` iff bit c of ``bits``, ``tab = sign_table``."""
    ok = _same_float_arrays(src, dst) and _all_ints(i, j, bits) and isinstance(tab, types.Array)
    if not (ok and scale == src.dtype):
        return None
    return types.void(src, i, dst, j, bits, tab, scale), _hgroup_codegen(True)


@intrinsic
def _signs(typingctx, a, i, bits, tab):
    """``a[i + c] <- -a[i + c]`` for each set bit c < 8W of ``bits`` (``tab = sign_table``)."""
    if not (_is_float_array(a) and _all_ints(i, bits) and isinstance(tab, types.Array)):
        return None

    def codegen(context, builder, sig, args):
        V = _Vec(context, builder, sig.args[0])
        data = V.data(sig.args[0], args[0])
        i0 = V.index(args[1], sig.args[1])
        bits_ = context.cast(builder, args[2], sig.args[2], types.uint64)
        tdata = context.make_array(sig.args[3])(context, builder, args[3]).data
        for k in range(8):
            p = V.ptr(data, i0, k)
            V.store(V.flip(V.load(p), tdata, bits_, k), p)
        return context.get_dummy_value()

    return types.void(a, i, bits, tab), codegen


@intrinsic
def _prefetch(typingctx, a, i):
    """Hint: bring the cache line holding ``a[i]`` into cache. Never faults, even past the end."""
    if not (_is_float_array(a) and _all_ints(i)):
        return None

    def codegen(context, builder, sig, args):
        V = _Vec(context, builder, sig.args[0])
        data = V.data(sig.args[0], args[0])
        i0 = V.index(args[1], sig.args[1])
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        p = builder.bitcast(builder.gep(data, [i0]), i8p)
        # Arguments: address, rw (0 = read), locality, cache type (1 = data).
        flags = [ir.Constant(_I32, v) for v in (0, PREFETCH_LOCALITY, 1)]
        builder.call(fn, [p, *flags])
        return context.get_dummy_value()

    return types.void(a, i), codegen


def sign_table(dtype) -> np.ndarray:
    """``tab[r, c]``: the float sign bit if bit ``c`` of ``r`` is set, else 0 (``r < 2**W``)."""
    dtype = np.dtype(dtype)
    W = 32 // dtype.itemsize
    itype = np.dtype(f"u{dtype.itemsize}")
    r = np.arange(1 << W)[:, None]
    c = np.arange(W)[None, :]
    sign = itype.type(1) << itype.type(8 * dtype.itemsize - 1)
    return np.where((r >> c) & 1, sign, itype.type(0)).astype(itype)


# ---------------------------------------------------------------------------------------
# The transform (numba)
# ---------------------------------------------------------------------------------------

_U5 = np.uint64(5)
_U31 = np.uint64(31)
_U32 = np.uint64(32)
_ONE = np.uint64(1)
_ZERO = np.uint64(0)


@numba.njit(inline="always", cache=True)
def _group_bits(e, G, k0, k1):
    """The G (32 or 64) sign bits of elements ``e .. e + G - 1`` (``e`` a multiple of 32)."""
    w = np.uint64(e) >> _U5
    bits = hash32(w, k0, k1)
    if G == 64:
        bits |= hash32(w + _ONE, k0, k1) << _U32
    return bits


@numba.njit(inline="always", cache=True)
def _negative(e, k0, k1):
    """True iff sign ``e`` of the stream is -1."""
    u = np.uint64(e)
    return (hash32(u >> _U5, k0, k1) >> (u & _U31)) & _ONE == _ONE


@numba.njit(cache=True)
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


@numba.njit(cache=True)
def _post_signs(a, off, n, k0, k1, sbase, tab):
    """``a[off + p] *= s[sbase + p]`` for ``p < n`` (``n`` a multiple of 8W)."""
    G = 8 * _lanes(a)
    for p in range(0, n, G):
        _signs(a, off + p, _group_bits(sbase + p, G, k0, k1), tab)


@numba.njit(cache=True)
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
                    if radix == 8:
                        _bfly8(a, j, h)
                    elif radix == 4:
                        _bfly4(a, j, h)
                    else:
                        _bfly2(a, j, h)
                if post and last:  # these radix groups are final
                    for k in range(radix):
                        e = jg + k * h
                        _signs(a, e, _group_bits(sbase + e - off, G, k0, k1), tab)
        h *= radix


@numba.njit(cache=True)
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


@numba.njit(cache=True)
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


@numba.njit(cache=True)
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
                    if radix == 8:
                        _bfly8(a, c, h * L)
                    elif radix == 4:
                        _bfly4(a, c, h * L)
                    else:
                        _bfly2(a, c, h * L)
                if post and radix * h == R:
                    for k in range(radix):
                        rk = r + k * h
                        _post_signs(a, off + rk * L + c0, C, k0, k1, sbase + rk * L + c0, tab)
        h *= radix


@numba.njit(parallel=True, cache=True)
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
    m1 = 0  # log2 of an L1 block, in elements
    while (2 << m1) * itemsize <= L1_BYTES:
        m1 += 1
    m2 = 0  # log2 of a pass-1 row
    while (2 << m2) * itemsize <= L2_BYTES:
        m2 += 1
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
        m_row = m1 if m <= m2 else m2
        L = 1 << m_row
        R = 1 << (m - m_row)
        C = max(G, min(L // MIN_CHUNKS, CHUNK_BYTES // (R * itemsize)))
        for t in range(nseg):
            so = soff + t * sstride
            do = doff + t * dstride
            for r in numba.prange(R):
                i, j, sb = so + r * L, do + r * L, sbase + r * L
                _row(src, i, dst, j, m_row, m1, mode, False, k0, k1, sb, scale, tab)
            for c in numba.prange(L // C):
                _cols(dst, do, L, R, c * C, C, post, k0, k1, sbase, tab)
