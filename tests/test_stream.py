"""Stream framing (gradzip.stream): every codec round-trips byte for byte, frames cost 8
bytes, and what does not belong to the channel's stream is refused with PayloadError."""

from __future__ import annotations

import struct

import pytest
import torch

import gradzip as gz
from gradzip import stream
from gradzip.compressors import names
from gradzip.stream import StreamReceiver, StreamSender, frame_size, opener_size
from gradzip.wire import MAX_NUMEL, PayloadWriter

SPECS = names() + ["onebit:dither=subtractive", "topk:k=3,values=fp16"]
STEPS = 5


def _x(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _payloads(spec, shape=(124,), steps=STEPS, dtype=torch.float32, first=0):
    c = gz.compressor(spec)
    return c, [
        c.encode(_x(shape, t, dtype), seed=9, step=first + t, worker=2) for t in range(steps)
    ]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape, dtype", [((124,), torch.float32), ((3, 7), torch.bfloat16)])
def test_round_trip_over_the_registry(spec, shape, dtype):
    """The receiver hands back the sender's payload byte for byte (header included), which
    both decode paths read; after the opener every message is the sections plus 8 bytes."""
    c, ps = _payloads(spec, shape, dtype=dtype)
    tx, rx = StreamSender(5), StreamReceiver(5)
    for t, p in enumerate(ps):
        msg = tx.pack(p if t % 2 else p.data)  # a Payload or its bytes
        assert msg.dtype == torch.uint8 and msg.dim() == 1
        if t == 0:
            assert msg.numel() == p.nbytes + 8 == opener_size(p)
        else:
            assert msg.numel() == p.nbytes - p.header.size + 8 == frame_size(p)
            assert msg.numel() - sum(p.header.section_lengths) == 8  # the whole overhead
        q = rx.unpack(msg, step=t)
        assert torch.equal(q.data, p.data)
        assert q.header == p.header
        assert torch.equal(gz.decode(q), c.decode(p))
        assert torch.equal(gz.decode(q.data), c.decode(q))


def _stream(spec="fosgd", channel=1, steps=STEPS):
    _, ps = _payloads(spec, steps=steps)
    tx = StreamSender(channel)
    return ps, [tx.pack(p) for p in ps]


def _open(channel=1, spec="fosgd"):
    ps, msgs = _stream(spec, channel)
    rx = StreamReceiver(channel)
    rx.unpack(msgs[0], step=0)
    return ps, msgs, rx


def test_wrong_step_is_refused():
    ps, msgs, rx = _open()
    with pytest.raises(gz.PayloadError, match=r"is for step 1, expected step 2"):
        rx.unpack(msgs[1], step=2)
    assert torch.equal(rx.unpack(msgs[1], step=1).data, ps[1].data)  # state unchanged
    for m in (msgs[1], msgs[0][8:]):  # a replay; not a stream message (a bare payload)
        with pytest.raises(gz.PayloadError, match=r"replayed or out of order|not a stream"):
            rx.unpack(m)
    rx.unpack(msgs[3])  # a lost frame is not an error where no step is expected
    with pytest.raises(gz.PayloadError, match=r"step 2, not after the last one received \(3\)"):
        rx.unpack(msgs[2])
    with pytest.raises(gz.PayloadError, match=r"opens at step 0, expected step 4"):
        rx.unpack(msgs[0], step=4)


def test_wrong_channel_is_refused():
    ps, msgs = _stream(channel=1)
    other = StreamReceiver(2)
    with pytest.raises(
        gz.PayloadError, match=r"wrong channel: an opener of channel 1 on channel 2"
    ):
        other.unpack(msgs[0])
    # channel 2 opened on a payload with the very same static header and step: channel 1's
    # frames still fail, by the channel key alone
    other.unpack(StreamSender(2).pack(ps[0]))
    with pytest.raises(gz.PayloadError, match=r"checksum mismatch .* another channel"):
        other.unpack(msgs[1], step=1)
    # a frame of another stream (another worker: another static header) on an open channel
    _, foreign = _stream(channel=1)
    rx = StreamReceiver(1)
    rx.unpack(msgs[0])
    tx3 = StreamSender(1)
    m3 = [tx3.pack(gz.compressor("fosgd").encode(_x(124, t), seed=10, step=t)) for t in range(2)]
    with pytest.raises(gz.PayloadError, match=r"checksum mismatch"):
        rx.unpack(m3[1])
    assert torch.equal(rx.unpack(foreign[1]).data, ps[1].data)  # the same stream is fine


@pytest.mark.parametrize("where", [0, 3, 4, 7, 8, -1])
def test_flipped_bit_is_refused(where):
    _, msgs, rx = _open()
    bad = msgs[1].clone()
    bad[where] ^= 0x10
    with pytest.raises(gz.PayloadError, match=r"checksum mismatch|expected step|not a stream"):
        rx.unpack(bad, step=1)
    flipped = msgs[0].clone()
    flipped[40] ^= 1  # in the opener's payload header
    with pytest.raises(gz.PayloadError):
        StreamReceiver(1).unpack(flipped)


def test_truncated_and_padded_frames_are_refused():
    _, msgs, rx = _open()
    m = msgs[1]
    for bad, what in ((m[:-1], "truncated"), (torch.cat([m, m[:1]]), "oversized"),
                      (m[:5], "truncated")):  # fmt: skip
        with pytest.raises(gz.PayloadError, match=what):
            rx.unpack(bad, step=1)
    with pytest.raises(gz.PayloadError, match="truncated"):
        StreamReceiver(1).unpack(msgs[0][:-3])


def test_frame_before_the_opener_is_refused():
    _, msgs = _stream()
    with pytest.raises(gz.PayloadError, match=r"a frame before the channel's opener"):
        StreamReceiver(1).unpack(msgs[1])


def test_frame_size_is_fixed_by_the_opener():
    """A frame of another codec's stream on the same channel has another size."""
    _, msgs, rx = _open()
    _, other = _stream("topk:k=3")
    with pytest.raises(gz.PayloadError, match=r"opener's layout makes every frame"):
        rx.unpack(other[1])


def test_sender_opens_again_when_the_stream_changes():
    """A new static header (codec parameters change: DQ-GD's rule), a step that does not
    increase (a run restarted from a checkpoint) or one too far: an opener, read as one."""
    tx, rx = StreamSender(4), StreamReceiver(4)
    a = gz.compressor("qsgd:levels=3")
    b = gz.compressor("qsgd:levels=7")
    seq = [(a, 0), (a, 1), (b, 2), (b, 3), (b, 1), (b, 2), (b, 2 + stream.MAX_DELTA)]
    kinds = []
    for c, t in seq:
        p = c.encode(_x(50, t), seed=1, step=t)
        m = tx.pack(p)
        kinds.append("open" if m.numel() == opener_size(p) else "frame")
        q = rx.unpack(m, step=t)
        assert torch.equal(q.data, p.data)
    assert kinds == ["open", "frame", "open", "frame", "open", "frame", "open"]


def test_large_steps_round_trip():
    tx, rx = StreamSender(0), StreamReceiver(0)
    c = gz.compressor("fosgd")
    for t in ((1 << 63) + 5, (1 << 63) + 6, (1 << 64) - 1):
        p = c.encode(_x(30, 1), seed=1, step=t)
        assert torch.equal(rx.unpack(tx.pack(p), step=t).data, p.data)


def test_hostile_openers_are_capped():
    """An opener declaring a huge shape is refused by max_numel before allocation."""
    w = PayloadWriter(1, torch.float32, (1 << 40,), [])
    huge = w.finish()
    msg = StreamSender(7).pack(huge)
    with pytest.raises(gz.PayloadError, match=r"more than the cap max_numel"):
        StreamReceiver(7).unpack(msg)
    with pytest.raises(gz.PayloadError, match=r"max_numel=100"):
        StreamReceiver(7, max_numel=100).unpack(StreamSender(7).pack(_payloads("fosgd")[1][0]))
    assert MAX_NUMEL < 1 << 40


def test_garbage_is_a_payload_error():
    rx = StreamReceiver(1)
    for junk in (b"", b"\x00" * 7, b"GZPS\x01\x00\x00\x00", b"\xff" * 64, b"abcdefgh" * 9):
        with pytest.raises(gz.PayloadError):
            rx.unpack(junk)
    with pytest.raises(gz.PayloadError, match="1-D uint8"):
        rx.unpack(torch.zeros(9))


def test_channel_keys_are_distinct():
    keys = {stream.channel_key(c) for c in range(4096)}
    assert len(keys) == 4096
    with pytest.raises(ValueError, match="u32"):
        StreamSender(1 << 32)
    # the frame's first word: tag bit, then the step after the opener
    _, msgs = _stream()
    word, _ = struct.unpack_from("<II", msgs[3].numpy(), 0)
    assert word == stream.TAG | 3
