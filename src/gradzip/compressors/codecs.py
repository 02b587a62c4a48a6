"""The codec table (codec id -> compressor class, for decoding) and the spec parser.

Both are filled by :mod:`.registry` when it is imported. Wrappers whose inner compressors
are given as spec strings or arrive as codec ids (``compose``, ``scaled``) look them up
here, so they do not import the registry that imports them.
"""

from __future__ import annotations

from collections.abc import Callable

#: codec id -> the compressor class that decodes it
CODECS: dict[int, type] = {}
_parser: list[Callable[[str], object]] = []  # the registry's compressor(spec)


def register_codec(cls: type) -> None:
    """Make payloads of ``cls.codec_id`` decodable (ids are unique)."""
    if CODECS.get(cls.codec_id, cls) is not cls:
        raise ValueError(f"codec id {cls.codec_id} of {cls} is taken by {CODECS[cls.codec_id]}")
    CODECS[cls.codec_id] = cls


def install_parser(parse: Callable[[str], object]) -> None:
    """Called once by the registry: how spec strings become compressors."""
    _parser[:] = [parse]


def from_spec(spec: str):
    """The compressor a spec string names (the registry's ``compressor``)."""
    if not _parser:  # pragma: no cover - gradzip.compressors imports the registry first
        raise RuntimeError("gradzip.compressors.registry is not imported")
    return _parser[0](spec)
