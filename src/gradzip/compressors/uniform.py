"""``uniform``: the fixed-range scalar quantizer of DQ-GD, R bits per dimension.

Lin, Kostina & Hassibi, "Achieving the fundamental convergence-communication tradeoff with
Differentially Quantized Gradient Descent". The quantizer's dynamic range r is fixed in
advance (DQ-GD shrinks it geometrically, known to both sides), so only the bits travel.

1. y = Phi x (``flatten=true``: the randomized Hadamard rotation, which brings the
   covering efficiency rho of the cube near sqrt(2 ln 2d) instead of sqrt(d)), else y = x.
2. Coordinate i gets b_i = floor((i+1) R) - floor(i R) bits (Bresenham: R may be
   fractional; the b_i sum to floor(R d) and differ by at most one). A coordinate with
   b_i = 0 is not sent and decodes to 0.
3. Each y_i is clipped to [-r, r] and rounded to the centre of its cell among 2^b_i equal
   cells: deterministic, biased (the DQ-GD analysis needs no unbiasedness).
4. The receiver rebuilds the centres and rotates back.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .. import _alloc, bits, hadamard, rng
from ..wire import Payload, PayloadError
from .base import Compressor, EncodeContext

_PARAMS = struct.Struct("<ffB3x")
MAX_BITS = 24


def allocation(d: int, rate: float) -> tuple[int, int, int]:
    """(b_lo, b_hi, number of coordinates with b_hi) for R = rate bits per dimension."""
    lo = math.floor(rate)
    n_hi = math.floor(rate * d) - lo * d
    return lo, lo + 1, n_hi


def widths(d: int, rate: float, device=None) -> torch.Tensor:
    """Step 2: b_i = floor((i+1) R) - floor(i R) bits for coordinate i (int64)."""
    i = torch.arange(d + 1, dtype=torch.float64, device=device)
    f = torch.floor(i * rate)
    return (f[1:] - f[:-1]).to(torch.int64)


# The reference of steps 3 and 4, in the dtype of its input: the compressor runs it in
# float32 (with the payload's float32 range) as the oracle of its kernels; DQ-GD's
# reproduction runs it in float64 (gradzip.reproduce.dqgd).


def cell_index(y: torch.Tensor, w: torch.Tensor, r: float) -> torch.Tensor:
    """Step 3: the cell of each y_i clipped to [-r, r], among 2^w_i equal cells, as a float
    of y's dtype (the range is taken in that dtype; a NaN stays NaN)."""
    levels = (1 << w).to(y.dtype)
    idx = torch.floor((torch.clamp(y, -r, r) + r) / (2 * r / levels))
    return torch.minimum(idx, levels - 1).clamp_min(0)


def cell_centre(idx: torch.Tensor, w: torch.Tensor, r: float) -> torch.Tensor:
    """Step 4 (before rotating back): the centre of cell ``idx`` (a float tensor, whose dtype
    the result and the range take), 0 where w_i = 0."""
    z = (idx + 0.5) * (2 * r / (1 << w).to(idx.dtype)) - r
    return torch.where(w > 0, z, 0.0)


@dataclass(frozen=True)
class Uniform(Compressor):
    """Fixed-range scalar quantizer with R (possibly fractional) bits per dimension."""

    bits: float = 2.0
    range: float = 1.0
    flatten: bool = True

    name: ClassVar[str] = "uniform"
    codec_id: ClassVar[int] = 50
    summary: ClassVar[str] = "DQ-GD's fixed-range scalar quantizer, R bits/dim (fractional ok)"
    bits_formula: ClassVar[str] = "floor(R d) / d"

    def __post_init__(self):
        if not (0 < self.bits <= MAX_BITS and math.isfinite(self.bits)):
            raise ValueError(f"uniform: bits must be in (0, {MAX_BITS}], got {self.bits}")
        if not (self.range > 0 and math.isfinite(self.range)):
            raise ValueError(f"uniform: range must be a positive number, got {self.range}")

    @property
    def unbiased(self) -> bool:
        return False

    def section_lengths(self, d: int) -> list[int]:
        lo, hi, n_hi = allocation(d, self.bits)
        return [bits.packed_size(d - n_hi, lo) if lo else 0, bits.packed_size(n_hi, hi)]

    def to_params(self) -> bytes:
        return _PARAMS.pack(self.bits, self.range, int(self.flatten))

    @classmethod
    def from_params(cls, raw: bytes) -> Uniform:
        if len(raw) != _PARAMS.size:
            raise PayloadError(f"uniform: expected {_PARAMS.size} parameter bytes, got {len(raw)}")
        b, r, fl = _PARAMS.unpack(raw)
        if fl > 1:
            raise PayloadError(f"uniform: invalid flatten flag {fl}")
        try:
            return cls(bits=b, range=r, flatten=bool(fl))
        except ValueError as e:
            raise PayloadError(str(e)) from None

    @property
    def r32(self) -> float:
        """The range as the float32 the payload carries: encoder and decoder both use it."""
        return float(np.float32(self.range))

    def codes_reference(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference: the cell indices of the ``lo``-bit and the ``hi``-bit coordinates."""
        d = y.numel()
        w = widths(d, self.bits, y.device)
        idx = cell_index(y, w, self.r32).to(torch.int64)
        lo, hi, _ = allocation(d, self.bits)
        return idx[w == lo], idx[w == hi]

    def decode_reference(self, codes_lo, codes_hi, d: int) -> torch.Tensor:
        """Reference: cell centres from the code arrays (before rotating back)."""
        lo, hi, _ = allocation(d, self.bits)
        w = widths(d, self.bits)
        idx = torch.zeros(d, dtype=torch.int64)
        idx[w == lo] = codes_lo.to(torch.int64)
        idx[w == hi] = codes_hi.to(torch.int64)
        return cell_centre(idx.to(torch.float32), w, self.r32)

    def _codes(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = y.numel()
        if y.device.type != "cpu":
            return self.codes_reference(y)
        from .._numba import uniform as nb

        lo, _, n_hi = allocation(d, self.bits)
        codes_lo = np.zeros(d - n_hi, np.int32)  # int32: what pack_uints takes fastest
        codes_hi = np.zeros(n_hi, np.int32)
        nb.encode(y.numpy(), self.bits, lo, self.r32, codes_lo, codes_hi)
        return torch.from_numpy(codes_lo), torch.from_numpy(codes_hi)

    def _encode(self, ctx: EncodeContext) -> Payload:
        d = ctx.d
        v = ctx.f32()
        if self.flatten and d:
            out = _alloc.scratch(d) if v.device.type == "cpu" else None  # quantized below
            v = hadamard.rotate(v, ctx.key(rng.STREAM_ROTATION), out=out)
        lo, hi, n_hi = allocation(d, self.bits)
        writer = ctx.writer(self.section_lengths(d))
        if v.device.type == "cpu" and d:
            from .._numba import uniform as nb

            sec = [t.numpy() for t in writer.sections]
            if self._packed_fast(lo, n_hi):  # integer R <= 8: whole groups of 8
                nb.encode_packed(v.numpy(), lo, self.r32, sec[0])
            else:  # quantized and appended to the two bit streams in one pass
                nb.encode_streams(v.numpy(), self.bits, lo, self.r32, sec[0], sec[1])
            return writer.finish()
        codes_lo, codes_hi = self._codes(v)
        if lo:
            writer.sections[0].copy_(bits.pack_uints(codes_lo.cpu(), lo))
        writer.sections[1].copy_(bits.pack_uints(codes_hi.cpu(), hi))
        return writer.finish()

    @staticmethod
    def _packed_fast(lo: int, n_hi: int) -> bool:
        """Whether the CPU kernels take whole groups of eight codes (integer R <= 8)."""
        from .._numba.uniform import MAX_PACKED_BITS

        return n_hi == 0 and 1 <= lo <= MAX_PACKED_BITS

    def _decode(self, p: Payload, device) -> torch.Tensor:
        h = p.header
        d = h.numel
        lo, hi, n_hi = allocation(d, self.bits)
        from .._numba import uniform as nb

        z = _alloc.empty(d)
        if d == 0:
            pass
        elif self._packed_fast(lo, n_hi):
            nb.decode_packed(p.section(0).numpy(), lo, self.r32, z.numpy())
        else:
            secs = p.section(0).numpy(), p.section(1).numpy()
            nb.decode_streams(*secs, self.bits, lo, self.r32, z.numpy())
        return self._finish_decode(z, h, device)

    def _finish_decode(self, z: torch.Tensor, h, device) -> torch.Tensor:
        d = h.numel
        if device is not None:
            z = z.to(device)
        if self.flatten and d:
            z = hadamard.unrotate(
                z, rng.derive_key(h.seed, h.step, h.worker, rng.STREAM_ROTATION), out=z
            )
        return z


ENTRIES = [("uniform", Uniform, Uniform.summary)]
