"""Dithered one-bit quantization, with and without flattening; FO-SGD.

Stollenwerk & Jacques, "Flattened one-bit stochastic gradient descent" (arXiv 2405.11095);
DESIGN.md sections 3.1-3.3. Encoding a gradient g of length d:

1. y = Phi g, the randomized Hadamard rotation (``flatten=True``), else y = g.
2. Pick the scale lambda by the rule: ``max`` lambda = ||y||_inf (unbiased); ``norm``
   lambda = c ||g||_2 sqrt(2 ln(2B) / B), B the rotation block (biased only where a
   flattened coordinate exceeds lambda, which flattening makes rare); ``fixed`` lambda
   given, and then nothing but the d bits is sent.
3. Draw the dither xi = lambda u from the shared seed, u uniform on (-1, 1)^d at a
   resolution of 2^-15 (``rng.dither16``: four dither values per 64-bit SplitMix64 word,
   which cuts the hashing that dominates the quantizer; the probabilities are then multiples of
   2^-16, a bias of at most 2^-15 lambda per coordinate, far below the standard deviation
   of about lambda), and send the bits b = sign(y + xi).
4. The receiver forms lambda b (``standard`` dither: E = y, Var = lambda^2 - y^2 where
   |y| <= lambda) or lambda b - xi (``subtractive``: unbiased, Var = lambda^2 / 3 whatever
   y is), and rotates back: g_hat = Phi^T(...).

Fast paths (CPU float32, d a power of two >= 2^16): FO-SGD with the ``norm`` rule encodes
in two passes over memory instead of five (``hadamard.rotate_quantize_``: the norm is taken
during the rotation, the quantizer runs on each piece of the rotated vector as it is
finished, which is never stored), and the ``standard`` dither decodes with the inverse
rotation reading the bits directly (``hadamard.unrotate_signs``). Both give exactly the
payload / output of the plain path, which the tests check against the pure-torch references.

Without flattening the variance is d lambda^2 - ||g||^2 with lambda >= ||g||_inf: up to
(d - 1)||g||^2 for a 1-sparse g. With flattening it is O(log d) ||g||^2: the paper's
central claim, shown by ``tests/test_onebit.py`` and ``gradzip demo``.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .. import _alloc, bits, hadamard, rng
from ..wire import MAX_NUMEL, Payload, PayloadError
from .base import Compressor, EncodeContext, NonFiniteError, read_f32

SCALES = ("max", "norm", "fixed")
DITHERS = ("standard", "subtractive")
_PARAMS = struct.Struct("<BBBxff")  # scale rule, dither, flatten, pad, c, lam


def _f32_up(v: float) -> float:
    """``v`` rounded up to a float32, so a scale never clips what it was computed from."""
    f = np.float32(v)
    if float(f) < v:
        f = np.nextafter(f, np.float32(np.inf))
    return float(f)


# --- the quantizer kernels: fast CPU path (numba) and pure-torch reference ---------------


def quantize_reference(y: torch.Tensor, lam: float, key: int | None) -> torch.Tensor:
    """Packed bits of ``y + lam * u < 0`` (``key=None``: no dither, bits of ``y < 0``)."""
    if key is not None:
        y = y + lam * rng.dither16(key, y.numel(), y.device)
    return bits.pack_bits(y < 0)


def quantize_(y: torch.Tensor, lam: float, key: int | None, out: torch.Tensor) -> None:
    """Writes the packed bits of :func:`quantize_reference` into ``out`` (uint8, CPU)."""
    if y.device.type == "cpu" and y.dtype == torch.float32:
        from .._numba import quantize as k

        if key is None:
            k.sign_pack(y.numpy(), out.numpy())
        else:
            k.dither_sign_pack(y.numpy(), lam, key, out.numpy())
    else:
        out.copy_(quantize_reference(y, lam, key).cpu())


def dequantize_reference(data, n, lam, key, device=None) -> torch.Tensor:
    """``lam * b`` from packed bits, minus ``lam * u`` when ``key`` is given (subtractive)."""
    on_cpu = device is None or torch.device(device).type == "cpu"
    out = _alloc.empty(n) if on_cpu else None
    z = bits.unpack_signs(data.to(device) if device else data, n, scale=lam, out=out)
    if key is not None:
        z = z - lam * rng.dither16(key, n, z.device)
    return z


def dequantize(data, n, lam, key, device=None) -> torch.Tensor:
    if (device is None or torch.device(device).type == "cpu") and key is not None:
        from .._numba.quantize import unpack_subtract_dither

        out = _alloc.empty(n)
        unpack_subtract_dither(data.numpy(), lam, key, out.numpy())
        return out
    return dequantize_reference(data, n, lam, key, device)


# --- the compressor -------------------------------------------------------------------------


@dataclass(frozen=True)
class OneBit(Compressor):
    """Dithered one-bit quantizer (DESIGN 3.2), optionally flattened (3.3).

    Args:
        scale: ``max`` | ``norm`` | ``fixed``, the rule for lambda (see module docstring).
        dither: ``standard`` (receiver forms lambda b) or ``subtractive`` (lambda b - xi).
        flatten: rotate by Phi before quantizing (FO-SGD) or not.
        c: the constant of the ``norm`` rule (c >= 1 keeps clipping rare).
        lam: lambda for the ``fixed`` rule.
    """

    scale: str = "max"
    dither: str = "standard"
    flatten: bool = False
    c: float = 1.0
    lam: float = 0.0

    name: ClassVar[str] = "onebit"
    codec_id: ClassVar[int] = 10
    summary: ClassVar[str] = "dithered one-bit quantizer, optionally Hadamard-flattened"

    def __post_init__(self):
        if self.scale not in SCALES:
            raise ValueError(f"onebit: scale must be one of {SCALES}, got {self.scale!r}")
        if self.dither not in DITHERS:
            raise ValueError(f"onebit: dither must be one of {DITHERS}, got {self.dither!r}")
        if not (math.isfinite(self.c) and self.c > 0):
            raise ValueError(f"onebit: c must be a positive number, got {self.c}")
        if self.scale == "fixed" and not (math.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"onebit: scale=fixed needs lam > 0, got lam={self.lam}")

    @property
    def unbiased(self) -> bool:
        return self.scale == "max"

    @property
    def bits_formula(self) -> str:
        return "1" if self.scale == "fixed" else "1 + 32/d"

    def omega(self, d: int) -> float | None:
        # lambda = ||y||_inf <= ||x||_2: standard Var = d lambda^2 - ||x||^2 <= (d - 1)||x||^2,
        # subtractive Var = d lambda^2 / 3 <= (d / 3)||x||^2 (worst cases: 1-sparse y)
        if not self.unbiased:
            return None
        return d - 1.0 if self.dither == "standard" else d / 3.0

    def section_lengths(self, d: int) -> list[int]:
        packed = bits.packed_size(d)
        return [packed] if self.scale == "fixed" else [4, packed]

    def to_params(self) -> bytes:
        return _PARAMS.pack(
            SCALES.index(self.scale), DITHERS.index(self.dither), int(self.flatten),
            self.c, self.lam,
        )  # fmt: skip

    @classmethod
    def from_params(cls, raw: bytes) -> OneBit:
        if len(raw) != _PARAMS.size:
            raise PayloadError(f"onebit: expected {_PARAMS.size} parameter bytes, got {len(raw)}")
        s, dth, fl, c, lam = _PARAMS.unpack(raw)
        if s >= len(SCALES) or dth >= len(DITHERS) or fl > 1:
            raise PayloadError(f"onebit: invalid parameters scale={s} dither={dth} flatten={fl}")
        try:
            return cls(scale=SCALES[s], dither=DITHERS[dth], flatten=bool(fl), c=c, lam=lam)
        except ValueError as e:
            raise PayloadError(str(e)) from None

    def norm_scale(self, norm: float, d: int) -> float:
        """lambda of the ``norm`` rule for a vector of 2-norm ``norm`` and length d."""
        if d == 0:
            return 0.0
        n = hadamard.rotation_block(d) if self.flatten else d
        return self.c * norm * math.sqrt(2 * math.log(2 * n) / n)

    def encode(self, x: torch.Tensor, seed: int = 0, step: int = 0, worker: int = 0) -> Payload:
        """:meth:`Compressor.encode`, minus its separate finiteness pass where the fused
        encoder runs (:meth:`_encode_fused` checks finiteness itself, in its first pass,
        before any payload exists); everything else goes through the base class."""
        if not (
            self.flatten
            and self.scale == "norm"
            and isinstance(x, torch.Tensor)
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and x.numel() <= MAX_NUMEL
        ):
            return super().encode(x, seed, step, worker)
        ctx = EncodeContext(self, x, seed, step, worker)
        v = ctx.f32()
        if not hadamard.can_rotate_quantize(v):
            ctx.stats()  # validates finiteness before any work, as the base class does
            return self._encode(ctx)
        return self._encode_fused(ctx, v)

    def _encode(self, ctx: EncodeContext) -> Payload:
        v = ctx.f32()
        if self.flatten and self.scale == "norm" and hadamard.can_rotate_quantize(v):
            return self._encode_fused(ctx, v)
        sq, mx, _ = ctx.stats()
        y = v
        if self.flatten and ctx.d:
            out = _alloc.scratch(ctx.d) if v.device.type == "cpu" else None  # quantized below
            y = hadamard.rotate(v, ctx.key(rng.STREAM_ROTATION), out=out)
        if self.scale == "max":
            lam = float(y.abs().max()) if self.flatten and ctx.d else mx
        elif self.scale == "norm":
            lam = self.norm_scale(math.sqrt(sq), ctx.d)
        else:
            lam = self.lam
        lam = _f32_up(lam)
        w = ctx.writer(self.section_lengths(ctx.d))
        if self.scale != "fixed":
            w.put_f32(0, lam)
        quantize_(y, lam, ctx.key(rng.STREAM_DITHER), w.sections[-1])
        return w.finish()

    def _encode_fused(self, ctx: EncodeContext, v: torch.Tensor) -> Payload:
        """FO-SGD's default (``norm`` rule, CPU float32, d a power of two >= 2**16) in two
        passes over memory instead of five: lambda needs only ||g||_2, which pass 1 of the
        rotation takes on the way, and pass 2 quantizes the rotated vector as it finishes
        it (:func:`gradzip.hadamard.rotate_quantize_`). Same payload as the unfused path,
        bit for bit, up to the rounding of ||g||_2^2 (a float64 sum in another order)."""
        w = ctx.writer(self.section_lengths(ctx.d))

        def scale_of(sq: float, finite: bool) -> float:
            if not finite:
                bad = int((~torch.isfinite(v)).sum())
                raise NonFiniteError(
                    f"{self.name}: input has {bad} non-finite value(s) (NaN or inf) out of "
                    f"{ctx.d}; a gradient must be finite to be compressed"
                )
            return _f32_up(self.norm_scale(math.sqrt(sq), ctx.d))

        lam = hadamard.rotate_quantize_(
            v, ctx.key(rng.STREAM_ROTATION), scale_of, ctx.key(rng.STREAM_DITHER), w.arrays[-1]
        )
        w.put_f32(0, lam)
        return w.finish()

    def _decode(self, p: Payload, device) -> torch.Tensor:
        h = p.header
        d = h.numel
        lam = self.lam if self.scale == "fixed" else read_f32(p.section(0), 1, "onebit scale")[0]
        data = p.section(-1 if self.scale == "fixed" else 1)
        on_cpu = device is None or torch.device(device).type == "cpu"
        if self.flatten and self.dither == "standard" and on_cpu and hadamard.can_unrotate_signs(d):
            # fused: the inverse rotation reads the bits, the signs are never unpacked
            key = rng.derive_key(h.seed, h.step, h.worker, rng.STREAM_ROTATION)
            return hadamard.unrotate_signs(data, d, lam, key)
        key = rng.derive_key(h.seed, h.step, h.worker, rng.STREAM_DITHER)
        z = dequantize(data, d, lam, key if self.dither == "subtractive" else None, device)
        if self.flatten and d:
            key = rng.derive_key(h.seed, h.step, h.worker, rng.STREAM_ROTATION)
            z = hadamard.unrotate(z, key, out=z)  # in place
        return z


def onebit(scale="max", dither="standard", flatten=False, c=1.0, lam=0.0) -> OneBit:
    """Dithered one-bit quantizer without flattening (by default)."""
    return OneBit(scale=scale, dither=dither, flatten=flatten, c=c, lam=lam)


def fosgd(scale="norm", dither="standard", c=1.0, lam=0.0) -> OneBit:
    """FO-SGD's compressor: Hadamard flattening, then dithered one-bit (``norm`` scale)."""
    return OneBit(scale=scale, dither=dither, flatten=True, c=c, lam=lam)


ENTRIES = [
    ("onebit", onebit, "dithered one-bit quantizer, no flattening by default"),
    ("fosgd", fosgd, "FO-SGD: Hadamard flattening + dithered one-bit, norm scale"),
]
CODEC_CLASSES = [OneBit]
