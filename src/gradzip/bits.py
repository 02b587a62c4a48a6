"""Bit packing for compressed payloads: sign bits, 0/1 flags and dense fixed-width integers.

Format (fixed; other implementations can rely on it)
----------------------------------------------------
* Flags and signs: element ``8*i + j`` is bit ``j`` (LSB first) of byte ``i``, exactly as
  ``np.packbits(..., bitorder="little")``. ``n`` flags take ``ceil(n / 8)`` bytes and the unused
  high bits of the last byte are 0.
* Signs: the bit is 1 iff ``x < 0``. So ``-0.0`` gives 0 (it compares equal to 0), ``-inf`` gives
  1, and NaN (either sign) gives 0 because every comparison with NaN is false. Compressors reject
  non-finite input before packing; this module does not check for it.
* Unsigned integers of ``width`` bits (``1 <= width <= 32``): one LSB-first bit stream in which
  value ``i`` occupies stream bits ``[i*width, (i+1)*width)`` (its least significant bit first)
  and stream bit ``b`` is bit ``b % 8`` of byte ``b // 8``. ``n`` values take
  ``ceil(n * width / 8)`` bytes; unused trailing bits are 0. With ``width == 1`` this is the
  flag format.

Unpacking ignores the unused trailing bits of the last byte (it does not check that they are 0).

Implementations
---------------
Every function has a pure-torch ``*_reference`` twin (vectorized, any device, CUDA included).
The public functions use numba kernels (:mod:`gradzip._numba.bits`) for CPU tensors and the
reference elsewhere; both give identical results, which the tests check.

Inputs are validated up front: a wrong type or dtype is a ``TypeError``, a wrong shape, length or
value range a ``ValueError``, each with a message that names the argument.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch

from . import _alloc

__all__ = [
    "MAX_WIDTH",
    "pack_signs",
    "unpack_signs",
    "pack_bits",
    "unpack_bits",
    "pack_uints",
    "unpack_uints",
    "packed_size",
    "pack_signs_reference",
    "unpack_signs_reference",
    "pack_bits_reference",
    "unpack_bits_reference",
    "pack_uints_reference",
    "unpack_uints_reference",
]

#: largest supported width of :func:`pack_uints`
MAX_WIDTH = 32

# bit patterns of -inf as signed 16-bit integers (see gradzip._numba.bits._mask8_neg16)
_NEG_INF16 = {torch.float16: -1024, torch.bfloat16: -128}
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# unsigned dtypes with barely any torch kernels (no min/max/compare): widened to int64 first
_WIDEN = (torch.uint16, torch.uint32, torch.uint64)


# --------------------------------------------------------------------------------------------
# validation


def _check_n(n) -> int:
    if isinstance(n, bool) or isinstance(n, torch.Tensor):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an int, got {type(n).__name__}") from None
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return n


def _check_width(width) -> int:
    if isinstance(width, bool) or isinstance(width, torch.Tensor):
        raise TypeError(f"width must be an int, got {type(width).__name__}")
    try:
        width = operator.index(width)
    except TypeError:
        raise TypeError(f"width must be an int, got {type(width).__name__}") from None
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"width must be in [1, {MAX_WIDTH}], got {width}")
    return width


def _check_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_data(data, nbytes: int, what: str) -> torch.Tensor:
    data = _check_tensor(data, "data")
    if data.dtype != torch.uint8:
        raise TypeError(f"data must be a uint8 tensor, got dtype {data.dtype}")
    if data.dim() != 1:
        raise ValueError(f"data must be 1-D, got shape {tuple(data.shape)}")
    if data.numel() != nbytes:
        raise ValueError(
            f"data has {data.numel()} bytes but {what} need exactly {nbytes} "
            "(truncated or mismatched payload?)"
        )
    return data


def _check_signs_input(x) -> torch.Tensor:
    x = _check_tensor(x, "x")
    if not (x.dtype.is_floating_point or x.dtype == torch.bool):
        raise TypeError(f"pack_signs expects a floating-point or bool tensor, got dtype {x.dtype}")
    x = x.reshape(-1)
    if x.dtype not in _FLOATS and x.dtype != torch.bool:
        x = x.float()  # float8 and friends: exact in float32, which has the kernels
    return x


def _check_bits_input(bits) -> torch.Tensor:
    bits = _check_tensor(bits, "bits")
    dt = bits.dtype
    if dt != torch.bool and (dt.is_floating_point or dt.is_complex):
        raise TypeError(
            f"pack_bits expects a bool or integer tensor of 0/1, got dtype {dt} "
            "(use pack_signs for the signs of floats)"
        )
    bits = bits.reshape(-1)
    if dt in _WIDEN:
        bits = bits.to(torch.int64)
    if bits.dtype != torch.bool and bits.numel() > 0:
        lo, hi = torch.aminmax(bits)
        if lo.item() < 0 or hi.item() > 1:
            bad = int(bits[(bits != 0) & (bits != 1)][0].item())
            raise ValueError(f"pack_bits expects only 0 and 1, got the value {bad}")
    return bits


def _check_uints_input(values, width: int) -> torch.Tensor:
    values = _check_tensor(values, "values")
    dt = values.dtype
    if dt == torch.bool or dt.is_floating_point or dt.is_complex:
        raise TypeError(f"pack_uints expects an integer tensor, got dtype {dt}")
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D, got shape {tuple(values.shape)}")
    wrapped = dt == torch.uint64  # to int64, values >= 2**63 wrap to negative ones
    if dt in _WIDEN:
        values = values.to(torch.int64)
    if values.numel() > 0:
        lo, hi = torch.aminmax(values)
        if lo.item() < 0 or hi.item() >> width:
            bad_mask = (values < 0) | (values.to(torch.int64) >> width != 0)
            i = int(bad_mask.nonzero()[0, 0].item())
            v = int(values[i].item())
            if wrapped and v < 0:
                v += 1 << 64
            raise ValueError(
                f"values must be in [0, 2**{width}) for width {width}, got {v} at index {i}"
            )
    return values


def _check_scale(scale) -> float:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or scale.dtype.is_complex or scale.dtype == torch.bool:
            raise TypeError("scale must be a real number or a one-element real tensor")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def _check_float_dtype(dtype) -> torch.dtype:
    if dtype not in _FLOATS:
        names = ", ".join(str(d) for d in _FLOATS)
        raise TypeError(f"dtype must be one of {names}; got {dtype!r}")
    return dtype


def packed_size(n: int, width: int = 1) -> int:
    """Bytes taken by ``n`` values of ``width`` bits: ``ceil(n * width / 8)``.

    ``width`` may be any positive int here (not only ``<= 32``), so that it also sizes other
    fixed-width fields.
    """
    n = _check_n(n)
    if isinstance(width, bool) or isinstance(width, torch.Tensor):
        raise TypeError(f"width must be an int, got {type(width).__name__}")
    try:
        width = operator.index(width)
    except TypeError:
        raise TypeError(f"width must be an int, got {type(width).__name__}") from None
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    return (n * width + 7) // 8


# --------------------------------------------------------------------------------------------
# dispatch helpers

_NB = None


def _nb():
    global _NB
    if _NB is None:
        from ._numba import bits as nb

        _NB = nb
    return _NB


def _fast(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _np(t: torch.Tensor):
    """A numpy view of a contiguous CPU tensor (no copy)."""
    t = t.detach()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.numpy()


# --------------------------------------------------------------------------------------------
# references (pure torch, any device)


def pack_bits_reference(bits: torch.Tensor) -> torch.Tensor:
    """Reference :func:`pack_bits` (pure torch)."""
    bits = _check_bits_input(bits)
    return _pack_bool_ref(bits != 0 if bits.dtype != torch.bool else bits)


def _pack_bool_ref(b: torch.Tensor) -> torch.Tensor:
    n = b.numel()
    dev = b.device
    pad = (-n) % 8
    b = b.to(torch.uint8)
    if pad:
        b = torch.cat([b, torch.zeros(pad, dtype=torch.uint8, device=dev)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=dev)
    return (b.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def _unpack_bool_ref(data: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=data.device)
    return ((data.unsqueeze(1) >> shifts) & 1).reshape(-1)[:n].bool()


def unpack_bits_reference(data: torch.Tensor, n: int) -> torch.Tensor:
    """Reference :func:`unpack_bits` (pure torch)."""
    n = _check_n(n)
    data = _check_data(data, packed_size(n), f"{n} bits")
    return _unpack_bool_ref(data, n)


def pack_signs_reference(x: torch.Tensor) -> torch.Tensor:
    """Reference :func:`pack_signs` (pure torch)."""
    x = _check_signs_input(x)
    return _pack_bool_ref(x if x.dtype == torch.bool else x < 0)


def unpack_signs_reference(
    data: torch.Tensor, n: int, scale: float = 1.0, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Reference :func:`unpack_signs` (pure torch; no ``out``)."""
    n = _check_n(n)
    scale = _check_scale(scale)
    dtype = _check_float_dtype(torch.float32 if dtype is None else dtype)
    data = _check_data(data, packed_size(n), f"{n} signs")
    bits = _unpack_bool_ref(data, n)
    pos = torch.tensor(scale, dtype=dtype, device=data.device)
    return torch.where(bits, -pos, pos)


def pack_uints_reference(values: torch.Tensor, width: int) -> torch.Tensor:
    """Reference :func:`pack_uints` (pure torch).

    Each value, shifted by its bit offset within its first byte, spans at most 5 bytes; their
    contributions are added into the output with ``scatter_add_``. Contributions to one byte
    have disjoint bits, so the sum is their bitwise or (and exact, so also deterministic on
    CUDA).
    """
    width = _check_width(width)
    v = _check_uints_input(values, width).to(torch.int64)
    n = v.numel()
    dev = v.device
    nbytes = packed_size(n, width)
    span = (width + 7 + 7) // 8  # bytes one value can touch
    start = torch.arange(n, dtype=torch.int64, device=dev) * width
    shifted = v << (start & 7)
    byte = start >> 3
    acc = torch.zeros(nbytes + span, dtype=torch.int64, device=dev)
    for k in range(span):
        acc.scatter_add_(0, byte + k, (shifted >> (8 * k)) & 0xFF)
    return acc[:nbytes].to(torch.uint8)


def unpack_uints_reference(data: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """Reference :func:`unpack_uints` (pure torch; gathers the up to 5 bytes of each value)."""
    n = _check_n(n)
    width = _check_width(width)
    data = _check_data(data, packed_size(n, width), f"{n} values of width {width}")
    dev = data.device
    span = (width + 7 + 7) // 8
    padded = torch.cat([data.to(torch.int64), torch.zeros(span, dtype=torch.int64, device=dev)])
    start = torch.arange(n, dtype=torch.int64, device=dev) * width
    byte = start >> 3
    word = torch.zeros(n, dtype=torch.int64, device=dev)
    for k in range(span):
        word |= padded[byte + k] << (8 * k)
    return (word >> (start & 7)) & ((1 << width) - 1)


# --------------------------------------------------------------------------------------------
# public API


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack ``x < 0`` (for a bool tensor: ``x``) into ``ceil(n/8)`` uint8 bytes, LSB first.

    ``x`` may have any shape (it is flattened) and any floating-point dtype, or be bool.
    ``-0.0`` and NaN give bit 0 (see the module docstring). Returns a 1-D uint8 tensor on
    ``x``'s device.
    """
    x = _check_signs_input(x)
    if not _fast(x):
        return pack_signs_reference(x)
    out = _alloc.empty(packed_size(x.numel()), torch.uint8)
    if x.numel():
        x = x.detach()
        nb = _nb()
        if x.dtype in _NEG_INF16:
            nb.pack_neg16(_np(x.view(torch.int16)), _NEG_INF16[x.dtype], out.numpy())
        else:
            nb.pack_flags(_np(x), out.numpy())
    return out


def unpack_signs(
    data: torch.Tensor,
    n: int,
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: ``n`` values, ``+scale`` where the bit is 0, ``-scale``
    where it is 1 (``-scale`` is ``scale`` with its sign bit flipped, so ``scale == 0`` gives
    ``-0.0`` for set bits).

    ``scale`` is a finite real number (or a one-element tensor, read with ``.item()``); it is
    rounded to ``dtype``. ``dtype`` defaults to ``out.dtype`` if ``out`` is given, else float32.
    ``data`` must hold exactly ``ceil(n/8)`` bytes (``ValueError`` otherwise).

    ``out``: optional contiguous tensor of ``n`` elements (any shape) on ``data``'s device to
    write into and return. Writing into an existing buffer avoids allocating (and page-faulting)
    a fresh output, which for large ``n`` costs more than the unpacking itself.
    """
    n = _check_n(n)
    scale = _check_scale(scale)
    if out is not None:
        out = _check_tensor(out, "out")
    if dtype is None:
        dtype = torch.float32 if out is None else out.dtype
    dtype = _check_float_dtype(dtype)
    data = _check_data(data, packed_size(n), f"{n} signs")
    if out is not None:
        if out.dtype != dtype:
            raise TypeError(f"out has dtype {out.dtype} but dtype is {dtype}")
        if out.numel() != n or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous tensor of n={n} elements, got shape "
                f"{tuple(out.shape)} (contiguous={out.is_contiguous()})"
            )
        if out.device != data.device:
            raise ValueError(f"out is on {out.device} but data is on {data.device}")
    if not _fast(data):
        res = unpack_signs_reference(data, n, scale, dtype)
        if out is None:
            return res
        out.detach().view(-1).copy_(res)
        return out
    res = _alloc.empty(n, dtype) if out is None else out
    if n:
        target = res.detach().view(-1)
        if dtype.itemsize == 2:
            # no 16-bit floats in numba: select their bit patterns (rounded by torch)
            pos = torch.tensor(scale, dtype=dtype)
            one, zero = (-pos).view(torch.int16).item(), pos.view(torch.int16).item()
            target = target.view(torch.int16)
        else:
            one, zero = -scale, scale  # the kernel rounds them to dtype
        _nb().unpack_select(_np(data), one, zero, target.numpy())
    return res


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (or an integer tensor of 0 and 1) into ``ceil(n/8)`` uint8 bytes,
    LSB first (any shape, flattened). Integers other than 0 and 1 are a ``ValueError``."""
    bits = _check_bits_input(bits)
    if not _fast(bits):
        return pack_bits_reference(bits)
    out = _alloc.empty(packed_size(bits.numel()), torch.uint8)
    if bits.numel():
        _nb().pack_flags(_np(bits), out.numpy())
    return out


def unpack_bits(data: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor of ``n`` elements."""
    n = _check_n(n)
    data = _check_data(data, packed_size(n), f"{n} bits")
    if not _fast(data):
        return _unpack_bool_ref(data, n)
    res = torch.empty(n, dtype=torch.bool)
    if n:
        _nb().unpack_select(_np(data), 1, 0, res.view(torch.uint8).numpy())
    return res


def pack_uints(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack a 1-D tensor of integers in ``[0, 2**width)`` (any integer dtype, ``1 <= width <=
    32``) densely into ``ceil(n*width/8)`` uint8 bytes (LSB-first bit stream, see the module
    docstring). Values out of range are a ``ValueError``."""
    width = _check_width(width)
    values = _check_uints_input(values, width)
    if not _fast(values):
        return pack_uints_reference(values, width)
    out = _alloc.empty(packed_size(values.numel(), width), torch.uint8)
    if values.numel():
        _nb().pack_uints(_np(values), width, out.numpy())
    return out


def unpack_uints(
    data: torch.Tensor, n: int, width: int, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """Inverse of :func:`pack_uints`: a tensor of ``n`` values, int64 or (``dtype=
    torch.int32``, for widths up to 31: half the memory traffic) int32."""
    n = _check_n(n)
    width = _check_width(width)
    if dtype not in (torch.int64, torch.int32) or (dtype == torch.int32 and width > 31):
        raise ValueError(f"unpack_uints: dtype {dtype} cannot hold {width}-bit values")
    data = _check_data(data, packed_size(n, width), f"{n} values of width {width}")
    if not _fast(data):
        return unpack_uints_reference(data, n, width).to(dtype)
    res = _alloc.empty(n, dtype)
    if n:
        _nb().unpack_uints(_np(data), width, res.numpy())
    return res
