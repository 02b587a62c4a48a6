"""Elias-Fano code: k strictly increasing integers below d in a size fixed by (k, d).

Elias (1974), Fano (1971); the form of Vigna, "Quasi-succinct indices" (WSDM 2013).
About k (2 + log2(d / k)) bits, against k ceil(log2 d) for fixed-width indices: at the
density of a top-0.3% selection, 10.3 bits an index instead of 20. The size depends only on
k and d, so a payload that uses it keeps a size fixed by its codec and length (what the DDP
hook relies on).

Format, for ascending indices i_0 < ... < i_{k-1} < d:

1. l = floor(log2(d / k)) low bits (0 when k >= d / 2), k = 0: nothing at all;
2. the low parts i_j mod 2**l: k unsigned integers of l bits (:func:`gradzip.bits.pack_uints`'s
   format), ``ceil(k l / 8)`` bytes;
3. the high parts h_j = i_j >> l (non-decreasing, at most (d - 1) >> l) in unary: a bitmap of
   k + ((d - 1) >> l) + 1 flags with flag h_j + j set (:func:`gradzip.bits.pack_bits`'s
   format), the rest 0.

Decoding validates untrusted bytes: exactly k set flags, indices strictly increasing and
below d; anything else is a :class:`gradzip.wire.PayloadError`. :func:`encode_reference` and
:func:`decode_reference` are the plain per-index loops the vectorized versions are tested
against.
"""

from __future__ import annotations

import numpy as np
import torch

from . import bits
from .wire import PayloadError


def low_bits(k: int, d: int) -> int:
    """l = floor(log2(d / k)) (0 when k = 0 or k >= d / 2)."""
    if k <= 0 or d <= 2 * k:
        return 0
    return (d // k).bit_length() - 1  # floor(log2(d / k)) = floor(log2(floor(d / k)))


def bitmap_bits(k: int, d: int) -> int:
    """Flags of the unary high parts: k + ((d - 1) >> l) + 1 (0 when k = 0)."""
    return k + ((d - 1) >> low_bits(k, d)) + 1 if k > 0 else 0


def sizes(k: int, d: int) -> tuple[int, int]:
    """Bytes of the low parts and of the bitmap."""
    ell = low_bits(k, d)
    return (bits.packed_size(k, ell) if ell else 0), bits.packed_size(bitmap_bits(k, d))


def size(k: int, d: int) -> int:
    """Bytes of the code of k indices below d."""
    return sum(sizes(k, d))


def encode(idx: torch.Tensor, d: int, out: torch.Tensor) -> None:
    """Write the code of ascending int64 ``idx`` (all < d) into ``out`` (uint8, size(k, d))."""
    k = idx.numel()
    if not k:
        return
    lo_n, _ = sizes(k, d)
    ell = low_bits(k, d)
    v = idx.cpu().numpy().astype(np.int64, copy=False)
    if ell:
        out[:lo_n] = bits.pack_uints(torch.from_numpy(v & ((1 << ell) - 1)), ell)
    flags = np.zeros(bitmap_bits(k, d), dtype=np.bool_)
    flags[(v >> ell) + np.arange(k)] = True
    out[lo_n:] = bits.pack_bits(torch.from_numpy(flags))


def decode(data: torch.Tensor, k: int, d: int, what: str) -> torch.Tensor:
    """The k indices of a code (int64, ascending); :class:`PayloadError` if it is invalid."""
    if data.numel() != size(k, d):
        raise PayloadError(f"{what}: an index code of {data.numel()} bytes, expected {size(k, d)}")
    if not k:
        return torch.empty(0, dtype=torch.int64)
    lo_n, _ = sizes(k, d)
    ell = low_bits(k, d)
    flags = bits.unpack_bits(data[lo_n:], bitmap_bits(k, d)).numpy()
    pos = np.flatnonzero(flags)
    if pos.size != k:
        raise PayloadError(f"{what}: the index code marks {pos.size} indices, expected {k}")
    idx = (pos - np.arange(k)) << ell
    if ell:
        idx |= bits.unpack_uints(data[:lo_n], k, ell).numpy().astype(np.int64)
    bad = np.flatnonzero(np.diff(idx) <= 0)
    if bad.size or idx[-1] >= d:
        at = int(bad[0]) + 1 if bad.size else k - 1
        raise PayloadError(
            f"{what}: index {int(idx[at])} at position {at} is "
            + (f"not below d={d}" if not bad.size else f"not above {int(idx[at - 1])}")
            + " (indices must be strictly increasing and < d)"
        )
    return torch.from_numpy(idx)


def encode_reference(idx: list[int], d: int) -> bytes:
    """The code, one index at a time (for tests)."""
    k = len(idx)
    if not k:
        return b""
    ell = low_bits(k, d)
    stream = []  # low parts: LSB-first, l bits each
    for i in idx:
        stream += [(i >> b) & 1 for b in range(ell)]
    flags = [0] * bitmap_bits(k, d)
    for j, i in enumerate(idx):
        flags[(i >> ell) + j] = 1
    return _pack(stream) + _pack(flags)


def decode_reference(code: bytes, k: int, d: int) -> list[int]:
    """The indices of a valid code, one at a time (for tests)."""
    if not k:
        return []
    ell = low_bits(k, d)
    lo_n = -(-k * ell // 8)
    stream = _unpack(code[:lo_n])
    flags = _unpack(code[lo_n:])[: bitmap_bits(k, d)]
    out, j = [], 0
    for p, f in enumerate(flags):
        if f:
            low = sum(stream[j * ell + b] << b for b in range(ell))
            out.append(((p - j) << ell) | low)
            j += 1
    return out


def _pack(flags: list[int]) -> bytes:
    return bytes(
        sum(f << b for b, f in enumerate(flags[i : i + 8])) for i in range(0, len(flags), 8)
    )


def _unpack(data: bytes) -> list[int]:
    return [(byte >> b) & 1 for byte in data for b in range(8)]
