"""numba kernels for :mod:`gradzip.bits` (CPU fast path; the torch reference lives there).

All kernels write into a caller-allocated output and assume the caller validated the inputs
(dtypes, lengths, value ranges) and passes 1-D C-contiguous arrays. Bit order everywhere is
LSB first: element ``8*i + j`` is bit ``j`` of byte ``i``, as in
``np.packbits(..., bitorder="little")``.

The sign and bit kernels handle 8 elements per output byte with small LLVM intrinsics, so that
the compare-and-gather compiles to a vector compare plus ``movmsk`` (and the inverse to a
broadcast, compare and blend) instead of eight scalar compares and shifts; the same loops in
plain numba measured 1.5-2x slower, which matters because packing 2**24 float32 signs is bound
by reading 64 MiB. The integer kernels use unaligned 8-byte loads and stores the same way.

Each kernel has a serial ``*_range`` body working on a range of output bytes (or groups) and a
``*_par`` wrapper that splits the range across numba's threads. :data:`PARALLEL_MIN` is the
element count from which the dispatchers use the parallel wrapper. Parallel calls are serialized
by a lock: numba's fallback "workqueue" threading layer aborts the process when two Python
threads run parallel kernels at once.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic

from .cache import CACHE

#: element count from which the parallel kernels are used (below it, thread start-up costs more
#: than it saves)
PARALLEL_MIN = 1 << 17

_PAR_LOCK = threading.Lock()

# output bytes (sign/bit kernels) or 8-value groups (uint kernels) per parallel chunk
_CHUNK = 1 << 14


# --------------------------------------------------------------------------------------------
# intrinsics (they read and write raw memory: typing accepts only 1-D C-contiguous arrays)


def _c1d(t) -> bool:
    return isinstance(t, types.Array) and t.ndim == 1 and t.layout == "C"


@intrinsic
def _mask8(typingctx, arr, idx):
    """Byte whose bit ``j`` says whether ``arr[idx + j]`` is set, for ``j`` in ``0..7``.

    "Set" means ``< 0`` (ordered compare, so NaN and -0.0 give 0) for float arrays and ``!= 0``
    for integer and bool arrays. Reads exactly 8 elements; the caller keeps them in bounds.
    """
    if not _c1d(arr):
        return None
    dt = arr.dtype
    if not isinstance(dt, types.Float | types.Integer | types.Boolean):
        return None
    sig = types.uint8(arr, types.intp)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        vty = ir.VectorType(context.get_data_type(dt), 8)
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), vty.as_pointer())
        v = builder.load(ptr, align=1)
        zero = ir.Constant(vty, None)
        if isinstance(dt, types.Float):
            cmp = builder.fcmp_ordered("<", v, zero)
        else:
            cmp = builder.icmp_unsigned("!=", v, zero)
        return builder.bitcast(cmp, ir.IntType(8))

    return sig, codegen


@intrinsic
def _mask8_neg16(typingctx, arr, idx, limit):
    """Like :func:`_mask8` with ``< 0`` for 16-bit floats viewed as ``int16``.

    For the bit pattern ``v`` (signed) of a float16/bfloat16, ``x < 0`` (false for -0.0 and
    NaN) is ``int16(v - 1) < limit`` with wrapping subtraction, where ``limit`` is the pattern of
    -inf as a signed int16 (-1024 for float16, -128 for bfloat16): -0.0 (-32768) wraps to
    +32767, negative NaNs lie strictly between -inf and 0.
    """
    if not (_c1d(arr) and arr.dtype == types.int16):
        return None
    sig = types.uint8(arr, types.intp, types.int64)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i16 = ir.IntType(16)
        vty = ir.VectorType(i16, 8)
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), vty.as_pointer())
        v = builder.load(ptr, align=1)
        lim = builder.trunc(args[2], i16)
        lim_v = builder.shuffle_vector(
            builder.insert_element(ir.Constant(vty, ir.Undefined), lim, ir.Constant(i16, 0)),
            ir.Constant(vty, ir.Undefined),
            ir.Constant(ir.VectorType(ir.IntType(32), 8), None),
        )
        t = builder.sub(v, ir.Constant(vty, [1] * 8))
        cmp = builder.icmp_signed("<", t, lim_v)
        return builder.bitcast(cmp, ir.IntType(8))

    return sig, codegen


@intrinsic
def _select8(typingctx, out, idx, byte, one, zero):
    """``out[idx + j] = one if bit j of byte else zero`` for ``j`` in ``0..7``.

    ``out`` is an integer or float array; ``one`` and ``zero`` are cast to its dtype (floats
    round to nearest, overflowing to inf, as numpy and torch do).
    """
    if not (_c1d(out) and isinstance(out.dtype, types.Integer | types.Float)):
        return None
    if not all(isinstance(t, types.Integer | types.Float) for t in (one, zero)):
        return None
    dt = out.dtype
    sig = types.void(out, types.intp, types.uint8, one, zero)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ety = context.get_data_type(dt)
        vty = ir.VectorType(ety, 8)
        mask_ty = ir.VectorType(ir.IntType(32), 8)

        def splat(x):
            v = builder.insert_element(
                ir.Constant(vty, ir.Undefined), x, ir.Constant(ir.IntType(32), 0)
            )
            return builder.shuffle_vector(
                v, ir.Constant(vty, ir.Undefined), ir.Constant(mask_ty, None)
            )

        one_v = context.cast(builder, args[3], signature.args[3], dt)
        zero_v = context.cast(builder, args[4], signature.args[4], dt)
        bits = builder.bitcast(args[2], ir.VectorType(ir.IntType(1), 8))
        vals = builder.select(bits, splat(one_v), splat(zero_v))
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), vty.as_pointer())
        builder.store(vals, ptr, align=1)
        return context.get_dummy_value()

    return sig, codegen


# --------------------------------------------------------------------------------------------
# packing flags (signs of floats, nonzero of ints/bools)


@numba.njit(cache=CACHE)
def _pack_range(x, out, lo, hi):
    for i in range(lo, hi):
        out[i] = _mask8(x, 8 * i)


@numba.njit(cache=CACHE)
def _pack_neg16_range(x, limit, out, lo, hi):
    for i in range(lo, hi):
        out[i] = _mask8_neg16(x, 8 * i, limit)


@numba.njit(parallel=True, cache=CACHE)
def _pack_par(x, out, nfull):
    nch = (nfull + _CHUNK - 1) // _CHUNK
    for c in numba.prange(nch):
        _pack_range(x, out, c * _CHUNK, min(nfull, (c + 1) * _CHUNK))


@numba.njit(parallel=True, cache=CACHE)
def _pack_neg16_par(x, limit, out, nfull):
    nch = (nfull + _CHUNK - 1) // _CHUNK
    for c in numba.prange(nch):
        _pack_neg16_range(x, limit, out, c * _CHUNK, min(nfull, (c + 1) * _CHUNK))


@numba.njit(cache=CACHE)
def _pack_tail(x, out, nfull):
    # the last partial byte: copy the leftover elements into a zero buffer (zero gives bit 0)
    rem = x.size - 8 * nfull
    if rem > 0:
        buf = np.zeros(8, x.dtype)
        buf[:rem] = x[8 * nfull :]
        out[nfull] = _mask8(buf, 0)


@numba.njit(cache=CACHE)
def _pack_neg16_tail(x, limit, out, nfull):
    rem = x.size - 8 * nfull
    if rem > 0:
        buf = np.zeros(8, np.int16)
        buf[:rem] = x[8 * nfull :]
        out[nfull] = _mask8_neg16(buf, 0, limit)


def pack_flags(x: np.ndarray, out: np.ndarray) -> None:
    """``out = packbits(x < 0)`` for float ``x``, ``packbits(x != 0)`` for int/bool ``x``."""
    nfull = x.size // 8
    if x.size >= PARALLEL_MIN:
        with _PAR_LOCK:
            _pack_par(x, out, nfull)
    else:
        _pack_range(x, out, 0, nfull)
    _pack_tail(x, out, nfull)


def pack_neg16(x: np.ndarray, limit: int, out: np.ndarray) -> None:
    """``out = packbits(x < 0)`` for float16/bfloat16 ``x`` viewed as int16 (see ``limit``)."""
    nfull = x.size // 8
    if x.size >= PARALLEL_MIN:
        with _PAR_LOCK:
            _pack_neg16_par(x, limit, out, nfull)
    else:
        _pack_neg16_range(x, limit, out, 0, nfull)
    _pack_neg16_tail(x, limit, out, nfull)


# --------------------------------------------------------------------------------------------
# unpacking to two values (signs as float bit patterns, bits as 0/1 bytes)


@numba.njit(cache=CACHE)
def _unpack_range(data, one, zero, out, lo, hi):
    for i in range(lo, hi):
        _select8(out, 8 * i, data[i], one, zero)


@numba.njit(parallel=True, cache=CACHE)
def _unpack_par(data, one, zero, out, nfull):
    nch = (nfull + _CHUNK - 1) // _CHUNK
    for c in numba.prange(nch):
        _unpack_range(data, one, zero, out, c * _CHUNK, min(nfull, (c + 1) * _CHUNK))


@numba.njit(cache=CACHE)
def _unpack_tail(data, one, zero, out, nfull):
    rem = out.size - 8 * nfull
    if rem > 0:
        buf = np.empty(8, out.dtype)
        _select8(buf, 0, data[nfull], one, zero)
        out[8 * nfull :] = buf[:rem]


def unpack_select(data: np.ndarray, one, zero, out: np.ndarray) -> None:
    """``out[k] = one if bit k of data is set else zero``, with ``one`` and ``zero`` cast to
    ``out``'s dtype inside the kernel; ``out`` (float32/float64, an int16 view of 16-bit floats,
    a uint8 view of bools) fixes ``n = out.size``."""
    nfull = out.size // 8
    if out.size >= PARALLEL_MIN:
        with _PAR_LOCK:
            _unpack_par(data, one, zero, out, nfull)
    else:
        _unpack_range(data, one, zero, out, 0, nfull)
    _unpack_tail(data, one, zero, out, nfull)


# --------------------------------------------------------------------------------------------
# dense unsigned integers: 8 values of `width` bits fill exactly `width` bytes
#
# Packing keeps a bit accumulator in a register and, after each value, stores all 8 bytes of it
# at the current output byte (unaligned) whether or not 4 of them are complete; it advances by 4
# bytes once they are. This is branch-free and about 2.5x faster than flushing byte by byte, but
# it writes up to 8 bytes ahead, so each range stops that fast loop 8+ bytes before its end and
# finishes with the byte-exact group code (ranges start and end on group boundaries, so parallel
# ranges never write each other's bytes). Unpacking reads an unaligned 8-byte window per value.


@intrinsic
def _load_u64(typingctx, arr, idx):
    """The 8 bytes ``arr[idx : idx + 8]`` (uint8 array) as a little-endian uint64."""
    if not (_c1d(arr) and arr.dtype == types.uint8):
        return None
    sig = types.uint64(arr, types.intp)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i64 = ir.IntType(64)
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i64.as_pointer())
        return builder.load(ptr, align=1)

    return sig, codegen


@intrinsic
def _store_u64(typingctx, arr, idx, val):
    """``arr[idx : idx + 8] = val`` as 8 little-endian bytes (uint8 array)."""
    if not (_c1d(arr) and arr.dtype == types.uint8):
        return None
    sig = types.void(arr, types.intp, types.uint64)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i64 = ir.IntType(64)
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i64.as_pointer())
        builder.store(args[2], ptr, align=1)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=CACHE)
def _pack_uints_group(v, base, width, out, p):
    # values v[base : base + 8] -> out[p : p + width], byte by byte; each value < 2**32 and
    # fewer than 8 pending bits, so the accumulator never holds more than 40 bits
    acc = np.uint64(0)
    nbits = np.uint64(0)
    w = np.uint64(width)
    for j in range(8):
        acc |= np.uint64(v[base + j]) << nbits
        nbits += w
        while nbits >= np.uint64(8):
            out[p] = np.uint8(acc & np.uint64(0xFF))
            p += 1
            acc >>= np.uint64(8)
            nbits -= np.uint64(8)


@numba.njit(cache=CACHE)
def _pack_uints_range(v, width, out, lo, hi):
    # groups [lo, hi) -> bytes [lo * width, hi * width). Group g is bytes [g*width, (g+1)*width)
    # and starts with an empty accumulator, so groups do not depend on each other. Its 8-byte
    # stores reach byte (g + 1) * width + 8 at most: the last groups of the range, where that
    # would pass the range's end, take the byte-exact path.
    end = hi * width
    w = np.uint64(width)
    fast_hi = max(lo, min(hi, (end - 8) // width - 1))
    for g in range(lo, fast_hi):
        base = 8 * g
        p = g * width
        acc = np.uint64(0)
        nbits = np.uint64(0)
        for j in range(8):
            acc |= np.uint64(v[base + j]) << nbits
            nbits += w
            _store_u64(out, p, acc)
            full = nbits >= np.uint64(32)
            p += 4 * full
            acc = acc >> np.uint64(32 * full)
            nbits -= np.uint64(32 * full)
    for g in range(fast_hi, hi):
        _pack_uints_group(v, 8 * g, width, out, g * width)


@numba.njit(parallel=True, cache=CACHE)
def _pack_uints_par(v, width, out, ngroups):
    nch = (ngroups + _CHUNK - 1) // _CHUNK
    for c in numba.prange(nch):
        _pack_uints_range(v, width, out, c * _CHUNK, min(ngroups, (c + 1) * _CHUNK))


@numba.njit(cache=CACHE)
def _pack_uints_tail(v, width, out, ngroups):
    rem = v.size - 8 * ngroups
    if rem > 0:
        buf = np.zeros(8, np.uint64)
        for j in range(rem):
            buf[j] = np.uint64(v[8 * ngroups + j])
        tmp = np.zeros(width, np.uint8)
        _pack_uints_group(buf, 0, width, tmp, 0)
        start = ngroups * width
        out[start:] = tmp[: out.size - start]


def pack_uints(v: np.ndarray, width: int, out: np.ndarray) -> None:
    """Pack ``v`` (validated: ``0 <= v < 2**width``) into ``out`` of ``ceil(n*width/8)`` bytes."""
    ngroups = v.size // 8
    if v.size >= PARALLEL_MIN:
        with _PAR_LOCK:
            _pack_uints_par(v, width, out, ngroups)
    else:
        _pack_uints_range(v, width, out, 0, ngroups)
    _pack_uints_tail(v, width, out, ngroups)


@numba.njit(cache=CACHE)
def _unpack_uints_range(data, width, out, lo, hi):
    # values [lo, hi); value i is bits [i*width, (i+1)*width) of the stream, read from the
    # 8 bytes at byte (i*width) // 8 (those exist for i < safe; the rest are assembled bytewise)
    mask = (np.uint64(1) << np.uint64(width)) - np.uint64(1)
    nbytes = data.size
    safe = (8 * (nbytes - 7) + width - 1) // width if nbytes >= 8 else 0
    mid = max(lo, min(hi, safe))
    for i in range(lo, mid):
        b = i * width
        out[i] = np.int64((_load_u64(data, b >> 3) >> np.uint64(b & 7)) & mask)
    for i in range(mid, hi):
        b = i * width
        p = b >> 3
        word = np.uint64(0)
        for k in range(nbytes - p):
            word |= np.uint64(data[p + k]) << np.uint64(8 * k)
        out[i] = np.int64((word >> np.uint64(b & 7)) & mask)


@numba.njit(parallel=True, cache=CACHE)
def _unpack_uints_par(data, width, out, n):
    nch = (n + 8 * _CHUNK - 1) // (8 * _CHUNK)
    for c in numba.prange(nch):
        _unpack_uints_range(data, width, out, c * 8 * _CHUNK, min(n, (c + 1) * 8 * _CHUNK))


def unpack_uints(data: np.ndarray, width: int, out: np.ndarray) -> None:
    """Inverse of :func:`pack_uints`; ``out`` is an int64 array that fixes ``n``."""
    if out.size >= PARALLEL_MIN:
        with _PAR_LOCK:
            _unpack_uints_par(data, width, out, out.size)
    else:
        _unpack_uints_range(data, width, out, 0, out.size)


from .parallel import launch_numba_threads  # noqa: E402

launch_numba_threads()  # numba's pool, without changing torch's thread count
