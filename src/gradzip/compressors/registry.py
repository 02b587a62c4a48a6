"""Registry: spec strings to compressors, codec ids to decoders.

Spec grammar: ``name`` or ``name:key=value,key=value`` (``name(key=value,...)`` also
works). Keys are the factory's keyword arguments; values are parsed by the type of the
default (``true``/``false`` for booleans). Unknown names or keys are errors that list
what is valid.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..wire import MAX_NUMEL, Payload, PayloadError
from . import casts, onebit, signs
from .base import Compressor


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Compressor]
    summary: str

    def defaults(self) -> dict:
        sig = inspect.signature(self.factory)
        return {k: p.default for k, p in sig.parameters.items()}


_ENTRIES: dict[str, Entry] = {}
CODECS: dict[int, type[Compressor]] = {}


def register(name: str, factory: Callable[..., Compressor], summary: str) -> None:
    """Add a compressor under ``name``; its class's codec id becomes decodable."""
    if name in _ENTRIES:
        raise ValueError(f"compressor {name!r} is already registered")
    cls = type(factory())
    if CODECS.get(cls.codec_id, cls) is not cls:
        raise ValueError(f"codec id {cls.codec_id} of {name!r} is taken by {CODECS[cls.codec_id]}")
    _ENTRIES[name] = Entry(name, factory, summary)
    CODECS[cls.codec_id] = cls


def names() -> list[str]:
    return list(_ENTRIES)


_SPEC = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?::(.*)|\((.*)\))?\s*$")


def _convert(name: str, key: str, raw: str, default):
    raw = raw.strip()
    try:
        if isinstance(default, bool):
            low = raw.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(
            f"compressor {name!r}: {key}={raw!r} is not a valid {type(default).__name__}"
        ) from None
    return raw


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split a spec string into its name and raw ``key=value`` strings."""
    m = _SPEC.match(spec)
    if not m:
        raise ValueError(
            f"malformed compressor spec {spec!r} (expected name or name:key=value,...)"
        )
    name, args = m.group(1), m.group(2) if m.group(2) is not None else m.group(3)
    kwargs: dict[str, str] = {}
    for part in filter(None, (a.strip() for a in (args or "").split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"malformed argument {part!r} in compressor spec {spec!r}")
        kwargs[key.strip()] = value
    return name, kwargs


def compressor(spec: str | Compressor, **overrides) -> Compressor:
    """Make a compressor from a spec string such as ``"fosgd"`` or ``"onebit:scale=norm"``."""
    if isinstance(spec, Compressor):
        if overrides:
            raise ValueError("overrides apply to spec strings, not to compressor objects")
        return spec
    name, raw = parse_spec(spec)
    if name not in _ENTRIES:
        raise ValueError(f"unknown compressor {name!r}; available: {', '.join(_ENTRIES)}")
    entry = _ENTRIES[name]
    defaults = entry.defaults()
    for key in list(raw) + list(overrides):
        if key not in defaults:
            valid = ", ".join(defaults) or "none"
            raise ValueError(f"compressor {name!r} has no parameter {key!r} (valid: {valid})")
    kwargs = {k: _convert(name, k, v, defaults[k]) for k, v in raw.items()}
    kwargs.update(overrides)
    return entry.factory(**kwargs)


def available_compressors(d: int = 1 << 20) -> list[dict]:
    """Every registered compressor with its parameters and properties (at length ``d``)."""
    out = []
    for e in _ENTRIES.values():
        c = e.factory()
        out.append(
            {
                "name": e.name,
                "summary": e.summary,
                "params": e.defaults(),
                "unbiased": c.unbiased,
                "bits_per_coordinate": c.bits_per_coordinate(d),
            }
        )
    return out


def decode(data, device=None, *, max_numel: int = MAX_NUMEL) -> torch.Tensor:
    """Decode any payload (bytes or uint8 tensor) without a compressor object."""
    p = data if isinstance(data, Payload) else Payload.from_bytes(data, max_numel=max_numel)
    cls = CODECS.get(p.header.codec)
    if cls is None:
        raise PayloadError(f"unknown codec id {p.header.codec} (known: {sorted(CODECS)})")
    return cls.from_params(p.header.params).decode(p, device=device)


register("identity", casts.Identity, casts.Identity.summary)
register("fp16", casts.FP16, casts.FP16.summary)
register("bf16", casts.BF16, casts.BF16.summary)
register("onebit", onebit.onebit, "dithered one-bit quantizer, no flattening by default")
register("fosgd", onebit.fosgd, "FO-SGD: Hadamard flattening + dithered one-bit, norm scale")
register("sign", signs.Sign, signs.Sign.summary)
register("scaled_sign", signs.ScaledSign, signs.ScaledSign.summary)
register("drive", signs.Drive, signs.Drive.summary)
