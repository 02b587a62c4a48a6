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
results agree bit for bit. Calls on fewer than :data:`SERIAL_BELOW` elements stay on the
calling thread.

Two fused CPU float32 paths serve FO-SGD (lengths a power of two, ``2**16`` and up), the
codec of :mod:`gradzip._numba.fused_onebit`: :func:`rotate_quantize_` computes the dithered
one-bit bits of ``Phi x`` in two passes over memory, taking ``||x||_2`` on the way (the
``norm`` scale rule needs nothing else), and :func:`unrotate_signs` computes
``Phi^T (lam * b)`` straight from the packed bits. Each equals its unfused composition of
references bit for bit. Here they check their tensors and hand the arrays to the codec.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from . import _alloc, rng

__all__ = [
    "can_rotate_quantize",
    "can_unrotate_signs",
    "fwht_",
    "fwht_reference",
    "rotate",
    "rotate_quantize_",
    "rotate_reference",
    "rotation_block",
    "unrotate",
    "unrotate_reference",
    "unrotate_signs",
]

_FAST_DTYPES = (torch.float32, torch.float64)
#: Below this many elements in one call, the fast path runs on the calling thread only.
SERIAL_BELOW = 1 << 16
#: log2 of the smallest single segment that :func:`_transform_threaded` runs on gradzip's
#: pool: below it, dispatching the pieces costs more than numba's prange (docs/perf.md).
POOLED_FROM = 23


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


def _reference_start(x: torch.Tensor, key: int):
    """``(z, d, B, w1, w2, scale)`` of the references: ``z`` a copy of ``x`` in the compute
    dtype, ``d`` its length, ``B = rotation_block(d)`` and :func:`_step_weights`."""
    d = _check_vector(x)
    B = rotation_block(d)
    dtype = _compute_dtype(x.dtype)
    w1, w2, scale = _step_weights(key, B, dtype, x.device)
    return x.to(dtype).clone(), d, B, w1, w2, scale


def rotate_reference(x: torch.Tensor, key: int) -> torch.Tensor:
    """``Phi x`` along the last dimension, pure torch (see the module docstring)."""
    z, d, B, w1, w2, _ = _reference_start(x, key)
    z[..., :B] = fwht_reference(z[..., :B] * w1)
    if d > B:
        z[..., d - B :] = fwht_reference(z[..., d - B :] * w2)
    return z


def unrotate_reference(y: torch.Tensor, key: int) -> torch.Tensor:
    """``Phi^T y`` (the inverse of :func:`rotate_reference`), pure torch."""
    z, d, B, w1, w2, scale = _reference_start(y, key)
    s1, s2 = w1 / scale, w2 / scale  # exactly +-1
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


def _codec():
    from ._numba import fused_onebit

    return fused_onebit


def _transform(numel: int):
    """The kernel for a call on ``numel`` elements: threaded, or serial if small.

    Small calls never enter a thread region: waking a pool costs more than their whole
    transform, and under CPU contention a call can wait milliseconds for a worker.
    """
    k = _kernel()
    return k.transform_serial if numel < SERIAL_BELOW else _transform_threaded


def _transform_threaded(src, soff, sstride, dst, doff, dstride, nseg, m, mode, k0, k1, sb, sc, tab):
    """``fwht.transform`` (same arguments and results), with one large segment done by
    :func:`gradzip._numba.parallel.run_pieces` on gradzip's thread pool instead of numba's
    ``prange``.

    numba's OpenMP workers spin for milliseconds after a parallel region and took a core
    from the thread pool the quantizer that follows runs on (docs/perf.md); one pool for
    every pass avoids that.
    An out-of-place pass 1 streams its rows out (see ``fwht.rows_pass``).
    """
    from ._numba.parallel import run_pieces, worker_buffers

    k = _kernel()
    if nseg != 1 or m < POOLED_FROM or not k.two_pass(m, dst.itemsize):
        k.transform(src, soff, sstride, dst, doff, dstride, nseg, m, mode, k0, k1, sb, sc, tab)
        return
    n = 1 << m
    L, R, C = k.grid(m, dst.itemsize)
    s_at = src.ctypes.data + soff * src.itemsize
    d_at = dst.ctypes.data + doff * dst.itemsize
    stream = s_at != d_at and d_at % 32 == 0
    rows = worker_buffers("rows", L, dst.dtype)
    run_pieces(
        n,
        L,
        lambda w, i, j: k.rows_pass(
            src, soff, dst, doff, rows[w], stream, m, mode, k0, k1, sb, sc, tab, i, j
        ),
    )
    post = mode == k.UNROTATE
    run_pieces(
        n,
        n // (L // C),
        lambda w, i, j: k.cols_pass(dst, doff, m, post, k0, k1, sb, tab, i, j),
    )


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
            t = _transform(a.size)
            t(a, 0, n, a, 0, n, nseg, m, k.PLAIN, 0, 0, 0, one, _table(x.dtype))
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


def _key64(key: int) -> int:
    """``key``, checked to be a 64-bit key."""
    if isinstance(key, bool) or not isinstance(key, int | np.integer) or not 0 <= key <= rng.MASK64:
        raise ValueError(f"key must be an integer in [0, 2**64), got {key!r}")
    return int(key)


def _split_key(key: int) -> tuple[int, int]:
    key = _key64(key)
    return key & rng.MASK32, key >> 32


def _use_fast(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"


def _rotate_cpu(x: torch.Tensor, key: int, out: torch.Tensor | None, inverse: bool):
    """:func:`rotate` (or with ``inverse``, :func:`unrotate`) on the numba kernel."""
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
    t = _transform(rows * d)
    mode = k.UNROTATE if inverse else k.ROTATE

    def step(src, off: int, sbase: int) -> None:
        """One orthonormal step: the block of ``B`` at ``off`` of every row, into ``out``."""
        t(src, off, d, o, off, d, rows, m, mode, k0, k1, sbase, scale, tab)

    def keep(cols: slice) -> None:
        """The coordinates the first step leaves alone, into ``out`` (unless in place)."""
        if o2.data_ptr() != x2.data_ptr():
            o2[:, cols].copy_(x2[:, cols])

    if d == B:
        step(a, 0, 0)
    elif not inverse:  # the head with s1, then the tail with s2 (the module docstring)
        step(a, 0, 0)
        keep(slice(B, None))
        step(o, d - B, B)
    else:  # backwards: the tail, then the head
        step(a, d - B, B)
        keep(slice(None, d - B))
        step(o, 0, 0)
    return out


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
    return _rotate_cpu(x, key, out, inverse=False)


def unrotate(y: torch.Tensor, key: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``Phi^T y``, the exact inverse of :func:`rotate` (same conventions)."""
    if not _use_fast(y):
        z = unrotate_reference(y, key)
        return z if out is None else out.copy_(z)
    return _rotate_cpu(y, key, out, inverse=True)


# ---------------------------------------------------------------------------------------
# The fused one-bit codec of FO-SGD (CPU float32; gradzip._numba.fused_onebit)
# ---------------------------------------------------------------------------------------


def can_rotate_quantize(x: torch.Tensor) -> bool:
    """Whether :func:`rotate_quantize_` takes ``x``: a contiguous 1-D CPU float32 tensor whose
    length is a power of two large enough for the two-pass (rows, column chunks) transform
    (``2**16`` and up). Anything else goes the unfused way (rotate, then quantize)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 1
        and x.is_contiguous()
        and _codec().fused_ok(x.numel())
    )


def rotate_quantize_(
    x: torch.Tensor,
    key: int,
    scale_of: Callable[[float, bool], float],
    dither_key: int,
    out: torch.Tensor | np.ndarray,
    scratch: torch.Tensor | None = None,
    with_inner: bool = False,
) -> float | tuple[float, float]:
    """The dithered one-bit quantization of ``Phi x``, fused with the rotation; returns lambda
    (with ``with_inner``: ``(lambda, <b, Phi x>)``, b = +-1 the signs sent, in float64).

    ``out`` (uint8, ``len(x) / 8`` bytes, a CPU tensor or a numpy array) receives the
    packed bits ``Phi x + lam * u < 0`` with ``u = rng.dither16(dither_key, len(x))`` (bit
    ``j`` of byte ``i`` for element ``8 i + j``), exactly the bits of
    ``quantize_reference(rotate_reference(x, key), lam, dither_key)`` in
    :mod:`gradzip.compressors.onebit`. ``lam = scale_of(sq, finite)`` is
    chosen between the two passes from ``sq = ||x||_2**2`` (float64; the rotation preserves
    it, so the ``norm`` scale rule needs nothing else) and ``finite`` (no NaN or inf in
    ``x``, exactly when ``sq`` is finite); ``scale_of`` raises to refuse the input, and then
    ``out`` is left untouched. ``lam`` must be a float32 value.

    Compared with ``stats``, ``rotate`` and ``quantize_`` in a row it saves three passes
    over memory (see :mod:`gradzip._numba.fused_onebit`). ``scratch`` holds pass 1's result:
    a float32 tensor of at least :func:`fused_scratch_numel` ``(len(x))`` elements, 32-byte
    aligned; otherwise (and by default) a reused per-thread buffer is used.
    ``x`` must satisfy :func:`can_rotate_quantize`.
    """
    if not can_rotate_quantize(x):
        raise ValueError("rotate_quantize_ needs a contiguous 1-D CPU float32 power-of-two x")
    d = x.numel()
    o = out.numpy() if isinstance(out, torch.Tensor) and out.device.type == "cpu" else out
    if not (isinstance(o, np.ndarray) and o.dtype == np.uint8 and o.shape == (d // 8,)):
        raise ValueError(f"out must be a uint8 CPU tensor or array of {d // 8} bytes")
    if not o.flags.c_contiguous:
        raise ValueError("out must be contiguous")
    m = d.bit_length() - 1
    size = fused_scratch_numel(d)
    if scratch is None or scratch.numel() < size or scratch.data_ptr() % 32:
        y = _alloc.scratch_array(size)  # pass 1 streams rows into it
    else:
        y = scratch.detach().view(-1)[:size].numpy()
    k0, k1 = _split_key(key)
    dk = np.uint64(_key64(dither_key))
    a = x.detach().numpy()
    return _codec().rotate_quantize(a, y, m, k0, k1, scale_of, dk, o, with_inner)


def fused_scratch_numel(n: int) -> int:
    """Elements of the intermediate of the fused encoder and decoder for a length ``n`` that
    :func:`can_unrotate_signs` takes: ``n`` and one cache line of padding per row and
    column block (1.6% at 2**21 and up)."""
    return _codec().scratch_size(n.bit_length() - 1)


def can_unrotate_signs(n: int) -> bool:
    """Whether :func:`unrotate_signs` fuses for length ``n`` (a power of two >= ``2**16``)."""
    return _codec().fused_ok(n)


def unrotate_signs(
    data: torch.Tensor, n: int, lam: float, key: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``Phi^T (lam * b)`` for the ``n`` signs ``b`` packed in ``data``, fused (CPU float32).

    Equals ``unrotate_reference(bits.unpack_signs_reference(data, n, lam), key)`` bit for
    bit (``b = -1`` where the bit is set), without unpacking the signs into memory: the
    first pass of the inverse rotation builds its input from the bits in registers (see
    :mod:`gradzip._numba.fused_onebit`). ``lam`` is a float32 value; ``n`` must satisfy
    :func:`can_unrotate_signs`; ``out`` (float32, ``n`` elements, contiguous) receives the
    result; where it is 32-byte aligned, the last pass streams into it with non-temporal
    stores (no line of ``out`` is read first).
    """
    if not can_unrotate_signs(n):
        raise ValueError(f"unrotate_signs needs a power-of-two n >= 2**16, got {n}")
    if data.dtype != torch.uint8 or data.numel() != n // 8 or data.device.type != "cpu":
        raise ValueError(f"data must be {n // 8} CPU uint8 bytes")
    if out is None:
        out = _alloc.empty(n)
    elif out.dtype != torch.float32 or out.numel() != n or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of {n} elements")
    m = n.bit_length() - 1
    k0, k1 = _split_key(key)
    o = out.detach().view(-1).numpy()
    tab = _table(torch.float32)
    _codec().unrotate_signs(data.contiguous().numpy(), o, m, lam, k0, k1, tab)
    return out
