"""Registry: spec strings to compressors, codec ids to decoders.

Spec grammar (whitespace is ignored)::

    spec  := name | name ":" args | name "(" [args] ")"
    args  := arg (("," | "+") arg)*
    arg   := key "=" value | key "=" spec | spec

Keyword values are parsed by the type of the factory's default (``true``/``false`` for
booleans); positional ``spec`` arguments are compressors handed to wrappers in order.
Examples: ``fosgd``, ``onebit:scale=norm,flatten=true``, ``qsgd(levels=16)``,
``scaled(qsgd(levels=4))``, ``compose:topk(k=0.01)+natural_dithering(levels=8)``.
Unknown names or keys are errors that list what is valid.

Each compressor module lists what it provides in ``ENTRIES``: ``(name, factory, summary)``,
and in ``CODEC_CLASSES`` the classes behind factory functions, so their payloads decode.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..wire import MAX_NUMEL, Payload, PayloadError
from . import casts, compact, compose, onebit, quantize, rounding, scaled, signs, sparse, uniform
from .base import Compressor
from .codecs import CODECS, install_parser, register_codec

_MODULES = (casts, onebit, signs, sparse, compact, quantize, rounding, scaled, uniform, compose)


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Compressor]
    summary: str

    def parameters(self) -> dict[str, inspect.Parameter]:
        return dict(inspect.signature(self.factory).parameters)

    def defaults(self) -> dict:
        return {k: p.default for k, p in self.parameters().items() if _is_scalar(p.default)}


_ENTRIES: dict[str, Entry] = {}


def _is_scalar(v) -> bool:
    return isinstance(v, bool | int | float | str)


def register(name: str, factory: Callable[..., Compressor], summary: str) -> None:
    """Add a compressor under ``name``; its class's codec id becomes decodable."""
    if name in _ENTRIES:
        raise ValueError(f"compressor {name!r} is already registered")
    _ENTRIES[name] = Entry(name, factory, summary)
    if isinstance(factory, type):
        register_codec(factory)


def names() -> list[str]:
    return list(_ENTRIES)


# --- parsing ------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![A-Za-z_]))"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_.\-]*)|(?P<punct>[:(),+=]))"
)


@dataclass
class Node:
    """A parsed spec: a name and its arguments (key or None, raw string or Node)."""

    name: str
    args: list[tuple[str | None, str | Node]]


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens: list[str] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise ValueError(f"malformed compressor spec {text!r} at {text[pos:]!r}")
            self.tokens.append(m.group(m.lastgroup))
            pos = m.end()
        self.i = 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            want = f"{expected!r}" if expected else "more"
            raise ValueError(f"malformed compressor spec {self.text!r}: expected {want}")
        self.i += 1
        return tok

    def spec(self, top: bool = False) -> Node:
        name = self.take()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"malformed compressor spec {self.text!r}: {name!r} is not a name")
        node = Node(name, [])
        if self.peek() == "(":
            self.take("(")
            if self.peek() != ")":
                self.args(node)
            self.take(")")
        elif top and self.peek() == ":":
            self.take(":")
            self.args(node)
        return node

    def args(self, node: Node) -> None:
        while True:
            if self.i + 1 < len(self.tokens) and self.tokens[self.i + 1] == "=":
                key = self.take()
                self.take("=")
                if self.i + 1 < len(self.tokens) and self.tokens[self.i + 1] == "(":
                    node.args.append((key, self.spec()))
                else:
                    node.args.append((key, self.take()))
            else:
                node.args.append((None, self.spec()))
            if self.peek() in (",", "+"):
                self.take()
                continue
            return

    def parse(self) -> Node:
        node = self.spec(top=True)
        if self.peek() is not None:
            raise ValueError(f"malformed compressor spec {self.text!r}: unexpected {self.peek()!r}")
        return node


def parse_spec(spec: str) -> Node:
    """Parse a spec string into a :class:`Node` (see the module docstring)."""
    return _Parser(spec).parse()


def _convert(name: str, key: str, raw, default):
    if isinstance(raw, Node):
        raise ValueError(f"compressor {name!r}: {key} takes a value, not a compressor")
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


def _build(node: Node) -> Compressor:
    if node.name not in _ENTRIES:
        raise ValueError(f"unknown compressor {node.name!r}; available: {', '.join(_ENTRIES)}")
    entry = _ENTRIES[node.name]
    params = entry.parameters()
    positional = [k for k, p in params.items() if not _is_scalar(p.default)]
    kwargs: dict = {}
    for key, value in node.args:
        if key is None:
            if len(kwargs.keys() & set(positional)) >= len(positional) or not positional:
                raise ValueError(
                    f"compressor {node.name!r} takes no further compressor argument "
                    f"(got {value.name!r}; parameters are written key=value)"
                )
            key = next(k for k in positional if k not in kwargs)
        if key not in params:
            valid = ", ".join(params) or "none"
            raise ValueError(f"compressor {node.name!r} has no parameter {key!r} (valid: {valid})")
        if key in kwargs:
            raise ValueError(f"compressor {node.name!r}: {key} given twice")
        default = params[key].default
        if _is_scalar(default):
            kwargs[key] = _convert(node.name, key, value, default)
        else:
            kwargs[key] = _build(value if isinstance(value, Node) else Node(value, []))
    missing = [k for k in positional if k not in kwargs and params[k].default is params[k].empty]
    if missing:
        raise ValueError(f"compressor {node.name!r} needs {', '.join(missing)}")
    return entry.factory(**kwargs)


def compressor(spec: str | Compressor, **overrides) -> Compressor:
    """Make a compressor from a spec string such as ``"fosgd"`` or ``"qsgd(levels=16)"``."""
    if isinstance(spec, Compressor):
        if overrides:
            raise ValueError("overrides apply to spec strings, not to compressor objects")
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a compressor spec is a string, got {type(spec).__name__}")
    node = parse_spec(spec)
    node.args += [(k, v if isinstance(v, str) else _fmt(v)) for k, v in overrides.items()]
    return _build(node)


def _fmt(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def available_compressors(d: int = 1 << 20) -> list[dict]:
    """Every registered compressor (default parameters) with its properties at length d."""
    out = []
    for e in _ENTRIES.values():
        if any(not _is_scalar(p.default) for p in e.parameters().values()):
            c = None  # a wrapper: its properties are those of what it wraps
        else:
            c = e.factory()
        out.append(
            {
                "name": e.name,
                "summary": e.summary,
                "params": e.defaults(),
                "unbiased": c.unbiased if c else None,
                "omega": c.omega(d) if c else None,
                "delta": c.delta(d) if c else None,
                "exact_inner_product": c.exact_inner_product if c else None,
                "bits_per_coordinate": c.bits_per_coordinate(d) if c else None,
                "bits_formula": c.bits_formula if c else "that of the wrapped compressors",
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


for _module in _MODULES:
    for _name, _factory, _summary in _module.ENTRIES:
        register(_name, _factory, _summary)
    for _cls in getattr(_module, "CODEC_CLASSES", ()):
        register_codec(_cls)
install_parser(compressor)
