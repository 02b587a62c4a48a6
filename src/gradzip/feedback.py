"""Feedback rules: what a sender transmits given its gradient (or update) and its memory.

DESIGN 3.4. A rule is a value (a :class:`Rule`, looked up by name with :func:`rule`)
with pure functions, in the optax style: ``prepare(g, lr, state) -> v`` forms the vector
to compress, and ``update(state, v, decoded) -> state`` forms the new memory once the
sender knows what the receiver will decode; its attributes (``in_update_units``,
``has_memory``, ...) tell the engines and the DDP hook how it composes, so they hold rule
objects and never branch on names. A new rule is one subclass in this file. State is an
explicit :class:`FeedbackState`; a checkpoint is just the union of those states.

Rules:

- ``none``: v = g. The vector is in gradient units; whoever applies it multiplies by the
  step size after decoding (so scale-free compressors such as ``sign`` work: signSGD).
- ``ef`` (Mem-SGD, Stich, Cordonnier & Jaggi 2018, Alg. 1; EF-signSGD, Karimireddy et
  al. 2019): v = e + lr * g; send C(v); e <- v - decode(C(v)). The step size enters the
  memory, so v is in update units and is applied without a further step size.
- ``dq`` (DQ-GD, Lin, Kostina & Hassibi): the gradient is taken at the corrected point
  z_t = x_t + lr * e_{t-1}; v = u_t = g(z_t) - e_{t-1}; q_t = decode(C(u_t));
  e_t = q_t - u_t; the model steps by lr * q_t. Then z_t follows unquantized gradient
  descent exactly: z_{t+1} = x_{t+1} + lr e_t = x_t - lr q_t + lr (q_t - u_t)
  = z_t - lr g(z_t).

The server's downlink uses ``none`` or ``ef`` on its own vector (two-level error feedback
when both sides use ``ef``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields, replace

import torch


class NonContractiveFeedbackWarning(UserWarning):
    """Error feedback was asked for with a compressor that is not a contraction."""


def contraction(c, d: int = 1 << 20) -> float | None:
    """1 - 1/delta: the bound on E||C(x) - x||^2 / ||x||^2 the compressor declares for a
    d-vector (class B3, or an unbiased one with omega < 1), None when it declares none."""
    delta = c.delta(d)
    if delta is not None:
        return 1.0 - 1.0 / delta
    omega = c.omega(d) if c.unbiased else None
    return omega if omega is not None and omega < 1 else None


def auto(c, d: int = 1 << 20) -> str:
    """The rule ``auto`` stands for: ``ef`` for a biased compressor that declares a
    contraction (class B3: top-k, scaled sign, ``fosgd:rescale=mse``), ``none`` for
    unbiased ones and for biased ones whose error can exceed the input (the paper's
    fosgd, gradzip's default fosgd, plain sign), with which the memory could grow."""
    return "ef" if not c.unbiased and c.delta(d) is not None else "none"


def check_feedback(r, c, where: str, d: int = 1 << 20) -> None:
    """Warn when the rule ``r`` needs a contraction (``ef``) and ``c`` declares none: the
    memory e <- v - C(v) then need not shrink, and with an error larger than the input (a norm
    rule's dither, plain sign, QSGD at large d) it grows until the run diverges."""
    if not rule(r).needs_contraction or contraction(c, d) is not None:
        return
    warnings.warn(
        f"{where}: error feedback with {c.spec}, which declares no contraction "
        f"(E||C(x) - x||^2 < ||x||^2 is not guaranteed; class B3 delta is None): the memory "
        f"can grow until training diverges. Use a contractive compressor (e.g. "
        f"fosgd:rescale=mse, scaled_sign, topk) or the rule 'none'.",
        NonContractiveFeedbackWarning,
        stacklevel=3,
    )


@dataclass
class FeedbackState:
    """Memory of one sender."""

    error: torch.Tensor | None = None  # (d,) float32: e, the residual not yet transmitted

    def state_dict(self) -> dict:
        return {"error": None if self.error is None else self.error.clone()}

    @classmethod
    def from_state_dict(cls, sd: dict) -> FeedbackState:
        e = sd.get("error")
        return cls(None if e is None else e.clone())


class Rule:
    """A feedback rule as a value: what a sender transmits and what it remembers.

    Subclasses override the three operations; the class attributes say how the rule
    composes with the rest of the step, so that the engines and the hook ask the rule
    instead of branching on its name."""

    name: str = ""
    #: whether the vectors carry the step size (the receiver applies them as they are)
    in_update_units: bool = False
    #: whether the rule keeps a memory (``update`` is the identity otherwise)
    has_memory: bool = False
    #: whether the gradient is taken at a corrected point (a comm hook cannot)
    needs_gradient_point: bool = False
    #: whether the rule can serve the server's downlink as well as the uplink
    downlink: bool = True
    #: whether the memory stays bounded only for a contraction (see check_feedback)
    needs_contraction: bool = False

    def gradient_point(self, x: torch.Tensor, lr: float, state: FeedbackState) -> torch.Tensor:
        """Where the sender evaluates its gradient."""
        return x

    def prepare(self, g: torch.Tensor, lr: float, state: FeedbackState) -> torch.Tensor:
        """The vector v to compress (step 1 of each rule)."""
        return g

    def update(self, state: FeedbackState, v: torch.Tensor, decoded: torch.Tensor) -> FeedbackState:
        """The new memory once the sender knows what is decoded (step 3 of each rule)."""
        return state

    def compressor_at(self, compressor, t: int, method):
        """The compressor the rule uses at step t (a rule with a schedule of its own)."""
        return compressor

    def check(self, compressor, side: str) -> None:
        """Raise ValueError if the rule cannot run with ``compressor`` on ``side``."""
        if side == "downlink" and not self.downlink:
            raise ValueError(f"the {self.name} rule applies to the uplink only")

    def __repr__(self) -> str:
        return f"feedback.rule({self.name!r})"


class _NoFeedback(Rule):
    name = "none"


class _ErrorFeedback(Rule):
    name = "ef"
    in_update_units = True
    has_memory = True
    needs_contraction = True

    def prepare(self, g, lr, state):
        return lr * g if state.error is None else state.error + lr * g

    def update(self, state, v, decoded):
        return FeedbackState(v - decoded)  # e = v - C(v)


class _DQFeedback(Rule):
    name = "dq"
    has_memory = True
    needs_gradient_point = True
    downlink = False

    def gradient_point(self, x, lr, state):
        return x if state.error is None else x + lr * state.error  # z_t = x_t + lr e_{t-1}

    def prepare(self, g, lr, state):
        return g if state.error is None else g - state.error  # u_t = g(z_t) - e_{t-1}

    def update(self, state, v, decoded):
        return FeedbackState(decoded - v)  # e_t = q_t - u_t

    def compressor_at(self, compressor, t, method):
        """The quantizer's range r_t = dq_range * dq_decay**t, fixed in advance."""
        return replace(compressor, range=method.dq_range * method.dq_decay**t)

    def check(self, compressor, side):
        super().check(compressor, side)
        if "range" not in {f.name for f in fields(compressor)}:
            raise ValueError(
                f"the dq rule needs a quantizer with a fixed range (e.g. uniform), "
                f"got {compressor.spec!r}"
            )


#: name -> rule; a new rule is a subclass of :class:`Rule` added here
RULES: dict[str, Rule] = {r.name: r for r in (_NoFeedback(), _ErrorFeedback(), _DQFeedback())}


def rule(r: str | Rule) -> Rule:
    """The rule of a name (a :class:`Rule` is returned as it is)."""
    if isinstance(r, Rule):
        return r
    if r not in RULES:
        raise ValueError(f"unknown feedback rule {r!r}; valid: {', '.join(RULES)}")
    return RULES[r]
