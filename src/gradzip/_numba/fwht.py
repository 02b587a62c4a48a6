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

Rows (pass 1) and column chunks (pass 2) are spread over the threads with ``prange``;
many small segments are spread one segment per work item instead. Small calls (below
``gradzip.hadamard.SERIAL_BELOW`` elements) use :func:`transform_serial`, the same work on
the calling thread: waking numba's pool costs more than their whole transform, and under
CPU contention a call can wait milliseconds for a descheduled worker.

Fused encoder and decoder (FO-SGD, float32, ``n = 2**m >= 2**16``)
------------------------------------------------------------------
The one-bit FO-SGD encoder with the ``norm`` scale rule needs only ``||x||_2`` (the rotation
preserves it) to quantize ``Phi x``. Done one after the other, the norm, the rotation and
the quantizer cost five passes over memory (read x; rows; columns read and written back;
read Phi x). :func:`rotate_stats` and :func:`cols_quantize` do it in two:

1. Pass 1 takes the sum of squares of x (float64; non-finite iff some x is) from the
   registers that load it for the first stages of the transform (``_hgroup_stats``): no
   pass of its own. Each row is done in L2 and streamed out with non-temporal stores
   spread over the next row's work, into column blocks (:func:`_layout`): the part of
   row r in the block of columns ``Q S .. Q S + S`` goes to ``Q R T + r T``, with
   ``T = S + P``, ``S`` = 1024 floats at 2**24 and a pad ``P`` of one cache line.
2. The caller picks lambda from the norm (and refuses non-finite input) between the passes.
3. Pass 2 reads each column chunk (``C <= S`` columns) once into a per-thread buffer,
   finishes its stages there and quantizes it from L2, eight elements to a vector compare
   whose mask is the payload's byte (``_quant32``: dither hash, sign, packing in
   registers). The chunk is never written back: the rotated vector is never stored, and
   no dirty line of the intermediate goes back to memory.

The layout is a compromise between the passes, measured at 2**24 (2 threads, interleaved
A/B). Plain row-major rows are ``4 L`` bytes apart, a multiple of the L2's set stride:
a chunk's R rows fall in the same few cache sets and evict each other before pass 2 uses
them (the pad staggers them). Chunk-major (``S = C``: each chunk contiguous) made pass 2
7.2 -> 6.3 ms, but pass 1 then streams each row in runs of 512 bytes 256 KiB apart, and
its stores did not overlap its compute, spread over the row or not; in runs of 4 KiB and
spread over the next row's work they do: pass 1 5.34 -> 4.72 ms, pass 2 3.85 -> 4.01 ms
(the chunk's rows are no longer one contiguous read); then spread over the first two
thirds of the row's work only (:func:`_row_streaming`), pass 1 4.9 -> 4.5 ms. Streamed
after each row instead of spread, the runs of 4 KiB gained nothing. What is left of the
stores still costs pass 1 about 0.7 ms (4.2 ms against 3.5 ms with no stores at all).

The decoder's inverse rotation of ``lam * b`` builds its pass-1 input from the payload's
bits in registers (:func:`unrotate_signs_rows`, ``_hgroup_bits``) instead of unpacking
them into a float vector first: one pass over ``4 n`` bytes less in each direction. From
2**24 its pass 1 streams into a scratch buffer in the same layout (4.18 -> 3.92 ms against
chunk-major, with stores streamed after each row), and its pass 2 (:func:`cols_unrotate`)
finishes each chunk in L2 and streams it to the output rows with non-temporal stores:
measured 9.1 -> 8.7 ms for both passes at 2**24 against the rows in place in the output
and an in-place column pass.

Both run their passes as plain ``nogil`` kernels on pieces of the work that the calling
thread and the pool of :mod:`gradzip._numba.parallel` pull one after another
(:func:`gradzip.hadamard._run_pieces`), not with ``prange``: the statistics and the
quantizer are loops that LLVM vectorizes, which it does much worse inside numba's parallel
regions; and with a few pieces per thread, a thread that the OS deschedules on a busy
machine leaves its remaining pieces to the others instead of holding up the pass.

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
- ``_bfly8/4/2(a, i, s)``: 3/2/1 stages across 8/4/2 vectors at ``a[i + k s]`` (``s >= W``);
  ``_bfly8/4/2_to`` read them from one array and write them to another.
- ``_hgroup_bits``: ``_hgroup`` on a vector of ``+-c`` built from ``8 W`` packed bits.
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

from ..rng import GAMMA, signed64
from .bits import _load_u64
from .rng import _GAMMA, _M1, _M2, U64, dither16_word, hash32

PLAIN, ROTATE, UNROTATE = 0, 1, 2

# Cache budgets (bytes). Measured on a 2-core AMD EPYC (32 KiB L1d, 512 KiB L2 per core);
# anything of this order works on current x86 and ARM server cores. A float32 row of 2**15
# has 15 = 6 + 3 + 3 + 3 stages (register group, two L1 sweeps, one L2 sweep), all radix 8:
# a row of 2**16 needs a lone radix-2 sweep over the whole row for its 16th stage, and the
# fused encoder at 2**24 measured about 10-20% slower with it (the column pass has 3 sweeps
# either way; measured on a 2-core EPYC with 1 MiB L2 per core).
L1_BYTES = 1 << 14  # a block transformed entirely in L1 (half of a 32 KiB L1d)
L2_BYTES = 1 << 17  # a pass-1 row (a quarter of a 512 KiB L2)
CHUNK_BYTES = 1 << 18  # a pass-2 column chunk (room is left for the prefetched next one)
MIN_CHUNKS = 8  # pass 2 keeps at least this many column chunks, for the threads
SEGMENT_BYTES = 1 << 12  # the fused passes' intermediate: rows stored in runs of this
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

    def splat(self, x, vty=None):
        """``x`` in every lane of a vector (of ``vty``, by default this dtype's)."""
        b, vty = self.builder, vty or self.vty
        v = b.insert_element(ir.Constant(vty, ir.Undefined), x, ir.Constant(_I64, 0))
        return b.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count))

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

    def h_group_store(self, xs, ddata, j0):
        """``dst[j0 : j0 + 8W] <- H_{8W}`` of the 8 vectors ``xs``: each in registers, then
        the stages across them; stored at ``ddata + j0``."""
        v = [self.h_in_register(x) for x in xs]
        self.butterflies(v)
        for k in range(8):
            self.store(v[k], self.ptr(ddata, j0, k))

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


def _src_dst(context, builder, sig, args):
    """``(V, src data, i, dst data, j)`` of an intrinsic's first four arguments
    ``(src, i, dst, j)``."""
    V = _Vec(context, builder, sig.args[0])
    sdata, ddata = V.data(sig.args[0], args[0]), V.data(sig.args[2], args[2])
    return V, sdata, V.index(args[1], sig.args[1]), ddata, V.index(args[3], sig.args[3])


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


@numba.njit(inline="always", cache=True)
def _bfly(a, i, s, radix):
    """``_bfly<radix>(a, i, s)``, radix 8, 4 or 2 (the last sweep of a transform may need
    fewer than 3 stages)."""
    if radix == 8:
        _bfly8(a, i, s)
    elif radix == 4:
        _bfly4(a, i, s)
    else:
        _bfly2(a, i, s)


def _make_bfly_to(radix: int):
    @intrinsic
    def bfly_to(typingctx, a, i, s, b, j, t):
        if not (_same_float_arrays(a, b) and _all_ints(i, s, j, t)):
            return None

        def codegen(context, builder, sig, args):
            V = _Vec(context, builder, sig.args[0])
            src = V.data(sig.args[0], args[0])
            dst = V.data(sig.args[3], args[3])
            i0, st = V.index(args[1], sig.args[1]), V.index(args[2], sig.args[2])
            j0, tt = V.index(args[4], sig.args[4]), V.index(args[5], sig.args[5])

            def at(data, base, stride, k):
                return V.ptr(data, builder.add(base, builder.mul(stride, ir.Constant(_I64, k))))

            v = [V.load(at(src, i0, st, k)) for k in range(radix)]
            V.butterflies(v)
            for k, x in enumerate(v):
                V.store(x, at(dst, j0, tt, k))
            return context.get_dummy_value()

        return types.void(a, i, s, b, j, t), codegen

    return bfly_to


# bfly<r>_to(a, i, s, b, j, t): the same stages, read from a[i + k s], written to b[j + k t].
_bfly8_to = _make_bfly_to(8)
_bfly4_to = _make_bfly_to(4)
_bfly2_to = _make_bfly_to(2)


@numba.njit(inline="always", cache=True)
def _bfly_to(a, i, s, b, j, t, radix):
    """``_bfly<radix>_to(a, i, s, b, j, t)``, radix 8, 4 or 2 (as :func:`_bfly`)."""
    if radix == 8:
        _bfly8_to(a, i, s, b, j, t)
    elif radix == 4:
        _bfly4_to(a, i, s, b, j, t)
    else:
        _bfly2_to(a, i, s, b, j, t)


def _hgroup_codegen(signed: bool):
    def codegen(context, builder, sig, args):
        V, sdata, i0, ddata, j0 = _src_dst(context, builder, sig, args)
        if signed:
            bits = context.cast(builder, args[4], sig.args[4], types.uint64)
            tdata = context.make_array(sig.args[5])(context, builder, args[5]).data
            scale = V.splat(args[6])
        xs = [V.load(V.ptr(sdata, i0, k)) for k in range(8)]
        if signed:
            xs = [builder.fmul(V.flip(x, tdata, bits, k), scale) for k, x in enumerate(xs)]
        V.h_group_store(xs, ddata, j0)
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
def _hgroup_stats(typingctx, src, i, dst, j, bits, stab, sq):
    """:func:`_hgroup_signed` on float32, its signs and scale given as ``stab`` =
    :func:`scaled_sign_table` (one multiply per vector instead of a sign flip and a
    multiply: the same products), that also adds the squares of the 64 inputs (in float64)
    to the partial sums ``sq[0:8]``, from the registers that load them. The sums are
    non-finite iff some input is NaN or inf: a float32 square is at most about 1.2e77, so a
    float64 sum of them cannot overflow; no separate finiteness check is needed."""
    ok = _same_float_arrays(src, dst) and src.dtype == types.float32
    ok = ok and _all_ints(i, j, bits) and isinstance(stab, types.Array)
    ok = ok and stab.dtype == types.float32 and isinstance(sq, types.Array)
    if not (ok and sq.dtype == types.float64):
        return None

    def codegen(context, builder, sig, args):
        b = builder
        V, sdata, i0, ddata, j0 = _src_dst(context, b, sig, args)
        bits = context.cast(b, args[4], sig.args[4], types.uint64)
        tdata = V.data(sig.args[5], args[5])
        dty = ir.VectorType(ir.DoubleType(), 4)
        sqp = b.bitcast(V.data(sig.args[6], args[6]), dty.as_pointer())
        fma = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(dty, [dty] * 3), "llvm.fma.v4f64"
        )
        xs = [V.load(V.ptr(sdata, i0, k)) for k in range(8)]
        for h in range(2):  # low, then high halves of the vectors, as float64
            lanes = ir.Constant(ir.VectorType(_I32, 4), [4 * h + c for c in range(4)])
            q = [b.fpext(b.shuffle_vector(x, x, lanes), dty) for x in xs]
            # pairs q0^2 + q1^2 (one multiply, one fused multiply-add), then a tree: short
            # chains, and a quarter fewer operations than a square and an add each
            t = [b.call(fma, [q[c + 1], q[c + 1], b.fmul(q[c], q[c])]) for c in range(0, 8, 2)]
            while len(t) > 1:
                t = [b.fadd(t[c], t[c + 1]) for c in range(0, len(t), 2)]
            p = b.gep(sqp, [ir.Constant(_I64, h)])
            b.store(b.fadd(b.load(p, align=8), t[0]), p, align=8)
        signed = []
        for k, x in enumerate(xs):
            row = b.and_(b.lshr(bits, ir.Constant(_I64, 8 * k)), ir.Constant(_I64, 255))
            tp = b.bitcast(b.gep(tdata, [b.mul(row, ir.Constant(_I64, 8))]), V.vty.as_pointer())
            signed.append(b.fmul(x, b.load(tp, align=4)))
        V.h_group_store(signed, ddata, j0)
        return context.get_dummy_value()

    return types.void(src, i, dst, j, bits, stab, sq), codegen


@intrinsic
def _hgroup_bits(typingctx, dst, j, bits, tab, c):
    """``dst[j : j + 8W] <- H_{8W} v`` with ``v_e = -c`` if bit e of ``bits`` is set, else ``c``.

    The input is generated from 8W packed sign bits instead of being loaded: the first
    stages of the decoder's inverse rotation read the payload's bits, not a float vector.
    """
    ok = _is_float_array(dst) and _all_ints(j, bits) and isinstance(tab, types.Array)
    if not (ok and c == dst.dtype):
        return None

    def codegen(context, builder, sig, args):
        V = _Vec(context, builder, sig.args[0])
        ddata = V.data(sig.args[0], args[0])
        j0 = V.index(args[1], sig.args[1])
        bits = context.cast(builder, args[2], sig.args[2], types.uint64)
        tdata = context.make_array(sig.args[3])(context, builder, args[3]).data
        base = V.splat(args[4])
        V.h_group_store([V.flip(base, tdata, bits, k) for k in range(8)], ddata, j0)
        return context.get_dummy_value()

    return types.void(dst, j, bits, tab, c), codegen


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


def _mix64_vec(b, z):
    """:func:`gradzip._numba.rng.mix64` on a vector of uint64 lanes."""

    def c(v):
        return ir.Constant(z.type, [signed64(v)] * z.type.count)

    z = b.mul(b.xor(z, b.lshr(z, c(30))), c(int(_M1)))
    z = b.mul(b.xor(z, b.lshr(z, c(27))), c(int(_M2)))
    return b.xor(z, b.lshr(z, c(31)))


def _quant32_codegen(prescaled: bool, summed: bool):
    def codegen(context, builder, sig, args):
        b = builder
        V = _Vec(context, b, sig.args[0])
        ity = V.ivty
        v64 = ir.VectorType(_I64, 4)
        base = V.splat(context.cast(b, args[2], sig.args[2], types.uint64), v64)
        words = []
        for g in range(2):  # mix64 of z0 + j GAMMA, j = 4g .. 4g + 3, as 8 halves
            steps = [signed64(((4 * g + j) * GAMMA) % (1 << 64)) for j in range(4)]
            steps = ir.Constant(v64, steps)
            words.append(b.bitcast(_mix64_vec(b, b.add(base, steps)), ity))
        ydata = V.data(sig.args[0], args[0])
        e0 = V.index(args[1], sig.args[1])
        odata = context.make_array(sig.args[4])(context, b, args[4]).data
        o0 = V.index(args[5], sig.args[5])
        lam_v = V.splat(args[3])

        def ic(v):
            return ir.Constant(ity, [v] * 8)

        if summed:  # acc[0:8] += the 32 values y b (b = -1 where the bit is set)
            accp = V.ptr(V.data(sig.args[6], args[6]), ir.Constant(_I64, 0))
            accv = V.load(accp)
        for k in range(4):
            w = words[k % 2]
            t = b.and_(w, ic(0xFFFF)) if k < 2 else b.lshr(w, ic(16))
            s = b.sitofp(b.sub(ic(65535), b.add(t, t)), V.vty)  # -u 2**16, exact
            if not prescaled:
                s = b.fmul(s, V.const([2.0**-16] * 8))  # -u, exact
            w = b.fmul(lam_v, s)
            yv = V.load(V.ptr(ydata, e0, k))
            mask = b.fcmp_ordered("<", yv, w)
            b.store(b.bitcast(mask, ir.IntType(8)), b.gep(odata, [b.add(o0, ir.Constant(_I64, k))]))
            if summed:
                accv = b.fadd(accv, b.select(mask, b.fneg(yv), yv))
        if summed:
            V.store(accv, accp)
        return context.get_dummy_value()

    return codegen


def _quant32_args_ok(y, e, z0, lam, out, o) -> bool:
    ok = isinstance(y, types.Array) and y.dtype == types.float32 and lam == types.float32
    ok = ok and isinstance(out, types.Array) and out.dtype == types.uint8
    return ok and _all_ints(e, z0, o)


def _make_quant32(prescaled: bool):
    @intrinsic
    def quant32(typingctx, y, e, z0, lam, out, o):
        if not _quant32_args_ok(y, e, z0, lam, out, o):
            return None
        return types.void(y, e, z0, lam, out, o), _quant32_codegen(prescaled, False)

    return quant32


def _make_quant32_sum(prescaled: bool):
    @intrinsic
    def quant32_sum(typingctx, y, e, z0, lam, out, o, acc):
        ok = isinstance(acc, types.Array) and acc.dtype == types.float32
        if not (ok and _quant32_args_ok(y, e, z0, lam, out, o)):
            return None
        return types.void(y, e, z0, lam, out, o, acc), _quant32_codegen(prescaled, True)

    return quant32_sum


# _quant32(y, e, z0, lam, out, o): ``out[o : o + 4] <-`` the bits ``y[e + p] + lam * u_p < 0``
# of the 32 float32 values ``y[e : e + 32]`` (bit ``p % 8`` of byte ``p // 8``), ``u`` one
# group of ``dither16``: the 8 words ``mix64(z0 + j GAMMA)`` (``z0 = key + 8 g GAMMA`` for
# group g), as 16 32-bit halves, their low 16 bits for ``p < 16`` and their high 16 bits
# for the rest, each ``t`` giving ``u = (2 t + 1) 2**-16 - 1``. Bit for bit the reference's
# rounded ``fl(y + fl(lam u)) < 0``, in fewer operations: a rounded sum is negative iff the
# exact one is (rounding keeps the sign and never makes 0 of a nonzero sum of floats), so
# the bit is ``y < fl(lam (-u))`` (``-u`` is exact, and rounding is symmetric), no add; and
# ``-u 2**16 = 65535 - 2 t`` is an integer, converted exactly. ``_quant32_prescaled`` takes
# ``lam 2**-16`` instead of ``lam`` and multiplies once: the same products when
# ``lam 2**-16`` is exact (:func:`prescale`). Measured on a chunk in L2: 15.3 -> 11.9 us per
# 65536 elements for that; 14.2 -> 9.6 us for SplitMix64's words (two 64-bit multiplies
# per 64 bits) instead of two ``hash32`` per 32 bits (four 32-bit multiplies per 32 bits).
# Each output byte is one vector compare whose mask is the byte (``vmovmskps``). Call them
# through :func:`quant32`.
_quant32 = _make_quant32(False)
_quant32_prescaled = _make_quant32(True)
# the same, and ``acc[0:8] += `` the 32 products ``y b`` (``b = -1`` where the bit is set), in
# float32 lanes: the fitted scales' <b, y> at the cost of one select and one add per vector
_quant32_sum = _make_quant32_sum(False)
_quant32_prescaled_sum = _make_quant32_sum(True)


@numba.njit(inline="always", cache=True)
def quant32_sum(y, e, z0, lam, lam16, exact, out, o, acc):
    """:func:`quant32`, and ``acc[0:8] +=`` the 32 values ``y b`` (float32 lanes)."""
    if exact:
        _quant32_prescaled_sum(y, e, z0, lam16, out, o, acc)
    else:
        _quant32_sum(y, e, z0, lam, out, o, acc)


@numba.njit(inline="always", cache=True)
def prescale(lam):
    """``(lam16, exact)``: ``lam 2**-16`` (float32) and whether it is exact (all but the
    tiniest ``lam``); then ``lam16 * s`` and ``lam * (s 2**-16)`` are the same real number,
    rounded the same way, and :func:`quant32` multiplies once per element."""
    lam16 = lam * np.float32(2.0**-16)
    return lam16, lam16 * np.float32(65536.0) == lam


@numba.njit(inline="always", cache=True)
def quant32(y, e, z0, lam, lam16, exact, out, o):
    """``out[o : o + 4] <-`` the bits ``y[e + p] + lam * u_p < 0``, ``p < 32``, ``u`` the
    group of ``dither16`` whose first word is ``mix64(z0)`` (``z0 = dither16_word(key,
    8 g)`` for group g; ``y`` contiguous float32); ``lam16, exact = prescale(lam)``. See
    ``_quant32`` above."""
    if exact:
        _quant32_prescaled(y, e, z0, lam16, out, o)
    else:
        _quant32(y, e, z0, lam, out, o)


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


def _make_copy8(nontemporal: bool):
    @intrinsic
    def copy8(typingctx, src, i, dst, j):
        if not (_same_float_arrays(src, dst) and _all_ints(i, j)):
            return None

        def codegen(context, builder, sig, args):
            V, sdata, i0, ddata, j0 = _src_dst(context, builder, sig, args)
            nt = builder.module.add_metadata([ir.Constant(_I32, 1)])
            for k in range(8):
                v = V.load(V.ptr(sdata, i0, k))
                if nontemporal:
                    st = builder.store(v, V.ptr(ddata, j0, k), align=32)
                    st.set_metadata("nontemporal", nt)
                else:
                    V.store(v, V.ptr(ddata, j0, k))
            return context.get_dummy_value()

        return types.void(src, i, dst, j), codegen

    return copy8


# _stream8(src, i, dst, j): ``dst[j : j + 8W] <- src[i : i + 8W]`` with non-temporal stores:
# the lines go to memory without first being read into the cache (no read-for-ownership).
# ``dst + j`` must be 32-byte aligned; call :func:`_fence` before other threads read what
# was written. _copy8: the same with plain stores, for any alignment.
_stream8 = _make_copy8(True)
_copy8 = _make_copy8(False)


@intrinsic
def _fence(typingctx):
    """A full memory fence (orders the non-temporal stores before it)."""

    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


def scaled_sign_table(scale: float) -> np.ndarray:
    """``stab[r, c]``: ``-scale`` if bit ``c`` of ``r`` is set, else ``scale`` (float32,
    ``r < 256``): the sign flip and the scale of 8 float32 lanes in one multiply, for
    :func:`rotate_stats` (``fl(x (-s)) = -fl(x s)``, so the products are the same)."""
    bits = (np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1
    return np.where(bits == 1, -np.float32(scale), np.float32(scale)).astype(np.float32)


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
                    _bfly(a, j, h, radix)
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
                    _bfly(a, c, h * L, radix)
                if post and radix * h == R:
                    for k in range(radix):
                        rk = r + k * h
                        _post_signs(a, off + rk * L + c0, C, k0, k1, sbase + rk * L + c0, tab)
        h *= radix


@numba.njit(inline="always", cache=True)
def _budgets(itemsize):
    """``(m1, m2)``: log2 of an L1 block and of a pass-1 row, in elements."""
    m1 = 0
    while (2 << m1) * itemsize <= L1_BYTES:
        m1 += 1
    m2 = 0
    while (2 << m2) * itemsize <= L2_BYTES:
        m2 += 1
    return m1, m2


@numba.njit(inline="always", cache=True)
def _grid(m, m1, m2, G, itemsize):
    """``(log2 L, L, R, C)`` of a large segment (2**m): R rows of L, column chunks of C."""
    m_row = m1 if m <= m2 else m2
    L = 1 << m_row
    R = 1 << (m - m_row)
    C = max(G, min(L // MIN_CHUNKS, CHUNK_BYTES // (R * itemsize)))
    return m_row, L, R, C


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


@numba.njit(cache=True)
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


# ---------------------------------------------------------------------------------------
# The fused encoder: rotation + norm + dithered one-bit quantization (FO-SGD, ``norm`` rule)
# ---------------------------------------------------------------------------------------


def fused_ok(n: int) -> bool:
    """Whether the fused encoder takes a float32 vector of ``n`` elements: a power of two
    longer than a pass-1 row (the two-pass route of :func:`transform`)."""
    return n >= 1 and n & (n - 1) == 0 and 4 * n > L2_BYTES


def grid(m: int, itemsize: int) -> tuple[int, int, int]:
    """``(L, R, C)`` of :func:`transform`'s two-pass route for one segment of ``2**m``."""
    m1, m2 = _budgets(itemsize)
    return _grid(m, m1, m2, 8 * (32 // itemsize), itemsize)[1:]


def two_pass(m: int, itemsize: int) -> bool:
    """Whether :func:`transform` takes one segment of ``2**m`` by rows, then columns."""
    m1, _ = _budgets(itemsize)
    return (1 << m) >= 8 * (32 // itemsize) and m > m1


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


@numba.njit(inline="always", cache=True)
def _layout(L, C):
    """``(S, P)`` of the intermediate that pass 1 of the fused encoder and decoder writes
    and pass 2 reads: the ``R x L`` matrix in column blocks of ``S`` columns (a multiple of
    the chunk width ``C``), block ``Q`` at ``Q R (S + P)``, its row ``r`` at ``+ r (S + P)``.

    Pass 1 streams each row out in runs of ``S`` floats (``SEGMENT_BYTES``; runs of one
    chunk's 512 bytes, 256 KiB apart, made pass 1 about 0.6 ms slower at 2**24, see the
    module docstring). Pass 2 reads a chunk from rows ``S + P`` apart; the pad of one cache
    line staggers them over the L2's sets (``4 S`` bytes is a multiple of its set stride).
    """
    S = max(C, min(L, SEGMENT_BYTES // 4))
    return S, LINE // 4


@numba.njit(inline="always", cache=True)
def _block_base(c0, R, S, P):
    """Offset of column ``c0`` of row 0 in the layout of :func:`_layout`."""
    return (c0 // S) * (R * (S + P)) + c0 % S


@numba.njit(inline="always", cache=True)
def _stream_groups(prev, dst, rp, R, S, P, s, t):
    """Register groups ``s .. t`` of row ``rp`` (held in ``prev``) out to ``dst`` in the
    layout of :func:`_layout`, with non-temporal stores; returns ``t``."""
    G = 8 * _lanes(prev)
    for k in range(s, t):
        g = k * G
        _stream8(prev, g, dst, _block_base(g, R, S, P) + rp * (S + P))
    return t


@numba.njit(inline="always", cache=True)
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


@numba.njit(cache=True)
def _row_streaming(src, data, r, row, rp, prev, dst, m, k0, k1, stab, sq, tab, c, enc):
    """Pass 1 of the fused encoder or decoder on row ``r`` (in ``row``, in L2), while row
    ``rp`` (in ``prev``; none if ``rp < 0``) goes out to ``dst`` (:func:`_layout`).

    The encoder (``enc``) reads ``src`` and adds the squares to ``sq[0:8]``
    (``_hgroup_stats``); the decoder builds its input from the packed bits ``data``
    (``_hgroup_bits``). The other's arguments are unused.

    The ``4 L`` bytes of non-temporal stores are spread over the first two thirds of the
    row's work: a register group after each input group and two after each group of
    butterflies in L1, none in the L2 sweep. Streamed after the row, they stall the core
    until they drain (see the module docstring); spread over the whole row (one every
    other input group, one per group of butterflies in L1, two in L2), pass 1 measured
    0.4 ms slower at 2**24; packed into the first half, just as slow.
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


@numba.njit(cache=True)
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


@numba.njit(nogil=True, cache=True)
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
    :func:`gradzip._numba.quantize.stats32`'s value up to summation order. A pass of its
    own over the row cost about 1 ms of 14 at 2**24. ``stab = scaled_sign_table(scale)``
    (the signs and the ``1/sqrt(n)`` scale).
    """
    nothing = np.empty(0, np.uint8)  # the decoder's bits; stab stands in for its sign table
    k0, k1 = np.uint64(key0), np.uint64(key1)
    _rows_streaming(
        src, nothing, dst, rows2, m, k0, k1, stab, sq, stab, np.float32(0), True, start, stop
    )


@numba.njit(inline="always", cache=True)
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


@numba.njit(inline="always", cache=True)
def _prefetch_row(a, i, C):
    """Hint: ``a[i : i + C]`` into cache (a row of the next column chunk). Issued while a
    chunk is finished from L2, not during its first sweep (where these loads compete with
    the chunk's own): pass 2 of the encoder measured 6.9 -> 5.6 ms at 2**24 on 2 threads
    for that, about 10 ms without any prefetch."""
    for p in range(i, i + C, LINE // 4):
        _prefetch(a, p)


@numba.njit(inline="always", cache=True)
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


@numba.njit(inline="always", cache=True)
def _chunk_at(q, L, R, C):
    """``(c0, base, nxt, T)`` of column chunk ``q`` in the layout of :func:`_layout`: its
    first column, the offsets of its row 0 and of the next chunk's (-1 after the last
    chunk) and the row stride."""
    S, P = _layout(L, C)
    c0 = q * C
    nxt = _block_base(c0 + C, R, S, P) if c0 + C < L else -1
    return c0, _block_base(c0, R, S, P), nxt, S + P


@numba.njit(nogil=True, cache=True)
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


# ---------------------------------------------------------------------------------------
# The fused decoder: unpacking of the signs + inverse rotation (FO-SGD, standard dither)
# ---------------------------------------------------------------------------------------


@numba.njit(nogil=True, cache=True)
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


@numba.njit(nogil=True, cache=True)
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


@numba.njit(inline="always", cache=True)
def _row_streamed(src, soff, dst, doff, row, m, m1, mode, k0, k1, sbase, scale, tab):
    """:func:`_row` (no post-transform signs) done in ``row`` (in L2), then streamed out to
    ``dst[doff:]`` (32-byte aligned) with non-temporal stores: the lines of ``dst`` are
    never read first (no read-for-ownership)."""
    _row(src, soff, row, 0, m, m1, mode, False, k0, k1, sbase, scale, tab)
    for g in range(0, 1 << m, 8 * _lanes(row)):
        _stream8(row, g, dst, doff + g)


@numba.njit(nogil=True, cache=True)
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


@numba.njit(nogil=True, cache=True)
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
