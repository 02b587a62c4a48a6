"""gradzip.fsdp: FSDP2 (fully_shard) with gradzip's reduce-scatter, 2 CPU ranks over gloo.

In one spawn, each rank checks: the identity compressor equals FSDP2's own reduce-scatter
bit for bit; ``topk:k=0.01`` with error feedback, cut and resumed from state dicts, equals
the uninterrupted run bit for bit; ``fosgd`` trains (the loss falls) and sends far fewer
bytes than float32.
"""

from __future__ import annotations

import faulthandler
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard

from gradzip import fsdp


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    fully_shard(m[0])  # 1088 coordinates: compressed
    fully_shard(m[2])  # 4160: compressed
    fully_shard(m)  # the root holds the last layer, 260: below min_numel, reduced dense
    return m


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 16, generator=g)
    return x, (x[:, :4] > 0).long().argmax(1)  # a learnable target


def _train(m, opt, rank: int, steps: range, fixed: bool = False) -> list[float]:
    losses = []
    for t in steps:
        x, y = _batch(rank, 0 if fixed else t)
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _local(m) -> torch.Tensor:
    return torch.cat([p.to_local().detach().reshape(-1) for p in m.parameters()]).clone()


def _sgd(m):
    return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)


def _identity_is_fsdp(rank: int) -> None:
    ref = _model()
    _train(ref, _sgd(ref), rank, range(3))
    m = _model()
    state = fsdp.register(m, "identity")
    _train(m, _sgd(m), rank, range(3))
    assert torch.equal(_local(m), _local(ref)), "identity differs from FSDP2's reduce-scatter"
    tr = state.traffic()
    assert tr["compressed_buckets"] == 2 * 3 and tr["dense_buckets"] == 3, tr
    assert state.steps == {"": 3, "0": 3, "2": 3}


def _resume_is_exact(rank: int) -> None:
    whole = _model()
    fsdp.register(whole, "topk:k=0.01")
    _train(whole, _sgd(whole), rank, range(6))

    m = _model()
    state = fsdp.register(m, "topk:k=0.01")
    assert state.config == {"uplink": "topk:k=0.01", "uplink_rule": "ef"}
    opt = _sgd(m)
    _train(m, opt, rank, range(3))
    saved = (m.state_dict(), opt.state_dict(), state.state_dict())
    assert set(saved[2]["worker_error"]) == {"0", "2"}  # the root's is reduced dense

    m2 = _model()
    state2 = fsdp.register(m2, "topk:k=0.01")
    opt2 = _sgd(m2)
    m2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    state2.load_state_dict(saved[2])
    _train(m2, opt2, rank, range(3, 6))
    assert torch.equal(_local(m2), _local(whole)), "resumed run differs from the whole run"


def _fosgd_trains(rank: int) -> None:
    m = _model()
    state = fsdp.register(m, "fosgd")
    losses = _train(m, _sgd(m), rank, range(12), fixed=True)  # each rank fits its batch
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    tr = state.traffic()
    fp32 = 12 * (1088 + 4160) // 2 * 4  # the chunks sent to the other rank, in float32
    assert tr["compressed_buckets"] == 2 * 12 and 0 < tr["sent"] < fp32 / 8, (tr, fp32)


def _worker(rank: int, port: int) -> None:
    faulthandler.enable()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    _identity_is_fsdp(rank)
    _resume_is_exact(rank)
    _fosgd_trains(rank)
    from gradzip import ddp

    ddp.shutdown()  # barrier, destroy the group, exit without finalization (docs/ddp.md)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_two_ranks(monkeypatch):
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "GRADZIP_THREADS"):
        monkeypatch.setenv(var, "1")
    mp.spawn(_worker, args=(_free_port(),), nprocs=2)


def test_register_errors():
    with pytest.raises(ValueError, match="fully_shard"):
        fsdp.register(nn.Linear(4, 4), "fosgd")
    with pytest.raises(ValueError, match="nosuch"):
        fsdp.GradzipFSDPState("nosuch")
    with pytest.raises(ValueError, match="dq"):
        fsdp.GradzipFSDPState("dqgd")
    assert fsdp.GradzipFSDPState("memsgd-topk").config == {
        "uplink": "topk:k=0.01",
        "uplink_rule": "ef",
    }
