"""Adapters for the frameworks users train with (docs/integrations.md).

Each submodule imports its framework; this package imports none of them, so ``import
gradzip`` never pulls Lightning or Accelerate in:

- :mod:`gradzip.integrations.lightning`: ``GradzipDDPStrategy``, a Lightning
  ``DDPStrategy`` that registers the gradzip hook on CPU and GPU and keeps its state in
  Lightning's checkpoints (``pip install gradzip[lightning]``);
- :mod:`gradzip.integrations.accelerate`: ``register(accelerator, model, spec)`` after
  ``accelerator.prepare`` (``pip install gradzip[accelerate]``).

FSDP2 (``torch.distributed.fsdp.fully_shard``) is torch's own: :mod:`gradzip.fsdp`.
"""
