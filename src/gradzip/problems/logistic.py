"""L2-regularized logistic regression in closed form, in the dtype of its data.

    f(x) = (1/n) sum_i log(1 + exp(m_i)) + (lam / 2) ||x||^2,  m_i = -y_i a_i^T x,
    y_i in {-1, +1},

with its gradient (all rows, a mini-batch, or one row), Hessian and minimizer. The
:class:`~gradzip.problems.Problem` ``logreg`` computes the same loss through its float32
model and autograd; this closed form serves where float64 and speed matter: f* to 1e-12
and Mem-SGD's one-row steps (:mod:`gradzip.reproduce.memsgd`), f* of the biased
compressors' runs (:mod:`gradzip.reproduce.biased`), and the logistic test gradients of
:mod:`gradzip.experiments.gradients`. :func:`from_dataset` lays the rows out as the
``logreg`` problem's linear model does (weights, then the bias), so that :meth:`loss` at
its parameters is that problem's training loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from .datasets import Dataset


@dataclass(frozen=True)
class Logistic:
    """The objective on rows ``A`` with labels ``y``; results take ``A``'s dtype."""

    A: torch.Tensor  # (n, d) rows a_i, float32 or float64 (a bias is a column of ones)
    y: torch.Tensor  # (n,) labels in {-1, +1}, A's dtype
    lam: float  # lambda >= 0, regularizes every coordinate (the bias too)

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def d(self) -> int:
        return self.A.shape[1]

    @cached_property
    def _labels(self) -> list[float]:  # y as Python floats, for the one-row gradient
        return self.y.tolist()

    def loss(self, x: torch.Tensor) -> float:
        """f(x)."""
        m = -self.y * (self.A @ x)
        return float(torch.logaddexp(m.new_zeros(()), m).mean() + 0.5 * self.lam * x @ x)

    def gradient(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The gradient of the loss averaged over ``rows`` (row indices, repeats counted: a
        mini-batch drawn with replacement), plus lam x; ``None``: all rows, grad f(x)."""
        A, y = (self.A, self.y) if rows is None else (self.A[rows], self.y[rows])
        s = -y * torch.sigmoid(-y * (A @ x))  # d log(1 + exp(m_i)) / d (a_i^T x)
        return A.T @ s / len(y) + self.lam * x

    def row_gradient(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """``gradient(x, [i])`` with scalar arithmetic for the scalar part: SGD on one row
        per step (Mem-SGD) pays for each tensor operation, not for the flops."""
        a, yi = self.A[i], self._labels[i]
        m = -yi * float(a @ x)
        s = 0.5 * (1.0 + math.tanh(0.5 * m))  # sigmoid(m), without overflow
        return (-yi * s) * a + self.lam * x

    def hessian(self, x: torch.Tensor) -> torch.Tensor:
        """(1/n) A^T diag(s (1 - s)) A + lam I with s = sigmoid(m)."""
        s = torch.sigmoid(-self.y * (self.A @ x))
        eye = torch.eye(self.d, dtype=self.A.dtype, device=self.A.device)
        return (self.A.T * (s * (1 - s))) @ self.A / self.n + self.lam * eye

    def solve(self, newton_steps: int = 30) -> tuple[torch.Tensor, float, float]:
        """``(x*, f*, ||grad f(x*)||)``: L-BFGS from 0 (scipy, in float64), then up to
        ``newton_steps`` Newton steps (quadratic convergence from the L-BFGS point) until
        the gradient's norm is below 1e-15 (lam > 0: the minimizer exists and is unique)."""
        from scipy.optimize import minimize

        def fun(v):
            x = torch.from_numpy(v).to(self.A.dtype)
            return self.loss(x), self.gradient(x).double().numpy()

        r = minimize(
            fun,
            torch.zeros(self.d, dtype=torch.float64).numpy(),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 5000, "gtol": 1e-10, "ftol": 0},
        )
        x = torch.from_numpy(r.x).to(self.A.dtype)
        for _ in range(newton_steps):
            g = self.gradient(x)
            if float(torch.linalg.vector_norm(g)) < 1e-15:
                break
            x = x - torch.linalg.solve(self.hessian(x), g)
        return x, self.loss(x), float(torch.linalg.vector_norm(self.gradient(x)))


def from_dataset(
    ds: Dataset, lam: float, bias: bool = True, dtype: torch.dtype = torch.float64
) -> Logistic:
    """The objective on a binary dataset's training rows (labels {0, 1} -> {-1, +1}), in
    ``dtype``; with ``bias``, a column of ones after the features (``nn.Linear``'s order:
    weights, then bias), as the ``logreg`` problem's model."""
    A = ds.X.reshape(len(ds.X), -1).to(dtype)
    if bias:
        A = torch.cat([A, torch.ones(len(A), 1, dtype=dtype)], 1)
    return Logistic(A, ds.y.to(dtype) * 2 - 1, lam)
