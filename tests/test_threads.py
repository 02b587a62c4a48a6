"""Results never depend on thread settings (issue 17, item 6).

numba's OpenMP layer used to change torch's thread count when its pool launched
(``omp_set_num_threads(NUMBA_NUM_THREADS)`` in the OpenMP runtime torch shares); the
engines pin torch's thread count per process (the ``threads`` config key), so the
torch.distributed engines equal the simulated ones whatever the environment says.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_PROBE = """
import torch
before = torch.get_num_threads()
import gradzip as gz
from gradzip._numba import bits
import numpy as np
x = torch.randn(1 << 18)
for spec in ("fosgd", "sign", "qsgd:levels=16"):
    c = gz.compressor(spec)
    c.decode(c.encode(x, seed=1))
out = np.empty(x.numel() // 8, np.uint8)
bits.pack_flags(x.numpy(), out)  # a parallel=True kernel: numba's pool is running
print(before, torch.get_num_threads())
"""


@pytest.mark.parametrize(
    "env", [{"NUMBA_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "1"}, {"NUMBA_NUM_THREADS": "3"}]
)
def test_gradzip_leaves_torch_threads_alone(env):
    drop = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")
    full = {k: v for k, v in os.environ.items() if k not in drop}
    r = subprocess.run(
        [sys.executable, "-c", _PROBE], env={**full, **env}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = r.stdout.split()
    assert before == after, (env, r.stdout)


def _x(run_dir):
    import torch

    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["engine"]["x"]


@pytest.mark.parametrize("engine", ["torchdist", "torchdist-sharded"])
def test_torchdist_equals_simulated_at_600k_parameters(engine, tmp_path, monkeypatch):
    """Every process of a run pins torch's thread count (``threads``, 1 by default): the
    spawned workers (given OMP_NUM_THREADS = their share of the cores) and this process
    (torch's default here) compute the same gradients, bit for bit, at d = 600,010."""
    import torch

    from gradzip.experiments.config import RunConfig
    from gradzip.experiments.runner import read_metrics, train

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    cfg = RunConfig(
        problem="mlp-digits", hidden=8000, method="memsgd-topk",
        workers=2, steps=3, eval_every=0, lr=0.1, seed=2, checkpoint_seconds=0,
    )  # fmt: skip
    ref = cfg.replace(engine="simulated" if engine == "torchdist" else "simulated-sharded")
    a = train(cfg.replace(engine=engine, out=str(tmp_path / "d")), progress=False)
    b = train(ref.replace(out=str(tmp_path / "s")), progress=False)
    assert torch.get_num_threads() == before  # the run's pin is undone
    assert json.loads((tmp_path / "s" / "config.json").read_text())["dim"] == 600_010
    assert torch.equal(_x(tmp_path / "d"), _x(tmp_path / "s"))
    assert [r["loss"] for r in read_metrics(tmp_path / "d")[0]] == [
        r["loss"] for r in read_metrics(tmp_path / "s")[0]
    ]
    assert a["test_loss"] == b["test_loss"]
