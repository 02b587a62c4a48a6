"""The channels of the torch.distributed engines and how their payloads are framed.

Every payload between two processes travels on a channel (:mod:`gradzip.stream`): worker
i's uplink of shard j, and shard j's downlink (the same bytes to every rank that receives
it, so one channel with a receiver on each). The parameter server is the sharded layout
with one shard. With ``framing="stream"`` (the default) a channel sends its static header
once and then 8 bytes a message; with ``"payload"`` every message is a standalone
payload, as the simulated engines count them. Only the framing differs: the receiver hands
the decoders the sender's payload byte for byte, so trajectories are the same.
"""

from __future__ import annotations

import torch

from ..stream import StreamReceiver, StreamSender
from ..wire import MAX_NUMEL, Payload

FRAMINGS = ("stream", "payload")


def up_channel(worker: int, shard: int = 0, shards: int = 1) -> int:
    """The channel of worker ``worker``'s uplink of shard ``shard`` (even ids)."""
    return 2 * (shard * shards + worker)


def down_channel(shard: int = 0) -> int:
    """The channel of shard ``shard``'s downlink (odd ids)."""
    return 2 * shard + 1


def check_framing(framing: str) -> str:
    if framing not in FRAMINGS:
        raise ValueError(f"unknown framing {framing!r}; valid: {', '.join(FRAMINGS)}")
    return framing


class Links:
    """This process's ends of its channels, each made on first use. ``max_numel`` caps
    what an opener may declare (a payload here holds at most the model's coordinates)."""

    def __init__(self, framing: str = "stream", max_numel: int = MAX_NUMEL):
        self.stream = check_framing(framing) == "stream"
        self.max_numel = max_numel
        self._tx: dict[int, StreamSender] = {}
        self._rx: dict[int, StreamReceiver] = {}

    def pack(self, channel: int, data: torch.Tensor) -> torch.Tensor:
        """The bytes that carry payload ``data`` on ``channel``."""
        if not self.stream:
            return data
        tx = self._tx.get(channel)
        if tx is None:
            tx = self._tx[channel] = StreamSender(channel)
        return tx.pack(data)

    def unpack(self, channel: int, msg: torch.Tensor, step: int) -> Payload | torch.Tensor:
        """The payload ``msg`` carries on ``channel`` at ``step`` (what ``decode`` reads);
        raises :class:`~gradzip.wire.PayloadError` on anything else."""
        if not self.stream:
            return msg
        rx = self._rx.get(channel)
        if rx is None:
            rx = self._rx[channel] = StreamReceiver(channel, max_numel=self.max_numel)
        return rx.unpack(msg, step=step)
