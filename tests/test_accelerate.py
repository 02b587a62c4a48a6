"""gradzip.integrations.accelerate: a real Accelerator, 2 CPU ranks over gloo.

The test runs this file under torchrun (``accelerate launch`` is torchrun underneath), 2
ranks. Each trains with ``fosgd`` and ``topk:k=0.01``
(error feedback both ways): an uninterrupted run, and the same run cut in the middle by
``accelerator.save_state`` and resumed in a fresh Accelerator with ``load_state``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

SPECS = ("fosgd", "topk:k=0.01")
STEPS = 4


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 16, generator=g), torch.randint(4, (8,), generator=g)


def _run(spec: str, steps: range, save: str | None = None, load: str | None = None):
    import torch.nn.functional as F
    from accelerate import Accelerator
    from torch import nn

    from gradzip.integrations import accelerate as gza

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))  # 1348 coordinates
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = accelerator.prepare(model, opt)
    state = gza.register(accelerator, model, spec)
    if load is not None:
        accelerator.load_state(load)
    for t in steps:
        x, y = _batch(accelerator.process_index, t)
        opt.zero_grad()
        accelerator.backward(F.cross_entropy(model(x), y))
        opt.step()
    if save is not None:
        accelerator.save_state(save)
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    return params, state


def _worker(out: str) -> None:
    """One rank, started by torchrun (RANK, WORLD_SIZE, MASTER_ADDR... set by it)."""
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    from gradzip import ddp

    result = {}
    for spec in SPECS:
        ckpt = os.path.join(out, spec.replace(":", "-"))
        whole, state = _run(spec, range(STEPS))
        _run(spec, range(STEPS // 2), save=ckpt)
        resumed, resumed_state = _run(spec, range(STEPS // 2, STEPS), load=ckpt)
        result[spec] = {
            "whole": whole,
            "resumed": resumed,
            "traffic": state.traffic(),
            "steps": (state.step, resumed_state.step),
        }
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    ddp.shutdown()  # barrier (both ranks wrote), then exit without finalization


def test_accelerate_two_ranks(tmp_path):
    import accelerate  # noqa: F401  (gradzip[accelerate] is part of the test extra)

    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", GRADZIP_THREADS="1")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", __file__, str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    print(f"accelerate job (torchrun): {time.perf_counter() - t0:.1f} s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for spec in SPECS:
        r0, r1 = ranks[0][spec], ranks[1][spec]
        assert torch.equal(r0["whole"], r1["whole"]), f"{spec}: replicas differ"
        assert torch.equal(r0["resumed"], r1["resumed"]), f"{spec}: resumed replicas differ"
        assert torch.equal(r0["whole"], r0["resumed"]), f"{spec}: resume is not bit-identical"
        assert r0["steps"] == (STEPS, STEPS)
        tr = r0["traffic"]
        assert tr["compressed_buckets"] == STEPS and tr["dense_buckets"] == 0
        fp32_ring = STEPS * 4 * r0["whole"].numel()  # 2 (n-1)/n of the buffer, n = 2
        assert 0 < tr["sent"] < fp32_ring / 8, (spec, tr["sent"], fp32_ring)


def test_single_process_registers_nothing():
    import pytest
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from torch import nn

    from gradzip.integrations import accelerate as gza

    try:
        accelerator = Accelerator(cpu=True)
        model = accelerator.prepare(nn.Linear(2, 2))
        with pytest.warns(UserWarning, match="single process"):
            assert gza.register(accelerator, model, "fosgd") is None
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # a process-wide singleton


if __name__ == "__main__":  # a rank under torchrun
    _worker(sys.argv[1])
