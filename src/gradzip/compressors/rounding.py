"""Biased rounding (``biased_rounding``): the deterministic quantizer of Beznosikov et al.

Item 5 of :mod:`gradzip.compressors.quantize`'s docstring: |x_i| rounds to the nearest
level b^k (exact float32 levels), class B3 with delta = (b+1)^2 / (4b). The codes, their
packing and the validation on decoding are the quantizers' (``_Quantizer``); this module
holds the level tables, which need care to be exact.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..wire import Payload, PayloadError
from .base import EncodeContext
from .quantize import (
    F32_MAX,
    _check_range,
    _Quantizer,
    _width,
    bucket_codes_reference,
)

MIN_BASE, MAX_BASE = 1.1, 2.0**20  # 12 bits/coordinate at 1.1; ratios <= 2^20 keep sums exact
_F64 = struct.Struct("<d")

# --- exact float32 levels b^k and bucket tables -------------------------------------------------


def _nearest_f32(a: int, b: int) -> float:
    """The float32 nearest to a/b > 0 (ties to even), exact; a/b in the normal range."""
    t = 26 - (a.bit_length() - b.bit_length())
    q, r = divmod(a << t, b) if t >= 0 else divmod(a, b << -t)
    drop = q.bit_length() - 24  # q has 26 or 27 bits
    mant = q >> drop
    half = (q >> (drop - 1)) & 1
    if half and (r or q & ((1 << (drop - 1)) - 1) or mant & 1):
        mant += 1
    return math.ldexp(mant, drop - t)


def _floor_f32(v: float) -> np.float32:
    """The largest float32 <= v."""
    f = np.float32(v)
    return np.nextafter(f, np.float32(-np.inf)) if float(f) > v else f


@dataclass(frozen=True)
class _Tables:
    levels: np.ndarray  # float64 copies of the float32 levels, ascending
    shift: int  # bucket of |x| is bits(|x|) >> shift
    c0: np.ndarray  # uint32: code at a bucket's start
    thr: np.ndarray  # uint32: bits of the bucket's threshold (0xFFFFFFFF: none)
    table: np.ndarray  # float32 magnitudes by code index (0 first), padded to 2**(w-1)
    ratio: float  # largest ratio of consecutive levels


@functools.lru_cache(maxsize=8)
def rounding_tables(base: float) -> _Tables:
    """Levels b^k (float32, exact rounding) in [2^-126, float32 max] and the bucket tables."""
    num, den = float(base).as_integer_ratio()
    lb = math.log2(base)
    k_lo, k_hi = math.floor(-126 / lb) - 1, math.ceil(128 / lb) + 1
    pos, neg = [], []
    a, b = 1, 1
    for _ in range(k_hi + 1):  # b^0, b^1, ...: num^k / den^k, exact integers
        pos.append(_nearest_f32(a, b))
        a, b = a * num, b * den
    a, b = den, num
    for _ in range(-k_lo):  # b^-1, b^-2, ...
        neg.append(_nearest_f32(a, b))
        a, b = a * den, b * num
    levels = np.array(neg[::-1] + pos)
    levels = levels[(levels >= 2.0**-126) & (levels <= F32_MAX)]
    thr = np.empty(levels.size, np.float64)
    thr[0] = levels[0] / 2
    thr[1:] = (levels[:-1] + levels[1:]) / 2  # exact in float64 (ratio <= 2^20)
    tb = np.array([_floor_f32(v) for v in thr], np.float32).view(np.uint32).astype(np.int64)
    for q in range(0, 12):
        shift = 23 - q
        g = tb >> shift
        if np.all(np.diff(g) > 0):
            break
    else:  # pragma: no cover (MIN_BASE keeps q small)
        raise ValueError(f"biased_rounding: base {base} needs too fine a bucket table")
    starts = np.arange(1 << (8 + q), dtype=np.int64) << shift
    c0 = np.searchsorted(tb, starts, side="left")
    inside = np.full(starts.size, 0xFFFFFFFF, np.int64)
    has = c0 < tb.size
    hit = has & ((tb[np.minimum(c0, tb.size - 1)] >> shift) == (starts >> shift))
    inside[hit] = tb[c0[hit]]
    n = levels.size
    table = np.zeros(1 << (_width(n) - 1), np.float32)
    table[1 : n + 1] = levels
    return _Tables(
        levels=levels, shift=shift, c0=c0.astype(np.uint32), thr=inside.astype(np.uint32),
        table=table, ratio=float(np.max(levels[1:] / levels[:-1])),
    )  # fmt: skip


@dataclass(frozen=True)
class BiasedRounding(_Quantizer):
    """Deterministic rounding of |x_i| to the nearest power of b (module docstring, 5)."""

    base: float = 2.0

    name: ClassVar[str] = "biased_rounding"
    codec_id: ClassVar[int] = 34
    summary: ClassVar[str] = "deterministic rounding to the nearest power of b (biased, B3)"
    n_scalars: ClassVar[int] = 0

    def __post_init__(self):
        b = self.base
        if isinstance(b, bool) or not isinstance(b, int | float):
            raise ValueError(f"biased_rounding: base must be a number, got {b!r}")
        if not (math.isfinite(b) and MIN_BASE <= b <= MAX_BASE):
            raise ValueError(f"biased_rounding: base must be in [{MIN_BASE}, 2**20], got {b}")
        object.__setattr__(self, "base", float(b))

    def tables(self) -> _Tables:
        return rounding_tables(self.base)

    @property
    def bits_formula(self) -> str:
        n = self.tables().levels.size
        return f"1 + ceil(log2(N+1)) = {self.width()} (N = {n} levels of base {self.base})"

    @property
    def unbiased(self) -> bool:
        return False

    def delta(self, d: int) -> float:
        b = self.tables().ratio
        return (b + 1) ** 2 / (4 * b)

    def width(self) -> int:
        return _width(self.tables().levels.size)

    def _encode_impl(self, ctx: EncodeContext, fast: bool) -> Payload:
        _check_range(self.name, ctx, ctx.stats()[1], "the value")
        return super()._encode_impl(ctx, fast)

    def _codes_fast(self, x, scalar, key, out):
        from .._numba import quantizers as nb

        t = self.tables()
        nb.encode_buckets(x, t.shift, t.c0, t.thr, self.width(), out)

    def _codes_reference(self, x, scalar, key):
        t = self.tables()
        return bucket_codes_reference(x, t.shift, t.c0, t.thr)

    def _magnitudes(self, scalar: float) -> dict:
        t = self.tables()
        return {"table": t.table, "top": t.levels.size}

    def to_params(self) -> bytes:
        return _F64.pack(self.base)

    @classmethod
    def from_params(cls, raw: bytes) -> BiasedRounding:
        if len(raw) != _F64.size:
            raise PayloadError(f"{cls.name}: expected {_F64.size} parameter bytes, got {len(raw)}")
        try:
            return cls(base=_F64.unpack(raw)[0])
        except ValueError as e:
            raise PayloadError(str(e)) from None


def biased_rounding(base: float = 2.0) -> BiasedRounding:
    """Deterministic rounding to the nearest power of ``base`` (default 2: 9 bits)."""
    return BiasedRounding(base=base)


ENTRIES = [
    ("biased_rounding", biased_rounding, BiasedRounding.summary),
]
CODEC_CLASSES = [BiasedRounding]
