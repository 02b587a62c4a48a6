"""The payload: the bytes that cross the network, and nothing else.

A payload is one 1-D ``uint8`` tensor: a self-describing header followed by packed
sections. Everything a receiver needs to decode it is in the header (codec, its
parameters, dtype, shape, and the ``seed/step/worker`` that derive the shared randomness),
so :func:`gradzip.decode` needs no compressor object. The shared randomness is part of the
format: the version changes with the streams of :mod:`gradzip.rng` (version 1 drew the
one-bit quantizers' dither from ``hash32``; a subtractive payload of it would decode to
wrong values here, so it is refused).

Layout (little-endian)::

    offset  size     field
    0       4        magic b"GZPW"
    4       1        format version (2)
    5       1        codec id (see gradzip.compressors.registry)
    6       1        dtype code of the decoded tensor (1 f32, 2 f16, 3 bf16, 4 f64)
    7       1        ndim (0..8)
    8       8        seed   (u64)
    16      8        step   (u64)
    24      4        worker (u32)
    28      2        P: length of the codec parameters (<= 1024)
    30      1        S: number of sections (<= 8)
    31      1        reserved, 0
    32      4        CRC-32 (zlib) of every byte of the payload except these four
    36      8*ndim   shape (u64 each)
    ...     P        codec parameters (codec-defined, validated by the codec)
    ...     8*S      section lengths (u64 each)
    ...              the sections, back to back; they end exactly where the payload ends

Parsing validates every field before anything is allocated: a truncated, padded,
corrupted or hostile payload raises :class:`PayloadError` saying what is wrong, and the
element count a payload may declare is capped (``max_numel``), so a few bytes can never
ask for gigabytes.

Between two parties that exchange payloads every step, :mod:`gradzip.stream` sends the
header once per channel and then 8 bytes a message; what it delivers is this format,
byte for byte.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import _alloc

MAGIC = b"GZPW"
VERSION = 2
PREFIX = struct.Struct("<4sBBBBQQIHBBI")  # up to and including the CRC
CRC_OFFSET = 32
MAX_NDIM = 8
MAX_PARAMS = 1024
MAX_SECTIONS = 8
#: Default cap on the number of elements a payload may declare (2**31, 8 GiB of float32).
MAX_NUMEL = 1 << 31

DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.float16,
    3: torch.bfloat16,
    4: torch.float64,
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


class PayloadError(ValueError):
    """Bytes that are not a valid gradzip payload; the message says what is wrong."""


@dataclass(frozen=True)
class Header:
    """The parsed header of a payload."""

    codec: int  # codec id
    dtype: torch.dtype  # dtype of the decoded tensor
    shape: tuple[int, ...]  # shape of the decoded tensor
    seed: int
    step: int
    worker: int
    params: bytes  # codec parameters, codec-defined
    section_lengths: tuple[int, ...]
    size: int  # header bytes; sections start here

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Payload:
    """A payload: ``data`` is the 1-D ``uint8`` CPU tensor that goes on the wire."""

    data: torch.Tensor
    header: Header

    @property
    def nbits(self) -> int:
        """Bits on the wire: ``8 * len(data)``, header included."""
        return 8 * self.data.numel()

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def section(self, i: int) -> torch.Tensor:
        """Section ``i`` as a ``uint8`` view into ``data``."""
        lengths = self.header.section_lengths
        start = self.header.size + sum(lengths[:i])
        return self.data[start : start + lengths[i]]

    def to_bytes(self) -> bytes:
        return self.data.numpy().tobytes()

    @classmethod
    def from_bytes(cls, buf, *, max_numel: int = MAX_NUMEL) -> Payload:
        """Parse and validate ``buf`` (bytes-like, numpy or 1-D uint8 tensor)."""
        data = _as_uint8_tensor(buf)
        return cls(data, parse_header(data, max_numel=max_numel))


def _as_uint8_tensor(buf) -> torch.Tensor:
    if isinstance(buf, torch.Tensor):
        if buf.dtype != torch.uint8 or buf.dim() != 1:
            raise PayloadError(
                f"a payload is a 1-D uint8 tensor, got dtype {buf.dtype} and shape "
                f"{tuple(buf.shape)}"
            )
        return buf.detach().cpu().contiguous()
    if isinstance(buf, bytes | bytearray | memoryview):
        arr = np.frombuffer(buf, dtype=np.uint8)
        return torch.from_numpy(arr.copy()) if arr.size else torch.empty(0, dtype=torch.uint8)
    if isinstance(buf, np.ndarray) and buf.dtype == np.uint8 and buf.ndim == 1:
        return torch.from_numpy(np.ascontiguousarray(buf))
    raise PayloadError(f"a payload is bytes or a 1-D uint8 tensor, got {type(buf).__name__}")


# CRC-32 of zlib, computed by zlib-ng (PCLMUL folding: about 35 GB/s here, against about
# 4 GB/s for the system zlib that Python's own module uses, which alone cost 3-4x a copy_ of
# a 64 MiB payload). The values are the same; the system zlib is the fallback.
try:
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; kept for odd platforms
    _crc32 = zlib.crc32


def _crc(data: np.ndarray) -> int:
    return _crc32(data[CRC_OFFSET + 4 :], zlib.crc32(data[:CRC_OFFSET]))


def parse_header(data: torch.Tensor, *, max_numel: int = MAX_NUMEL) -> Header:
    """Validate ``data`` (1-D uint8 CPU tensor) and return its header."""
    raw = data.numpy()
    n = raw.size
    if n < PREFIX.size:
        raise PayloadError(f"truncated payload: {n} bytes, a header needs at least {PREFIX.size}")
    (magic, version, codec, dtype_code, ndim, seed, step, worker, plen, nsec, reserved, crc) = (
        PREFIX.unpack_from(raw, 0)
    )
    if magic != MAGIC:
        raise PayloadError(f"not a gradzip payload: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise PayloadError(f"unsupported format version {version} (this gradzip reads {VERSION})")
    if dtype_code not in DTYPES:
        raise PayloadError(f"unknown dtype code {dtype_code} (known: {sorted(DTYPES)})")
    if ndim > MAX_NDIM:
        raise PayloadError(f"ndim {ndim} exceeds the maximum of {MAX_NDIM}")
    if plen > MAX_PARAMS:
        raise PayloadError(f"codec parameters of {plen} bytes exceed the maximum of {MAX_PARAMS}")
    if nsec > MAX_SECTIONS:
        raise PayloadError(f"{nsec} sections exceed the maximum of {MAX_SECTIONS}")
    if reserved != 0:
        raise PayloadError(f"reserved header byte is {reserved}, expected 0")
    size = PREFIX.size + 8 * ndim + plen + 8 * nsec
    if n < size:
        raise PayloadError(f"truncated payload: {n} bytes, its header declares {size}")
    shape = struct.unpack_from(f"<{ndim}Q", raw, PREFIX.size)
    numel = 1
    for s in shape:
        numel *= s
    if numel > max_numel:
        raise PayloadError(
            f"payload declares shape {shape} ({numel} elements), more than the cap "
            f"max_numel={max_numel}"
        )
    off = PREFIX.size + 8 * ndim
    params = raw[off : off + plen].tobytes()
    lengths = struct.unpack_from(f"<{nsec}Q", raw, off + plen)
    body = sum(lengths)
    if size + body != n:
        kind = "truncated" if size + body > n else "trailing bytes in"
        raise PayloadError(f"{kind} payload: {n} bytes, header and sections declare {size + body}")
    actual = _crc(raw)
    if actual != crc:
        raise PayloadError(
            f"checksum mismatch (stored {crc:#010x}, computed {actual:#010x}): "
            "the payload was corrupted"
        )
    return Header(
        codec=codec,
        dtype=DTYPES[dtype_code],
        shape=tuple(shape),
        seed=seed,
        step=step,
        worker=worker,
        params=params,
        section_lengths=tuple(lengths),
        size=size,
    )


class PayloadWriter:
    """Allocates a payload and hands out its sections for kernels to write into.

    Usage: ``w = PayloadWriter(...)``; fill ``w.sections[i]`` (uint8 tensor views) or
    ``w.arrays[i]`` (the same bytes as numpy views) in place, or ``w.put_f32(i, ...)``;
    then ``w.finish()`` stamps the checksum and returns the :class:`Payload`. Writing in
    place saves the copy that assembling separate buffers would cost. The buffer is numpy
    until a tensor is asked for: on a 2**24 encode, whose passes leave the caches cold,
    each torch call here measured 30-60 us, numpy ones a few.
    """

    def __init__(
        self,
        codec: int,
        dtype: torch.dtype,
        shape: Sequence[int],
        section_lengths: Sequence[int],
        *,
        seed: int = 0,
        step: int = 0,
        worker: int = 0,
        params: bytes = b"",
    ):
        if dtype not in DTYPE_CODES:
            raise TypeError(f"dtype {dtype} cannot be sent (supported: {list(DTYPE_CODES)})")
        shape = tuple(int(s) for s in shape)
        if len(shape) > MAX_NDIM:
            raise ValueError(f"tensors of more than {MAX_NDIM} dimensions cannot be sent")
        if len(params) > MAX_PARAMS or len(section_lengths) > MAX_SECTIONS:
            raise ValueError("too many codec parameters or sections")
        if not (0 <= seed < 1 << 64 and 0 <= step < 1 << 64 and 0 <= worker < 1 << 32):
            raise ValueError(
                f"seed and step must be in [0, 2**64) and worker in [0, 2**32), "
                f"got seed={seed}, step={step}, worker={worker}"
            )
        size = PREFIX.size + 8 * len(shape) + len(params) + 8 * len(section_lengths)
        raw = self.raw = _alloc.empty_bytes(size + sum(section_lengths))
        PREFIX.pack_into(
            raw, 0, MAGIC, VERSION, codec, DTYPE_CODES[dtype], len(shape), seed, step, worker,
            len(params), len(section_lengths), 0, 0,
        )  # fmt: skip
        struct.pack_into(f"<{len(shape)}Q", raw, PREFIX.size, *shape)
        off = PREFIX.size + 8 * len(shape)
        raw[off : off + len(params)] = np.frombuffer(params, dtype=np.uint8)
        struct.pack_into(f"<{len(section_lengths)}Q", raw, off + len(params), *section_lengths)
        self.header = Header(
            codec, dtype, shape, seed, step, worker, bytes(params), tuple(section_lengths), size
        )
        self.arrays = []
        start = size
        for n in section_lengths:
            self.arrays.append(raw[start : start + n])
            start += n
        self._data = None
        self._sections = None

    @property
    def data(self) -> torch.Tensor:
        """The whole payload as a ``uint8`` tensor (the same memory as ``raw``)."""
        if self._data is None:
            self._data = torch.from_numpy(self.raw)
        return self._data

    @property
    def sections(self) -> list[torch.Tensor]:
        """The sections as ``uint8`` tensor views (made on first use)."""
        if self._sections is None:
            self._sections = [torch.from_numpy(a) for a in self.arrays]
        return self._sections

    def put_f32(self, i: int, *values: float) -> None:
        """Section ``i`` <- the float32 ``values`` (little-endian)."""
        struct.pack_into(f"<{len(values)}f", self.arrays[i], 0, *values)

    def finish(self) -> Payload:
        struct.pack_into("<I", self.raw, CRC_OFFSET, _crc(self.raw))
        return Payload(self.data, self.header)
