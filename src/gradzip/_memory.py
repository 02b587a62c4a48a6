"""Per-parameter flat memories of the DDP hook (error feedback, worker and server side).

Memories are kept per parameter, keyed by its name, so that they survive DDP's bucket
rebuilds; those written together (one bucket) are views of one flat tensor, so reading a
bucket back copies nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

FORMAT = "gradzip.ddp/1"
_REPLICATED = "replicated"  # a server memory loaded from a checkpoint: the total, on every rank


class Memory(dict):
    """Per-parameter flat memories (name -> 1-D float32 tensor). Those written together
    are views of one flat tensor per bucket, so reading a bucket back copies nothing."""

    def __init__(self, *args):
        super().__init__(*args)
        self._flat: dict[tuple, tuple[torch.Tensor, tuple]] = {}

    def get_flat(self, names, sizes, dev) -> torch.Tensor | None:
        """The bucket's memory as one vector (None if none of its parameters has one)."""
        key = tuple(names)
        hit = self._flat.get(key)
        if hit is not None and all(
            dict.get(self, nm) is v for nm, v in zip(names, hit[1], strict=True)
        ):
            return hit[0]
        if not any(nm in self for nm in names):
            return None
        flat = torch.cat(
            [
                self[nm].to(dev, torch.float32) if nm in self else torch.zeros(s, device=dev)
                for nm, s in zip(names, sizes, strict=True)
            ]
        )
        self.put_flat(names, sizes, flat)
        return flat

    def put_flat(self, names, sizes, flat: torch.Tensor) -> None:
        """Own ``flat`` (not copied) as the bucket's memory."""
        views = tuple(flat.split(sizes))
        for nm, v in zip(names, views, strict=True):
            self[nm] = v
        self._flat[tuple(names)] = (flat, views)


def migrate(state, names, sizes, sig, lo: int, hi: int, dev) -> None:
    """Server memories placed by another bucket layout (or loaded): gather the total of
    each and keep this rank's shard [lo, hi) of the bucket."""
    parts = []
    for nm, s in zip(names, sizes, strict=True):
        m = state.server_error.get(nm)
        if m is None or (state._owner.get(nm) == _REPLICATED and state.rank != 0):
            parts.append(torch.zeros(s, device=dev))
        else:
            parts.append(m.to(dev, torch.float32))
    full = torch.cat(parts)
    dist.all_reduce(full, group=state.group)
    full[:lo] = 0
    full[hi:] = 0
    state.server_error.put_flat(names, sizes, full)
    for nm in names:
        state._owner[nm] = sig


def gather(state) -> dict:
    """The full state (every rank's memories). A collective: call it on every rank."""
    state._bind_group()
    state._pipeline.drain()  # no bucket's collective in flight
    n, dev = state.n, None
    for m in (*state.worker_error.values(), *state.server_error.values()):
        dev = m.device
        break
    cdev = state._comm_device(dev if dev is not None else torch.device("cpu"))
    if state.backend == "nccl" and cdev.type == "cpu":
        cdev = torch.device("cuda", torch.cuda.current_device())
    wnames = [nm for nm in state.names if nm in state.worker_error]
    snames = [nm for nm in state.names if nm in state.server_error]
    flat = torch.cat(
        [state.worker_error[nm].to(cdev, torch.float32) for nm in wnames]
        or [torch.zeros(0, device=cdev)]
    )
    gathered = [torch.empty_like(flat) for _ in range(n)]
    dist.all_gather(gathered, flat, group=state.group)
    sparts = []
    for nm in snames:
        m = state.server_error[nm].to(cdev, torch.float32)
        if state._owner.get(nm) == _REPLICATED and state.rank != 0:
            m = torch.zeros_like(m)
        sparts.append(m)
    sflat = torch.cat(sparts or [torch.zeros(0, device=cdev)])
    dist.all_reduce(sflat, group=state.group)
    wsizes = [state.worker_error[nm].numel() for nm in wnames]
    ssizes = [state.server_error[nm].numel() for nm in snames]
    per_rank = [g.cpu().split(wsizes) for g in gathered]
    return {
        "format": FORMAT,
        "world": n,
        "step": state.step,
        "skipped_steps": state._guard.skipped_steps,
        "seed": state.seed,
        "config": state.config.as_dict(),
        "worker_error": {
            nm: torch.stack([pr[k] for pr in per_rank]).clone() for k, nm in enumerate(wnames)
        },
        "server_error": {
            nm: part.clone() for nm, part in zip(snames, sflat.cpu().split(ssizes), strict=True)
        },
    }


def restore(state, sd: dict) -> None:
    """Restore a :meth:`GradzipState.state_dict` (on every rank; no communication)."""
    state._bind_group()
    state._pipeline.drain()
    state._layouts.clear()  # the channels open again (the step may go back)
    if not isinstance(sd, dict) or sd.get("format") != FORMAT:
        raise ValueError(f"not a gradzip.ddp state dict (expected format {FORMAT!r})")
    if sd["world"] != state.n:
        raise ValueError(
            f"the checkpoint holds the memories of {sd['world']} ranks, this run has "
            f"{state.n}: error memories cannot be redistributed"
        )
    if sd["config"] != state.config.as_dict():
        raise ValueError(
            f"the checkpoint was made with {sd['config']}, this hook is {state.config.as_dict()}"
        )
    names = set(sd["worker_error"]) | set(sd["server_error"])
    if state.names:
        check_names(state, names)
    else:  # named at the first step: checked then
        state._pending_names = names
    for nm, m in sd["worker_error"].items():
        if m.shape[0] != state.n:
            raise ValueError(f"worker memory of {nm!r} has {m.shape[0]} ranks")
    state.step = int(sd["step"])
    state._guard.skipped_steps = int(sd.get("skipped_steps", 0))  # absent before 2026-12
    state.seed = int(sd["seed"])
    state.worker_error = Memory(
        {nm: m[state.rank].clone().float() for nm, m in sd["worker_error"].items()}
    )
    state.server_error = Memory({nm: m.clone().float() for nm, m in sd["server_error"].items()})
    state._owner = dict.fromkeys(state.server_error, _REPLICATED)


def check_names(state, names) -> None:
    """Raise ValueError unless every name of a loaded checkpoint is a parameter's."""
    bad = set(names) - set(state.names)
    if bad:
        raise ValueError(
            f"checkpoint memories for unknown parameters: {sorted(bad)[:5]} (this state "
            f"names its parameters {state.names[:3]}...; a checkpoint loads into a state "
            "of its own naming: bound to the model, or not)"
        )
