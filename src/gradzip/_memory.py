"""Per-parameter flat memories of the DDP hook (error feedback, worker and server side).

Memories are kept per parameter, keyed by its name, so that they survive DDP's bucket
rebuilds; those written together (one bucket) are views of one flat tensor, so reading a
bucket back copies nothing.
"""

from __future__ import annotations

import torch


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
