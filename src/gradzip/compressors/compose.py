"""``compose(S, Q)``: a sparsifier, then a quantizer on the kept values.

Beznosikov, Horvath, Richtarik, Safaryan ("On biased compression for distributed
learning") propose top-k followed by natural dithering. Encoding x of length d:

1. the sparsifier S picks the kept indices and their values v (m = S.kept(d) of them,
   already scaled as S would send them: by d/k for unbiased rand-k, by 1/p_i for
   adaptive sparsification): :meth:`Sparsifier.select`;
2. the quantizer Q (any registered compressor) encodes v, a float32 vector of length m,
   with the same seed, step and worker, into a payload of its own;
3. the payload is S's index section (empty for rand-k, whose indices come from the seed)
   and that nested payload, whole, as the second section.

S's own value format (top-k's ``values=``) plays no part here: Q encodes the values.

Decoding validates the nested payload like any other (its header, checksum, sections), and
also that it is Q's codec with Q's parameters, float32, of shape (m,), with the outer seed,
step and worker; nesting (compose inside a wrapper inside compose...) is limited to
``MAX_DEPTH`` levels.

Properties (Q's constants taken at length m, the length it sees):

- unbiased iff S and Q are; then omega = (1 + omega_S)(1 + omega_Q) - 1 (independent
  randomness: S draws from ``STREAM_INDICES``, quantizers from their own streams);
- S a coordinate projection (top-k, unscaled rand-k): Q(Sx) - Sx lives on the kept
  coordinates and Sx - x on the others, so E||Q(Sx) - x||^2 = E||Q(v) - v||^2 + ||Sx - x||^2
  <= ||x||^2 - E||Sx||^2 / delta_Q, and delta = delta_S delta_Q, where delta_Q is Q's own
  or, for unbiased Q with omega_Q < 1, 1/(1 - omega_Q);
- otherwise, for an unbiased composition with omega < 1, delta = 1/(1 - omega).

The header overhead of the nested payload (``nested_header_bytes``) is part of the bits.
"""

from __future__ import annotations

import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from ..wire import MAX_PARAMS, Payload, PayloadError
from .base import Compressor, EncodeContext, all_finite, nested_header_bytes, read_nested
from .codecs import CODECS, from_spec
from .sparse import Sparsifier, scatter

MAX_DEPTH = 4
_SUB = struct.Struct("<BH")  # codec id, length of its parameters
_state = threading.local()


@contextmanager
def _deeper():
    n = getattr(_state, "depth", 0)
    if n >= MAX_DEPTH:
        raise PayloadError(f"compose: nested deeper than {MAX_DEPTH} levels")
    _state.depth = n + 1
    try:
        yield
    finally:
        _state.depth = n


def _depth(c: Compressor) -> int:
    """Compose levels in c, through any wrapper whose fields are compressors."""
    inner = [getattr(c, f.name) for f in fields(c)]
    sub = max((_depth(v) for v in inner if isinstance(v, Compressor)), default=0)
    return sub + isinstance(c, Compose)


def _sparsifier_names() -> str:
    return ", ".join(c.name for c in CODECS.values() if issubclass(c, Sparsifier))


@dataclass(frozen=True)
class Compose(Compressor):
    """Sparsifier S, then quantizer Q on the kept values (see the module docstring)."""

    sparsifier: Compressor
    quantizer: Compressor

    name: ClassVar[str] = "compose"
    codec_id: ClassVar[int] = 23
    summary: ClassVar[str] = "a sparsifier, then a quantizer on the kept values"

    def __post_init__(self):
        for role in ("sparsifier", "quantizer"):
            v = getattr(self, role)
            if isinstance(v, str):
                object.__setattr__(self, role, from_spec(v))
            elif not isinstance(v, Compressor):
                raise TypeError(f"compose: the {role} must be a compressor, got {type(v).__name__}")
        if not isinstance(self.sparsifier, Sparsifier):
            raise ValueError(
                f"compose: the first argument must be a sparsifier "
                f"({_sparsifier_names()}), got {self.sparsifier.spec!r}"
            )
        if _depth(self) > MAX_DEPTH:
            raise ValueError(f"compose: nested deeper than {MAX_DEPTH} levels")
        if len(self.to_params()) > MAX_PARAMS:
            raise ValueError(
                f"compose: the parameters of {self.spec} take more than {MAX_PARAMS} bytes"
            )

    # --- properties -------------------------------------------------------------------------
    @property
    def unbiased(self) -> bool:
        return self.sparsifier.unbiased and self.quantizer.unbiased

    def omega(self, d: int) -> float | None:
        if not self.unbiased:
            return None
        ws = self.sparsifier.omega(d)
        wq = self.quantizer.omega(self.sparsifier.kept(d))
        if ws is None or wq is None:
            return None
        return (1.0 + ws) * (1.0 + wq) - 1.0

    def delta(self, d: int) -> float | None:
        S, Q = self.sparsifier, self.quantizer
        m = S.kept(d)
        if S.projection:
            ds = S.delta(d)
            dq = Q.delta(m)
            if dq is None and Q.unbiased:
                wq = Q.omega(m)
                dq = 1.0 / (1.0 - wq) if wq is not None and wq < 1 else None
            return ds * dq if ds is not None and dq is not None else None
        w = self.omega(d)
        return 1.0 / (1.0 - w) if w is not None and w < 1 else None

    @property
    def bits_formula(self) -> str:
        q = self.quantizer
        return (
            f"index bits of {self.sparsifier.spec} + (8 * {self.nested_header_bytes()} + "
            f"m * ({q.bits_formula} at d = m)) / d, m = the kept count"
        )

    def nested_header_bytes(self) -> int:
        """Header bytes of the nested payload (shape (m,), Q's parameters and sections)."""
        return nested_header_bytes(self.quantizer)

    def section_lengths(self, d: int) -> list[int]:
        S, q = self.sparsifier, self.quantizer
        m = S.kept(d)
        return [S.index_bytes(d), nested_header_bytes(q) + sum(q.section_lengths(m))]

    # --- header parameters ------------------------------------------------------------------
    def to_params(self) -> bytes:
        out = b""
        for c in (self.sparsifier, self.quantizer):
            raw = c.to_params()
            out += _SUB.pack(c.codec_id, len(raw)) + raw
        return out

    @classmethod
    def from_params(cls, raw: bytes) -> Compose:
        with _deeper():
            parts = []
            off = 0
            for role in ("sparsifier", "quantizer"):
                if len(raw) < off + _SUB.size:
                    raise PayloadError(f"compose: parameters end before the {role}")
                codec, n = _SUB.unpack_from(raw, off)
                off += _SUB.size
                if len(raw) < off + n:
                    raise PayloadError(f"compose: {role} parameters truncated")
                sub_cls = CODECS.get(codec)
                if sub_cls is None:
                    raise PayloadError(f"compose: unknown {role} codec id {codec}")
                if role == "sparsifier" and not issubclass(sub_cls, Sparsifier):
                    raise PayloadError(f"compose: codec {codec} ({sub_cls.name}) is no sparsifier")
                try:
                    parts.append(sub_cls.from_params(raw[off : off + n]))
                except PayloadError:
                    raise
                except (ValueError, TypeError, KeyError, IndexError, struct.error) as e:
                    raise PayloadError(f"compose: invalid {role} parameters: {e}") from None
                off += n
            if off != len(raw):
                raise PayloadError(f"compose: {len(raw) - off} trailing parameter bytes")
            try:
                return cls(*parts)
            except (ValueError, TypeError) as e:
                raise PayloadError(str(e)) from None

    # --- encode / decode --------------------------------------------------------------------
    def _encode(self, ctx: EncodeContext) -> Payload:
        S, Q = self.sparsifier, self.quantizer
        idx, vals = S.select(ctx)
        vals = vals.reshape(-1) if vals.numel() else torch.empty(0)  # strides as Q expects
        nested = Q.encode(vals, seed=ctx.seed, step=ctx.step, worker=ctx.worker)
        lengths = self.section_lengths(ctx.d)
        if nested.nbytes != lengths[1]:
            raise RuntimeError(
                f"compose: {Q.spec} encoded {vals.numel()} values into {nested.nbytes} bytes, "
                f"but its declared section lengths give {lengths[1]}"
            )
        w = ctx.writer(lengths)
        S.pack_indices(idx, ctx.d, w.sections[0])
        w.sections[1].copy_(nested.data)
        return w.finish()

    def _decode(self, p: Payload, device) -> torch.Tensor:
        S, Q = self.sparsifier, self.quantizer
        h = p.header
        d = h.numel
        m = S.kept(d)
        idx = S.unpack_indices(p.section(0), h)
        nested = read_nested(p.section(1), Q, m, h, "compose")
        with _deeper():
            vals = Q.decode(nested)
        if vals.numel() and not all_finite(vals):
            raise PayloadError("compose: the nested payload decodes to non-finite values")
        return scatter(idx, vals.reshape(-1), d, device)


def compose(sparsifier: Compressor | None = None, quantizer: Compressor | None = None) -> Compose:
    """A sparsifier followed by a quantizer on its kept values: ``compose(topk(k=0.01), Q)``.

    Both are compressors (or spec strings). Left out, they default to ``topk(k=0.01)`` and
    ``bf16``, so that ``gradzip.compressor("compose")`` names a working compressor; the
    spec ``compose:topk(k=0.01)+natural_dithering(levels=8)`` is Beznosikov et al.'s.
    """
    if sparsifier is None:
        from .sparse import topk

        sparsifier = topk(k=0.01)
    if quantizer is None:
        from .casts import BF16

        quantizer = BF16()
    return Compose(sparsifier, quantizer)


ENTRIES = [("compose", compose, Compose.summary)]
CODEC_CLASSES = [Compose]
