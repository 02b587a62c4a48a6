"""gz.decode on hostile bytes: only PayloadError ever comes out, and nothing big is allocated.

Mutations of valid payloads of every codec, half of them with the checksum re-stamped so
they get past it and reach the header, parameter and section checks; plus random bytes.
"""

import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradzip as gz
from gradzip.compressors import names

SPECS = names() + ["onebit:scale=fixed,lam=0.5", "onebit:dither=subtractive", "fosgd:scale=max"]


def _valid_payloads():
    out = []
    for spec in SPECS:
        c = gz.compressor(spec)
        for shape, dtype in (
            ((37,), torch.float32),
            ((3, 5), torch.float64),
            ((16,), torch.bfloat16),
        ):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(len(out))).to(dtype)
            out.append(c.encode(x, seed=len(out)).to_bytes())
    return out


VALID = _valid_payloads()


def restamp(raw: bytearray) -> bytearray:
    if len(raw) >= 36:
        struct.pack_into("<I", raw, 32, zlib.crc32(bytes(raw[36:]), zlib.crc32(bytes(raw[:32]))))
    return raw


def mutate(rng: np.random.Generator, raw: bytes) -> bytes:
    b = bytearray(raw)
    kind = rng.integers(6)
    if kind == 0:  # flip bits
        for _ in range(rng.integers(1, 4)):
            i = rng.integers(len(b))
            b[i] ^= 1 << rng.integers(8)
    elif kind == 1:  # overwrite a byte, biased towards the header
        i = rng.integers(min(len(b), 80) if rng.random() < 0.8 else len(b))
        b[i] = rng.integers(256)
    elif kind == 2:  # truncate
        b = b[: rng.integers(len(b))]
    elif kind == 3:  # extend
        b += bytes(rng.integers(0, 256, rng.integers(1, 20)).astype(np.uint8))
    elif kind == 4:  # write an extreme integer into a header field
        off = int(rng.integers(0, min(len(b), 90)))
        val = [0, 1, 255, 1 << 31, (1 << 64) - 1][rng.integers(5)]
        fmt = ["<B", "<H", "<I", "<Q"][rng.integers(4)]
        if off + struct.calcsize(fmt) <= len(b):
            struct.pack_into(fmt, b, off, val % (1 << (8 * struct.calcsize(fmt))))
    else:  # replace a float scalar by a non-finite or negative one
        off = int(rng.integers(36, max(37, len(b) - 4)))
        if off + 4 <= len(b):
            struct.pack_into("<f", b, off, [float("nan"), float("inf"), -1.0][rng.integers(3)])
    if rng.random() < 0.5:
        restamp(b)
    return bytes(b)


def check(data: bytes) -> None:
    try:
        y = gz.decode(data, max_numel=1 << 16)
    except gz.PayloadError:
        return
    assert isinstance(y, torch.Tensor) and y.numel() <= 1 << 16
    assert torch.isfinite(y).all(), "a payload that decodes must decode to finite values"


def test_ten_thousand_mutations():
    rng = np.random.default_rng(2026)
    decoded = rejected = 0
    for i in range(10_000):
        data = mutate(rng, VALID[i % len(VALID)])
        try:
            gz.decode(data, max_numel=1 << 16)
            decoded += 1
        except gz.PayloadError:
            rejected += 1
        check(data)
    # both outcomes occur: the mutations reach deep checks and some stay valid
    assert rejected > 5000 and decoded > 100


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_random_bytes(data):
    check(data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID), st.data())
def test_hypothesis_mutations(raw, data):
    i = data.draw(st.integers(0, len(raw) - 1))
    v = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    b = bytearray(raw)
    b[i] = v
    check(bytes(restamp(b)))
    check(bytes(restamp(bytearray(raw[:cut]))))
    check(bytes(restamp(bytearray(raw[:4]) + bytes([v]) + raw[5:])))  # version byte


@pytest.mark.parametrize("raw", VALID[:3])
def test_valid_payloads_still_decode(raw):
    assert torch.isfinite(gz.decode(raw)).all()
