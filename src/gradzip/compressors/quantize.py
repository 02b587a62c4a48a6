"""Quantizers: ``qsgd``, ``terngrad``, ``natural``, ``natural_dithering``, ``biased_rounding``.

Each maps coordinate i to the index j_i of a magnitude and sends the w-bit code
``(j_i << 1) | neg_i`` (neg_i = 1 for a negative x_i rounded to a nonzero magnitude), packed
in :func:`gradzip.bits.pack_uints`'s format, after the float32 scale if there is one. The
receiver maps j to its magnitude and applies the sign. Stochastic rounding draws
``u_i = rng.uniform(key)[i]`` with ``key = derive_key(seed, step, worker, STREAM_ROUNDING)``
(``u_i = (2 m_i + 1) 2**-24``, ``m_i = hash32(i, key) >> 9`` 23 random bits), so it is
shared randomness, identical in the numba kernels (:mod:`gradzip._numba.quantizers`) and in
the pure-torch references here, byte for byte.

1. ``qsgd`` [levels=s] (Alistarh et al. 2017, QSGD, Lemma 3.1): C(x)_i = ||x||_2 sign(x_i)
   xi_i / s, xi_i = floor(t_i) or floor(t_i) + 1 with probability frac(t_i),
   t_i = s |x_i| / ||x||_2. Unbiased; E||C(x) - x||^2 <= min(d/s^2, sqrt(d)/s) ||x||^2.
   Bits: 1 + ceil(log2(s+1)) per coordinate + 32 (the norm), byte-padded.
2. ``terngrad`` (Wen et al. 2017, TernGrad): s = ||x||_inf, C(x)_i = s sign(x_i) b_i,
   b_i ~ Bernoulli(|x_i| / s). Unbiased; the paper's second moment E||C(x)||^2 =
   ||x||_inf ||x||_1 gives Var = ||x||_inf ||x||_1 - ||x||^2 <= omega ||x||^2 with
   omega = (sqrt(d) - 1) / 2, tight (attained at x = (1, a, ..., a), a = 1/(sqrt(d) + 1),
   since max ||x||_inf ||x||_1 / ||x||_2^2 = (sqrt(d) + 1) / 2). Bits: 2 per coordinate
   (code = sign and Bernoulli bit; base-3 packing would save 0.4 bit, not worth a slower
   kernel) + 32. No gradient clipping (the paper's is a separate, optional step).
3. ``natural`` (Horvath et al. 2019, "Natural compression for distributed deep learning",
   C_nat): |x_i| in [2^e, 2^(e+1)) rounds to 2^(e+1) with probability |x_i|/2^e - 1, else
   2^e. On the float32 bits (exponent E, mantissa m): up iff m_i < m, so P(up) = m/2^23
   exactly. Unbiased, omega = 1/8. Bits: 9 per coordinate (1 sign + 8 exponent bits).
   Zero and subnormals: |x| < 2^-126 (E = 0) rounds to 0 or 2^-126 with the same rule
   (unbiased; its variance |x|(2^-126 - |x|) is not within x^2/8, so omega = 1/8 holds for
   coordinates 0 or >= 2^-126 in magnitude; subnormal ones add at most 2^-126 |x_i|).
   |x| >= 2^127 rounds down to 2^127 (2^128 is not a float32): the only biased case.
   The float32 value of x is what is rounded (float64 input is first rounded to float32).
4. ``natural_dithering`` [levels=s] (Horvath et al. 2019, D_nat^{p,s} with p = 2): levels
   0, 2^(1-s), ..., 1/2, 1 times ||x||_2; t_i = |x_i| / ||x||_2 >= 2^(1-s) is rounded as in
   C_nat, below 2^(1-s) between 0 and 2^(1-s) with probability t_i 2^(s-1). Unbiased,
   omega = 1/8 + min(sqrt(d)/2^(s-1), d/2^(2(s-1))) (their Theorem for p = 2). Bits:
   1 + ceil(log2(s+1)) per coordinate + 32 (the norm).
5. ``biased_rounding`` [base=b] (:mod:`.rounding`; Beznosikov et al. 2020, "On biased
   compression for distributed learning", biased rounding): C(x)_i = sign(x_i) argmin_t |t -
   |x_i|| over the levels t = b^k: nearest in absolute distance, as in the paper, so the
   threshold between b^k and b^(k+1) is their midpoint and |C(x)_i - x_i| <= (b-1)/(b+1)
   |x_i|, hence class B3 with delta = (b+1)^2 / (4b) (9/8 for b = 2). (Rounding log_b |x_i|
   to the nearest integer instead would give |C(x)_i - x_i| <= (sqrt(b) - 1)|x_i|: no
   contraction for b >= 4.) The levels are b^k rounded to float32 within [2^-126, float32
   max]; delta is computed from the largest ratio of consecutive float32 levels (b up to
   ~1e-7). Below the smallest level L0, |x_i| <= L0/2 rounds to 0 and above to L0; above the
   largest level it rounds down to it: the bound covers coordinates in [L0, L_top] and 0.
   Deterministic. Bits: 1 + ceil(log2(N+1)) per coordinate, N the number of levels (9 bits
   for b = 2).

Decoding validates untrusted bytes: the scale must be finite and non-negative, every code's
magnitude index must exist (PayloadError otherwise), and decoded values are finite.
"""

from __future__ import annotations

import functools
import math
import operator
import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .. import _alloc, bits, rng
from ..wire import Payload, PayloadError
from .base import Compressor, EncodeContext, read_f32

F32_MAX = float(np.finfo(np.float32).max)
MAX_QSGD_LEVELS = (1 << 15) - 1  # codes of at most 16 bits (the kernels)
MAX_DITHER_LEVELS = 126  # the level 2^(1-s) stays a normal float32
_TINY = 2.0**-60  # below this a norm is pre-scaled by 2^64 (exact) so 1/norm stays finite
_PRESCALE = 2.0**64
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")


def _f32(v: float) -> float:
    return float(np.float32(v))


def _f32_up(v: float) -> float:
    """``v`` rounded up to a float32 (so a norm is never below what it was computed from)."""
    if v > F32_MAX:
        return math.inf
    f = np.float32(v)
    if float(f) < v:
        f = np.nextafter(f, np.float32(np.inf))
    return float(f)


def _width(n: int) -> int:
    """Bits of a code for magnitude indices 0..n: ceil(log2(n+1)) + 1 sign bit."""
    return max(1, n.bit_length()) + 1


def _check_levels(name: str, s, top: int) -> int:
    try:
        if isinstance(s, bool):
            raise TypeError
        s = operator.index(s)
    except TypeError:
        raise ValueError(f"{name}: levels must be an integer, got {s!r}") from None
    if not 1 <= s <= top:
        raise ValueError(f"{name}: levels must be in [1, {top}], got {s}")
    return s


def _scale_for(norm32: float, top: float) -> tuple[float, float]:
    """(p, r) with t = min(|x| p r, top) the rounding target of |x| for a norm ``norm32``."""
    p = _PRESCALE if norm32 < _TINY else 1.0
    return p, _f32(top / (norm32 * p)) if norm32 else 0.0


def _check_range(name: str, ctx: EncodeContext, value: float, what: str) -> float:
    v = _f32_up(value)
    if not math.isfinite(v) or ctx.stats()[1] > F32_MAX:
        raise ValueError(f"{name}: {what} {value:.3g} exceeds the float32 range")
    return v


def _cpu(device) -> bool:
    return device is None or torch.device(device).type == "cpu"


# --- pure-torch references: the codes of each quantizer, and decoding -------------------------


def _negative(x: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    return ((x < 0) & (j != 0)).to(torch.int64)


def linear_codes_reference(x, p, r, s, key) -> torch.Tensor:
    """QSGD/TernGrad codes: t = min(|x| p r, s), j = floor(t) + (u < frac(t))."""
    t = ((x.abs() * p) * r).clamp_max(s)
    fl = torch.floor(t)
    j = fl.to(torch.int64) + (rng.uniform(key, x.numel(), x.device) < t - fl)
    return (j << 1) | _negative(x, j)


def natural_codes_reference(x, key) -> torch.Tensor:
    """Natural compression codes from the float32 bits: e' = E + (m_i < mantissa)."""
    b = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    mag = b & 0x7FFFFFFF
    k = rng.hash32(torch.arange(x.numel(), device=x.device), key) >> 9
    e = ((mag >> 23) + (k < (mag & 0x7FFFFF))).clamp_max(254)
    return (e << 1) | ((b >> 31) & (e != 0))


def dither_codes_reference(x, p, r, s, key) -> torch.Tensor:
    """Natural dithering codes: natural rounding of t = min(|x| p r, 1) above 2^(1-s)."""
    t = ((x.abs() * p) * r).clamp_max(1.0)
    b = t.view(torch.int32).to(torch.int64)
    k = rng.hash32(torch.arange(x.numel(), device=x.device), key) >> 9
    e = b >> 23
    j_nat = e + (k < (b & 0x7FFFFF)) + (s - 127)
    j_lin = (rng.uniform(key, x.numel(), x.device) < t * 2.0 ** (s - 1)).to(torch.int64)
    j = torch.where(e >= 128 - s, j_nat, j_lin)
    return (j << 1) | _negative(x, j)


def bucket_codes_reference(x, shift, c0, thr) -> torch.Tensor:
    """Deterministic rounding codes: bucket ``|x|_bits >> shift``, one threshold each."""
    b = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    mag = b & 0x7FFFFFFF
    g = mag >> shift
    c0 = torch.as_tensor(c0.astype(np.int64), device=x.device)
    thr = torch.as_tensor(thr.astype(np.int64), device=x.device)
    j = c0[g] + (mag > thr[g])
    return (j << 1) | ((b >> 31) & (j != 0))


def decode_reference(section, d, w, *, scale=None, table=None, device=None):
    """(values, largest j): +-j*scale (float32) or +-table[j], from the packed codes."""
    c = bits.unpack_uints_reference(section.to(device) if device else section, d, w)
    j = c >> 1
    top = int(j.max()) if d else 0
    if scale is not None:
        v = j.to(torch.float32) * scale
    else:
        tab = torch.as_tensor(table, dtype=torch.float32, device=c.device)
        v = tab[j.clamp_max(tab.numel() - 1)]
    return torch.where((c & 1).bool(), -v, v), top


# --- the compressors ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Quantizer(Compressor):
    """A quantizer sending w-bit codes after ``n_scalars`` float32 scalars (0 or 1)."""

    n_scalars: ClassVar[int] = 1

    def width(self) -> int:
        raise NotImplementedError

    def section_lengths(self, d: int) -> list[int]:
        return [4] * self.n_scalars + [bits.packed_size(d, self.width())]

    # the pieces a subclass provides
    def _scalar(self, ctx: EncodeContext) -> float:  # the float32 scalar sent (if any)
        raise NotImplementedError

    def _codes_fast(self, x: np.ndarray, scalar: float, key: int, out: np.ndarray) -> None:
        raise NotImplementedError

    def _codes_reference(self, x: torch.Tensor, scalar: float, key: int) -> torch.Tensor:
        raise NotImplementedError

    def _magnitudes(self, scalar: float) -> dict:  # decode: {"scale": f} or {"table": array}
        raise NotImplementedError

    # encode / decode ---------------------------------------------------------------------------
    def encode_reference(self, x, seed: int = 0, step: int = 0, worker: int = 0) -> Payload:
        """:meth:`encode` through the pure-torch reference (any device; for tests)."""
        ctx = EncodeContext(self, x, seed, step, worker)
        ctx.stats()
        return self._encode_impl(ctx, fast=False)

    def decode_reference(self, payload, device=None) -> torch.Tensor:
        """:meth:`decode` through the pure-torch reference."""
        p = payload if isinstance(payload, Payload) else Payload.from_bytes(payload)
        if p.header.codec != self.codec_id:
            raise PayloadError(f"{self.name}: not a payload of codec {self.codec_id}")
        out = self._decode_impl(p, device, fast=False)
        return out.reshape(p.header.shape).to(p.header.dtype)

    def _encode(self, ctx: EncodeContext) -> Payload:
        return self._encode_impl(ctx, fast=True)

    def _encode_impl(self, ctx: EncodeContext, fast: bool) -> Payload:
        x = ctx.f32()
        scalar = self._scalar(ctx) if self.n_scalars else 0.0
        w = ctx.writer(self.section_lengths(ctx.d))
        if self.n_scalars:
            w.put_f32(0, scalar)
        key = ctx.key(rng.STREAM_ROUNDING)
        out = w.sections[-1]
        if fast and x.device.type == "cpu":
            if ctx.d:
                self._codes_fast(x.numpy(), scalar, key, out.numpy())
        elif ctx.d:
            codes = self._codes_reference(x, scalar, key)
            out.copy_(bits.pack_uints_reference(codes, self.width()).cpu())
        return w.finish()

    def _decode(self, p: Payload, device) -> torch.Tensor:
        return self._decode_impl(p, device, fast=True)

    def _decode_impl(self, p: Payload, device, fast: bool) -> torch.Tensor:
        d = p.header.numel
        scalar = read_f32(p.section(0), 1, f"{self.name} scale")[0] if self.n_scalars else 0.0
        mags = self._magnitudes(scalar)
        w = self.width()
        data = p.section(-1)
        if fast and _cpu(device):
            from .._numba import quantizers as nb

            out = _alloc.empty(d)
            top = 0
            if d:
                if "scale" in mags:
                    top = nb.decode_linear(data.numpy(), w, mags["scale"], out.numpy())
                else:
                    top = nb.decode_table(data.numpy(), w, mags["table"], out.numpy())
        else:
            kw = {k: v for k, v in mags.items() if k != "top"}
            out, top = decode_reference(data, d, w, device=device, **kw)
        if top > mags["top"]:
            raise PayloadError(
                f"{self.name}: a code has magnitude index {top}, the largest valid is "
                f"{mags['top']} (corrupt payload)"
            )
        return out


@dataclass(frozen=True)
class _NormScaled(_Quantizer):
    """Stochastic rounding of |x_i| p r (p r ~ top / norm) to neighbouring integer levels."""

    def _norm(self, ctx: EncodeContext) -> float:
        raise NotImplementedError

    def _top(self) -> int:
        raise NotImplementedError

    def _scalar(self, ctx: EncodeContext) -> float:
        norm = _check_range(self.name, ctx, self._norm(ctx), "the scale")
        if not self._decodable(norm):
            raise ValueError(f"{self.name}: the scale {norm:.3g} exceeds the float32 range")
        return norm

    def _decodable(self, norm: float) -> bool:
        with np.errstate(over="ignore"):
            return bool(np.isfinite(np.float32(self._top()) * np.float32(self._mag_scale(norm))))

    def _mag_scale(self, norm: float) -> float:
        return _f32(norm / self._top())

    def _codes_fast(self, x, scalar, key, out):
        from .._numba import quantizers as nb
        from .._numba.rng import split_key

        p, r = _scale_for(scalar, self._top())
        nb.encode_linear(x, p, r, self._top(), *split_key(key), self.width(), out)

    def _codes_reference(self, x, scalar, key):
        p, r = _scale_for(scalar, self._top())
        return linear_codes_reference(x, p, r, float(self._top()), key)

    def _magnitudes(self, scalar: float) -> dict:
        if not self._decodable(scalar):
            raise PayloadError(f"{self.name}: scale {scalar:.3g} overflows float32 when decoded")
        return {"scale": self._mag_scale(scalar), "top": self._top()}


@dataclass(frozen=True)
class QSGD(_NormScaled):
    """QSGD / random dithering with s levels of ||x||_2 (see the module docstring, 1)."""

    levels: int = 15

    name: ClassVar[str] = "qsgd"
    codec_id: ClassVar[int] = 30
    summary: ClassVar[str] = "QSGD: norm-scaled stochastic rounding to s levels (unbiased)"

    def __post_init__(self):
        object.__setattr__(self, "levels", _check_levels("qsgd", self.levels, MAX_QSGD_LEVELS))

    @property
    def bits_formula(self) -> str:
        return f"1 + ceil(log2(s+1)) + 32/d = {self.width()} + 32/d (s = {self.levels})"

    @property
    def unbiased(self) -> bool:
        return True

    def omega(self, d: int) -> float:
        s = self.levels
        return min(d / s**2, math.sqrt(d) / s)

    def width(self) -> int:
        return _width(self.levels)

    def _top(self) -> int:
        return self.levels

    def _norm(self, ctx: EncodeContext) -> float:
        return math.sqrt(ctx.stats()[0])

    def to_params(self) -> bytes:
        return _U32.pack(self.levels)

    @classmethod
    def from_params(cls, raw: bytes) -> QSGD:
        if len(raw) != _U32.size:
            raise PayloadError(f"qsgd: expected {_U32.size} parameter bytes, got {len(raw)}")
        try:
            return cls(levels=_U32.unpack(raw)[0])
        except ValueError as e:
            raise PayloadError(str(e)) from None


@dataclass(frozen=True)
class TernGrad(_NormScaled):
    """TernGrad: ||x||_inf sign(x_i) Bernoulli(|x_i|/||x||_inf) (module docstring, 2)."""

    name: ClassVar[str] = "terngrad"
    codec_id: ClassVar[int] = 31
    summary: ClassVar[str] = "TernGrad: ||x||_inf * sign * Bernoulli(|x_i|/||x||_inf)"
    bits_formula: ClassVar[str] = "2 + 32/d"

    @property
    def unbiased(self) -> bool:
        return True

    def omega(self, d: int) -> float:
        return (math.sqrt(d) - 1) / 2 if d else 0.0

    def width(self) -> int:
        return 2

    def _top(self) -> int:
        return 1

    def _norm(self, ctx: EncodeContext) -> float:
        return ctx.stats()[1]


@dataclass(frozen=True)
class Natural(_Quantizer):
    """Natural compression C_nat: stochastic rounding to powers of two (module docstring, 3)."""

    name: ClassVar[str] = "natural"
    codec_id: ClassVar[int] = 32
    summary: ClassVar[str] = "natural compression: random rounding to powers of 2 (9 bits)"
    bits_formula: ClassVar[str] = "9 (1 sign + 8 exponent bits)"
    n_scalars: ClassVar[int] = 0

    @property
    def unbiased(self) -> bool:
        return True

    def omega(self, d: int) -> float:
        return 0.125

    def width(self) -> int:
        return 9

    def _codes_fast(self, x, scalar, key, out):
        from .._numba import quantizers as nb
        from .._numba.rng import split_key

        nb.encode_natural(x, *split_key(key), 9, out)

    def _encode_impl(self, ctx: EncodeContext, fast: bool) -> Payload:
        _check_range(self.name, ctx, ctx.stats()[1], "the value")
        return super()._encode_impl(ctx, fast)

    def _codes_reference(self, x, scalar, key):
        return natural_codes_reference(x, key)

    def _magnitudes(self, scalar: float) -> dict:
        return {"table": _natural_table(), "top": 254}


@functools.cache
def _natural_table() -> np.ndarray:
    t = np.zeros(256, np.float32)
    t[1:255] = np.ldexp(np.float32(1), np.arange(1, 255) - 127)
    return t


@dataclass(frozen=True)
class NaturalDithering(_Quantizer):
    """Natural dithering: levels 0, 2^(1-s), ..., 1 of ||x||_2 (module docstring, 4)."""

    levels: int = 7

    name: ClassVar[str] = "natural_dithering"
    codec_id: ClassVar[int] = 33
    summary: ClassVar[str] = "natural dithering: random rounding to levels 2^(j-s) ||x||_2"

    def __post_init__(self):
        s = _check_levels("natural_dithering", self.levels, MAX_DITHER_LEVELS)
        object.__setattr__(self, "levels", s)

    @property
    def bits_formula(self) -> str:
        return f"1 + ceil(log2(s+1)) + 32/d = {self.width()} + 32/d (s = {self.levels})"

    @property
    def unbiased(self) -> bool:
        return True

    def omega(self, d: int) -> float:
        s = self.levels
        return 0.125 + min(math.sqrt(d) / 2.0 ** (s - 1), d / 4.0 ** (s - 1))

    def width(self) -> int:
        return _width(self.levels)

    def _scalar(self, ctx: EncodeContext) -> float:
        return _check_range(self.name, ctx, math.sqrt(ctx.stats()[0]), "the 2-norm")

    def _codes_fast(self, x, scalar, key, out):
        from .._numba import quantizers as nb
        from .._numba.rng import split_key

        p, r = _scale_for(scalar, 1.0)
        nb.encode_dither(x, p, r, self.levels, *split_key(key), self.width(), out)

    def _codes_reference(self, x, scalar, key):
        p, r = _scale_for(scalar, 1.0)
        return dither_codes_reference(x, p, r, self.levels, key)

    def _magnitudes(self, scalar: float) -> dict:
        s = self.levels
        t = np.zeros(1 << (self.width() - 1), np.float32)
        t[1 : s + 1] = np.float64(scalar) * np.ldexp(1.0, np.arange(1, s + 1) - s)
        return {"table": t, "top": s}

    def to_params(self) -> bytes:
        return _U32.pack(self.levels)

    @classmethod
    def from_params(cls, raw: bytes) -> NaturalDithering:
        if len(raw) != _U32.size:
            raise PayloadError(f"{cls.name}: expected {_U32.size} parameter bytes, got {len(raw)}")
        try:
            return cls(levels=_U32.unpack(raw)[0])
        except ValueError as e:
            raise PayloadError(str(e)) from None


def qsgd(levels: int = 15) -> QSGD:
    """QSGD with s = ``levels`` (default 15: 4 level bits + 1 sign bit per coordinate)."""
    return QSGD(levels=levels)


def terngrad() -> TernGrad:
    """TernGrad: 2 bits per coordinate and the float32 ||x||_inf."""
    return TernGrad()


def natural() -> Natural:
    """Natural compression: 9 bits per coordinate (sign and float32 exponent)."""
    return Natural()


def natural_dithering(levels: int = 7) -> NaturalDithering:
    """Natural dithering with s = ``levels`` (default 7: 3 level bits + 1 sign bit)."""
    return NaturalDithering(levels=levels)


ENTRIES = [
    ("qsgd", qsgd, QSGD.summary),
    ("terngrad", terngrad, TernGrad.summary),
    ("natural", natural, Natural.summary),
    ("natural_dithering", natural_dithering, NaturalDithering.summary),
]
CODEC_CLASSES = [QSGD, TernGrad, Natural, NaturalDithering]
