"""What every compressor is: a value with ``encode(x, seed) -> Payload`` and ``decode``.

A compressor owns no hidden state (error memories and the like are explicit state
objects elsewhere). Its parameters are dataclass fields; the registry reads them to
parse spec strings, and ``to_params``/``from_params`` put them in the payload header so
that :func:`gradzip.decode` can rebuild the compressor from the bytes alone.

A subclass implements ``_encode(ctx)`` (fill sections through ``ctx.writer``) and
``_decode(payload, device)`` (return the flat float tensor), declares ``codec_id`` and
``name``, and states ``unbiased`` and ``bits_per_coordinate(d)``.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import torch

from .. import rng
from ..wire import DTYPE_CODES, MAX_NUMEL, PREFIX, Payload, PayloadError, PayloadWriter


class NonFiniteError(ValueError):
    """The input to ``encode`` holds NaN or inf (training uses it to detect divergence)."""


class EncodeContext:
    """Everything about one ``encode`` call: the input and its shared randomness."""

    def __init__(self, compressor, x: torch.Tensor, seed: int, step: int, worker: int):
        self.compressor = compressor
        self.shape = tuple(x.shape)
        self.dtype = x.dtype
        self.seed, self.step, self.worker = seed, step, worker
        self.flat = x.detach().reshape(-1).contiguous()  # original dtype
        self.d = self.flat.numel()
        self.device = x.device
        self._f32 = None
        self._stats = None

    def key(self, stream: int) -> int:
        return rng.derive_key(self.seed, self.step, self.worker, stream)

    def f32(self) -> torch.Tensor:
        """The input as a flat float32 tensor (no copy when it already is one)."""
        if self._f32 is None:
            self._f32 = self.flat.to(torch.float32)
        return self._f32

    def stats(self) -> tuple[float, float, float]:
        """``(||x||_2^2, ||x||_inf, ||x||_1)``, one pass; ``ValueError`` on NaN or inf."""
        if self._stats is None:
            src = self.f32() if self.flat.dtype != torch.float64 else self.flat
            if src.device.type == "cpu" and src.dtype == torch.float32 and src.numel():
                from .._numba.onebit import stats32

                sq, mx, l1 = stats32(src.numpy())
            elif src.numel() == 0:
                sq = mx = l1 = 0.0
            else:
                s = src.to(torch.float64)
                sq, mx, l1 = float(s.square().sum()), float(s.abs().max()), float(s.abs().sum())
            if not (math.isfinite(sq) and math.isfinite(mx)):
                bad = int((~torch.isfinite(src)).sum())
                raise NonFiniteError(
                    f"{self.compressor.name}: input has {bad} non-finite value(s) (NaN or inf) "
                    f"out of {self.d}; a gradient must be finite to be compressed"
                )
            self._stats = (float(sq), float(mx), float(l1))
        return self._stats

    def writer(self, section_lengths) -> PayloadWriter:
        c = self.compressor
        return PayloadWriter(
            c.codec_id, self.dtype, self.shape, section_lengths,
            seed=self.seed, step=self.step, worker=self.worker, params=c.to_params(),
        )  # fmt: skip


@dataclass(frozen=True)
class Compressor:
    """Base class of all compressors (see the module docstring)."""

    name: ClassVar[str] = "?"
    codec_id: ClassVar[int] = 0
    summary: ClassVar[str] = ""
    #: payload bits per coordinate as a formula of d (and parameters), header excluded
    bits_formula: ClassVar[str] = "?"

    # --- properties a subclass states -------------------------------------------------
    @property
    def unbiased(self) -> bool:
        raise NotImplementedError(f"{type(self).__name__} must state whether it is unbiased")

    def omega(self, d: int) -> float | None:
        """Variance bound of an unbiased compressor: E||C(x) - x||^2 <= omega ||x||^2.

        ``None`` when the compressor is biased or no bound is stated.
        """
        return None

    def delta(self, d: int) -> float | None:
        """Class B3 constant: E||C(x) - x||^2 <= (1 - 1/delta) ||x||^2 for every x.

        ``None`` when the compressor is in no class B3 (or no constant is stated).
        """
        return None

    @property
    def exact_inner_product(self) -> bool:
        """Whether the decoded vector has <C(x), x> = ||x||^2 for every draw whose bits
        correlate with x (a scale fitted by the sender, as DRIVE's): the direction is
        compressed, the step length along x is kept."""
        return False

    def bits_per_coordinate(self, d: int) -> float:
        """Payload bits per coordinate for a d-vector, header excluded (exact)."""
        return 8 * sum(self.section_lengths(d)) / max(d, 1)

    def section_lengths(self, d: int) -> list[int]:
        raise NotImplementedError(f"{type(self).__name__} must declare its section lengths")

    def expected_sections(self, header) -> list[int]:
        """The section lengths a valid payload with this header has."""
        return self.section_lengths(header.numel)

    # --- header parameters -------------------------------------------------------------
    def to_params(self) -> bytes:
        return b""

    @classmethod
    def from_params(cls, raw: bytes) -> Compressor:
        if raw:
            raise PayloadError(f"{cls.name}: expected no codec parameters, got {len(raw)} bytes")
        return cls()

    @property
    def spec(self) -> str:
        """The registry spec string that makes this compressor."""
        args = ",".join(f"{f.name}={_fmt(getattr(self, f.name))}" for f in fields(self))
        return f"{self.name}({args})" if args else self.name

    def __str__(self) -> str:
        return self.spec

    # --- encode / decode ---------------------------------------------------------------
    def encode(self, x: torch.Tensor, seed: int = 0, step: int = 0, worker: int = 0) -> Payload:
        """Compress ``x`` (any shape, any float dtype). Randomness comes from the integers."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in DTYPE_CODES:
            raise TypeError(
                f"{self.name}: cannot compress a {x.dtype} tensor "
                f"(supported: {', '.join(str(t) for t in DTYPE_CODES)})"
            )
        if x.numel() > MAX_NUMEL:
            raise ValueError(f"{self.name}: {x.numel()} elements exceed the cap of {MAX_NUMEL}")
        ctx = EncodeContext(self, x, seed, step, worker)
        ctx.stats()  # validates finiteness before any work
        return self._encode(ctx)

    def decode(self, payload, device=None) -> torch.Tensor:
        """Decompress a payload (a :class:`Payload`, bytes, or a uint8 tensor)."""
        p = payload if isinstance(payload, Payload) else Payload.from_bytes(payload)
        h = p.header
        out = self.codec_of(p)._decode(p, torch.device(device) if device is not None else None)
        return out.reshape(h.shape).to(h.dtype)

    def codec_of(self, p: Payload) -> Compressor:
        """The compressor that made ``p`` (this one, or this codec with the parameters of
        ``p``'s header), once the header's codec, parameters and sections are checked."""
        h = p.header
        if h.codec != self.codec_id:
            raise PayloadError(
                f"{self.name} (codec {self.codec_id}) cannot decode a payload of codec {h.codec}"
            )
        codec = self if h.params == self.to_params() else type(self).from_params(h.params)
        expected = codec.expected_sections(h)
        if list(h.section_lengths) != list(expected):
            raise PayloadError(
                f"{self.name}: sections of {list(h.section_lengths)} bytes do not match the "
                f"{expected} that {h.numel} elements need"
            )
        return codec

    def _encode(self, ctx: EncodeContext) -> Payload:
        raise NotImplementedError

    def _decode(self, p: Payload, device) -> torch.Tensor:
        raise NotImplementedError


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return v.spec if isinstance(v, Compressor) else str(v)


def read_f32(section: torch.Tensor, n: int, what: str) -> tuple[float, ...]:
    """``n`` float32 scalars from a section, validated finite and non-negative."""
    vals = struct.unpack(f"<{n}f", section.numpy().tobytes())
    for v in vals:
        if not (math.isfinite(v) and v >= 0):
            raise PayloadError(f"{what}: scalar {v} must be finite and non-negative")
    return vals


# --- payloads nested in another compressor's section (scaled, compose) ---------------------


def nested_header_bytes(inner: Compressor) -> int:
    """Header bytes of ``inner``'s payload for a 1-D vector, nested in a section."""
    return PREFIX.size + 8 + len(inner.to_params()) + 8 * len(inner.section_lengths(0))


def read_nested(raw: torch.Tensor, inner: Compressor, n: int, outer, who: str) -> Payload:
    """Parse and check the payload of ``inner`` nested in ``raw``: ``inner``'s codec and
    parameters, float32 of shape ``(n,)``, and the outer header's seed, step and worker.
    Anything else is a ``PayloadError`` naming ``who``."""
    nested = Payload.from_bytes(raw, max_numel=max(n, 1))
    nh = nested.header
    problems = []
    if nh.codec != inner.codec_id:
        problems.append(f"codec {nh.codec}, expected {inner.codec_id} ({inner.name})")
    if nh.params != inner.to_params():
        problems.append("parameters differ from the outer header's")
    if nh.dtype != torch.float32 or nh.shape != (n,):
        problems.append(f"{nh.dtype} of shape {nh.shape}, expected float32 of shape ({n},)")
    if (nh.seed, nh.step, nh.worker) != (outer.seed, outer.step, outer.worker):
        problems.append("seed, step or worker differ from the outer header's")
    if problems:
        raise PayloadError(f"{who}: nested payload: " + "; ".join(problems))
    return nested


# --- decoded values from untrusted bytes ----------------------------------------------------


def all_finite(values: torch.Tensor) -> bool:
    """True when ``values`` holds no NaN or inf (fast paths for CPU float tensors)."""
    if values.numel() == 0:
        return True
    if values.dtype == torch.float32 and values.device.type == "cpu":
        from .._numba.onebit import stats32

        sq, mx, _ = stats32(values.numpy())  # one parallel pass; NaN/inf make these non-finite
        return math.isfinite(sq) and math.isfinite(mx)
    if values.device.type == "cpu" and values.dtype in (torch.float64, torch.float16):
        # numpy: torch's multithreaded reduction stalls when another job holds a core
        return bool(np.isfinite(values.numpy()).all())
    return bool(torch.isfinite(values).all())


def check_finite(name: str, values: torch.Tensor) -> torch.Tensor:
    """Untrusted bytes may spell NaN or inf; a gradient never does, so refuse them."""
    if not all_finite(values):
        raise PayloadError(f"{name}: payload carries non-finite values")
    return values
