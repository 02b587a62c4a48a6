"""Walsh-Hadamard transform and the randomized rotation Phi used for flattening (DESIGN 3.1).

The rotation
------------
For a vector of any length ``d >= 1`` let ``B = rotation_block(d) = 2**floor(log2 d)`` (so
``B <= d < 2B``), ``H_B`` the (unnormalized, Sylvester / natural order) Walsh-Hadamard
matrix, and ``s = rng.rademacher(key, 2B)`` split as ``s1 = s[:B]``, ``s2 = s[B:]``.

- ``d == B``: ``Phi x = H_B (s1 * x) / sqrt(B)``.
- ``B < d < 2B``: two *overlapping* power-of-two blocks. First the head,
  ``z[0:B] = H_B (s1 * x[0:B]) / sqrt(B)``, ``z[B:d] = x[B:d]``; then the tail,
  ``z[d-B:d] = H_B (s2 * z[d-B:d]) / sqrt(B)``; ``Phi x = z``.

Each step is an orthonormal map on its ``B`` coordinates (identity on the others), so ``Phi``
is orthonormal and ``Phi^T`` runs the steps backwards with ``s * H_B(.) / sqrt(B)``.

Why this shape:

- *Zero padding bits.* Padding to ``2**ceil(log2 d)`` would send up to ``2d`` values; here
  exactly ``d`` values go on the wire, whatever ``d``.
- *Flattening.* Every output coordinate is, in the last step that wrote it, a sum
  ``sum_i +-v_i / sqrt(B)`` with independent Rademacher signs (``s1`` for ``[0, d-B)``,
  ``s2`` for ``[d-B, d)``) applied to a vector ``v`` of norm ``||x||_2`` that is independent of
  those signs (``v`` depends on ``s1`` only, never on ``s2``). Hoeffding gives
  ``P(|(Phi x)_i| > t) <= 2 exp(-t**2 B / (2 ||x||_2**2))`` and a union bound over the ``d``
  coordinates: with probability at least ``1 - delta``,
  ``||Phi x||_inf <= ||x||_2 sqrt(2 ln(2d/delta) / B)``; since ``B > d/2`` this is within a
  factor ``sqrt(2)`` of the bound for a padded transform of the same vector.
- *Cost.* Two transforms of size ``B <= d`` (one when ``d`` is a power of two), i.e.
  ``O(d log d)`` and, on the CPU fast path, about four passes over memory (two when ``d``
  is a power of two).

Paths
-----
``*_reference`` functions are pure torch (any device, any float dtype; this is the CUDA path)
and the test oracle. :func:`fwht_`, :func:`rotate` and :func:`unrotate` use the numba kernel
of :mod:`gradzip._numba.fwht` for CPU float32/float64 tensors and the reference otherwise.
Both paths do the same floating-point operations in the same order (sign flip, multiply
by ``fl(1/sqrt(B))``, butterflies ``(a + b, a - b)`` at stride 1, 2, 4, ...), so their
results agree bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import rng

__all__ = [
    "fwht_",
    "fwht_reference",
    "rotate",
    "rotate_reference",
    "rotation_block",
    "unrotate",
    "unrotate_reference",
]

_FAST_DTYPES = (torch.float32, torch.float64)


def _log2_exact(n: int) -> int:
    if n < 1 or n & (n - 1):
        raise ValueError(f"the last dimension must be a power of two, got {n}")
    return n.bit_length() - 1


def rotation_block(d: int) -> int:
    """``B = 2**floor(log2 d)``, the transform size used by the rotation of length ``d >= 1``."""
    if isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 1:
        raise ValueError(f"d must be an integer >= 1, got {d!r}")
    return 1 << (int(d).bit_length() - 1)


# ---------------------------------------------------------------------------------------
# Pure-torch reference (also the CUDA path)
# ---------------------------------------------------------------------------------------


def fwht_reference(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform along the last dimension (out of place).

    Natural (Sylvester) order: equals ``x @ scipy.linalg.hadamard(n)``. The last dimension
    must be a power of two; leading dimensions are a batch. Any float dtype, any device.
    """
    n = x.shape[-1]
    _log2_exact(n)
    batch = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        # Pairs (j, j + h) inside consecutive blocks of 2h: the butterfly of stride h.
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*batch, n) if h > 1 else y.reshape(*batch, n).clone()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in _FAST_DTYPES else torch.float32


def _step_weights(
    key: int, B: int, dtype, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s1 * scale, s2 * scale, scale)`` as tensors of ``dtype``, ``scale = fl(1/sqrt(B))``."""
    scale = torch.tensor(1.0 / math.sqrt(B), dtype=dtype, device=device)
    s = rng.rademacher(key, 2 * B, device=device, dtype=dtype)
    return s[:B] * scale, s[B:] * scale, scale


def _check_vector(x: torch.Tensor) -> int:
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("expected at least one dimension (the vector)")
    d = x.shape[-1]
    if d < 1:
        raise ValueError("the last dimension must be at least 1")
    return d


def rotate_reference(x: torch.Tensor, key: int) -> torch.Tensor:
    """``Phi x`` along the last dimension, pure torch (see the module docstring)."""
    d = _check_vector(x)
    B = rotation_block(d)
    dtype = _compute_dtype(x.dtype)
    w1, w2, _ = _step_weights(key, B, dtype, x.device)
    z = x.to(dtype).clone()
    z[..., :B] = fwht_reference(z[..., :B] * w1)
    if d > B:
        z[..., d - B :] = fwht_reference(z[..., d - B :] * w2)
    return z


def unrotate_reference(y: torch.Tensor, key: int) -> torch.Tensor:
    """``Phi^T y`` (the inverse of :func:`rotate_reference`), pure torch."""
    d = _check_vector(y)
    B = rotation_block(d)
    dtype = _compute_dtype(y.dtype)
    w1, w2, scale = _step_weights(key, B, dtype, y.device)
    s1, s2 = w1 / scale, w2 / scale  # exactly +-1
    z = y.to(dtype).clone()
    if d > B:
        z[..., d - B :] = fwht_reference(z[..., d - B :] * scale) * s2
    z[..., :B] = fwht_reference(z[..., :B] * scale) * s1
    return z


# ---------------------------------------------------------------------------------------
# Fast path (numba, CPU float32/float64)
# ---------------------------------------------------------------------------------------

_TABLES: dict[torch.dtype, np.ndarray] = {}


def _kernel():
    from ._numba import fwht

    return fwht


def _table(dtype: torch.dtype) -> np.ndarray:
    tab = _TABLES.get(dtype)
    if tab is None:
        tab = _TABLES[dtype] = _kernel().sign_table(
            np.float32 if dtype == torch.float32 else np.float64
        )
    return tab


def _np_scalar(value: float, dtype: torch.dtype):
    return np.float32(value) if dtype == torch.float32 else np.float64(value)


def fwht_(x: torch.Tensor) -> torch.Tensor:
    """In-place unnormalized Walsh-Hadamard transform along the last dimension; returns ``x``.

    The last dimension must be a power of two (leading dimensions are a batch). Contiguous
    CPU float32/float64 tensors use the numba kernel; anything else goes through
    :func:`fwht_reference` and is copied back.
    """
    n = x.shape[-1] if x.dim() else 0
    m = _log2_exact(n)
    if x.device.type == "cpu" and x.dtype in _FAST_DTYPES and x.is_contiguous():
        nseg = x.numel() // n
        if nseg:
            a = x.detach().view(-1).numpy()
            k = _kernel()
            one = _np_scalar(1.0, x.dtype)
            k.transform(a, 0, n, a, 0, n, nseg, m, k.PLAIN, 0, 0, 0, one, _table(x.dtype))
        return x
    with torch.no_grad():
        x.copy_(fwht_reference(x))
    return x


def _prepare(
    x: torch.Tensor, out: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x2, out, out2)``: x as a contiguous ``[rows, d]`` tensor of the compute dtype, and out."""
    d = _check_vector(x)
    dtype = _compute_dtype(x.dtype)
    x2 = x.detach().reshape(-1, d)
    if x2.dtype != dtype:
        x2 = x2.to(dtype)
    x2 = x2.contiguous()
    if out is None:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    else:
        if out.shape != x.shape or out.dtype != dtype or out.device != x.device:
            raise ValueError(
                f"out must have shape {tuple(x.shape)}, dtype {dtype} and device {x.device}; got "
                f"{tuple(out.shape)}, {out.dtype}, {out.device}"
            )
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    return x2, out, out.detach().view(-1, d)


def _split_key(key: int) -> tuple[int, int]:
    if isinstance(key, bool) or not isinstance(key, int | np.integer) or not 0 <= key <= rng.MASK64:
        raise ValueError(f"key must be an integer in [0, 2**64), got {key!r}")
    key = int(key)
    return key & rng.MASK32, key >> 32


def _use_fast(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"


def rotate(x: torch.Tensor, key: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``Phi x`` along the last dimension (any length ``d >= 1``; see the module docstring).

    Leading dimensions are a batch, all rows rotated with the same signs. float32/float64 in,
    same dtype out; other float dtypes are computed in, and returned as, float32. ``out``
    (contiguous, the result's shape and dtype) receives the result and is returned; it may
    be ``x`` itself but must not partially overlap it. Deterministic in ``key``.
    """
    if not _use_fast(x):
        z = rotate_reference(x, key)
        return z if out is None else out.copy_(z)
    x2, out, o2 = _prepare(x, out)
    d = x2.shape[1]
    if x2.shape[0] == 0:
        return out
    B = rotation_block(d)
    m = B.bit_length() - 1
    k = _kernel()
    k0, k1 = _split_key(key)
    scale = _np_scalar(1.0 / math.sqrt(B), out.dtype)
    tab = _table(out.dtype)
    a, o = x2.view(-1).numpy(), o2.view(-1).numpy()
    rows = x2.shape[0]
    k.transform(a, 0, d, o, 0, d, rows, m, k.ROTATE, k0, k1, 0, scale, tab)
    if d > B:
        if o2.data_ptr() != x2.data_ptr():
            o2[:, B:].copy_(x2[:, B:])
        k.transform(o, d - B, d, o, d - B, d, rows, m, k.ROTATE, k0, k1, B, scale, tab)
    return out


def unrotate(y: torch.Tensor, key: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``Phi^T y``, the exact inverse of :func:`rotate` (same conventions)."""
    if not _use_fast(y):
        z = unrotate_reference(y, key)
        return z if out is None else out.copy_(z)
    y2, out, o2 = _prepare(y, out)
    d = y2.shape[1]
    if y2.shape[0] == 0:
        return out
    B = rotation_block(d)
    m = B.bit_length() - 1
    k = _kernel()
    k0, k1 = _split_key(key)
    scale = _np_scalar(1.0 / math.sqrt(B), out.dtype)
    tab = _table(out.dtype)
    a, o = y2.view(-1).numpy(), o2.view(-1).numpy()
    rows = y2.shape[0]
    if d > B:
        k.transform(a, d - B, d, o, d - B, d, rows, m, k.UNROTATE, k0, k1, B, scale, tab)
        if o2.data_ptr() != y2.data_ptr():
            o2[:, : d - B].copy_(y2[:, : d - B])
        k.transform(o, 0, d, o, 0, d, rows, m, k.UNROTATE, k0, k1, 0, scale, tab)
    else:
        k.transform(a, 0, d, o, 0, d, rows, m, k.UNROTATE, k0, k1, 0, scale, tab)
    return out
