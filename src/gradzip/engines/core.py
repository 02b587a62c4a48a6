"""The parameter-server step, once, for every engine (DESIGN 3.4).

Engines differ only in how bytes move. Each step t:

1. Worker i evaluates its gradient at the point its rule asks for (x, or DQ-GD's z_t).
2. It forms v_i by its feedback rule, sends the bytes of C_up(v_i) (seed from t, i), and
   updates its memory with what the server will decode.
3. The server decodes and averages the messages into g_hat, forms w (optionally with
   heavy-ball momentum), applies its own rule, and sends the bytes of C_down(w)
   (seed from t, SERVER).
4. Every replica, the server's included, applies the same decoded update:
   x <- x - s_t * decode(down), with s_t = lr_t for gradient-unit vectors and 1 for
   vectors that already carry the step size (``ef``). So no copy drifts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import feedback
from ..compressors import decode
from ..methods import Method
from ..wire import PayloadError

SERVER = (1 << 32) - 1  # the worker id the server's downlink seeds from


@dataclass
class WorkerState:
    """One worker's memory (a checkpoint holds one per worker)."""

    feedback: feedback.FeedbackState = field(default_factory=feedback.FeedbackState)

    def state_dict(self) -> dict:
        return {"feedback": self.feedback.state_dict()}

    @classmethod
    def from_state_dict(cls, sd: dict) -> WorkerState:
        return cls(feedback.FeedbackState.from_state_dict(sd["feedback"]))


@dataclass
class ServerState:
    """The server's memory: downlink error and momentum buffer."""

    feedback: feedback.FeedbackState = field(default_factory=feedback.FeedbackState)
    momentum: torch.Tensor | None = None  # (d,) heavy-ball buffer

    def state_dict(self) -> dict:
        m = None if self.momentum is None else self.momentum.clone()
        return {"feedback": self.feedback.state_dict(), "momentum": m}

    @classmethod
    def from_state_dict(cls, sd: dict) -> ServerState:
        m = sd.get("momentum")
        return cls(
            feedback.FeedbackState.from_state_dict(sd["feedback"]), None if m is None else m.clone()
        )


class Algorithm:
    """The step of a :class:`Method`, as pure functions of explicit state."""

    def __init__(self, method: Method, dim: int, seed: int = 0, momentum: float = 0.0):
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.method = method
        self.dim = dim
        self.seed = seed
        self.momentum = momentum
        self.down = method.downlink_compressor()
        # where the step size is applied (see the module docstring, step 4)
        self.up_units = feedback.in_update_units(method.uplink_rule)
        self.down_units = self.up_units or method.downlink_rule == "ef"

    # --- worker side ------------------------------------------------------------------
    def gradient_point(self, x: torch.Tensor, lr: float, state: WorkerState) -> torch.Tensor:
        return feedback.gradient_point(self.method.uplink_rule, x, lr, state.feedback)

    def encode_uplink(
        self, t: int, worker: int, g: torch.Tensor, lr: float, state: WorkerState
    ) -> tuple[torch.Tensor, WorkerState]:
        """Steps 2: the uplink bytes and the worker's new state."""
        rule = self.method.uplink_rule
        v = feedback.prepare(rule, g, lr, state.feedback)
        c = self.method.uplink_at(t)
        p = c.encode(v, seed=self.seed, step=t, worker=worker)
        if rule != "none":
            state = WorkerState(feedback.update(rule, state.feedback, v, c.decode(p)))
        return p.data, state

    # --- server side ------------------------------------------------------------------
    def _decode_checked(self, data: torch.Tensor, who: str) -> torch.Tensor:
        y = decode(data)
        if y.shape != (self.dim,):
            raise PayloadError(
                f"{who} sent a tensor of shape {tuple(y.shape)}, expected ({self.dim},)"
            )
        return y.float()

    def aggregate(
        self, t: int, uplinks: list[torch.Tensor], lr: float, state: ServerState
    ) -> tuple[torch.Tensor, ServerState]:
        """Step 3: average the uplink payloads and return the downlink bytes."""
        g_hat = torch.zeros(self.dim)
        for i, data in enumerate(uplinks):
            g_hat += self._decode_checked(data, f"worker {i}")
        g_hat /= len(uplinks)
        m = state.momentum
        if self.momentum:
            m = g_hat if m is None else self.momentum * m + g_hat
            g_hat = m
        w = g_hat
        rule = self.method.downlink_rule
        if rule == "ef" and not self.up_units:
            w = lr * w  # into update units, so the memory does not mix step sizes
        fb = state.feedback
        v = feedback.prepare(rule, w, 1.0, fb)
        p = self.down.encode(v, seed=self.seed, step=t, worker=SERVER)
        if rule != "none":
            fb = feedback.update(rule, fb, v, self.down.decode(p))
        return p.data, ServerState(fb, m)

    # --- every replica ----------------------------------------------------------------
    def apply(self, x: torch.Tensor, downlink: torch.Tensor, lr: float) -> torch.Tensor:
        """Step 4: the new parameters from the downlink bytes."""
        u = self._decode_checked(downlink, "server")
        return x - (u if self.down_units else lr * u)
