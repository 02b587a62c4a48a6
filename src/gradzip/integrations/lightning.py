"""gradzip's DDP hook in PyTorch Lightning: a ``DDPStrategy`` that registers it.

::

    from gradzip.integrations.lightning import GradzipDDPStrategy

    trainer = L.Trainer(strategy=GradzipDDPStrategy("fosgd"), accelerator="cpu", devices=2)

Why a strategy: Lightning's ``DDPStrategy(ddp_comm_hook=...)`` registers a hook only when
the device is CUDA (``DDPStrategy._register_ddp_hooks`` checks ``root_device.type ==
"cuda"``) and wants its state built before the model is wrapped, while a
:class:`gradzip.ddp.GradzipState` is built from the wrapped model. This strategy builds the
state in :meth:`configure_ddp`, right after Lightning wraps the module in
``DistributedDataParallel``, on any device.

Checkpoints: when Lightning saves a checkpoint that holds the optimizer state (not
``save_weights_only``), the strategy adds the hook's state (step, seed, error memories of
every rank; :meth:`GradzipState.state_dict`) under the key ``"gradzip"``; ``Trainer.fit(...,
ckpt_path=...)`` restores it, so a resumed run draws the same seeds and keeps its memories.
``GradzipState.state_dict`` is a collective: Lightning calls ``save_checkpoint`` on every
rank, as it must for any distributed strategy.

Options: keyword arguments that :class:`gradzip.ddp.GradzipState` takes (``layout``,
``start_step``, ``min_numel``, ``downlink``, ``seed``, ...) go to the hook; the others go
to ``DDPStrategy`` (``find_unused_parameters``, ``static_graph``, ``bucket_cap_mb``,
``start_method``, ...). ``ddp_comm_hook``, ``ddp_comm_state``, ``ddp_comm_wrapper`` and
``model_averaging_period`` are refused: the strategy's hook is gradzip's.
"""

from __future__ import annotations

import inspect
from typing import Any

from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from .. import ddp
from ..compressors import compressor
from ..methods import PRESETS

__all__ = ["CHECKPOINT_KEY", "GradzipDDPStrategy"]

CHECKPOINT_KEY = "gradzip"
_REFUSED = ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period")


def _state_options() -> set[str]:
    """GradzipState's keyword options; ``process_group`` is the strategy's (the world), and
    so is ``timeout`` (the process group's; the hook's is ``gradzip_timeout``)."""
    params = inspect.signature(ddp.GradzipState).parameters.values()
    return {p.name for p in params if p.kind is p.KEYWORD_ONLY} - {"process_group", "timeout"}


class GradzipDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` with gradzip's communication hook, on CPU and GPU.

    Args:
        spec: a method preset (``gradzip methods``) or a compressor spec, as for
            :func:`gradzip.ddp.register`.
        **kwargs: GradzipState's options (to the hook) and DDPStrategy's (the rest;
            ``timeout`` is DDPStrategy's, the hook's is ``gradzip_timeout``, in seconds).

    After ``trainer.fit``, :attr:`gradzip_state` is the hook's state (``traffic()``...).
    """

    def __init__(self, spec: str = "fosgd", **kwargs: Any) -> None:
        refused = [k for k in _REFUSED if k in kwargs]
        if refused:
            raise TypeError(
                f"GradzipDDPStrategy registers gradzip's hook; it takes no {', '.join(refused)}"
            )
        if not isinstance(spec, str) or spec not in PRESETS:
            compressor(spec)  # a bad spec fails here, before any process is launched
        names = _state_options()
        self.gradzip_spec = spec
        self.gradzip_options = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        if "gradzip_timeout" in kwargs:
            self.gradzip_options["timeout"] = kwargs.pop("gradzip_timeout")
        self.gradzip_state: ddp.GradzipState | None = None
        self._gradzip_restore: dict | None = None
        super().__init__(**kwargs)

    def configure_ddp(self) -> None:
        """Wrap the module in DDP (Lightning), then register gradzip's hook on it."""
        super().configure_ddp()  # registers no hook of its own: it has none (see __init__)
        state = self.gradzip_state
        if state is None:
            state = ddp.GradzipState(self.model, self.gradzip_spec, **self.gradzip_options)
        # else: a second fit of the same Trainer; the parameters, hence the keys of the
        # memories, are the same objects, so the state carries on
        self.model.register_comm_hook(state, ddp.hook)
        self.gradzip_state = state
        sd, self._gradzip_restore = self._gradzip_restore, None
        if sd is not None:
            state.load_state_dict(sd)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None
    ) -> None:
        """Add the hook's state to a checkpoint that holds the optimizer's. Every rank
        runs this (Lightning's contract), as ``GradzipState.state_dict`` needs."""
        if self.gradzip_state is not None and "optimizer_states" in checkpoint:
            checkpoint = {**checkpoint, CHECKPOINT_KEY: self.gradzip_state.state_dict()}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Read a checkpoint (Lightning calls this before :meth:`configure_ddp` when
        fitting with ``ckpt_path``); its gradzip state is loaded once the hook exists."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self._gradzip_restore = checkpoint.get(CHECKPOINT_KEY)
        if self._gradzip_restore is None and "optimizer_states" in checkpoint:
            rank_zero_warn(
                f"{checkpoint_path} holds no gradzip state: the hook starts at step 0 with "
                "empty error memories"
            )
        return checkpoint
