"""Casts: ``identity`` (lossless, the input's own dtype), ``fp16`` and ``bf16``.

They are the baselines every other compressor is measured against: ``identity`` is what
uncompressed SGD sends, the half-precision casts what PyTorch's ``fp16_compress_hook`` and
``bf16_compress_hook`` send. Deterministic; unbiased only for ``identity`` (rounding to
nearest is biased, though the bias is below the format's resolution).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import _alloc
from ..wire import Payload
from .base import Compressor, EncodeContext, check_finite

_ITEMSIZE = {torch.float32: 4, torch.float64: 8, torch.float16: 2, torch.bfloat16: 2}


def _typed(sec: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The uint8 section ``sec`` read as ``dtype``: a view when aligned, else a copy."""
    if not _aligned(sec, dtype):
        sec = _alloc.empty(sec.numel(), torch.uint8).copy_(sec)
    return sec.view(dtype)


def _aligned(sec: torch.Tensor, dtype: torch.dtype) -> bool:
    size = _ITEMSIZE[dtype]  # torch checks the offset; the CPU wants the address aligned
    return sec.storage_offset() % size == 0 and sec.data_ptr() % size == 0


def _send(ctx: EncodeContext, dtype: torch.dtype) -> Payload:
    """Write the input, cast to ``dtype``, straight into the payload's section."""
    w = ctx.writer([ctx.d * _ITEMSIZE[dtype]])
    sec = w.sections[0]
    if not ctx.d:
        pass
    elif _aligned(sec, dtype):
        sec.view(dtype).copy_(ctx.flat)  # cast and write in one pass
    else:  # e.g. float64 after a 52-byte header
        sec.copy_(ctx.flat.to(dtype).cpu().view(torch.uint8))
    return w.finish()


def _receive(name: str, p: Payload, wire_dtype: torch.dtype, device) -> torch.Tensor:
    """Decode a cast payload to the sender's dtype in one pass, refusing NaN and inf."""
    sec = p.section(0)
    want = p.header.dtype
    if wire_dtype == want:
        out = _alloc.empty(sec.numel(), torch.uint8).copy_(sec).view(want)
    else:
        out = _alloc.empty(p.header.numel, want).copy_(_typed(sec, wire_dtype))
    check_finite(name, out)
    return out if device is None else out.to(device)


@dataclass(frozen=True)
class Identity(Compressor):
    """No compression: the values in the input's own dtype (32 bits for float32)."""

    name: ClassVar[str] = "identity"
    codec_id: ClassVar[int] = 1
    summary: ClassVar[str] = "no compression (the input dtype's bits)"
    bits_formula: ClassVar[str] = "8 * itemsize (32 for float32)"

    @property
    def unbiased(self) -> bool:
        return True

    def omega(self, d: int) -> float:
        return 0.0

    def delta(self, d: int) -> float:
        return 1.0

    def bits_per_coordinate(self, d: int, dtype: torch.dtype = torch.float32) -> float:
        return 8.0 * _ITEMSIZE[dtype]

    def section_lengths(self, d: int, dtype: torch.dtype = torch.float32) -> list[int]:
        return [d * _ITEMSIZE[dtype]]

    def _encode(self, ctx: EncodeContext) -> Payload:
        return _send(ctx, ctx.dtype)

    def expected_sections(self, header) -> list[int]:
        return self.section_lengths(header.numel, header.dtype)

    def _decode(self, p: Payload, device) -> torch.Tensor:
        return _receive(self.name, p, p.header.dtype, device)


@dataclass(frozen=True)
class _HalfCast(Compressor):
    target: ClassVar[torch.dtype] = torch.float16
    bits_formula: ClassVar[str] = "16"

    @property
    def unbiased(self) -> bool:
        return False

    def delta(self, d: int) -> float:
        # round to nearest: |C(x)_i - x_i| <= u |x_i| with u the unit roundoff (normal range)
        u = torch.finfo(self.target).eps / 2
        return 1.0 / (1.0 - u * u)

    def section_lengths(self, d: int) -> list[int]:
        return [2 * d]

    def _encode(self, ctx: EncodeContext) -> Payload:
        if self.target == torch.float16:
            limit = torch.finfo(torch.float16).max
            if ctx.stats()[1] > limit:
                raise ValueError(
                    f"fp16: |x| reaches {ctx.stats()[1]:.3g}, beyond float16's range "
                    f"({limit}); it would become inf. Use bf16, or scale the gradient."
                )
        return _send(ctx, self.target)

    def _decode(self, p: Payload, device) -> torch.Tensor:
        return _receive(self.name, p, self.target, device)


@dataclass(frozen=True)
class FP16(_HalfCast):
    """IEEE half precision (round to nearest): 16 bits per coordinate."""

    name: ClassVar[str] = "fp16"
    codec_id: ClassVar[int] = 2
    summary: ClassVar[str] = "cast to float16"
    target: ClassVar[torch.dtype] = torch.float16


@dataclass(frozen=True)
class BF16(_HalfCast):
    """bfloat16 (round to nearest): 16 bits per coordinate, float32's range."""

    name: ClassVar[str] = "bf16"
    codec_id: ClassVar[int] = 3
    summary: ClassVar[str] = "cast to bfloat16"
    target: ClassVar[torch.dtype] = torch.bfloat16


ENTRIES = [
    ("identity", Identity, Identity.summary),
    ("fp16", FP16, FP16.summary),
    ("bf16", BF16, BF16.summary),
]
