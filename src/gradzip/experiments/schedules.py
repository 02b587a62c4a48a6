"""Step-size schedules and iterate averaging.

- ``constant``: lr_t = lr.
- ``memsgd``: lr_t = gamma / (lambda (t + a)) with weighted averaging of the iterates,
  weights (t + a)^2 (Stich, Cordonnier & Jaggi 2018, Theorem 2.4).
- ``bottou``: lr_t = lr / (1 + lr lambda t) (Bottou 2012; the paper's SGD/QSGD baselines).
- ``cosine``: lr_t = lr (1 + cos(pi t / T)) / 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "memsgd", "bottou", "cosine")


@dataclass(frozen=True)
class Schedule:
    kind: str = "constant"
    lr: float = 0.1  # constant, bottou, cosine: the base step; memsgd: gamma
    lam: float = 0.0  # memsgd, bottou: the strong-convexity / L2 constant
    shift: float = 1.0  # memsgd: a
    steps: int = 1  # cosine: T

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; valid: {', '.join(SCHEDULES)}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.kind in ("memsgd", "bottou") and self.lam <= 0:
            raise ValueError(f"the {self.kind} schedule needs lam > 0 (the L2 constant)")

    def __call__(self, t: int) -> float:
        if self.kind == "constant":
            return self.lr
        if self.kind == "memsgd":
            return self.lr / (self.lam * (t + self.shift))
        if self.kind == "bottou":
            return self.lr / (1 + self.lr * self.lam * t)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(t, self.steps) / self.steps))

    def averaging_weight(self, t: int) -> float | None:
        """Weight of x_t in the averaged iterate (memsgd), or None for no averaging."""
        return (t + self.shift) ** 2 if self.kind == "memsgd" else None
