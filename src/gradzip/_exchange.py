"""The DDP hook's messages for one bucket layout: payloads framed on channels, sizes known.

The hook moves payloads with exact-size all-to-alls, so every rank must know the size of
every message before it arrives, without a length exchange. A payload's size is fixed by
its codec, parameters and length (:meth:`gradzip.engines.sharded.ShardLayout.probes`), and
so is its frame's (:mod:`gradzip.stream`). With ``framing="stream"`` (the default) each
channel's first message is an opener (8 bytes + the standalone payload) and every later
one a frame (8 bytes + the payload's sections); all channels of a layout open at its first
step on every rank (every rank sends on all of them each time the layout runs), so both
ends agree on which it is. ``framing="payload"`` sends standalone payloads.

The channels are those of the engines (:mod:`gradzip.engines.links`): rank i's uplink of
shard j, and shard j's downlink (one message to every rank). Receivers check each
message's step and channel and hand the decoders the sender's payload byte for byte, so
the results do not depend on the framing.

Every message ends with the sender's non-finite finding (:data:`gradzip._guard.TRAILER`
bytes, :func:`gradzip._guard.trailer`), counted in the sizes.
"""

from __future__ import annotations

import torch

from ._guard import TRAILER, read_trailer, trailer
from .engines.links import Links, down_channel, up_channel
from .engines.sharded import ShardLayout
from .stream import frame_size, opener_size


class BucketLinks:
    """This rank's ends of one layout's channels (rank ``rank`` of ``n``)."""

    def __init__(self, layout: ShardLayout, rank: int, n: int, framing: str, spec: tuple):
        self.lay, self.r, self.n = layout, rank, n
        self.links = Links(framing, max_numel=max(layout.sizes))
        self.stream = self.links.stream
        self.opened = False
        up, down = layout.probes()
        self._sizes = {
            "up": [(opener_size(p), frame_size(p), p.nbytes) for p in up],
            "down": [(opener_size(p), frame_size(p), p.nbytes) for p in down],
        }
        self.spec = spec  # (uplink spec, downlink spec), for errors

    def size(self, kind: str, j: int) -> int:
        """Bytes of this step's message of shard j (``kind``: ``up`` or ``down``)."""
        opener, frame, payload = self._sizes[kind][j]
        if not self.stream:
            return payload + TRAILER
        return (frame if self.opened else opener) + TRAILER

    def _up_channel(self, i: int, j: int) -> int:
        return up_channel(i, j, self.lay.n)

    def pack_up(self, j: int, data: torch.Tensor, found: list[int]) -> torch.Tensor:
        """This rank's uplink payload of shard j and its finding as its message."""
        msg = self.links.pack(self._up_channel(self.r, j), data)
        return self._checked("up", j, msg, trailer(found, self.r))

    def unpack_up(self, i: int, j: int, msg: torch.Tensor, t: int):
        """Rank i's uplink payload of shard j at step t, and its finding
        (``[kind, nan, inf, first, rank]``)."""
        msg, found = read_trailer(msg)
        return self.links.unpack(self._up_channel(i, j), msg, t), found

    def pack_down(self, j: int, data: torch.Tensor, found: list[int]) -> torch.Tensor:
        """Shard j's downlink payload (served here) and the first bad finding of its
        shard (``[kind, nan, inf, first, rank]``) as its message."""
        msg = self.links.pack(down_channel(j), data)
        return self._checked("down", j, msg, trailer(found[:4], found[4]))

    def unpack_down(self, j: int, msg: torch.Tensor, t: int):
        """Shard j's downlink payload at step t, and the finding its server forwards."""
        msg, found = read_trailer(msg)
        return self.links.unpack(down_channel(j), msg, t), found

    def _checked(self, kind: str, j: int, msg: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        msg = torch.cat([msg.reshape(-1), tail.to(msg.device)])
        expected = self.size(kind, j)
        if msg.numel() != expected:  # cannot happen for a codec whose decode validates
            spec = self.spec[0 if kind == "up" else 1]
            raise RuntimeError(
                f"gradzip.ddp: {spec} made a message of {msg.numel()} bytes where its codec "
                f"and length fix {expected}: the hook cannot size the exchange"
            )
        return msg
