"""wire: the header round-trips, and every kind of malformed input is a clear PayloadError."""

import struct
import zlib

import numpy as np
import pytest
import torch

import gradzip as gz
from gradzip import wire


def make(sections=(b"abc", b"defgh"), shape=(2, 4), params=b"\x01\x02", dtype=torch.float32):
    w = wire.PayloadWriter(
        200, dtype, shape, [len(s) for s in sections], seed=7, step=9, worker=3, params=params
    )
    for view, s in zip(w.sections, sections, strict=True):
        view.copy_(torch.tensor(list(s), dtype=torch.uint8))
    return w.finish()


def restamp(raw: bytearray) -> bytearray:
    """Recompute the checksum so a mutation reaches the deeper checks."""
    crc = zlib.crc32(bytes(raw[36:]), zlib.crc32(bytes(raw[:32])))
    struct.pack_into("<I", raw, 32, crc)
    return raw


def test_round_trip_of_header_and_sections():
    p = make()
    q = gz.Payload.from_bytes(p.to_bytes())
    h = q.header
    assert (h.codec, h.dtype, h.shape, h.seed, h.step, h.worker) == (
        200, torch.float32, (2, 4), 7, 9, 3,
    )  # fmt: skip
    assert h.params == b"\x01\x02"
    assert bytes(q.section(0).numpy()) == b"abc" and bytes(q.section(1).numpy()) == b"defgh"
    assert q.nbits == 8 * len(p.to_bytes())
    for form in (p.data, p.data.numpy(), bytearray(p.to_bytes()), memoryview(p.to_bytes())):
        assert gz.Payload.from_bytes(form).header == h


def test_header_is_compact():
    # 36 fixed bytes + 8 per dimension + params + 8 per section
    p = make(sections=(b"",), shape=(5,), params=b"")
    assert p.nbytes == 36 + 8 + 8


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r[:10], "truncated"),
        (lambda r: r[:-1], "truncated"),
        (lambda r: r + b"\x00", "trailing"),
        (lambda r: b"XXXX" + r[4:], "magic"),
        (lambda r: restamp(bytearray(r[:4]) + b"\x09" + r[5:]), "version"),
        # version 1 drew the one-bit dither from another stream: refused, not misdecoded
        (lambda r: restamp(bytearray(r[:4]) + b"\x01" + r[5:]), "version 1 .*reads 2"),
        (lambda r: restamp(bytearray(r[:6]) + b"\x63" + r[7:]), "dtype"),
        (lambda r: restamp(bytearray(r[:7]) + b"\x09" + r[8:]), "ndim"),
        (lambda r: restamp(bytearray(r[:31]) + b"\x01" + r[32:]), "reserved"),
        (lambda r: r[:-1] + bytes([r[-1] ^ 1]), "checksum"),
    ],
)
def test_malformed_headers(mutate, message):
    raw = make().to_bytes()
    with pytest.raises(gz.PayloadError, match=message):
        gz.Payload.from_bytes(bytes(mutate(raw)))


def test_absurd_shape_is_capped_before_allocation():
    raw = bytearray(make(shape=(2, 4)).to_bytes())
    struct.pack_into("<QQ", raw, 36, 1 << 40, 1 << 40)
    with pytest.raises(gz.PayloadError, match="max_numel"):
        gz.Payload.from_bytes(bytes(restamp(raw)))
    with pytest.raises(gz.PayloadError, match="max_numel"):
        gz.Payload.from_bytes(make(shape=(10, 10)).to_bytes(), max_numel=99)


def test_absurd_section_length():
    raw = bytearray(make().to_bytes())
    off = 36 + 16 + 2  # shape, params
    struct.pack_into("<Q", raw, off, (1 << 64) - 1)
    with pytest.raises(gz.PayloadError, match="truncated"):
        gz.Payload.from_bytes(bytes(restamp(raw)))


@pytest.mark.parametrize(
    "bad", [[1, 2, 3], "abc", torch.zeros(3), torch.zeros(2, 2, dtype=torch.uint8)]
)
def test_wrong_types(bad):
    with pytest.raises(gz.PayloadError, match="payload is"):
        gz.Payload.from_bytes(bad)


def test_writer_rejects_bad_fields():
    with pytest.raises(ValueError):
        wire.PayloadWriter(1, torch.float32, (3,), [1], seed=-1)
    with pytest.raises(TypeError):
        wire.PayloadWriter(1, torch.int32, (3,), [1])
    with pytest.raises(ValueError):
        wire.PayloadWriter(1, torch.float32, (1,) * 9, [1])


def test_empty_bytes():
    with pytest.raises(gz.PayloadError, match="truncated"):
        gz.Payload.from_bytes(b"")
    with pytest.raises(gz.PayloadError, match="truncated"):
        gz.Payload.from_bytes(np.zeros(0, np.uint8))


def test_fast_checksum_equals_zlib():
    """The checksum (zlib-ng's SIMD CRC-32) equals the standard library's zlib.crc32."""
    import zlib

    from gradzip import wire

    g = np.random.default_rng(11)
    for n in (0, 1, 7, 63, 64, 1000, (1 << 20) + 17, (3 << 22) + 5):
        b = g.integers(0, 256, n, dtype=np.uint8)
        assert wire._crc32(b, 12345) == zlib.crc32(b, 12345)
        assert wire._crc32(b[3:]) == zlib.crc32(b[3:])  # unaligned start
