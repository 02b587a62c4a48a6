"""gradzip's DDP hook in Hugging Face Accelerate: one call after ``accelerator.prepare``.

::

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = gradzip.integrations.accelerate.register(accelerator, model, "fosgd")

Why a function: ``DistributedDataParallelKwargs(comm_hook=...)`` takes only Accelerate's
``DDPCommunicationHookType`` (fp16, bf16, PowerSGD, batched PowerSGD), and a
:class:`gradzip.ddp.GradzipState` is built from the wrapped model, which exists only after
``prepare``. :func:`register` finds the ``DistributedDataParallel`` module that ``prepare``
returned, registers the hook on it and hands the state to
``accelerator.register_for_checkpointing``, so that ``accelerator.save_state`` /
``load_state`` save and restore the step, the seed and every rank's error memories
(``save_state`` is called on every rank, as :meth:`GradzipState.state_dict`, a
collective, needs).
"""

from __future__ import annotations

import warnings

from torch.nn.parallel import DistributedDataParallel

from .. import ddp

__all__ = ["register"]


def _ddp_module(model) -> DistributedDataParallel | None:
    """The DDP module ``prepare`` returned, under ``torch.compile``'s wrapper if any."""
    seen = 0
    while model is not None and seen < 4:
        if isinstance(model, DistributedDataParallel):
            return model
        model, seen = getattr(model, "_orig_mod", None), seen + 1
    return None


def register(accelerator, model, spec: str = "fosgd", **options) -> ddp.GradzipState | None:
    """Register gradzip's DDP hook on a model that ``accelerator.prepare`` wrapped.

    Args:
        accelerator: the ``accelerate.Accelerator`` that prepared ``model``.
        model: what ``prepare`` returned (a ``DistributedDataParallel``, maybe compiled).
        spec, **options: as for :func:`gradzip.ddp.register`.

    Returns the hook's state, registered for checkpointing, or None (with a warning) in a
    single-process run, where nothing is communicated. Raises TypeError where the model is
    distributed by something other than DDP (FSDP, DeepSpeed, ...).
    """
    wrapped = _ddp_module(model)
    if wrapped is None:
        if accelerator.num_processes == 1:
            warnings.warn(
                "gradzip.integrations.accelerate.register: a single process exchanges no "
                "gradients; no hook registered",
                stacklevel=2,
            )
            return None
        raise TypeError(
            f"accelerator.prepare returned a {type(model).__name__} "
            f"(distributed_type {accelerator.distributed_type}), not a "
            "DistributedDataParallel model: gradzip's hook is a DDP communication hook "
            "(for FSDP2, see gradzip.fsdp)"
        )
    state = ddp.register(wrapped, spec, **options)
    accelerator.register_for_checkpointing(state)
    return state
