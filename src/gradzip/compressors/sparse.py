"""Sparsifiers: ``topk``, ``randk`` and ``adaptive_sparse`` (DESIGN.md section 3.5).

Each keeps ``k`` of the ``d`` coordinates: ``k >= 1`` is a count, ``0 < k < 1`` a fraction
of d (``max(1, floor(k d + 1/2))``); either is clamped to d. The payload is the kept
indices, ascending, packed in ``ceil(log2 d)`` bits each (1 bit when d <= 2), and the kept
values; the receiver scatters them into zeros.

- ``topk`` [k, values=fp32|fp16|bf16]: the k largest ``|x_i|``, ties to the lower index
  (exact: equal to a stable descending sort of ``|x|``). Biased, class B3 with
  delta = d/k. Found without sorting d values (:mod:`gradzip._numba.sparse`).
- ``randk`` [k, unbiased=false]: k coordinates uniformly without replacement, chosen from
  the SHARED SEED: the k indices i with the smallest ``hash32(i, key)``, key =
  ``derive_key(seed, step, worker, STREAM_INDICES)`` (``hash32`` is a bijection of
  i < 2**32, so there are no ties and every k-subset is equally likely for an ideal hash).
  The receiver regenerates them from the header, so no index bits are sent: 32 k/d bits
  per coordinate. Unscaled it is biased (delta = d/k); ``unbiased=true`` sends
  ``(d/k) x_i`` (omega = d/k - 1).
- ``adaptive_sparse`` [k]: keep i with probability ``p_i = min(1, c |x_i|)``, c water-filled
  so that ``sum p_i = k`` (the coordinates with ``p_i = 1`` are sent exactly), value
  ``x_i / p_i``: unbiased (Wangni et al. 2018). The kept set is drawn by systematic
  sampling (Madow 1949): every i is kept with probability exactly p_i and exactly k are
  kept, so the payload has a fixed size; kept coordinates are dependent, which changes
  nothing in E C(x) or in ``E||C(x) - x||^2 = sum_i (1/p_i - 1) x_i^2`` (the squared norm is
  a sum over coordinates). omega = d/k - 1 (the worst case over x: see
  :meth:`AdaptiveSparse.omega`). Randomness: ``STREAM_INDICES``, so that a quantizer
  composed after it (``compose``), which draws its rounding and dither from other streams
  of the same (seed, step, worker), stays independent of the selection.

  Exactness: ``p_i`` is computed from integer weights ``W_i = ceil(|x_i| 2**b / ||x||_inf)``
  (``b = 52 - bitlength(d)``, so sums of weights are exact in float64) and the sampling is
  done in exact integer arithmetic: ``p_i = m W_i / T`` exactly, with m the number of
  unsaturated coordinates kept and T their total weight. The weights round |x_i| up by at
  most ``||x||_inf 2**-b``, which enters omega as the factor ``(1 + sqrt(d) 2**-b)**2``.

Sparsifiers also serve :mod:`gradzip.compressors.compose` through a small protocol
(:class:`Sparsifier`): ``kept(d)``, ``select(ctx) -> (indices, values)``,
``index_bytes(d)``, ``pack_indices`` and ``unpack_indices``.

Decoding validates untrusted bytes: the number of kept coordinates follows from d and the
parameters (so the sections must have exactly the declared lengths), indices must be
strictly increasing and below d, values finite; anything else is a :class:`PayloadError`.
With k a count the payload stays small whatever d the header declares, so what bounds the
receiver's output is its element cap (``gradzip.decode(data, max_numel=...)``).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .. import _alloc, bits, rng
from ..wire import MAX_NUMEL, Payload, PayloadError
from .base import Compressor, EncodeContext, all_finite, check_finite

VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_VALUE_NAMES = tuple(VALUE_DTYPES)
# key of the sample that places top-k's threshold: it changes the speed, never the result
_SAMPLE_KEY = rng.derive_key(0x70B, 0, 0, rng.STREAM_INDICES)


# --- k and the index format -------------------------------------------------------------------


def check_k(name: str, k) -> float:
    """k as a float: a count (an integer >= 1) or a fraction in (0, 1); else ValueError."""
    if isinstance(k, bool) or not isinstance(k, int | float):
        raise ValueError(f"{name}: k must be a number, got {k!r}")
    k = float(k)
    if not (math.isfinite(k) and k > 0):
        raise ValueError(f"{name}: k must be a count >= 1 or a fraction in (0, 1), got {k}")
    if k >= 1 and (k != math.floor(k) or k > MAX_NUMEL):
        raise ValueError(f"{name}: a count k must be an integer in [1, {MAX_NUMEL}], got {k}")
    return k


def kept_count(k: float, d: int) -> int:
    """Coordinates kept of d: k itself if k >= 1, else max(1, floor(k d + 1/2)); at most d."""
    if d <= 0:
        return 0
    n = int(k) if k >= 1 else max(1, math.floor(k * d + 0.5))
    return min(d, n)


def index_width(d: int) -> int:
    """Bits per index: ceil(log2 d), at least 1."""
    return max(1, (d - 1).bit_length())


def pack_indices(idx: torch.Tensor, d: int, out: torch.Tensor) -> None:
    """Write ascending int64 ``idx`` (all < d) into ``out`` (uint8, the index section).

    The format is :func:`gradzip.bits.pack_uints`'s; its kernel is called directly because
    the indices are known to be in range (it would check them with a full torch pass).
    """
    if idx.numel():
        from .._numba.bits import pack_uints as nb_pack_uints

        nb_pack_uints(idx.contiguous().numpy(), index_width(d), out.numpy())


def unpack_indices(section: torch.Tensor, n: int, d: int, what: str) -> torch.Tensor:
    """n indices from their section, checked strictly increasing and < d (PayloadError)."""
    idx = bits.unpack_uints(section, n, index_width(d))
    if n:
        from .._numba.sparse import check_indices

        bad = check_indices(idx.numpy(), d)
        if bad >= 0:
            prev = int(idx[bad - 1]) if bad else -1
            raise PayloadError(
                f"{what}: index {int(idx[bad])} at position {bad} is "
                + (f"not below d={d}" if int(idx[bad]) >= d else f"not above {prev}")
                + " (indices must be strictly increasing and < d)"
            )
    return idx


def scatter(idx: torch.Tensor, vals: torch.Tensor, d: int, device) -> torch.Tensor:
    """A float32 d-vector of zeros with ``vals`` at ``idx`` (on ``device``, default CPU)."""
    if device is None or torch.device(device).type == "cpu":
        from .._numba.sparse import scatter as nb_scatter

        v = vals.to(torch.float32).contiguous()
        out = _alloc.empty(d)
        nb_scatter(out.numpy(), idx.numpy(), v.numpy())
        return out
    out = torch.zeros(d, dtype=torch.float32, device=device)
    out[idx.to(device)] = vals.to(device, torch.float32)
    return out


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] as a CPU float32 tensor (numpy's gather on the CPU)."""
    if idx.numel() == 0:
        return torch.empty(0)  # (numpy's empty gathers have stride 0, which views reject)
    if x.device.type == "cpu":
        return torch.from_numpy(x.numpy()[idx.numpy()])
    return x[idx.to(x.device)].cpu()


# --- selections: fast CPU path (numba) and pure-torch references ------------------------------


def topk_indices_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices of the k largest |x|, ties to the lower index (any device)."""
    order = torch.sort(x.abs(), descending=True, stable=True).indices[:k]
    return order.sort().values


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`topk_indices_reference` (int64, on x's device); numba for CPU float32."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        from .._numba.rng import split_key
        from .._numba.sparse import topk_indices as nb_topk

        return torch.from_numpy(nb_topk(x.contiguous().numpy(), k, *split_key(_SAMPLE_KEY)))
    return topk_indices_reference(x, k)


def randk_indices_reference(d: int, k: int, key: int, device=None) -> torch.Tensor:
    """Ascending indices of the k smallest ``hash32(i, key)``, i < d (any device)."""
    h = rng.hash32(torch.arange(d, dtype=torch.int64, device=device), key)
    return torch.argsort(h)[:k].sort().values  # hash32 is a bijection of i: no ties


def randk_indices(d: int, k: int, key: int) -> torch.Tensor:
    """:func:`randk_indices_reference` on the CPU (numba), the same indices bit for bit."""
    from .._numba.rng import split_key
    from .._numba.sparse import randk_indices as nb_randk

    return torch.from_numpy(nb_randk(d, k, *split_key(key)))


def _weight_bits(d: int) -> int:
    return 52 - max(d, 1).bit_length()


def _random_below(total: int, key: int) -> int:
    """An integer uniform on [0, total) (up to 2**-75) from 128 bits of the stream ``key``."""
    h = rng.hash32(torch.arange(4, dtype=torch.int64), key).tolist()
    r = h[0] | h[1] << 32 | h[2] << 64 | h[3] << 96
    return r % total


def _water_fill(w_sorted: np.ndarray, total: float, k: int) -> int:
    """s, the number of saturated coordinates (p = 1), from the k largest weights, descending.

    s is the smallest s with ``W_(s+1) (k - s) < T_s``, T_s the total weight outside the s
    largest (exact: every quantity is an integer below 2**53). Then every saturated weight
    satisfies ``W (k - s) >= T_s`` and none tied with it is left out.
    """
    s = np.arange(k, dtype=np.float64)
    rest = total - np.concatenate(([0.0], np.cumsum(w_sorted[:-1])))
    ok = np.flatnonzero(w_sorted * (k - s) < rest)
    return int(ok[0]) if ok.size else k


def adaptive_select(
    x: torch.Tensor, k: int, key: int, amax: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ascending indices, values x_i / p_i) of adaptive sparsification (CPU float32 ``x``).

    See the module docstring; ``amax`` is ``||x||_inf`` when known. With at most k non-zeros
    every non-zero is kept exactly, and the lowest-index zeros fill the k slots (value 0).
    """
    from .._numba import sparse as nb

    xn = x.contiguous().numpy()
    d = xn.size
    if k >= d or k <= 0:
        idx = np.arange(k, dtype=np.int64)
        return torch.from_numpy(idx), torch.from_numpy(xn[idx])
    if amax is None:
        amax = float(np.abs(xn).max())
    if amax == 0.0:
        return torch.arange(k), torch.zeros(k)
    scale = 2.0 ** _weight_bits(d) / amax
    inf = float("inf")
    parts = nb.weight_sums(xn, scale, inf)
    total = sum(p[0] for p in parts)
    if sum(p[2] for p in parts) <= k:  # at most k non-zeros: each is kept as it is
        idx = topk_indices(x, k).numpy()
        return torch.from_numpy(idx), torch.from_numpy(xn[idx])
    wsat = inf
    if float(np.ceil(amax * scale)) * k >= total:  # some p_i = 1: water-fill on the top k
        w = np.sort(nb.weights_at(xn, topk_indices(x, k).numpy(), scale))[::-1]
        s = _water_fill(w, total, k)
        if s:
            wsat = float(w[s - 1])
            parts = nb.weight_sums(xn, scale, wsat)
    sums = [int(p[0]) for p in parts]
    nsat = [int(p[1]) for p in parts]
    t = sum(sums)
    m = k - sum(nsat)
    r = _random_below(t, key) if t else 0
    rems, counts, c = [], [], 0
    for si, ns in zip(sums, nsat, strict=True):
        lo = m * c + r
        rems.append(lo % t if t else 0)
        c += si
        counts.append(((m * c + r) // t - lo // t if t else 0) + ns)
    idx = np.empty(k, np.int64)
    vals = np.empty(k, np.float32)  # x_i / p_i, p_i = m W_i / t (or 1 where saturated)
    nb.systematic(xn, scale, wsat, m, t, rems, counts, idx, vals)
    return torch.from_numpy(idx), torch.from_numpy(vals)


def adaptive_select_reference(x: torch.Tensor, k: int, key: int):
    """The same selection in plain torch and Python integers (slow; for tests)."""
    x = x.detach().cpu().to(torch.float32).reshape(-1)
    d = x.numel()
    if k >= d or k <= 0:
        idx = torch.arange(k)
        return idx, x[idx]
    a = x.abs().to(torch.float64)
    amax = float(a.max())
    if amax == 0.0:
        return torch.arange(k), torch.zeros(k)
    w = torch.ceil(a * (2.0 ** _weight_bits(d) / amax))
    if int((w > 0).sum()) <= k:
        idx = topk_indices_reference(x, k)
        return idx, x[idx]
    total = float(w.sum())
    ws = torch.sort(w, descending=True).values[:k].numpy()
    s = _water_fill(ws, total, k) if float(w.max()) * k >= total else 0
    sat = w >= ws[s - 1] if s else torch.zeros(d, dtype=torch.bool)
    wi = [int(v) for v in torch.where(sat, 0.0, w).tolist()]
    satl = sat.tolist()
    xl = x.tolist()
    t = sum(wi)
    m = k - sum(satl)
    r = _random_below(t, key) if t else 0
    keep, vals, c = [], [], 0
    for i in range(d):
        if satl[i]:
            keep.append(i)
            vals.append(xl[i])
            continue
        before = (m * c + r) // t
        c += wi[i]
        if (m * c + r) // t > before:
            keep.append(i)
            vals.append(float(np.float32(xl[i] * float(t) / (float(m) * wi[i]))))
    return torch.tensor(keep, dtype=torch.int64), torch.tensor(vals, dtype=torch.float32)


# --- the compressors -----------------------------------------------------------------------


@dataclass(frozen=True)
class Sparsifier(Compressor):
    """A compressor that keeps ``kept(d)`` coordinates; the protocol ``compose`` uses.

    - ``kept(d)``: how many coordinates are kept (fixed by d and the parameters);
    - ``select(ctx) -> (indices, values)``: ascending int64 indices and the float32 values
      to send for them (already scaled, e.g. by d/k or 1/p_i), both on the CPU;
    - ``index_bytes(d)``, ``pack_indices(idx, d, out)``, ``unpack_indices(section, header)``:
      the index section (empty for rand-k, whose indices come from the shared seed);
      ``unpack_indices`` validates and raises :class:`PayloadError`.
    """

    #: C(x) equals x on the kept coordinates and 0 elsewhere (an orthogonal projection)
    projection: ClassVar[bool] = True
    #: whether the payload carries the indices
    sends_indices: ClassVar[bool] = True

    def kept(self, d: int) -> int:
        return kept_count(self.k, d)

    def value_dtype(self) -> torch.dtype:
        return torch.float32

    def select(self, ctx: EncodeContext) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def index_bytes(self, d: int) -> int:
        return bits.packed_size(self.kept(d), index_width(d)) if self.sends_indices else 0

    def pack_indices(self, idx: torch.Tensor, d: int, out: torch.Tensor) -> None:
        if self.sends_indices:
            pack_indices(idx, d, out)

    def unpack_indices(self, section: torch.Tensor | None, header) -> torch.Tensor:
        d = header.numel
        return unpack_indices(section, self.kept(d), d, self.name)

    def section_lengths(self, d: int) -> list[int]:
        vbytes = self.kept(d) * self.value_dtype().itemsize
        return [self.index_bytes(d), vbytes] if self.sends_indices else [vbytes]

    def _value_bits(self) -> int:
        return 8 * self.value_dtype().itemsize

    @property
    def bits_formula(self) -> str:
        idx = "ceil(log2 d) + " if self.sends_indices else ""
        return f"k/d * ({idx}{self._value_bits()}), k = {self._k_text()}"

    def _k_text(self) -> str:
        return f"{int(self.k)}" if self.k >= 1 else f"max(1, floor({self.k} d + 1/2))"

    def _encode(self, ctx: EncodeContext) -> Payload:
        idx, vals = self.select(ctx)
        vals = self._cast_values(vals)
        w = ctx.writer(self.section_lengths(ctx.d))
        self.pack_indices(idx, ctx.d, w.sections[0])
        if vals.numel():
            w.sections[-1].numpy()[:] = vals.view(torch.uint8).numpy()
        return w.finish()

    def _cast_values(self, vals: torch.Tensor) -> torch.Tensor:
        vt = self.value_dtype()
        if vt == torch.float16:  # numpy: single-threaded, no stall on a busy core
            with np.errstate(over="ignore"):  # reported below
                out = torch.from_numpy(vals.numpy().astype(np.float16))
        else:
            out = vals.to(vt).contiguous()
        if vals.numel() and not all_finite(out if vt == torch.float32 else out.float()):
            big = float(vals.abs().max())
            raise ValueError(
                f"{self.name}: a kept value ({big:.3g}) overflows {vt}; "
                + ("use values=fp32 or bf16, or scale the gradient" if vt != torch.float32 else
                   "the gradient is too large for this scaling")
            )  # fmt: skip
        return out

    def _decode(self, p: Payload, device) -> torch.Tensor:
        h = p.header
        d = h.numel
        idx = self.unpack_indices(p.section(0) if self.sends_indices else None, h)
        raw = p.section(-1).numpy().copy()  # a copy is aligned for the value dtype
        vt = self.value_dtype()
        if vt == torch.bfloat16:
            vals = torch.from_numpy(raw).view(vt).float()
        elif vt == torch.float16:
            vals = torch.from_numpy(raw.view(np.float16).astype(np.float32))
        else:
            vals = torch.from_numpy(raw.view(np.float32))
        return scatter(idx, check_finite(self.name, vals), d, device)


_KPARAMS = struct.Struct("<dB")  # k, a one-byte option


def _read_kparams(cls, raw: bytes, options: int) -> tuple[float, int]:
    if len(raw) != _KPARAMS.size:
        raise PayloadError(f"{cls.name}: expected {_KPARAMS.size} parameter bytes, got {len(raw)}")
    k, opt = _KPARAMS.unpack(raw)
    if opt >= options:
        raise PayloadError(f"{cls.name}: invalid option byte {opt}")
    try:
        check_k(cls.name, k)
    except ValueError as e:
        raise PayloadError(str(e)) from None
    return k, opt


@dataclass(frozen=True)
class TopK(Sparsifier):
    """The k largest |x_i| (ties to the lower index), values as fp32, fp16 or bf16."""

    k: float = 0.01
    values: str = "fp32"

    name: ClassVar[str] = "topk"
    codec_id: ClassVar[int] = 20
    summary: ClassVar[str] = "top-k: the k largest |x_i| with their indices (biased)"

    def __post_init__(self):
        object.__setattr__(self, "k", check_k(self.name, self.k))
        if self.values not in VALUE_DTYPES:
            raise ValueError(f"topk: values must be one of {_VALUE_NAMES}, got {self.values!r}")

    @property
    def unbiased(self) -> bool:
        return False

    def delta(self, d: int) -> float:
        # ||C(x) - x||^2 = ||x||^2 - (the k largest squares) <= (1 - k/d) ||x||^2
        return d / self.kept(d) if d else 1.0

    def value_dtype(self) -> torch.dtype:
        return VALUE_DTYPES[self.values]

    def to_params(self) -> bytes:
        return _KPARAMS.pack(self.k, _VALUE_NAMES.index(self.values))

    @classmethod
    def from_params(cls, raw: bytes) -> TopK:
        k, opt = _read_kparams(cls, raw, len(_VALUE_NAMES))
        return cls(k=k, values=_VALUE_NAMES[opt])

    def select(self, ctx: EncodeContext) -> tuple[torch.Tensor, torch.Tensor]:
        x = ctx.f32()
        idx = topk_indices(x, self.kept(ctx.d))
        return idx.cpu(), _gather(x, idx)


@dataclass(frozen=True)
class RandK(Sparsifier):
    """k coordinates chosen from the shared seed (no index bits), optionally scaled by d/k."""

    k: float = 0.01
    unbiased: bool = False

    name: ClassVar[str] = "randk"
    codec_id: ClassVar[int] = 21
    summary: ClassVar[str] = "rand-k: k coordinates from the shared seed (unbiased=true: times d/k)"
    sends_indices: ClassVar[bool] = False

    def __post_init__(self):
        object.__setattr__(self, "k", check_k(self.name, self.k))
        if not isinstance(self.unbiased, bool):
            raise ValueError(f"randk: unbiased must be true or false, got {self.unbiased!r}")

    @property
    def projection(self) -> bool:  # type: ignore[override]
        return not self.unbiased

    def omega(self, d: int) -> float | None:
        # E||(d/k) S x - x||^2 = (d/k - 1) ||x||^2 exactly
        return d / self.kept(d) - 1.0 if self.unbiased and d else (0.0 if self.unbiased else None)

    def delta(self, d: int) -> float | None:
        if not self.unbiased:  # E||Sx - x||^2 = (1 - k/d) ||x||^2
            return d / self.kept(d) if d else 1.0
        w = self.omega(d)
        return 1.0 / (1.0 - w) if w < 1 else None

    def to_params(self) -> bytes:
        return _KPARAMS.pack(self.k, int(self.unbiased))

    @classmethod
    def from_params(cls, raw: bytes) -> RandK:
        k, opt = _read_kparams(cls, raw, 2)
        return cls(k=k, unbiased=bool(opt))

    def indices(self, d: int, seed: int, step: int, worker: int) -> torch.Tensor:
        """The kept indices: what sender and receiver both derive from the integers."""
        return randk_indices(d, self.kept(d), rng.derive_key(seed, step, worker,
                                                              rng.STREAM_INDICES))  # fmt: skip

    def select(self, ctx: EncodeContext) -> tuple[torch.Tensor, torch.Tensor]:
        d = ctx.d
        idx = self.indices(d, ctx.seed, ctx.step, ctx.worker)
        vals = _gather(ctx.f32(), idx)
        if self.unbiased and idx.numel():
            with np.errstate(over="ignore"):
                scaled = (vals.numpy().astype(np.float64) * (d / idx.numel())).astype(np.float32)
            vals = torch.from_numpy(scaled)
            if not all_finite(vals):
                raise ValueError(
                    f"randk: a value scaled by d/k = {d / idx.numel():.3g} overflows float32"
                )
        return idx, vals

    def unpack_indices(self, section, header) -> torch.Tensor:
        h = header
        return self.indices(h.numel, h.seed, h.step, h.worker)


@dataclass(frozen=True)
class AdaptiveSparse(Sparsifier):
    """Keep i with probability min(1, c|x_i|) (sum = k), value x_i / p_i: unbiased."""

    k: float = 0.01

    name: ClassVar[str] = "adaptive_sparse"
    codec_id: ClassVar[int] = 22
    summary: ClassVar[str] = "adaptive random sparsification: keep i w.p. ~|x_i|, unbiased"
    projection: ClassVar[bool] = False

    def __post_init__(self):
        object.__setattr__(self, "k", check_k(self.name, self.k))

    @property
    def unbiased(self) -> bool:
        return True

    def omega(self, d: int) -> float:
        """(d/k - 1) (1 + sqrt(d) 2**-b)**2, b the weight bits (see the module docstring).

        For exact probabilities p_i = min(1, c w_i): with s saturated coordinates, m = k - s
        kept among the others (set U, weights summing to A), the variance is
        A**2/m - ||w_U||**2, and the saturated ones each weigh at least A/m; maximizing the
        ratio to ||w||**2 over ||w_U||**2 >= A**2/|U| and |U| <= d - s gives at most
        (d - k)/k. The implemented weights w_i >= |x_i| exceed them by at most
        ||x||_inf 2**-b each, hence the factor. It is attained (to that factor) by vectors
        with all |x_i| equal, where adaptive sparsification is unbiased rand-k.
        """
        n = self.kept(d)
        if n >= d:
            return 0.0
        return (d / n - 1.0) * (1.0 + math.sqrt(d) * 2.0 ** -_weight_bits(d)) ** 2

    def delta(self, d: int) -> float | None:
        w = self.omega(d)
        return 1.0 / (1.0 - w) if w < 1 else None

    def to_params(self) -> bytes:
        return _KPARAMS.pack(self.k, 0)

    @classmethod
    def from_params(cls, raw: bytes) -> AdaptiveSparse:
        k, _ = _read_kparams(cls, raw, 1)
        return cls(k=k)

    def select(self, ctx: EncodeContext) -> tuple[torch.Tensor, torch.Tensor]:
        x = ctx.f32().cpu()
        amax = ctx.stats()[1] if ctx.flat.dtype != torch.float64 else None  # that of x32
        idx, vals = adaptive_select(x, self.kept(ctx.d), ctx.key(rng.STREAM_INDICES), amax)
        if vals.numel() and not all_finite(vals):
            raise ValueError("adaptive_sparse: a value x_i / p_i overflows float32")
        return idx, vals


def topk(k: float = 0.01, values: str = "fp32") -> TopK:
    """Top-k: the k largest |x_i| (k a count >= 1 or a fraction of d)."""
    return TopK(k=k, values=values)


def randk(k: float = 0.01, unbiased: bool = False) -> RandK:
    """Rand-k from the shared seed; ``unbiased=True`` scales the kept values by d/k."""
    return RandK(k=k, unbiased=unbiased)


def adaptive_sparse(k: float = 0.01) -> AdaptiveSparse:
    """Adaptive random sparsification keeping exactly k coordinates, unbiased."""
    return AdaptiveSparse(k=k)


ENTRIES = [
    ("topk", topk, TopK.summary),
    ("randk", randk, RandK.summary),
    ("adaptive_sparse", adaptive_sparse, AdaptiveSparse.summary),
]
CODEC_CLASSES = [TopK, RandK, AdaptiveSparse]
