"""A training problem: data split across workers, a model, a loss, and flat gradients.

The parameters live in one flat float32 vector ``x`` (what the compressors see). A worker's
stochastic gradient at step t is taken on a mini-batch drawn by the counter-based generator
from (seed, step, worker), so every engine draws the same batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from .. import rng
from . import datasets, models

LOSSES = ("mse", "logistic", "cross_entropy")


@dataclass
class Problem:
    name: str
    data: datasets.Dataset
    model: nn.Module
    loss: str  # mse | logistic | cross_entropy
    l2: float = 0.0  # L2 regularization lambda (the paper's; 1/n for Mem-SGD's setting)
    batch_size: int = 32  # 0: full gradients
    shards: list[torch.Tensor] = field(default_factory=list)  # per-worker row indices

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; valid: {LOSSES}")
        self._names = [n for n, _ in self.model.named_parameters()]
        self._shapes = [p.shape for _, p in self.model.named_parameters()]
        self._sizes = [p.numel() for _, p in self.model.named_parameters()]

    @property
    def dim(self) -> int:
        return sum(self._sizes)

    def initial_point(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()]).float()

    def _params(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            n: t.view(s)
            for n, t, s in zip(self._names, x.split(self._sizes), self._shapes, strict=True)
        }

    def _loss(self, x: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.model, self._params(x), (X,))
        if self.loss == "mse":
            val = 0.5 * (out.reshape(-1) - y).square().mean()
        elif self.loss == "logistic":
            val = nn.functional.binary_cross_entropy_with_logits(out.reshape(-1), y.float())
        else:
            val = nn.functional.cross_entropy(out, y)
        if self.l2:
            val = val + 0.5 * self.l2 * x.square().sum()
        return val

    def split(self, n_workers: int, mode: str = "iid", seed: int = 0) -> None:
        """Assign training rows to workers: ``iid`` (shuffled) or ``label`` (sorted by label)."""
        n = len(self.data.y)
        if n_workers < 1 or n_workers > n:
            raise ValueError(f"cannot split {n} rows across {n_workers} workers")
        if mode == "iid":
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        elif mode == "label":
            order = torch.argsort(self.data.y, stable=True)
        else:
            raise ValueError(f"unknown split {mode!r}; valid: iid, label")
        self.shards = list(order.tensor_split(n_workers))

    def batch(self, seed: int, step: int, worker: int) -> torch.Tensor:
        """Row indices of worker ``worker``'s mini-batch at ``step`` (with replacement)."""
        shard = self.shards[worker]
        if self.batch_size == 0 or self.batch_size >= len(shard):
            return shard
        u = rng.uniform(rng.derive_key(seed, step, worker, rng.STREAM_INDICES), self.batch_size)
        return shard[(u * len(shard)).long().clamp_max(len(shard) - 1)]

    def gradient(self, x: torch.Tensor, rows: torch.Tensor) -> tuple[float, torch.Tensor]:
        """(loss, flat gradient) of the regularized loss on ``rows`` at ``x``."""
        x = x.detach().requires_grad_(True)
        val = self._loss(x, self.data.X[rows], self.data.y[rows])
        (g,) = torch.autograd.grad(val, x)
        return float(val.detach()), g

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, max_rows: int = 20000) -> dict[str, float]:
        """Full training loss and test loss / accuracy at ``x``."""
        out = {}
        for split, X, y in (
            ("train", self.data.X, self.data.y),
            ("test", self.data.X_test, self.data.y_test),
        ):
            X, y = X[:max_rows], y[:max_rows]
            out[f"{split}_loss"] = float(self._loss(x, X, y))
            if self.data.n_classes:
                logits = functional_call(self.model, self._params(x), (X,))
                pred = (
                    (logits.reshape(-1) > 0).long() if self.loss == "logistic" else logits.argmax(1)
                )
                out[f"{split}_acc"] = float((pred == y).float().mean())
        return out


@dataclass(frozen=True)
class Recipe:
    """How a named problem is made: its data, its model and its loss."""

    load: Callable[[str | None, int], datasets.Dataset]  # (data path or None, seed)
    model: Callable[[datasets.Dataset, int], nn.Module]  # (dataset, hidden units)
    loss: str  # one of LOSSES
    seeded: bool = True  # re-initialize the model from the seed (linear models start at 0)


def _linear(ds: datasets.Dataset, hidden: int) -> nn.Module:
    return models.linear(ds.X.shape[1], 1)


def _fashion(data: str | None, seed: int) -> datasets.Dataset:
    return datasets.load_fashion_mnist(data or None)  # None: datasets.fashion_dir()


#: name -> recipe; a new problem is one entry here
PROBLEMS: dict[str, Recipe] = {
    "lsq-synthetic": Recipe(
        lambda data, seed: datasets.synthetic_least_squares(seed=seed), _linear, "mse", False
    ),
    "lsq-diabetes": Recipe(
        lambda data, seed: datasets.load_diabetes(seed=seed), _linear, "mse", False
    ),
    "logreg": Recipe(
        lambda data, seed: datasets.load_libsvm(data or datasets.libsvm_path("a9a"), seed=seed),
        _linear,
        "logistic",
        False,
    ),
    "softmax-digits": Recipe(
        lambda data, seed: datasets.load_digits(seed=seed),
        lambda ds, hidden: models.linear(64, 10),
        "cross_entropy",
    ),
    "mlp-digits": Recipe(
        lambda data, seed: datasets.load_digits(seed=seed),
        lambda ds, hidden: models.mlp(64, 10, hidden),
        "cross_entropy",
    ),
    "mlp-fashion": Recipe(
        _fashion, lambda ds, hidden: models.mlp(784, 10, hidden), "cross_entropy"
    ),
    "cnn-fashion": Recipe(_fashion, lambda ds, hidden: models.cnn(10), "cross_entropy"),
}


def build(
    name: str,
    data: str | None = None,
    *,
    workers: int = 1,
    split: str = "iid",
    batch_size: int = 32,
    l2: float | None = None,
    seed: int = 0,
    hidden: int = 128,
) -> Problem:
    """A problem by name (a key of :data:`PROBLEMS`): lsq-synthetic, lsq-diabetes, logreg,
    softmax-digits, mlp-digits, mlp-fashion, cnn-fashion. ``data`` is the dataset path where
    one is read."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; available: {', '.join(PROBLEMS)}")
    recipe = PROBLEMS[name]
    ds = recipe.load(data, seed)
    model = recipe.model(ds, hidden)
    if recipe.seeded:
        models.init_(model, seed)
    if l2 is None:
        l2 = 1.0 / len(ds.y) if recipe.loss == "logistic" else 0.0
    p = Problem(name, ds, model, recipe.loss, l2=l2, batch_size=batch_size)
    p.split(workers, split, seed)
    return p


def smoothness(problem: Problem) -> tuple[float, float]:
    """(L, mu) of a least-squares or logistic problem's full loss (exact for mse)."""
    X = problem.data.X.double()
    X1 = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    ev = torch.linalg.eigvalsh(X1.T @ X1 / len(X))
    scale = 1.0 if problem.loss == "mse" else 0.25
    return float(ev[-1]) * scale + problem.l2, max(
        float(ev[0]) * (problem.loss == "mse"), 0.0
    ) + problem.l2
