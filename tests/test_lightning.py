"""gradzip.integrations.lightning: a real Lightning Trainer, 2 CPU ranks over gloo.

The test runs this file as a script, as a user runs a training script: Lightning's
default launcher starts the second rank by running the script again. Each rank trains
with ``fosgd`` and ``topk:k=0.01`` (error feedback both ways): an uninterrupted run of two
epochs, and the same run cut after the first epoch's checkpoint and resumed from it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

SPECS = ("fosgd", "topk:k=0.01")
STEPS_PER_EPOCH = 2


def _job(out: Path) -> None:
    """One rank (run as a script; Lightning starts the other ranks the same way)."""
    import lightning.pytorch as L
    import torch.nn.functional as F
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from gradzip import ddp
    from gradzip.integrations.lightning import GradzipDDPStrategy

    torch.set_num_threads(1)

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 4)  # 1348 coordinates

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.b(F.relu(self.a(x))), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 16, generator=g), torch.randint(4, (32,), generator=g))
    loader = DataLoader(data, batch_size=32 // (2 * STEPS_PER_EPOCH))  # 2 steps per epoch

    def fit(spec: str, epochs: int, ckpt: str | None = None, callbacks=()):
        torch.manual_seed(0)
        model = Net()
        trainer = L.Trainer(
            strategy=GradzipDDPStrategy(spec, timeout=timedelta(seconds=180)),  # no orphan hangs
            accelerator="cpu",
            devices=2,
            max_epochs=epochs,
            logger=False,
            callbacks=list(callbacks),
            enable_checkpointing=bool(callbacks),
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=out,
        )
        trainer.fit(model, loader, ckpt_path=ckpt)
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
        return params, trainer.strategy.gradzip_state

    result = {}
    for spec in SPECS:
        name = spec.replace(":", "-").replace("=", "")
        whole, state = fit(spec, 2)
        cut = ModelCheckpoint(dirpath=out, filename=f"{name}-e1")
        fit(spec, 1, callbacks=[cut])
        resumed, resumed_state = fit(spec, 2, ckpt=str(out / f"{name}-e1.ckpt"))
        result[spec] = {
            "whole": whole,
            "resumed": resumed,
            "traffic": state.traffic(),
            "steps": (state.step, resumed_state.step),
            "numel": whole.numel(),
        }
    rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.save(result, out / f"rank{rank}.pt")
    ddp.shutdown()  # barrier (both ranks wrote), then exit without finalization


def test_lightning_strategy_two_ranks(tmp_path):
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", GRADZIP_THREADS="1")
    env.pop("LOCAL_RANK", None)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path)],
        env=env,
        capture_output=True,  # the second rank inherits the pipes: run waits for both
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    print(f"lightning job: {time.perf_counter() - t0:.1f} s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for spec in SPECS:
        r0, r1 = ranks[0][spec], ranks[1][spec]
        assert torch.equal(r0["whole"], r1["whole"]), f"{spec}: replicas differ"
        assert torch.equal(r0["resumed"], r1["resumed"]), f"{spec}: resumed replicas differ"
        assert torch.equal(r0["whole"], r0["resumed"]), f"{spec}: resume is not bit-identical"
        assert r0["steps"] == (2 * STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH)
        tr = r0["traffic"]
        assert tr["compressed_buckets"] == 2 * STEPS_PER_EPOCH and tr["dense_buckets"] == 0
        fp32_ring = 2 * STEPS_PER_EPOCH * 4 * r0["numel"]  # 2 (n-1)/n of the buffer, n = 2
        assert 0 < tr["sent"] < fp32_ring / 8, (spec, tr["sent"], fp32_ring)


def test_refuses_another_hook():
    from gradzip.integrations.lightning import GradzipDDPStrategy

    with pytest.raises(TypeError, match="ddp_comm_hook"):
        GradzipDDPStrategy("fosgd", ddp_comm_hook=lambda s, b: None)
    with pytest.raises(ValueError, match="nosuch"):
        GradzipDDPStrategy("nosuch")
    s = GradzipDDPStrategy("topk:k=0.01", start_step=3, find_unused_parameters=True)
    assert s.gradzip_options == {"start_step": 3}
    assert s._ddp_kwargs == {"find_unused_parameters": True}


def test_gradzip_imports_no_framework():
    """Only the adapter modules import Lightning or Accelerate (at any level)."""
    import ast

    src = Path(__file__).resolve().parents[1] / "src" / "gradzip"
    allowed = {"integrations/lightning.py": "lightning", "integrations/accelerate.py": "accelerate"}
    for path in src.rglob("*.py"):
        rel = path.relative_to(src).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in ("lightning", "pytorch_lightning", "accelerate"):
                    assert allowed.get(rel) == top, f"{rel} imports {name}"


if __name__ == "__main__":
    _job(Path(sys.argv[1]))
