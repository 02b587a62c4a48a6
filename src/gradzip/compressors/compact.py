"""``topk_compact``: top-k with Elias-Fano indices and 4-, 8- or 16-bit scaled values.

The same selection as ``topk`` (the k largest |x_i|, ties to the lower index), sent in
fewer bits: the indices in the Elias-Fano code (:mod:`gradzip.eliasfano`: about
2 + log2(d / k) bits each instead of ceil(log2 d), and 2 bits when every coordinate is
kept), the values divided by one float32 scale s = max |v| / F and cast to ``fp16``
(F = 65504), ``fp8`` (e4m3: 3 mantissa bits, F = 448) or ``fp4`` (e2m1, OCP MX: the
magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 and a sign, F = 6; rounded to the nearest, ties
down), which cannot overflow. At the rates where top-k needs error feedback anyway (k/d of
a few tenths of a percent) a value needs little precision: the rounding error is fed back
with the rest, and the bits go to more coordinates instead (docs/ddp.md).

Payload: the index code, s (float32), the k values (fp4: two 4-bit codes a byte, sign in
bit 3, in :func:`gradzip.bits.pack_uints`'s format). Decoding validates the code (exactly
k strictly increasing indices below d), the scale (finite, >= 0) and the values (finite).

Contraction: ||C(x) - x||^2 = ||x - S x||^2 + ||S x - C(x)||^2 (disjoint supports), the
first at most (1 - k/d) ||x||^2 (top-k). fp8 and fp16: the second is at most
(u^2 + k 2^-2e) ||S x||^2, u the relative rounding of the format (2^-4 for e4m3, 2^-11 for
fp16) and 2^-e the absolute rounding below its normal range relative to F (e = 10 + log2
448 for e4m3, 25 + log2 65504 for fp16); hence delta = d / (k (1 - u^2 - k 2^-2e)). fp4
has no useful relative bound (a value below s/4 becomes 0), but no value's error exceeds
the value, and the largest, M = max |v|, becomes 6 s = M (1 + 2^-22 at most: s is rounded
up): the error is at most ||x||^2 - M^2 (1 - 2^-40) and M^2 >= ||S x||^2 / k >= ||x||^2 / d,
so delta = d / (1 - 2^-40): a contraction, if a weak one on paper (the capture measured on
the DDP example's gradients is that of fp8 with a third more coordinates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .. import bits, eliasfano
from ..wire import Payload, PayloadError
from .base import EncodeContext, check_finite, read_f32
from .sparse import _KPARAMS, TopK, _read_kparams, scatter

#: name -> (torch dtype, largest finite value F, relative rounding u, absolute rounding / F)
FORMATS = {
    "fp8": (torch.float8_e4m3fn, 448.0, 2.0**-4, 2.0**-10 / 448.0),
    "fp16": (torch.float16, 65504.0, 2.0**-11, 2.0**-25 / 65504.0),
    "fp4": (None, 6.0, None, None),
}
_FORMAT_NAMES = tuple(FORMATS)
#: e2m1's magnitudes (code & 7) and the signed value of each 4-bit code
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_SIGNED = torch.cat([E2M1, -E2M1])
_E2M1_MID = (E2M1[1:] + E2M1[:-1]) / 2


def e2m1_codes(a: torch.Tensor) -> torch.Tensor:
    """4-bit codes of float32 values with |a| <= 6: the nearest magnitude, ties down."""
    mag = torch.bucketize(a.abs(), _E2M1_MID)  # boundaries[i-1] < |a| <= boundaries[i]
    return mag | ((a < 0).to(torch.int64) << 3)


def e2m1_codes_reference(a: torch.Tensor) -> torch.Tensor:
    """:func:`e2m1_codes` one value at a time (for tests)."""
    out = []
    for v in a.tolist():
        dist = [abs(abs(v) - float(m)) for m in E2M1]
        best = min(range(8), key=lambda j: (dist[j], j))  # nearest; ties to the lower
        out.append(best | (8 if v < 0 else 0))
    return torch.tensor(out, dtype=torch.int64)


def _scale(vmax: float, top: float) -> float:
    """s = vmax / F as a float32 rounded up, so that |v| / s <= F (0 for v = 0)."""
    s = np.float32(vmax / top)
    if float(s) * top < vmax:
        s = np.nextafter(s, np.float32(np.inf))
    return float(s)


@dataclass(frozen=True)
class CompactTopK(TopK):
    """The k largest |x_i| (as ``topk``), Elias-Fano indices, scaled fp4, fp8 or fp16 values."""

    k: float = 0.01
    values: str = "fp8"

    name: ClassVar[str] = "topk_compact"
    codec_id: ClassVar[int] = 24
    summary: ClassVar[str] = "top-k, Elias-Fano indices, scaled fp4/fp8/fp16 values (biased)"

    def __post_init__(self):
        if self.values not in FORMATS:
            raise ValueError(
                f"topk_compact: values must be one of {_FORMAT_NAMES}, got {self.values!r}"
            )
        object.__setattr__(self, "k", TopK(k=self.k).k)  # topk's check of k

    def delta(self, d: int) -> float:
        """d / (k (1 - u^2 - k 2^-2e)), fp4: d / (1 - 2^-40) (module docstring)."""
        n = self.kept(d)
        if not n:
            return 1.0
        if self.values == "fp4":
            return d / (1.0 - 2.0**-40)
        _, _, u, a = FORMATS[self.values]
        return d / (n * (1.0 - u * u - n * a * a))

    def value_dtype(self) -> torch.dtype:
        """The wire dtype of the values (fp4: uint8, two packed codes a byte)."""
        return FORMATS[self.values][0] or torch.uint8

    def value_bits(self) -> int:
        return 4 if self.values == "fp4" else 8 * FORMATS[self.values][0].itemsize

    def value_bytes(self, k: int) -> int:
        return (k + 1) // 2 if self.values == "fp4" else k * self.value_bits() // 8

    @property
    def bits_formula(self) -> str:
        v = self.value_bits()
        return (
            f"(8 * elias_fano_bytes(k, d) + 32 + 8 * ceil({v} k / 8)) / d, "
            f"about k/d * (2 + log2(d/k) + {v}), k = {self._k_text()}"
        )

    def index_bytes(self, d: int) -> int:
        return eliasfano.size(self.kept(d), d)

    def pack_indices(self, idx: torch.Tensor, d: int, out: torch.Tensor) -> None:
        eliasfano.encode(idx, d, out)

    def unpack_indices(self, section, header) -> torch.Tensor:
        d = header.numel
        return eliasfano.decode(section, self.kept(d), d, self.name)

    def section_lengths(self, d: int) -> list[int]:
        return [self.index_bytes(d), 4, self.value_bytes(self.kept(d))]

    def to_params(self) -> bytes:
        return _KPARAMS.pack(self.k, _FORMAT_NAMES.index(self.values))

    @classmethod
    def from_params(cls, raw: bytes) -> CompactTopK:
        k, opt = _read_kparams(cls, raw, len(_FORMAT_NAMES))
        return cls(k=k, values=_FORMAT_NAMES[opt])

    def _encode(self, ctx: EncodeContext) -> Payload:
        idx, vals = self.select(ctx)
        dtype, top, _, _ = FORMATS[self.values]
        w = ctx.writer(self.section_lengths(ctx.d))
        self.pack_indices(idx, ctx.d, w.sections[0])
        vmax = float(vals.abs().max()) if vals.numel() else 0.0
        s = _scale(vmax, top) if vmax > 0 else 0.0
        if not math.isfinite(s):  # pragma: no cover - vmax <= float32 max, F > 1
            raise ValueError("topk_compact: the value scale overflows float32")
        w.put_f32(1, s)
        if vals.numel():
            a = vals / s if s > 0 else vals
            if self.values == "fp4":
                w.sections[2].copy_(bits.pack_uints(e2m1_codes(a), 4))
            else:
                w.sections[2].copy_(a.to(dtype).view(torch.uint8))
        return w.finish()

    def _decode(self, p: Payload, device) -> torch.Tensor:
        h = p.header
        idx = self.unpack_indices(p.section(0), h)
        (s,) = read_f32(p.section(1), 1, "topk_compact scale")
        raw = p.section(2).clone()  # aligned for the value dtype
        if self.values == "fp4":  # every code is a value
            vals = _E2M1_SIGNED[bits.unpack_uints(raw, idx.numel(), 4)]
        else:
            vals = raw.view(FORMATS[self.values][0]).float()
        if self.values == "fp8" and bool(((raw & 0x7F) == 0x7F).any()):
            raise PayloadError("topk_compact: payload carries a NaN value")  # e4m3fn's NaN
        vals = check_finite(self.name, vals).mul_(s)
        if not bool(torch.isfinite(vals).all()):
            raise PayloadError("topk_compact: a value times its scale overflows float32")
        return scatter(idx, vals, h.numel, device)


def topk_compact(k: float = 0.01, values: str = "fp8") -> CompactTopK:
    """Top-k with Elias-Fano indices and scaled fp8 (fp4, fp16) values: ``topk_compact:k=0.004``."""
    return CompactTopK(k=k, values=values)


ENTRIES = [("topk_compact", topk_compact, CompactTopK.summary)]
CODEC_CLASSES = [CompactTopK]
