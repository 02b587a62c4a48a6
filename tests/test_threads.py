"""Results never depend on thread settings (issue 17, item 6).

numba's OpenMP layer used to change torch's thread count when its pool launched
(``omp_set_num_threads(NUMBA_NUM_THREADS)`` in the OpenMP runtime torch shares); the
engines pin torch's thread count per process (the ``threads`` config key), so the
torch.distributed engines equal the simulated ones whatever the environment says.
"""

from __future__ import annotations

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
