"""Hand-written LLVM vector code (numba intrinsics) for the Walsh-Hadamard kernels and the
one-bit quantizer: the arithmetic that numba's auto-vectorizer handles poorly.

numba vectorizes butterflies with a run-time stride badly (it needs alias checks that fail
for short strides) and the strides 1, 2, 4 not at all, so the arithmetic of
:mod:`gradzip._numba.fwht` and :mod:`gradzip._numba.fused_onebit` is spelled out here on
32-byte vectors of ``W`` lanes (8 float32 or 4 float64):

- ``_hgroup*``: the lowest ``log2(8 W)`` stages on ``8 W`` contiguous elements, in
  registers. Inside a vector, stage ``t`` is ``shuffle(x, c -> c ^ t) + sign_t * x`` (one
  shuffle and one exact FMA, ``sign_t`` being +-1); then a radix-8 butterfly across the 8
  vectors. ``_hgroup_signed`` flips signs and scales on the way in, ``_hgroup_stats`` also
  sums the squares of its input, ``_hgroup_bits`` builds its input from packed sign bits.
- ``_bfly8/4/2(a, i, s)``: 3/2/1 stages across 8/4/2 vectors at ``a[i + k s]`` (``s >= W``);
  ``_bfly8/4/2_to`` read them from one array and write them to another.
- ``_signs``: flip the signs of ``8 W`` elements given ``8 W`` bits (xor of the sign bit,
  with masks looked up ``W`` bits at a time in
  :func:`gradzip._numba.fwht.sign_table`).
- ``_quant32*`` (through :func:`quant32`): the dithered one-bit quantizer of 32 float32
  values, each output byte one vector compare mask.
- ``_prefetch``, ``_stream8`` / ``_copy8``, ``_fence``: a prefetch hint, 8 vectors copied
  with non-temporal or plain stores, a memory fence.

Every intrinsic does the same floating-point operations, in the same order, as the scalar
reference (no fast-math), so the kernels built on them match it bit for bit.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..rng import GAMMA, signed64
from .cache import CACHE
from .rng import _M1, _M2

PREFETCH_LOCALITY = 2  # llvm.prefetch locality: 3 = t0 (L1), 2 = t1, 1 = t2, 0 = nta

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


@numba.njit(inline="always", cache=CACHE)
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


@numba.njit(inline="always", cache=CACHE)
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
    :func:`gradzip._numba.fused_onebit.scaled_sign_table` (one multiply per vector instead
    of a sign flip and a multiply: the same products), that also adds the squares of the 64
    inputs (in float64) to the partial sums ``sq[0:8]``, from the registers that load them.
    The sums are non-finite iff some input is NaN or inf: a float32 square is at most about
    1.2e77, so a float64 sum of them cannot overflow; no separate finiteness check is
    needed."""
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
# ``lam 2**-16`` is exact (:func:`prescale`). Each output byte is one vector compare whose
# mask is the byte (``vmovmskps``). Timings of both choices: docs/perf.md. Call them through
# :func:`quant32`.
_quant32 = _make_quant32(False)
_quant32_prescaled = _make_quant32(True)
# the same, and ``acc[0:8] += `` the 32 products ``y b`` (``b = -1`` where the bit is set), in
# float32 lanes: the fitted scales' <b, y> at the cost of one select and one add per vector
_quant32_sum = _make_quant32_sum(False)
_quant32_prescaled_sum = _make_quant32_sum(True)


@numba.njit(inline="always", cache=CACHE)
def quant32_sum(y, e, z0, lam, lam16, exact, out, o, acc):
    """:func:`quant32`, and ``acc[0:8] +=`` the 32 values ``y b`` (float32 lanes)."""
    if exact:
        _quant32_prescaled_sum(y, e, z0, lam16, out, o, acc)
    else:
        _quant32_sum(y, e, z0, lam, out, o, acc)


@numba.njit(inline="always", cache=CACHE)
def prescale(lam):
    """``(lam16, exact)``: ``lam 2**-16`` (float32) and whether it is exact (all but the
    tiniest ``lam``); then ``lam16 * s`` and ``lam * (s 2**-16)`` are the same real number,
    rounded the same way, and :func:`quant32` multiplies once per element."""
    lam16 = lam * np.float32(2.0**-16)
    return lam16, lam16 * np.float32(65536.0) == lam


@numba.njit(inline="always", cache=CACHE)
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
