"""CPU kernels of the quantizers in :mod:`gradzip.compressors.quantize` (references there).

Every quantizer there turns coordinate ``i`` into a ``w``-bit code ``(j << 1) | neg``: ``j``
the index of the magnitude it rounds to, ``neg`` 1 for a negative value rounded to a
nonzero magnitude. The codes are packed in :func:`gradzip.bits.pack_uints`'s format.

Encoding works on chunks of ``CHUNK`` elements: one loop computes the codes into a small
uint32 scratch (vectorizable: float32 compares, the counter hash, integer ops), then the
chunk is packed with :mod:`gradzip._numba.bits`' packer (chunks start on 8-value groups, so
each chunk owns its bytes and pieces run on separate threads). Decoding reads each code
from an unaligned 8-byte window and maps ``j`` to a magnitude (a table, or ``j * scale``).

The rounding uniform of element ``i`` is ``u_i = (2 (hash32(i, key) >> 9) + 1) 2**-24``,
exactly :func:`gradzip.rng.uniform`. No fastmath: the codes must equal the reference's.
"""

from __future__ import annotations

import numba
import numpy as np

from .bits import _load_u64, _store_u64
from .cache import CACHE
from .parallel import run
from .rng import U32, hash32

CHUNK = 1 << 12  # elements per work item (a multiple of 8: chunks own whole bytes)
_U24 = np.float32(2.0**-24)
_ABS = U32(0x7FFFFFFF)
_MANT = U32(0x7FFFFF)
_ONE = U32(1)


@numba.njit(inline="always", cache=CACHE)
def _uniform_bits(i, k0, k1):
    """``hash32(i) >> 9``: the 23 random bits behind the uniform of element ``i``."""
    return U32(hash32(i, k0, k1) >> U32(9))


@numba.njit(inline="always", cache=CACHE)
def _uniform(m):
    """The uniform ``(2 m + 1) 2**-24`` in (0, 1) (exact in float32)."""
    return np.float32(U32(m * U32(2) + _ONE)) * _U24


@numba.njit(inline="always", cache=CACHE)
def _store_group(codes, g, w, out, p):
    """Store the 8 codes ``codes[8g : 8g+8]`` (``w <= 16`` bits each) at ``out[p:]``.

    Writes whole 8-byte words: bytes past the group's ``w`` are zero (or junk of this
    group's bits shifted out), overwritten by the next group's stores.
    """
    c = codes[8 * g : 8 * g + 8]
    if w <= 8:
        acc = np.uint64(0)
        for j in range(8):
            acc |= np.uint64(c[j]) << np.uint64(j * w)
        _store_u64(out, p, acc)
    else:  # two halves of 4 codes (4w <= 64 bits); the second starts at bit 4w
        h0 = np.uint64(0)
        h1 = np.uint64(0)
        for j in range(4):
            h0 |= np.uint64(c[j]) << np.uint64(j * w)
            h1 |= np.uint64(c[4 + j]) << np.uint64(j * w)
        off = 4 * w
        b = off >> 3
        r = off & 7
        _store_u64(out, p, h0 | ((h1 << np.uint64(off - 32)) << np.uint64(32)))
        hi = ((h0 >> np.uint64(8 * b - 32)) >> np.uint64(32)) | (h1 << np.uint64(r))
        _store_u64(out, p + b, hi)


@numba.njit(cache=CACHE)
def _pack_chunk(codes, m, w, out, base):
    """Pack ``codes[:m]`` (element ``base`` onwards, ``base % 8 == 0``) into ``out``.

    ``codes`` has room for a whole last group: its unused entries are zeroed here. Groups
    whose 8-byte stores could pass the chunk's last byte go through a small buffer.
    """
    o = out[(base // 8) * w :]
    ng = (m + 7) // 8
    for j in range(m, 8 * ng):
        codes[j] = 0
    nbytes = (m * w + 7) // 8
    fast = max(0, ng - 5)  # stores of group g end before byte g*w + w + 8 <= (ng-1)*w
    for g in range(fast):
        _store_group(codes, g, w, o, g * w)
    tmp = np.zeros(8 * 16, np.uint8)
    for g in range(fast, ng):
        _store_group(codes, g, w, tmp, (g - fast) * w)
    o[fast * w : nbytes] = tmp[: nbytes - fast * w]


# --- encoders ----------------------------------------------------------------------------------


@numba.njit(nogil=True, cache=CACHE)
def _encode_linear(x, p, r, s, k0, k1, w, out, start, stop):
    # QSGD / TernGrad: t = min(|x| p r, s), j = floor(t) + (u < t - floor(t))
    codes = np.empty(CHUNK + 8, np.uint32)
    for base in range(start, stop, CHUNK):
        xs = x[base : min(stop, base + CHUNK)]
        b32 = U32(base)
        for i in range(xs.size):
            v = xs[i]
            t = min(abs(v) * p * r, s)
            fl = np.floor(t)
            up = _uniform(_uniform_bits(U32(b32 + U32(i)), k0, k1)) < t - fl
            j = U32(np.int32(fl)) + U32(up)
            neg = U32(v < np.float32(0)) & U32(j != U32(0))
            codes[i] = (j << _ONE) | neg
        _pack_chunk(codes, xs.size, w, out, base)


@numba.njit(nogil=True, cache=CACHE)
def _encode_natural(xb, k0, k1, w, out, start, stop):
    # natural compression on the float32 bits: exponent e, mantissa m; round up iff k < m
    codes = np.empty(CHUNK + 8, np.uint32)
    for base in range(start, stop, CHUNK):
        xs = xb[base : min(stop, base + CHUNK)]
        b32 = U32(base)
        for i in range(xs.size):
            b = xs[i]
            mag = b & _ABS
            k = _uniform_bits(U32(b32 + U32(i)), k0, k1)
            e = U32(mag >> U32(23)) + U32(k < (mag & _MANT))
            e = min(e, U32(254))
            neg = U32(b >> U32(31)) & U32(e != U32(0))
            codes[i] = (e << _ONE) | neg
        _pack_chunk(codes, xs.size, w, out, base)


@numba.njit(nogil=True, cache=CACHE)
def _encode_dither(x, p, r, s, lin, k0, k1, w, out, start, stop):
    # natural dithering: t = min(|x| p r, 1); t >= 2^(1-s): natural rounding of t's bits,
    # level j = e' - 127 + s; below: j = (u < t 2^(s-1)) (0 or the level 2^(1-s))
    codes = np.empty(CHUNK + 8, np.uint32)
    tf = np.empty(CHUNK, np.float32)
    tb = tf.view(np.uint32)
    e_lo = U32(128 - s)
    off = np.int32(s - 127)
    for base in range(start, stop, CHUNK):
        xs = x[base : min(stop, base + CHUNK)]
        b32 = U32(base)
        for i in range(xs.size):
            tf[i] = min(abs(xs[i]) * p * r, np.float32(1))
        for i in range(xs.size):
            t = tf[i]
            b = tb[i]
            k = _uniform_bits(U32(b32 + U32(i)), k0, k1)
            e = U32(b >> U32(23))
            j_nat = np.int32(e + U32(k < (b & _MANT))) + off
            j_lin = np.int32(_uniform(k) < t * lin)
            j = U32(j_nat if e >= e_lo else j_lin)
            neg = U32(xs[i] < np.float32(0)) & U32(j != U32(0))
            codes[i] = (j << _ONE) | neg
        _pack_chunk(codes, xs.size, w, out, base)


@numba.njit(nogil=True, cache=CACHE)
def _encode_buckets(xb, shift, c0, thr, w, out, start, stop):
    # deterministic rounding: the bucket of |x|'s bits holds at most one threshold
    codes = np.empty(CHUNK + 8, np.uint32)
    sh = U32(shift)
    for base in range(start, stop, CHUNK):
        xs = xb[base : min(stop, base + CHUNK)]
        for i in range(xs.size):
            b = xs[i]
            mag = b & _ABS
            g = mag >> sh
            j = U32(c0[g] + U32(mag > thr[g]))
            neg = U32(b >> U32(31)) & U32(j != U32(0))
            codes[i] = (j << _ONE) | neg
        _pack_chunk(codes, xs.size, w, out, base)


def encode_linear(x, p, r, s, k0, k1, w, out) -> None:
    """QSGD/TernGrad codes of float32 ``x`` into ``out`` (see the module docstring)."""
    f = np.float32
    run(_encode_linear, x.size, x, f(p), f(r), f(s), k0, k1, w, out, align=CHUNK)


def encode_natural(x, k0, k1, w, out) -> None:
    """Natural compression codes of float32 ``x`` (exponent after rounding, sign)."""
    run(_encode_natural, x.size, x.view(np.uint32), k0, k1, w, out, align=CHUNK)


def encode_dither(x, p, r, s, k0, k1, w, out) -> None:
    """Natural dithering codes (levels 0, 2^(1-s), ..., 1 of the norm) of float32 ``x``."""
    f = np.float32
    lin = f(2.0 ** (s - 1))
    run(_encode_dither, x.size, x, f(p), f(r), s, lin, k0, k1, w, out, align=CHUNK)


def encode_buckets(x, shift, c0, thr, w, out) -> None:
    """Deterministic rounding codes of float32 ``x`` from bucket tables (see biased_rounding)."""
    run(_encode_buckets, x.size, x.view(np.uint32), shift, c0, thr, w, out, align=CHUNK)


# --- decoders ----------------------------------------------------------------------------------


@numba.njit(inline="always", cache=CACHE)
def _load_group(data, p, w, c):
    """The 8 codes of ``w <= 16`` bits at ``data[p:]`` into ``c`` (reads 8-byte words)."""
    mask = (np.uint64(1) << np.uint64(w)) - np.uint64(1)
    if w <= 8:
        word = _load_u64(data, p)
        for j in range(8):
            c[j] = (word >> np.uint64(j * w)) & mask
    else:
        off = 4 * w
        lo = _load_u64(data, p)
        hi = _load_u64(data, p + (off >> 3)) >> np.uint64(off & 7)
        for j in range(4):
            c[j] = (lo >> np.uint64(j * w)) & mask
            c[4 + j] = (hi >> np.uint64(j * w)) & mask


@numba.njit(inline="always", cache=CACHE)
def _tail(data, start, stop, w):
    """The bytes of groups [start//8, ceil(stop/8)) in a zero-padded copy (safe to load)."""
    g0 = start // 8
    p0 = g0 * w
    buf = np.zeros((stop + 7) // 8 * w - p0 + 16, np.uint8)
    n = min(data.size, ((stop + 7) // 8) * w) - p0
    buf[:n] = data[p0 : p0 + n]
    return buf


@numba.njit(nogil=True, cache=CACHE)
def _decode_linear(data, w, scale, out, start, stop):
    # values [start, stop), start % 8 == 0; codes of groups whose loads stay in data first
    os = out[start:stop]
    c = np.empty(8, np.uint64)
    top = np.uint64(0)
    safe = max(0, min(os.size // 8, (data.size - 16) // w - start // 8))
    for g in range(safe):
        _load_group(data, (start // 8 + g) * w, w, c)
        for j in range(8):
            jj = c[j] >> np.uint64(1)
            top = max(top, jj)
            v = np.float32(jj) * scale
            os[8 * g + j] = -v if c[j] & np.uint64(1) else v
    if 8 * safe < os.size:
        buf = _tail(data, start + 8 * safe, stop, w)
        for g in range(safe, (os.size + 7) // 8):
            _load_group(buf, (g - safe) * w, w, c)
            for j in range(min(8, os.size - 8 * g)):
                jj = c[j] >> np.uint64(1)
                top = max(top, jj)
                v = np.float32(jj) * scale
                os[8 * g + j] = -v if c[j] & np.uint64(1) else v
    return top


@numba.njit(nogil=True, cache=CACHE)
def _decode_table(data, w, table, out, start, stop):
    # table: uint32 bit patterns of the magnitudes, 2**(w-1) entries; out: uint32 view
    os = out[start:stop]
    c = np.empty(8, np.uint64)
    top = np.uint64(0)
    safe = max(0, min(os.size // 8, (data.size - 16) // w - start // 8))
    for g in range(safe):
        _load_group(data, (start // 8 + g) * w, w, c)
        for j in range(8):
            jj = c[j] >> np.uint64(1)
            top = max(top, jj)
            os[8 * g + j] = table[jj] | (U32(c[j] & np.uint64(1)) << U32(31))
    if 8 * safe < os.size:
        buf = _tail(data, start + 8 * safe, stop, w)
        for g in range(safe, (os.size + 7) // 8):
            _load_group(buf, (g - safe) * w, w, c)
            for j in range(min(8, os.size - 8 * g)):
                jj = c[j] >> np.uint64(1)
                top = max(top, jj)
                os[8 * g + j] = table[jj] | (U32(c[j] & np.uint64(1)) << U32(31))
    return top


def decode_linear(data, w, scale, out) -> int:
    """out[i] = +-j_i * scale (float32); returns the largest j (for validation)."""
    return int(max(run(_decode_linear, out.size, data, w, np.float32(scale), out)))


def decode_table(data, w, table, out) -> int:
    """out[i] = +-table[j_i] (float32 ``table`` of 2**(w-1) entries); returns the largest j."""
    tb = np.ascontiguousarray(table, np.float32).view(np.uint32)
    return int(max(run(_decode_table, out.size, data, w, tb, out.view(np.uint32))))
