"""``scaled(C)``: an unbiased compressor shrunk by 1/(omega + 1), a member of class B3.

Beznosikov, Horvath, Richtarik, Safaryan ("On biased compression for distributed
learning"): if C is unbiased with E||C(x) - x||^2 <= omega ||x||^2, then
C'(x) = C(x) / (omega + 1) satisfies

    E||C'(x) - x||^2 = E||C(x)||^2/(omega+1)^2 - 2||x||^2/(omega+1) + ||x||^2
                    <= (1 - 1/(omega + 1)) ||x||^2,

so C' is in B3 with delta = omega + 1 (biased: E C'(x) = x/(omega + 1)). This is what makes
an unbiased compressor usable with error feedback, which needs a contraction.

Encoding x of length d: the inner compressor encodes x (flattened to float32, shape (d,))
with the same seed, step and worker into a payload of its own, which is the single section
of this one. The factor 1/(omega(d) + 1) (rounded to float32) follows from the inner
compressor's omega at length d, known to both sides, so it is not sent; the receiver
decodes the nested payload and multiplies.

Decoding validates the nested payload like any other (header, checksum, sections, codec
values), and also that it is the inner compressor's codec with its parameters, float32 of
shape (d,), with the outer seed, step and worker; anything else is a PayloadError. The
nested header (``nested_header_bytes``) counts in the bits.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..wire import MAX_PARAMS, Payload, PayloadError
from .base import Compressor, EncodeContext, nested_header_bytes, read_nested
from .codecs import CODECS, from_spec

_SUB = struct.Struct("<BH")  # inner codec id, length of its parameters
_PROBE = (1, 1 << 20)  # lengths at which a wrapped compressor must state omega


def _inner_omega(inner: Compressor, d: int) -> float | None:
    if not inner.unbiased:
        return None
    w = inner.omega(d)
    return float(w) if w is not None and math.isfinite(w) and w >= 0 else None


@dataclass(frozen=True)
class Scaled(Compressor):
    """C(x) / (omega_C(d) + 1) for an unbiased C with a stated omega (module docstring)."""

    inner: Compressor

    name: ClassVar[str] = "scaled"
    codec_id: ClassVar[int] = 35
    summary: ClassVar[str] = "an unbiased C scaled by 1/(omega+1): class B3, delta = omega+1"

    def __post_init__(self):
        v = self.inner
        if isinstance(v, str):
            v = from_spec(v)
            object.__setattr__(self, "inner", v)
        if not isinstance(v, Compressor):
            raise TypeError(f"scaled: the inner compressor must be a compressor, got {v!r}")
        if not v.unbiased:
            raise ValueError(
                f"scaled: {v.spec} is biased; scaled(C) needs an unbiased C with a stated "
                "omega (e.g. qsgd, natural, natural_dithering, terngrad, randk:unbiased=true)"
            )
        if any(_inner_omega(v, d) is None for d in _PROBE):
            raise ValueError(f"scaled: {v.spec} states no variance bound omega to scale by")
        if len(self.to_params()) > MAX_PARAMS:
            raise ValueError(f"scaled: the parameters of {v.spec} exceed {MAX_PARAMS} bytes")

    @property
    def spec(self) -> str:
        return f"scaled({self.inner.spec})"

    # --- properties -----------------------------------------------------------------------
    @property
    def unbiased(self) -> bool:
        return False

    def delta(self, d: int) -> float | None:
        w = _inner_omega(self.inner, d)
        return None if w is None else w + 1.0

    def factor(self, d: int) -> float:
        """The float32 factor 1/(omega(d) + 1) applied to the inner decode."""
        w = _inner_omega(self.inner, d)
        if w is None:
            raise ValueError(f"scaled: {self.inner.spec} states no omega at d = {d}")
        return float(np.float32(1.0 / (w + 1.0)))

    @property
    def bits_formula(self) -> str:
        return f"{self.inner.bits_formula} + 8 * {self.nested_header_bytes()} / d"

    def nested_header_bytes(self) -> int:
        return nested_header_bytes(self.inner)

    def section_lengths(self, d: int) -> list[int]:
        return [self.nested_header_bytes() + sum(self.inner.section_lengths(d))]

    # --- header parameters ----------------------------------------------------------------
    def to_params(self) -> bytes:
        raw = self.inner.to_params()
        return _SUB.pack(self.inner.codec_id, len(raw)) + raw

    @classmethod
    def from_params(cls, raw: bytes) -> Scaled:
        if len(raw) < _SUB.size:
            raise PayloadError(f"scaled: {len(raw)} parameter bytes, expected at least 3")
        codec, n = _SUB.unpack_from(raw, 0)
        if len(raw) != _SUB.size + n:
            raise PayloadError(
                f"scaled: inner parameters of {len(raw) - _SUB.size} bytes, declared {n}"
            )
        sub_cls = CODECS.get(codec)
        if sub_cls is None:
            raise PayloadError(f"scaled: unknown inner codec id {codec}")
        if sub_cls is cls:  # biased, and it would recurse
            raise PayloadError("scaled: cannot wrap scaled (it is biased)")
        try:
            inner = sub_cls.from_params(raw[_SUB.size :])
            return cls(inner)
        except PayloadError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, struct.error) as e:
            raise PayloadError(f"scaled: invalid inner compressor: {e}") from None

    # --- encode / decode ------------------------------------------------------------------
    def _encode(self, ctx: EncodeContext) -> Payload:
        c = self.inner
        x = ctx.f32()
        if ctx.d:
            self.factor(ctx.d)  # raises before any work if omega is unknown at d
        nested = c.encode(x, seed=ctx.seed, step=ctx.step, worker=ctx.worker)
        lengths = self.section_lengths(ctx.d)
        if nested.nbytes != lengths[0]:
            raise RuntimeError(
                f"scaled: {c.spec} encoded {ctx.d} values into {nested.nbytes} bytes, "
                f"but its declared section lengths give {lengths[0]}"
            )
        w = ctx.writer(lengths)
        w.sections[0].copy_(nested.data)
        return w.finish()

    def _decode(self, p: Payload, device) -> torch.Tensor:
        c = self.inner
        h = p.header
        d = h.numel
        nested = read_nested(p.section(0), c, d, h, "scaled")
        y = c.decode(nested, device=device).reshape(-1)
        if y.dtype != torch.float32:
            y = y.to(torch.float32)
        if d:
            try:
                f = self.factor(d)
            except ValueError as e:
                raise PayloadError(str(e)) from None
            y = y.mul_(f)  # finite: the inner decode is (validated) and 0 < f <= 1
        return y


def scaled(inner: Compressor | None = None) -> Scaled:
    """``C / (omega + 1)`` for an unbiased compressor C: ``scaled(qsgd(levels=4))``.

    ``inner`` is a compressor (or a spec string); left out it is ``qsgd`` with its default
    levels, so that ``gradzip.compressor("scaled")`` names a working compressor.
    """
    if inner is None:
        from .quantize import qsgd

        inner = qsgd()
    return Scaled(inner)


ENTRIES = [("scaled", scaled, Scaled.summary)]
CODEC_CLASSES = [Scaled]
