"""Stream framing: a channel sends its static header once, then 8-byte frames.

A standalone payload (:mod:`gradzip.wire`) describes itself: 52-75 bytes of header per
message for the registry's compressors on a vector, 3.4-4.8 bits per coordinate at d = 124
(``benchmarks/stream_overhead.py``). Between two parties that talk every step the
header hardly changes. A *channel* is one sender and its receivers (worker i's uplink of
shard j; shard j's downlink, the same bytes to every worker); every payload on it has the
same *static header*: codec, parameters, dtype, shape, section lengths, seed, worker. Only
the step, the sections and the CRC change. So the first message on a channel (an
*opener*) is the whole payload bound to the channel, and every later one (a *frame*) is 8
bytes and the payload's sections (everything after its header, scale floats included)::

    opener: 8 + len(payload) bytes          frame: 8 + len(sections) bytes
    offset  size  field                     offset  size  field
    0       4     magic b"GZPS"             0       4     u32  2**31 | (step - opener's step)
    4       4     channel (u32)             4       4     u32  payload CRC ^ crc32(channel)
    8       ...   the standalone payload    8       ...   the payload's sections

(little-endian). Byte 3 tells them apart: the top bit of a frame's first word is set, an
opener's byte 3 is ``S`` (0x53), so no length has to travel.

Why these 8 bytes:

- The step (what seeds the shared randomness, with seed and worker) as 31 bits counted
  from the opener's step: a channel runs 2**31 steps on one opener. Between openers the
  steps strictly increase: a step that does not (a run restarted from a checkpoint) or
  does not fit makes the sender open again, so a receiver refuses a frame whose step is not
  after the last one (replayed or reordered), and one whose step is not the step it
  expects where it knows it (``unpack(msg, step=t)``, as the engines do).
- The check: the CRC-32 of the standalone payload (the field the encoder stamped, which
  covers every header byte, the step included, and every section byte) XOR a key of the
  channel, ``crc32(channel as u32)``. The receiver rebuilds the standalone payload from
  the opener's header, the frame's step and the frame's sections, and recomputes it: a
  flipped bit, a frame of another stream (another static header) or a wrong step fail it,
  and so does a frame of another channel even where everything else is equal (the CRC-32 of
  4 bytes is a bijection: no two channels share a key). The sender computes nothing: it
  reuses the encoder's CRC.

The receiver checks a frame against what it expects (a tag, the opener's layout: frames
have exactly ``8 + len(sections)`` bytes, the step, the check) before it allocates the
rebuilt payload, whose size the opener fixed; an opener is parsed as a standalone payload
(:func:`gradzip.wire.parse_header`, its element count capped by ``max_numel``). What
:meth:`StreamReceiver.unpack` returns is the :class:`~gradzip.wire.Payload` the sender
encoded, byte for byte, so ``gz.decode`` and ``Compressor.decode`` read it unchanged (the
parsed header comes with it: nothing is parsed twice). Failures raise
:class:`~gradzip.wire.PayloadError` saying what is wrong and leave the receiver as it was.
No Python objects cross the wire.

A receiver without an expected step accepts an opener at any step (a sender opens again
after a restart): a replayed opener is caught only where the caller passes ``step``.

Sizes are known without sending lengths: :func:`frame_size` and :func:`opener_size` of a
payload of the same codec, parameters and length (one probe encode per shard tells, as
``ShardLayout.payload_sizes`` does for standalone payloads).
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

import numpy as np
import torch

from . import _alloc
from .wire import (
    CRC_OFFSET,
    MAGIC,
    PREFIX,
    VERSION,
    Payload,
    PayloadError,
    _as_uint8_tensor,
    _crc,
    parse_header,
)
from .wire import MAX_NUMEL as _MAX_NUMEL

OPENER_MAGIC = b"GZPS"
OVERHEAD = 8  # bytes before the body of a frame, and before the payload of an opener
TAG = 1 << 31  # set in a frame's first word; never in an opener's (b"GZPS"[3] < 0x80)
MAX_DELTA = TAG - 1  # steps after the opener a frame can say
_WORD2 = struct.Struct("<II")
_STEP = struct.Struct("<Q")
_STEP_OFFSET = 16  # of the u64 step in a standalone payload
_STEP_END = 24


def channel_key(channel: int) -> int:
    """What a frame's check is XORed with: ``crc32`` of the channel as a u32."""
    return zlib.crc32(struct.pack("<I", channel))


def _check_channel(channel: int) -> int:
    channel = int(channel)
    if not 0 <= channel < 1 << 32:
        raise ValueError(f"a channel is a u32, got {channel}")
    return channel


def _header_size(raw: np.ndarray) -> int:
    """The header size of a payload this process encoded (read, not verified)."""
    n = raw.size
    if n < PREFIX.size or raw[:4].tobytes() != MAGIC or raw[4] != VERSION:
        raise PayloadError("can only frame a gradzip payload (bad magic, version or length)")
    ndim, plen, nsec = int(raw[7]), int(raw[28]) | int(raw[29]) << 8, int(raw[30])
    size = PREFIX.size + 8 * ndim + plen + 8 * nsec
    if size > n:
        raise PayloadError(f"truncated payload: {n} bytes, its header declares {size}")
    return size


def _raw(payload) -> tuple[np.ndarray, int]:
    """(the payload's bytes as numpy, its header size) for a Payload or its data."""
    if isinstance(payload, Payload):
        return payload.data.numpy(), payload.header.size
    raw = _as_uint8_tensor(payload).numpy()
    return raw, _header_size(raw)


def frame_size(payload) -> int:
    """Bytes of the frame that carries ``payload`` (a :class:`Payload` or its data) on an
    open channel: 8 + its sections. The same for every payload of its codec, parameters
    and length."""
    raw, size = _raw(payload)
    return OVERHEAD + raw.size - size


def opener_size(payload) -> int:
    """Bytes of the opener that carries ``payload``: 8 + the whole payload."""
    return OVERHEAD + _raw(payload)[0].size


class StreamSender:
    """The sending end of a channel: :meth:`pack` frames each payload.

    >>> import gradzip as gz, torch
    >>> c = gz.compressor("fosgd")
    >>> tx, rx = StreamSender(3), StreamReceiver(3)
    >>> p0, p1 = (c.encode(torch.randn(124), seed=1, step=t) for t in (0, 1))
    >>> m0, m1 = tx.pack(p0), tx.pack(p1)
    >>> (m0.numel() - p0.nbytes, m1.numel() - (p1.nbytes - p1.header.size))
    (8, 8)
    >>> torch.equal(gz.decode(rx.unpack(m0)), c.decode(p0))
    True
    >>> torch.equal(rx.unpack(m1, step=1).data, p1.data)
    True
    """

    def __init__(self, channel: int):
        self.channel = _check_channel(channel)
        self.key = channel_key(self.channel)
        self._static: bytes | None = None  # the open stream's static header bytes
        self._step0 = 0  # the opener's step
        self._last = -1  # the last step sent

    def reset(self) -> None:
        """The next message is an opener (e.g. after its receivers were rebuilt)."""
        self._static = None

    def pack(self, payload) -> torch.Tensor:
        """The message (1-D ``uint8``) that carries ``payload`` (a :class:`Payload` or its
        data): a frame if the channel is open on the same static header and the step
        follows, else an opener."""
        raw, size = _raw(payload)
        (step,) = _STEP.unpack_from(raw, _STEP_OFFSET)
        static = raw[:_STEP_OFFSET].tobytes() + raw[_STEP_END:CRC_OFFSET].tobytes()
        static += raw[CRC_OFFSET + 4 : size].tobytes()
        if static == self._static and self._last < step <= self._step0 + MAX_DELTA:
            out = _alloc.empty_bytes(OVERHEAD + raw.size - size)
            (crc,) = struct.unpack_from("<I", raw, CRC_OFFSET)
            _WORD2.pack_into(out, 0, TAG | (step - self._step0), crc ^ self.key)
            out[OVERHEAD:] = raw[size:]
        else:
            out = _alloc.empty_bytes(OVERHEAD + raw.size)
            out[:4] = np.frombuffer(OPENER_MAGIC, np.uint8)
            struct.pack_into("<I", out, 4, self.channel)
            out[OVERHEAD:] = raw
            self._static, self._step0 = static, step
        self._last = step
        return torch.from_numpy(out)


class StreamReceiver:
    """The receiving end of a channel: :meth:`unpack` checks a message and returns the
    standalone payload it carries. ``max_numel`` caps the element count an opener may
    declare (see :func:`gradzip.wire.parse_header`)."""

    def __init__(self, channel: int, *, max_numel: int = _MAX_NUMEL):
        self.channel = _check_channel(channel)
        self.key = channel_key(self.channel)
        self.max_numel = max_numel
        self._template: np.ndarray | None = None  # the opener's header bytes
        self._header = None  # the opener's parsed header
        self._last = -1
        self.frame_size: int | None = None  # bytes of every frame (None before the opener)

    def unpack(self, msg, *, step: int | None = None) -> Payload:
        """The payload ``msg`` (an opener or a frame, bytes-like or a 1-D ``uint8``
        tensor) carries, with its header; ``step``: the step it must be for."""
        data = _as_uint8_tensor(msg)
        raw = data.numpy()
        where = f"stream message on channel {self.channel}"
        if raw.size < OVERHEAD:
            raise PayloadError(f"truncated {where}: {raw.size} bytes, at least 8 needed")
        word, check = _WORD2.unpack_from(raw, 0)
        if not word & TAG:
            return self._open(data, step, where)
        if self._header is None:
            raise PayloadError(f"{where}: a frame before the channel's opener")
        if raw.size != self.frame_size:
            kind = "truncated" if raw.size < self.frame_size else "oversized"
            raise PayloadError(
                f"{kind} {where}: {raw.size} bytes, its opener's layout makes every frame "
                f"{self.frame_size}"
            )
        t = self._header.step + (word & MAX_DELTA)
        self._check_step(t, step, where)
        size = self._header.size
        buf = _alloc.empty_bytes(size + raw.size - OVERHEAD)
        buf[:size] = self._template
        _STEP.pack_into(buf, _STEP_OFFSET, t)
        buf[size:] = raw[OVERHEAD:]
        crc = _crc(buf)
        if crc ^ self.key != check:
            raise PayloadError(
                f"checksum mismatch in a {where} at step {t}: the frame was corrupted, or "
                "was sent on another channel or stream"
            )
        struct.pack_into("<I", buf, CRC_OFFSET, crc)
        self._last = t
        return Payload(torch.from_numpy(buf), dataclasses.replace(self._header, step=t))

    def _check_step(self, t: int, step: int | None, where: str) -> None:
        if step is not None and t != step:
            raise PayloadError(f"{where} is for step {t}, expected step {step}")
        if t <= self._last:
            raise PayloadError(
                f"{where} is for step {t}, not after the last one received ({self._last}): "
                "replayed or out of order"
            )

    def _open(self, data: torch.Tensor, step: int | None, where: str) -> Payload:
        raw = data.numpy()
        if raw[:4].tobytes() != OPENER_MAGIC:
            raise PayloadError(f"not a {where}: magic {raw[:4].tobytes()!r}")
        (channel,) = struct.unpack_from("<I", raw, 4)
        if channel != self.channel:
            raise PayloadError(f"wrong channel: an opener of channel {channel} on channel "
                               f"{self.channel}")  # fmt: skip
        body = data[OVERHEAD:]
        header = parse_header(body, max_numel=self.max_numel)
        if step is not None and header.step != step:
            raise PayloadError(f"{where} opens at step {header.step}, expected step {step}")
        self._template = raw[OVERHEAD : OVERHEAD + header.size].copy()
        self._header, self._last = header, header.step
        self.frame_size = OVERHEAD + body.numel() - header.size
        return Payload(body, header)
