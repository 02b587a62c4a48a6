"""Dithered one-bit quantization, with and without flattening; FO-SGD.

Stollenwerk & Jacques, "Flattened one-bit stochastic gradient descent" (arXiv 2405.11095);
DESIGN.md sections 3.1-3.3. Encoding a gradient g of length d:

1. y = Phi g, the randomized Hadamard rotation (``flatten=True``), else y = g.
2. Pick the dither's scale lambda by the rule: ``max`` lambda = ||y||_inf (unbiased);
   ``norm`` lambda = c ||g||_2 sqrt(2 ln(2B) / B), B the rotation block (the paper's:
   biased only where a flattened coordinate exceeds lambda, which flattening makes rare);
   ``rms`` lambda = c ||g||_2 / sqrt(d) (c = 0: no dither); ``l1`` lambda = c ||y||_1 / d;
   ``fixed`` lambda given, and then nothing but the d bits is sent.
3. Draw the dither xi = lambda u from the shared seed, u uniform on (-1, 1)^d at a
   resolution of 2^-15 (``rng.dither16``: four dither values per 64-bit SplitMix64 word,
   which cuts the hashing that dominates the quantizer; the probabilities are then multiples of
   2^-16, a bias of at most 2^-15 lambda per coordinate, far below the standard deviation
   of about lambda), and send the bits b = sign(y + xi).
4. The decode scale s (``rescale``), sent in lambda's place: lambda itself (``none``), or
   fitted by the sender from y and the bits it made: <b, y> / d (``mse``, the least-squares
   fit: a contraction) or ||y||^2 / <b, y> (``unbiased``: <C(g), g> = ||g||^2 exactly), or
   the latter capped at 1.9 <b, y> / d (``capped``: the same as ``unbiased`` on flat
   vectors, where <b, y>^2 / (d ||y||^2) is about 0.6, and a contraction on every vector).
5. The receiver forms s b (``standard`` dither; with s = lambda: E = y, Var = lambda^2 - y^2
   where |y| <= lambda) or lambda b - xi (``subtractive``: unbiased, Var = lambda^2 / 3
   whatever y is), and rotates back: g_hat = Phi^T(...).

gradzip's ``fosgd`` is ``scale=rms, c=0.5, rescale=unbiased`` (error about 0.7 ||g||^2,
chosen by ``gradzip scales`` and training runs: docs/fosgd.md); the paper's is
:data:`PAPER_FOSGD`.

Fast paths (CPU float32, d a power of two >= 2^16): FO-SGD with the ``norm`` or ``rms``
rule encodes in two passes over memory instead of five (``hadamard.rotate_quantize_``: the
norm is taken during the rotation, the quantizer runs on each piece of the rotated vector
as it is finished, which is never stored, and sums <b, y> there for a fitted scale), and
the ``standard`` dither decodes with the inverse
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

SCALES = ("max", "norm", "fixed", "rms", "l1")
DITHERS = ("standard", "subtractive")
RESCALES = ("none", "mse", "unbiased", "capped")
#: whose rotation a flattened payload uses: its sender's own, or the one every sender of the
#: step shares (on the wire: the flatten byte is 1 or 2)
ROTATIONS = ("sender", "shared")
#: ``capped``: the unbiased scale, at most CAP times the least-squares one (a contraction)
CAP = 1.9
_PARAMS = struct.Struct("<BBBBff")  # scale rule, dither, flatten, rescale, c, lam


def _stats(y: torch.Tensor) -> tuple[float, float, float]:
    """``(||y||_2^2, ||y||_inf, ||y||_1)`` of a finite float32 vector, in float64."""
    if y.device.type == "cpu" and y.dtype == torch.float32 and y.is_contiguous():
        from .._numba.onebit import stats32

        return stats32(y.numpy())
    s = y.to(torch.float64)
    return float(s.square().sum()), float(s.abs().max()), float(s.abs().sum())


def _f32_up(v: float) -> float:
    """``v`` rounded up to a float32, so a scale never clips what it was computed from."""
    f = np.float32(v)
    if float(f) < v:
        f = np.nextafter(f, np.float32(np.inf))
    return float(f)


# --- the quantizer kernels: fast CPU path (numba) and pure-torch reference ---------------


def signed_sum_reference(y: torch.Tensor, data: torch.Tensor) -> float:
    """``<b, y>`` in float64 for the signs b (+1 / -1 where the bit is set) packed in data."""
    b = bits.unpack_signs_reference(data.cpu(), y.numel(), dtype=torch.float64)
    return float((y.to(torch.float64).cpu() * b).sum())


def quantize_reference(y: torch.Tensor, lam: float, key: int | None) -> torch.Tensor:
    """Packed bits of ``y + lam * u < 0`` (``key=None``: no dither, bits of ``y < 0``)."""
    if key is not None:
        y = y + lam * rng.dither16(key, y.numel(), y.device)
    return bits.pack_bits(y < 0)


def quantize_(y: torch.Tensor, lam: float, key: int | None, out: torch.Tensor) -> None:
    """Writes the packed bits of :func:`quantize_reference` into ``out`` (uint8, CPU)."""
    if y.device.type == "cpu" and y.dtype == torch.float32:
        from .._numba import onebit as k

        if key is None:
            k.sign_pack(y.numpy(), out.numpy())
        else:
            k.dither_sign_pack(y.numpy(), lam, key, out.numpy())
    else:
        out.copy_(quantize_reference(y, lam, key).cpu())


def quantize_sum_(y: torch.Tensor, lam: float, key: int | None, out: torch.Tensor) -> float:
    """:func:`quantize_`, and return ``<b, y>`` (float64) of the bits just written: one pass
    over ``y`` on the CPU fast path (``key`` is unused when ``lam`` is 0)."""
    if y.device.type == "cpu" and y.dtype == torch.float32:
        from .._numba.onebit import dither_sign_pack_sum

        return dither_sign_pack_sum(y.numpy(), lam, key if lam > 0 else 0, out.numpy())
    quantize_(y, lam, key if lam > 0 else None, out)
    return signed_sum_reference(y, out)


def mean_signs_reference(datas: list, lams: list[float], out: torch.Tensor) -> torch.Tensor:
    """``out = (sum_j lams[j] * b_j) / m``, the terms added in order (b_j packed in datas[j]:
    +1 where a bit is 0, -1 where it is 1)."""
    out.zero_()
    for data, lam in zip(datas, lams, strict=True):
        out += bits.unpack_signs(data.to(out.device), out.numel(), scale=lam)
    return out.div_(len(datas))


def mean_signs_(datas: list, lams: list[float], out: torch.Tensor) -> torch.Tensor:
    """:func:`mean_signs_reference`, in one pass over ``out`` on the CPU fast path."""
    if out.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous() and datas:
        from .._numba.onebit import mean_signs

        rows = torch.stack([d.reshape(-1) for d in datas]).numpy()
        mean_signs(rows, np.asarray(lams, np.float32), out.numpy())
        return out
    return mean_signs_reference(datas, lams, out)


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
        from .._numba.onebit import unpack_subtract_dither

        out = _alloc.empty(n)
        unpack_subtract_dither(data.numpy(), lam, key, out.numpy())
        return out
    return dequantize_reference(data, n, lam, key, device)


# --- the compressor -------------------------------------------------------------------------


@dataclass(frozen=True)
class OneBit(Compressor):
    """Dithered one-bit quantizer (DESIGN 3.2), optionally flattened (3.3).

    Args:
        scale: ``max`` | ``norm`` | ``rms`` | ``fixed``, the rule for the dither's lambda
            (see module docstring).
        dither: ``standard`` (receiver forms lambda b) or ``subtractive`` (lambda b - xi).
        flatten: rotate by Phi before quantizing (FO-SGD) or not.
        c: the constant of the ``norm`` rule (c >= 1 keeps clipping rare) and of the ``rms``
            rule (lambda = c ||g||_2 / sqrt(d); c = 0 is no dither, then b = sign(y)).
        lam: lambda for the ``fixed`` rule.
        rescale: the scale s the receiver multiplies the bits by. ``none``: s = lambda
            (the paper). ``mse``: s = <b, y> / d, the least-squares fit of s b to y, which
            the sender computes once it has the bits (one float, as lambda would be): then
            <C(x), x> = ||C(x)||^2 and ||C(x) - x||^2 = (1 - <b,y>^2 / (d ||y||^2))||x||^2
            < ||x||^2, a contraction (class B3), safe under error feedback. ``unbiased``:
            s = ||y||^2 / <b, y>, so that <C(x), x> = ||x||^2 exactly (DRIVE's choice).
            ``capped``: s = min(||y||^2 / <b, y>, CAP <b, y> / d): the unbiased scale where it
            is at most CAP = 1.9 times the least-squares one (always, on the flat vectors
            the rotation makes: there the ratio is about 1.7 at c = 0.5), which bounds the
            error by ||y||^2 - (2 CAP - CAP^2) <b, y>^2 / d: a contraction, so error
            feedback is safe with it (``delta``), where ``unbiased``'s error can exceed the
            input (an x that rotates to one spike: error (d - 1) ||x||^2).
        rotation: with ``flatten``, ``sender`` (a rotation per sender and step: the errors
            of different senders are independent) or ``shared`` (one rotation per step for
            every sender, the server's downlink included: a server adds the payloads in the
            rotated domain, :meth:`mean_rotated`, and re-quantizes the mean there,
            :meth:`encode_rotated`, without a transform; the price is that the senders'
            errors are correlated where their gradients agree).
    """

    scale: str = "max"
    dither: str = "standard"
    flatten: bool = False
    c: float = 1.0
    lam: float = 0.0
    rescale: str = "none"
    rotation: str = "sender"

    name: ClassVar[str] = "onebit"
    codec_id: ClassVar[int] = 10
    summary: ClassVar[str] = "dithered one-bit quantizer, optionally Hadamard-flattened"

    def __post_init__(self):
        if self.scale not in SCALES:
            raise ValueError(f"onebit: scale must be one of {SCALES}, got {self.scale!r}")
        if self.dither not in DITHERS:
            raise ValueError(f"onebit: dither must be one of {DITHERS}, got {self.dither!r}")
        if self.rescale not in RESCALES:
            raise ValueError(f"onebit: rescale must be one of {RESCALES}, got {self.rescale!r}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"onebit: rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if self.rotation == "shared" and not self.flatten:
            raise ValueError("onebit: rotation=shared needs flatten=true (no rotation without it)")
        zero_ok = self.scale in ("rms", "l1") and self.rescale != "none"  # c = 0: undithered signs
        if not (math.isfinite(self.c) and (self.c > 0 or (zero_ok and self.c == 0))):
            raise ValueError(
                f"onebit: c must be a positive number{' or 0' if zero_ok else ''}, got {self.c}"
            )
        if self.scale == "fixed" and not (math.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"onebit: scale=fixed needs lam > 0, got lam={self.lam}")
        if self.rescale != "none" and self.scale == "fixed":
            raise ValueError(
                f"onebit: rescale={self.rescale} needs a sent scale; scale=fixed sends none "
                "(add rescale=none)"
            )
        if self.rescale != "none" and self.dither != "standard":
            raise ValueError(
                f"onebit: rescale={self.rescale} works with dither=standard only (add rescale=none)"
            )

    @property
    def unbiased(self) -> bool:
        return self.scale == "max" and self.rescale == "none"

    @property
    def exact_inner_product(self) -> bool:
        return self.rescale == "unbiased"

    @property
    def bits_formula(self) -> str:
        return "1" if self.scale == "fixed" else "1 + 32/d"

    def omega(self, d: int) -> float | None:
        # lambda = ||y||_inf <= ||x||_2: standard Var = d lambda^2 - ||x||^2 <= (d - 1)||x||^2,
        # subtractive Var = d lambda^2 / 3 <= (d / 3)||x||^2 (worst cases: 1-sparse y)
        if not self.unbiased:
            return None
        return d - 1.0 if self.dither == "standard" else d / 3.0

    def delta(self, d: int) -> float | None:
        """``rescale=mse`` and ``capped``. With E over the dither, E<b, y> = sum_i |y_i| min(|y_i| /
        lambda, 1) >= ||y||^2 / max(lambda, ||y||_inf), and E||C(x) - x||^2 = ||y||^2 -
        E<b, y>^2 / d <= ||y||^2 - (E<b, y>)^2 / d (Jensen). With ||y||_inf <= ||y|| this
        is <= (1 - 1/delta)||x||^2 for delta = d max(1, lambda^2 / ||y||^2): the worst
        case (a y with one large coordinate), which the rotation makes unlikely; measured
        on real gradients delta is about 3 (``gradzip scales``). ``capped``: s lies between
        the least-squares <b, y> / d and CAP times it (the unbiased scale is never below
        it: <b, y>^2 <= d ||y||^2), where the error, a convex quadratic in s, is at most
        ||y||^2 - (2 CAP - CAP^2) <b, y>^2 / d: delta grows by 1 / (2 CAP - CAP^2)."""
        if self.rescale not in ("mse", "capped"):
            return None
        d = max(int(d), 1)
        if self.scale in ("rms", "l1"):  # l1: lambda = c ||y||_1 / d <= c ||y|| / sqrt(d)
            ratio = self.c**2 / d  # (lambda / ||y||)^2
        elif self.scale == "norm":
            ratio = self.norm_scale(1.0, d) ** 2
        else:  # max: lambda = ||y||_inf <= ||y||
            ratio = 0.0
        gain = 1.0 if self.rescale == "mse" else 2 * CAP - CAP * CAP
        return float(d * max(1.0, ratio) / gain)

    def section_lengths(self, d: int) -> list[int]:
        packed = bits.packed_size(d)
        return [packed] if self.scale == "fixed" else [4, packed]

    def to_params(self) -> bytes:
        return _PARAMS.pack(
            SCALES.index(self.scale), DITHERS.index(self.dither), self._flatten_byte(),
            RESCALES.index(self.rescale), self.c, self.lam,
        )  # fmt: skip

    @classmethod
    def from_params(cls, raw: bytes) -> OneBit:
        if len(raw) != _PARAMS.size:
            raise PayloadError(f"onebit: expected {_PARAMS.size} parameter bytes, got {len(raw)}")
        s, dth, fl, rs, c, lam = _PARAMS.unpack(raw)
        if s >= len(SCALES) or dth >= len(DITHERS) or fl > 2 or rs >= len(RESCALES):
            raise PayloadError(
                f"onebit: invalid parameters scale={s} dither={dth} flatten={fl} rescale={rs}"
            )
        try:
            return cls(
                scale=SCALES[s], dither=DITHERS[dth], flatten=bool(fl), c=c, lam=lam,
                rescale=RESCALES[rs], rotation=ROTATIONS[max(fl - 1, 0)],
            )  # fmt: skip
        except ValueError as e:
            raise PayloadError(str(e)) from None

    def _flatten_byte(self) -> int:
        return 0 if not self.flatten else 1 + ROTATIONS.index(self.rotation)

    def rotation_key(self, seed: int, step: int, worker: int) -> int:
        """The key of the rotation of a payload of (seed, step, sender)."""
        if self.rotation == "shared":
            return rng.derive_key(seed, step, 0, rng.STREAM_SHARED_ROTATION)
        return rng.derive_key(seed, step, worker, rng.STREAM_ROTATION)

    def norm_scale(self, norm: float, d: int) -> float:
        """lambda of the ``norm`` or ``rms`` rule for a vector of 2-norm ``norm``, length d."""
        if d == 0:
            return 0.0
        if self.scale == "rms":
            return self.c * norm / math.sqrt(d)
        n = hadamard.rotation_block(d) if self.flatten else d
        return self.c * norm * math.sqrt(2 * math.log(2 * n) / n)

    def encode(self, x: torch.Tensor, seed: int = 0, step: int = 0, worker: int = 0) -> Payload:
        """:meth:`Compressor.encode`, minus its separate finiteness pass where the fused
        encoder runs (:meth:`_encode_fused` checks finiteness itself, in its first pass,
        before any payload exists); everything else goes through the base class."""
        if not (
            self.flatten
            and self.scale in ("norm", "rms")
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

    def _encode(self, ctx: EncodeContext, rotated: bool = False) -> Payload:
        """``rotated``: the input is already ``Phi x`` (:meth:`encode_rotated`)."""
        v = ctx.f32()
        rotate = self.flatten and ctx.d and not rotated
        if rotate and self.scale in ("norm", "rms") and hadamard.can_rotate_quantize(v):
            return self._encode_fused(ctx, v)
        sq, mx, _ = ctx.stats()
        y = v
        if rotate:
            out = _alloc.scratch(ctx.d) if v.device.type == "cpu" else None  # quantized below
            y = hadamard.rotate(v, self.rotation_key(ctx.seed, ctx.step, ctx.worker), out=out)
        if self.scale == "max":
            lam = float(y.abs().max()) if rotate else mx
        elif self.scale == "l1":
            l1 = _stats(y)[2] if rotate else ctx.stats()[2]
            lam = self.c * l1 / max(ctx.d, 1)
        elif self.scale in ("norm", "rms"):
            lam = self.norm_scale(math.sqrt(sq), ctx.d)
        else:
            lam = self.lam
        lam = _f32_up(lam)
        w = ctx.writer(self.section_lengths(ctx.d))
        packed = w.sections[-1]
        if self.rescale == "none":
            quantize_(y, lam, ctx.key(rng.STREAM_DITHER) if lam > 0 else None, packed)
        else:  # the decode scale fitted from <b, y>, summed while quantizing
            lam = self._fitted(quantize_sum_(y, lam, ctx.key(rng.STREAM_DITHER), packed), sq, ctx.d)
        if self.scale != "fixed":
            w.put_f32(0, lam)
        return w.finish()

    # --- a shared rotation: the server adds and re-quantizes in the rotated domain ---------
    @property
    def adds_rotated(self) -> bool:
        """Whether payloads of this codec add up in the rotated domain: a shared rotation
        and the standard dither (the receiver forms s b, nothing is subtracted)."""
        return self.flatten and self.rotation == "shared" and self.dither == "standard"

    def mean_rotated(self, payloads: list[Payload], out: torch.Tensor) -> torch.Tensor:
        """``out = (1/m) sum_j s_j b_j``: the mean of the payloads' vectors before the
        inverse rotation (each decodes to ``Phi^T(s_j b_j)``), for a codec that
        :attr:`adds_rotated`, in one pass. Payloads of one seed and step share ``Phi``, so
        ``Phi^T out`` is the mean of their decodes, and :meth:`encode_rotated` quantizes
        ``out`` for the downlink without a transform. Each payload is checked as by
        :meth:`decode`, and must have this codec's parameters."""
        if not self.adds_rotated:
            raise ValueError(f"{self.spec}: payloads add in the rotated domain only with "
                             "flatten=true, rotation=shared and dither=standard")  # fmt: skip
        lams, datas = [], []
        name = self.name
        for p in payloads:
            n = p.header.numel
            if self.codec_of(p) is not self:  # another rotation or scale: not summable here
                raise PayloadError(f"{name}: a payload of other parameters than {self.spec} "
                                   "cannot be added in its rotated domain")  # fmt: skip
            if n != out.numel():
                raise PayloadError(f"{name}: a payload of {n} coordinates, expected {out.numel()}")
            lams.append(read_f32(p.section(0), 1, "onebit scale")[0])
            datas.append(p.section(1))
        return mean_signs_(datas, lams, out.view(-1))

    def encode_rotated(
        self, y: torch.Tensor, seed: int = 0, step: int = 0, worker: int = 0
    ) -> Payload:
        """The payload of ``x = Phi^T y`` made from ``y = Phi x`` itself (no transform), for
        a codec that :attr:`adds_rotated`; it decodes like any other payload. ``y``: a
        finite float32 vector. Equal to ``encode(x)`` up to the rounding of ``Phi Phi^T``."""
        if not self.adds_rotated:
            raise ValueError(f"{self.spec}: encode_rotated needs rotation=shared, flatten=true "
                             "and dither=standard")  # fmt: skip
        if not isinstance(y, torch.Tensor) or y.dtype != torch.float32 or y.dim() != 1:
            raise TypeError("encode_rotated: expected a 1-D float32 tensor")
        ctx = EncodeContext(self, y, seed, step, worker)
        ctx.stats()  # finiteness first, as encode
        return self._encode(ctx, rotated=True)

    def _fitted(self, ip: float, sq: float, d: int) -> float:
        """The decode scale from ``ip = <b, y>`` and ``sq = ||y||^2`` (float32 value)."""
        if ip <= 0 or sq == 0:
            return 0.0  # bits uncorrelated with y (or y = 0): send nothing rather than noise
        if self.rescale == "mse":
            s = ip / d
        elif self.rescale == "capped":
            s = min(sq / ip, CAP * ip / d)
        else:
            s = sq / ip
        s = float(np.float32(s))
        return s if math.isfinite(s) else 0.0

    def _encode_fused(self, ctx: EncodeContext, v: torch.Tensor) -> Payload:
        """FO-SGD with a ``norm`` or ``rms`` rule (CPU float32, d a power of two >= 2**16) in two
        passes over memory instead of five: lambda needs only ||g||_2, which pass 1 of the
        rotation takes on the way, and pass 2 quantizes the rotated vector as it finishes
        it (:func:`gradzip.hadamard.rotate_quantize_`). Same payload as the unfused path,
        bit for bit, up to the rounding of ||g||_2^2 (a float64 sum in another order);
        with ``rescale``, pass 2 also sums <b, y> over each chunk while it is in L2, and the
        fitted scale may differ from the unfused path's in its last float32 bit."""
        w = ctx.writer(self.section_lengths(ctx.d))

        def scale_of(sq: float, finite: bool) -> float:
            if not finite:
                bad = int((~torch.isfinite(v)).sum())
                raise NonFiniteError(
                    f"{self.name}: input has {bad} non-finite value(s) (NaN or inf) out of "
                    f"{ctx.d}; a gradient must be finite to be compressed"
                )
            return _f32_up(self.norm_scale(math.sqrt(sq), ctx.d))

        norm2 = []

        def scale_and_norm(sq: float, finite: bool) -> float:
            norm2.append(sq)
            return scale_of(sq, finite)

        rot = self.rotation_key(ctx.seed, ctx.step, ctx.worker)
        dth = ctx.key(rng.STREAM_DITHER)
        if self.rescale == "none":
            lam = hadamard.rotate_quantize_(v, rot, scale_of, dth, w.arrays[-1])
        else:  # <b, y> taken in pass 2 as each chunk is quantized
            _, ip = hadamard.rotate_quantize_(
                v, rot, scale_and_norm, dth, w.arrays[-1], with_inner=True
            )
            lam = self._fitted(ip, norm2[0], ctx.d)
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
            key = self.rotation_key(h.seed, h.step, h.worker)
            return hadamard.unrotate_signs(data, d, lam, key)
        key = rng.derive_key(h.seed, h.step, h.worker, rng.STREAM_DITHER)
        z = dequantize(data, d, lam, key if self.dither == "subtractive" else None, device)
        if self.flatten and d:
            z = hadamard.unrotate(z, self.rotation_key(h.seed, h.step, h.worker), out=z)
        return z


def onebit(
    scale="max", dither="standard", flatten=False, c=1.0, lam=0.0, rescale="none", rotation="sender"
) -> OneBit:
    """Dithered one-bit quantizer without flattening (by default)."""
    return OneBit(scale=scale, dither=dither, flatten=flatten, c=c, lam=lam, rescale=rescale,
                  rotation=rotation)  # fmt: skip


#: the paper's FO-SGD compressor (``norm`` rule, decode scale lambda), as a spec
PAPER_FOSGD = "fosgd:scale=norm,c=1,rescale=none"


def fosgd(
    scale="rms", dither="standard", c=0.5, lam=0.0, rescale="unbiased", rotation="sender"
) -> OneBit:
    """FO-SGD's compressor: Hadamard flattening, then dithered one-bit.

    gradzip's default (chosen by ``gradzip scales`` and the training benchmarks, see
    docs/fosgd.md): dither scale lambda = 0.5 rms(Phi g), decode scale fitted by the sender
    so that <C(g), g> = ||g||^2 (vNMSE about 0.7). The paper's setting is
    :data:`PAPER_FOSGD` (``scale=norm,c=1,rescale=none``: vNMSE about 2 ln(2d))."""
    return OneBit(scale=scale, dither=dither, flatten=True, c=c, lam=lam, rescale=rescale,
                  rotation=rotation)  # fmt: skip


ENTRIES = [
    ("onebit", onebit, "dithered one-bit quantizer, no flattening by default"),
    ("fosgd", fosgd, "FO-SGD: Hadamard flattening + dithered one-bit, fitted scale"),
]
CODEC_CLASSES = [OneBit]
