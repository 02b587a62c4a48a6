"""The parameter-server step, once, for every engine (DESIGN 3.4).

Engines differ only in how bytes move. Each step t:

1. Worker i evaluates its gradient at the point its rule asks for (x, or DQ-GD's z_t).
2. It forms v_i by its feedback rule, sends the bytes of C_up(v_i) (seed from t, i), and
   updates its memory with what the server will decode.
3. The server decodes and averages the messages into g_hat, forms w by its optimizer
   (``sgd``: g_hat, or heavy-ball momentum m <- beta m + g_hat, w = m or, Nesterov,
   w = g_hat + beta m; ``adam``/``adamw``: w = lr m_hat / (sqrt(v_hat) + eps), the
   moments of g_hat in gradient units, bias-corrected with the global step), applies its
   own rule, and sends the bytes of C_down(w) (seed from t, SERVER).
4. Every replica, the server's included, applies the same decoded update:
   x <- x - s_t * decode(down), with s_t = lr_t for gradient-unit vectors and 1 for
   vectors that already carry the step size (``ef``, Adam); AdamW first decays
   x <- (1 - lr_t wd) x. So no copy drifts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass

import torch

from .. import feedback, hadamard
from ..compressors import decode
from ..methods import Method
from ..wire import Payload, PayloadError
from .policy import check_policy

SERVER = (1 << 32) - 1  # the worker id the server's downlink seeds from
OPTIMIZERS = ("sgd", "adam", "adamw")
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults
ADAM_EPS = 1e-8


class _State:
    """state_dict / from_state_dict of a state dataclass, field by field: tensors cloned,
    nested states by their own methods; a field missing from an older checkpoint takes
    its default."""

    def state_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.state_dict() if is_dataclass(v) else None if v is None else v.clone()
        return out

    @classmethod
    def from_state_dict(cls, sd: dict):
        template, kwargs = cls(), {}
        for f in fields(template):
            v, got = getattr(template, f.name), sd.get(f.name)
            if is_dataclass(v):
                kwargs[f.name] = type(v).from_state_dict(got)
            else:
                kwargs[f.name] = None if got is None else got.clone()
        return cls(**kwargs)


@dataclass
class WorkerState(_State):
    """One worker's memory (a checkpoint holds one per worker)."""

    feedback: feedback.FeedbackState = field(default_factory=feedback.FeedbackState)


@dataclass
class ServerState(_State):
    """The server's memory: downlink error, momentum buffer, Adam's second moment."""

    feedback: feedback.FeedbackState = field(default_factory=feedback.FeedbackState)
    momentum: torch.Tensor | None = None  # (d,) heavy-ball buffer, or Adam's first moment
    second: torch.Tensor | None = None  # (d,) Adam's second moment v


def state_tensors(state) -> list[torch.Tensor | None]:
    """The tensors of a state (:class:`WorkerState`, :class:`ServerState`, ...), nested
    states flattened, in field order: with :func:`state_from_tensors`, the one codec of
    the engines' states for checkpoints and messages (a new field needs no other edit)."""
    out = []
    for f in fields(state):
        v = getattr(state, f.name)
        out += state_tensors(v) if is_dataclass(v) else [v]
    return out


def state_from_tensors(template, values):
    """The state shaped like ``template`` (e.g. ``WorkerState()``) holding ``values``, in
    the order of :func:`state_tensors`; ``values`` is an iterator or a list."""
    it = iter(values)
    kwargs = {}
    for f in fields(template):
        v = getattr(template, f.name)
        kwargs[f.name] = state_from_tensors(v, it) if is_dataclass(v) else next(it)
    return type(template)(**kwargs)


class Algorithm:
    """The step of a :class:`Method`, as pure functions of explicit state."""

    def __init__(
        self,
        method: Method,
        dim: int,
        seed: int = 0,
        momentum: float = 0.0,
        *,
        nesterov: bool = False,
        optimizer: str = "sgd",
        weight_decay: float = 0.0,
        device: torch.device | str | None = None,
        nonfinite: str = "error",
    ):
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if momentum and optimizer != "sgd":
            raise ValueError(f"momentum is sgd's; {optimizer} has its betas {ADAM_BETAS}")
        if nesterov and (optimizer != "sgd" or not momentum):
            raise ValueError("nesterov needs the sgd optimizer and a momentum > 0")
        if weight_decay and optimizer != "adamw":
            raise ValueError("weight_decay is AdamW's decoupled decay: use optimizer adamw")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.method = method
        self.dim = dim
        self.seed = seed
        self.momentum = momentum
        self.nesterov = nesterov
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.device = None if device is None else torch.device(device)  # where decodes land
        self.nonfinite = check_policy(nonfinite)  # error | skip (engines/policy.py)
        self.up = method.uplink_compressor()
        self.down = method.downlink_compressor()
        self.up_rule = method.up_rule
        self.down_rule = method.down_rule
        # where the step size is applied (see the module docstring, step 4)
        self.up_units = self.up_rule.in_update_units
        self.down_units = self.up_units or self.down_rule.in_update_units or optimizer != "sgd"

    def options(self) -> dict:
        """The server optimizer's settings (an Algorithm for a shard takes the same)."""
        return {"momentum": self.momentum, "nesterov": self.nesterov,
                "optimizer": self.optimizer, "weight_decay": self.weight_decay,
                "nonfinite": self.nonfinite}  # fmt: skip

    # --- worker side ------------------------------------------------------------------
    def gradient_point(self, x: torch.Tensor, lr: float, state: WorkerState) -> torch.Tensor:
        return self.up_rule.gradient_point(x, lr, state.feedback)

    def encode_uplink(
        self, t: int, worker: int, g: torch.Tensor, lr: float, state: WorkerState
    ) -> tuple[torch.Tensor, WorkerState]:
        """Steps 2: the uplink bytes and the worker's new state."""
        rule = self.up_rule
        v = rule.prepare(g, lr, state.feedback)
        c = rule.compressor_at(self.up, t, self.method)
        p = c.encode(v, seed=self.seed, step=t, worker=worker)
        if rule.has_memory:
            state = WorkerState(rule.update(state.feedback, v, c.decode(p)))
        return p.data, state

    # --- server side ------------------------------------------------------------------
    def _decode_checked(
        self, data: torch.Tensor, who: str, *, codec=None, step=None, worker=None
    ) -> torch.Tensor:
        """Decode what ``who`` sent, refused (:class:`PayloadError`) before anything is
        allocated unless it holds this step's dimension (a header claiming more is refused
        while parsing) and, where given, the expected codec, step and sender, under this
        algorithm's seed: a stale, duplicated or misrouted payload is named, never used."""
        p = self._checked(data, who, codec=codec, step=step, worker=worker)
        return decode(p, device=self.device).float()

    def _checked(self, data, who: str, *, codec=None, step=None, worker=None) -> Payload:
        """The payload of :meth:`_decode_checked`, checked, not decoded."""
        p = data if isinstance(data, Payload) else Payload.from_bytes(data, max_numel=self.dim)
        h, problems = p.header, []
        if h.shape != (self.dim,):
            problems.append(f"shape {tuple(h.shape)}, expected ({self.dim},)")
        if codec is not None and h.codec != codec.codec_id:
            problems.append(f"codec {h.codec}, expected {codec.codec_id} ({codec.name})")
        if step is not None and h.step != step:
            problems.append(f"step {h.step}, expected {step}")
        if worker is not None and h.worker != worker:
            sender = "the server" if worker == SERVER else f"worker {worker}"
            problems.append(f"sender id {h.worker}, expected {sender}")
        if h.seed != self.seed:
            problems.append(f"seed {h.seed}, expected {self.seed}")
        if problems:
            raise PayloadError(f"{who} sent a payload of {', '.join(problems)}")
        return p

    def mean_uplink(
        self, t: int, uplinks: list, who: str = "worker", *, rotated: bool = False
    ) -> torch.Tensor:
        """The mean of the decoded uplink payloads of step t (``uplinks[i]`` from sender
        i, checked as :meth:`decode_uplink`). With a codec whose payloads add in the
        rotated domain (``fosgd:rotation=shared``) the scaled signs are summed and rotated
        back once, not once per payload; ``rotated=True`` then returns the mean still
        rotated (``Phi`` of it), for :meth:`aggregate`."""
        up = self.up_rule.compressor_at(self.up, t, self.method)
        if not getattr(up, "adds_rotated", False):
            acc = torch.zeros(self.dim, device=self.device)
            for i, data in enumerate(uplinks):
                acc += self._decode_checked(data, f"{who} {i}", codec=up, step=t, worker=i)
            return acc.div_(len(uplinks))
        ps = [
            self._checked(x, f"{who} {i}", codec=up, step=t, worker=i)
            for i, x in enumerate(uplinks)
        ]
        acc = up.mean_rotated(ps, torch.empty(self.dim, device=self.device))
        if not rotated and self.dim:
            acc = hadamard.unrotate(acc, up.rotation_key(self.seed, t, 0), out=acc)
        return acc

    def rotated_server(self, t: int) -> bool:
        """Whether the server's step t stays in the rotated domain: both codecs add in it
        with a shared rotation (the downlink's is the uplink's: the same seed and step),
        and the server sends its mean as it is (plain SGD, no rule of its own). It then
        quantizes ``Phi g_hat`` directly: no transform at the server."""
        up = self.up_rule.compressor_at(self.up, t, self.method)
        return (
            getattr(up, "adds_rotated", False)
            and getattr(self.down, "adds_rotated", False)
            and self.optimizer == "sgd"
            and not self.momentum
            and not (self.down_rule.has_memory or self.down_rule.in_update_units)
        )

    def aggregate(
        self, t: int, uplinks: list[torch.Tensor], lr: float, state: ServerState
    ) -> tuple[torch.Tensor, ServerState]:
        """Step 3: average the uplink payloads and return the downlink bytes."""
        if self.rotated_server(t):  # Phi g_hat, quantized as it is
            y = self.mean_uplink(t, uplinks, rotated=True)
            p = self.down.encode_rotated(y, seed=self.seed, step=t, worker=SERVER)
            return p.data, state
        g_hat = self.mean_uplink(t, uplinks)
        m, sq = state.momentum, state.second
        if self.optimizer != "sgd":  # Adam on the gradient-unit mean, w in update units
            w, m, sq = self._adam(t, g_hat / lr if self.up_units else g_hat, lr, m, sq)
        elif self.momentum:
            m = g_hat if m is None else self.momentum * m + g_hat
            w = g_hat + self.momentum * m if self.nesterov else m
        else:
            w = g_hat
        rule = self.down_rule
        if rule.in_update_units and not self.down_units_before_rule:
            w = lr * w  # into update units, so the memory does not mix step sizes
        fb = state.feedback
        v = rule.prepare(w, 1.0, fb)
        p = self.down.encode(v, seed=self.seed, step=t, worker=SERVER)
        if rule.has_memory:
            fb = rule.update(fb, v, self.down.decode(p))
        return p.data, ServerState(fb, m, sq)

    @property
    def down_units_before_rule(self) -> bool:
        """Whether the server's w is in update units before its downlink rule."""
        return self.up_units or self.optimizer != "sgd"

    def _adam(self, t: int, g: torch.Tensor, lr: float, m, sq):
        """Adam's step (Kingma & Ba, Alg. 1) at global step t (0-based), in update units."""
        b1, b2, eps = ADAM_BETAS[0], ADAM_BETAS[1], ADAM_EPS
        m = (1 - b1) * g if m is None else b1 * m + (1 - b1) * g  # 1. first moment
        sq = (1 - b2) * g * g if sq is None else b2 * sq + (1 - b2) * g * g  # 2. second
        k = t + 1  # 3. bias corrections
        w = (lr / (1 - b1**k)) * m / ((sq / (1 - b2**k)).sqrt() + eps)
        return w, m, sq

    # --- every replica ----------------------------------------------------------------
    def decode_uplink(
        self, data: torch.Tensor, who: str, t: int | None = None, worker: int | None = None
    ) -> torch.Tensor:
        """A worker's decoded uplink vector, checked against this step's dimension and the
        uplink codec (and the step t and the sender's id, where given)."""
        up = self.up if t is None else self.up_rule.compressor_at(self.up, t, self.method)
        return self._decode_checked(data, who, codec=up, step=t, worker=worker)

    def decode_downlink(
        self, downlink: torch.Tensor, who: str = "server", t: int | None = None
    ) -> torch.Tensor:
        """The decoded downlink vector, checked against this step's dimension, the downlink
        codec and the server's id (and the step t where given)."""
        return self._decode_checked(downlink, who, codec=self.down, step=t, worker=SERVER)

    def apply(
        self, x: torch.Tensor, downlink: torch.Tensor, lr: float, t: int | None = None
    ) -> torch.Tensor:
        """Step 4: the new parameters from the downlink bytes (of step t, where given)."""
        u = self.decode_downlink(downlink, "server", t)
        if self.weight_decay:  # AdamW's decoupled decay, the same on every replica
            x = x * (1 - lr * self.weight_decay)
        return x - (u if self.down_units else lr * u)
