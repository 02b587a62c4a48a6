"""benchmarks/chaos_faults.py's own logic: the crafted decode bomb and how a stopped rank's
name is read from the engines' messages (the scenarios themselves run in the benchmark)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import chaos_faults as cf  # noqa: E402
from gradzip.engines.core import Algorithm  # noqa: E402
from gradzip.methods import method  # noqa: E402
from gradzip.wire import Payload, PayloadError  # noqa: E402


def test_the_top_k_bomb_is_a_valid_payload_that_the_engines_refuse():
    a = Algorithm(method("sgd", uplink="topk:k=10", downlink="topk:k=10"), 1000, seed=5)
    small = a.up.encode(torch.randn(1000), seed=5, step=cf.STEP, worker=cf.WORKER).to_bytes()
    b = cf.bomb(small, 1 << 31)
    assert len(b) < 200
    h = Payload.from_bytes(b).header  # whole and CRC-valid under the library's default cap
    assert h.shape == (1 << 31,) and (h.step, h.worker) == (cf.STEP, cf.WORKER)
    data = torch.frombuffer(bytearray(b), dtype=torch.uint8)
    with pytest.raises(PayloadError, match="more than the cap max_numel=1000"):
        a.decode_uplink(data, "worker 1", cf.STEP, cf.WORKER)


@pytest.mark.parametrize(
    "line, named",
    [
        ("[rank0]: gradzip.engines.liveness.RankTimeout: worker 1 (rank 2) did not answer "
         "within 10 s at step 47 (the server (rank 0) was receiving the workers' replies): "
         "worker 1 (rank 2): heartbeat stopped", {"worker 1 (rank 2)"}),
        ("gradzip worker (rank 1): the server (rank 0) did not answer at step 46 while this "
         "rank was sending its uplink", {"the server (rank 0)"}),
        ("gradzip worker (rank 1): worker 0 (rank 0) did not answer at step 53 while this "
         "rank was exchanging uplink sizes", {"worker 0 (rank 0)"}),
        ("gradzip worker (rank 1): lost the server: Connection closed by peer", set()),
    ],
)  # fmt: skip
def test_the_rank_named_in_a_liveness_message(line, named):
    assert {m.group(1) for m in cf.NAMED.finditer(line)} == named
