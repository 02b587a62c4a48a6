"""Feedback rules: what a sender transmits given its gradient (or update) and its memory.

DESIGN 3.4. A rule is a small value with two pure functions, in the optax style:
``prepare(g, lr, state) -> v`` forms the vector to compress, and
``update(state, v, decoded) -> state`` forms the new memory once the sender knows what
the receiver will decode. State is an explicit :class:`FeedbackState`; a checkpoint is
just the union of those states.

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
from dataclasses import dataclass

import torch

RULES = ("none", "ef", "dq")


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


def check_feedback(rule: str, c, where: str, d: int = 1 << 20) -> None:
    """Warn when ``rule`` is ``ef`` and ``c`` declares no contraction: the memory
    e <- v - C(v) then need not shrink, and with an error larger than the input (a norm
    rule's dither, plain sign, QSGD at large d) it grows until the run diverges."""
    if rule != "ef" or contraction(c, d) is not None:
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


def _check(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"unknown feedback rule {rule!r}; valid: {', '.join(RULES)}")
    return rule


def in_update_units(rule: str) -> bool:
    """Whether the rule's vectors already include the step size (``ef``)."""
    return _check(rule) == "ef"


def gradient_point(rule: str, x: torch.Tensor, lr: float, state: FeedbackState) -> torch.Tensor:
    """Where the sender evaluates its gradient: x, or DQ-GD's corrected point z_t."""
    if _check(rule) == "dq" and state.error is not None:
        return x + lr * state.error
    return x


def prepare(rule: str, g: torch.Tensor, lr: float, state: FeedbackState) -> torch.Tensor:
    """The vector v to compress (step 1 of each rule)."""
    _check(rule)
    if rule == "none":
        return g
    if rule == "ef":
        return lr * g if state.error is None else state.error + lr * g
    return g if state.error is None else g - state.error  # dq: u_t = g(z_t) - e_{t-1}


def update(
    rule: str, state: FeedbackState, v: torch.Tensor, decoded: torch.Tensor
) -> FeedbackState:
    """The new memory once the sender knows what is decoded (step 3 of each rule)."""
    _check(rule)
    if rule == "none":
        return state
    if rule == "ef":
        return FeedbackState(v - decoded)  # e = v - C(v)
    return FeedbackState(decoded - v)  # dq: e_t = q_t - u_t
