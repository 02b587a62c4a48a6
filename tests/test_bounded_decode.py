"""Decodes in the engines and the hook are bounded by what the receiver expects: a payload
that claims more elements, another codec, another step, sender or seed is refused with
PayloadError before anything is allocated (issue 17, item 4)."""

from __future__ import annotations

import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch

import gradzip as gz
from gradzip.engines.core import SERVER, Algorithm
from gradzip.methods import method
from gradzip.wire import CRC_OFFSET, PayloadError


def _restamp(data: torch.Tensor, offset: int, fmt: str, value: int) -> torch.Tensor:
    """The payload with one header field rewritten and its CRC made valid again."""
    b = bytearray(data.numpy().tobytes())
    struct.pack_into(fmt, b, offset, value)
    crc = zlib.crc32(bytes(b[:CRC_OFFSET]) + bytes(b[CRC_OFFSET + 4 :]))
    struct.pack_into("<I", b, CRC_OFFSET, crc)
    return torch.from_numpy(np.frombuffer(bytes(b), dtype=np.uint8).copy())


def _algo(spec: str, d: int = 1000) -> Algorithm:
    return Algorithm(method("sgd", uplink=spec, downlink=spec), d, seed=5)


def test_a_decode_bomb_is_refused_before_allocating():
    a = _algo("topk:k=10")
    p = a.up.encode(torch.randn(1000), seed=5, step=0, worker=0).data
    bomb = _restamp(p, 36, "<Q", 1 << 31)  # shape[0]: 2^31 elements, CRC valid
    assert bomb.numel() < 200
    with pytest.raises(PayloadError):  # the library's own cap (2^31) lets it parse...
        gz.decode(bomb, max_numel=1 << 20)
    tracemalloc.start()
    with pytest.raises(PayloadError, match="1000"):  # ...the engines' decode does not
        a.aggregate(0, [bomb], 1.0, a_server_state())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 * 4 * 1000 + (1 << 16), peak


def a_server_state():
    from gradzip.engines.core import ServerState

    return ServerState()


@pytest.mark.parametrize("spec", ["fosgd", "topk:k=0.1", "qsgd:levels=4"])
def test_stale_misrouted_or_foreign_payloads_are_named(spec):
    a = _algo(spec)
    x = torch.randn(1000)
    good = a.up.encode(x, seed=5, step=4, worker=1).data
    y = a.decode_uplink(good, "worker 1", 4, 1)  # the expected one decodes
    assert torch.equal(y, gz.decode(good).float())
    cases = {
        "step 4, expected 5": lambda: a.decode_uplink(good, "worker 1", 5, 1),
        "sender id 1, expected worker 0": lambda: a.decode_uplink(good, "worker 0", 4, 0),
        "expected the server": lambda: a.decode_downlink(good, "server", 4),
        "seed 6, expected 5": lambda: a.decode_uplink(
            a.up.encode(x, seed=6, step=4, worker=1).data, "worker 1", 4, 1
        ),
        r"shape \(999,\)": lambda: a.decode_uplink(
            a.up.encode(x[:999], seed=5, step=4, worker=1).data, "worker 1", 4, 1
        ),
        "codec": lambda: a.decode_uplink(
            gz.compressor("identity").encode(x, seed=5, step=4, worker=1).data, "w", 4, 1
        ),
    }
    for what, call in cases.items():
        with pytest.raises(PayloadError, match=what):
            call()
    down = a.down.encode(x, seed=5, step=4, worker=SERVER).data
    assert torch.equal(a.decode_downlink(down, "server", 4), gz.decode(down).float())
    with pytest.raises(PayloadError, match="step 4, expected 3"):
        a.apply(torch.zeros(1000), down, 0.1, 3)
