"""Test vectors for compressor studies: synthetic draws and gradients from real training runs.

Every source returns a list of 1-D float32 tensors. Synthetic draws come from a seeded
``torch.Generator`` (never the global RNG); real gradients come from small, fast training
runs on files read by path (nothing is downloaded):

- :func:`logreg_gradients`: L2-regularized logistic regression on a LIBSVM file
  (``libsvm/a9a`` under :func:`gradzip.problems.datasets.data_dir` by default), full and mini-batch
  gradients at several points of a plain SGD run;
- :func:`mlp_gradients`: a one-hidden-layer MLP on scikit-learn's bundled digits,
  mini-batch gradients of all parameters flattened, at several points of training.

The logistic objective is :class:`gradzip.problems.logistic.Logistic`; the ``problems``
package is the place for datasets and models used in training (issue 4).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch

from ..problems import datasets, logistic

DEFAULT_LIBSVM = str(datasets.libsvm_path("a9a"))
#: feature counts of the LIBSVM files beside the project (files may omit the last feature)
KNOWN_FEATURES = datasets.LIBSVM_FEATURES

DEFAULT_D = 2000
DEFAULT_LOGREG_STEPS = (0, 30, 300, 1000, 3000)
DEFAULT_MLP_STEPS = (0, 25, 100, 300, 1000)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch (and numba, once imported) on one thread, then restore the settings.

    The vectors here are small: on a shared, loaded machine, waking a thread pool for each
    tiny operation costs 10 to 100 times the operation itself.
    """
    old_torch = torch.get_num_threads()
    old_numba = None
    try:
        import numba

        old_numba = numba.get_num_threads()
        numba.set_num_threads(1)
    except (ImportError, ValueError):
        pass
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old_torch)
        if old_numba is not None:
            import numba

            numba.set_num_threads(old_numba)


# --- synthetic ----------------------------------------------------------------------------


def gaussian(d: int = DEFAULT_D, n: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """``n`` standard Gaussian vectors of length ``d``."""
    g = _gen(seed)
    return [torch.randn(d, generator=g) for _ in range(n)]


def laplace(d: int = DEFAULT_D, n: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """``n`` vectors of i.i.d. standard Laplace entries (difference of two exponentials)."""
    g = _gen(seed)
    out = []
    for _ in range(n):
        u = torch.rand(2, d, generator=g, dtype=torch.float64).clamp_min_(1e-300)
        out.append((torch.log(u[0]) - torch.log(u[1])).float())
    return out


def sparse(d: int = DEFAULT_D, n: int = 8, seed: int = 0, density: float = 0.03):
    """``n`` vectors with ``max(1, round(density d))`` Gaussian entries, the rest zero."""
    g = _gen(seed)
    k = max(1, round(density * d))
    out = []
    for _ in range(n):
        x = torch.zeros(d)
        x[torch.randperm(d, generator=g)[:k]] = torch.randn(k, generator=g)
        out.append(x)
    return out


def heavy_tailed(d: int = DEFAULT_D, n: int = 8, seed: int = 0, dof: int = 2):
    """``n`` vectors of i.i.d. Student-t entries with ``dof`` (an integer) degrees of freedom.

    With 2 degrees of freedom the variance is infinite: a few coordinates dominate the norm.
    """
    if dof < 1:
        raise ValueError(f"heavy_tailed: dof must be an integer >= 1, got {dof}")
    g = _gen(seed)
    out = []
    for _ in range(n):
        z = torch.randn(d, generator=g, dtype=torch.float64)
        chi2 = torch.randn(dof, d, generator=g, dtype=torch.float64).square().sum(0)
        out.append((z / torch.sqrt(chi2.clamp_min(1e-300) / dof)).float())
    return out


SYNTHETIC: dict[str, Callable[..., list[torch.Tensor]]] = {
    "gaussian": gaussian,
    "laplace": laplace,
    "sparse": sparse,
    "student-t2": heavy_tailed,
}


# --- logistic regression on a LIBSVM file -------------------------------------------------


def load_libsvm(path: str | Path = DEFAULT_LIBSVM, n_features: int | None = None):
    """``(A, y)``: dense float64 features and labels in {-1, +1} from a binary LIBSVM file.

    ``n_features`` defaults to the known count for the files beside the project (123 for
    a9a), else to what the file shows. Raises ``FileNotFoundError`` naming a missing path and
    ``ValueError`` for a file that is not a binary LIBSVM set.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"LIBSVM data file not found: {p} (resolved {p.resolve()}); "
            f"the default {DEFAULT_LIBSVM} is {datasets.DATA_ENV} or ../shared/data, + libsvm/a9a"
        )
    if n_features is None:
        n_features = KNOWN_FEATURES.get(p.name)
    A, y = _load_libsvm(str(p.resolve()), n_features, p.stat().st_mtime_ns)
    return A.clone(), y.clone()


@lru_cache(maxsize=2)
def _load_libsvm(path: str, n_features: int | None, mtime_ns: int):
    p = Path(path)
    A, y = datasets.read_libsvm(p, n_features)  # DataError (a ValueError) naming the file
    labels = np.unique(y)
    if len(labels) != 2:
        raise ValueError(f"{p}: expected 2 distinct labels, found {len(labels)}")
    y = np.where(y == labels[1], 1.0, -1.0)
    return torch.from_numpy(A.toarray()).double(), torch.from_numpy(y).double()


def logreg_gradients(
    path: str | Path = DEFAULT_LIBSVM,
    steps: Sequence[int] = DEFAULT_LOGREG_STEPS,
    batch: int = 64,
    lr: float = 0.5,
    lam: float | None = None,
    seed: int = 0,
    full: bool = True,
    minibatch: bool = True,
    n_features: int | None = None,
) -> list[torch.Tensor]:
    """Gradients of L2-regularized logistic regression along a plain SGD run.

    f(w) = mean_i log(1 + exp(-y_i a_i^T w)) + lam/2 ||w||^2 (lam defaults to 1/n), no
    intercept, so d is the number of features. SGD with mini-batches of ``batch`` rows and
    step ``lr`` starts at w = 0; at each step in ``steps`` it records the full gradient
    and/or one mini-batch gradient (in that order), as float32.
    """
    A, y = load_libsvm(path, n_features)
    with single_thread():
        return _logreg_run(A, y, steps, batch, lr, lam, seed, full, minibatch)


def _logreg_run(A, y, steps, batch, lr, lam, seed, full, minibatch) -> list[torch.Tensor]:
    n, d = A.shape
    f = logistic.Logistic(A, y, 1.0 / n if lam is None else lam)
    g = _gen(seed)
    w = torch.zeros(d, dtype=torch.float64)
    want = sorted(set(steps))
    out = []
    for t in range(want[-1] + 1 if want else 0):
        if t in want:
            if full:
                out.append(f.gradient(w).float())
            if minibatch:
                out.append(f.gradient(w, torch.randint(n, (batch,), generator=g)).float())
        w -= lr * f.gradient(w, torch.randint(n, (batch,), generator=g))
    return out


# --- MLP on scikit-learn's digits ---------------------------------------------------------


def mlp_gradients(
    steps: Sequence[int] = DEFAULT_MLP_STEPS,
    hidden: int = 32,
    batch: int = 32,
    lr: float = 0.1,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Mini-batch gradients of a 64-``hidden``-10 tanh MLP on digits along a SGD run.

    Parameters (W1, b1, W2, b2, initialized from the seeded generator) are flattened in that
    order, so d = 65 hidden + (hidden + 1) 10 (2410 for hidden = 32). Cross-entropy loss,
    inputs scaled to [0, 1]; one mini-batch gradient recorded at each step in ``steps``.
    """
    from sklearn.datasets import load_digits

    X, labels = load_digits(return_X_y=True)
    X = torch.from_numpy(X / 16.0).float()
    labels = torch.from_numpy(labels).long()
    with single_thread():
        return _mlp_run(X, labels, steps, hidden, batch, lr, seed)


def _mlp_run(X, labels, steps, hidden, batch, lr, seed) -> list[torch.Tensor]:
    g = _gen(seed)
    params = [
        (torch.randn(64, hidden, generator=g) / math.sqrt(64)).requires_grad_(),
        torch.zeros(hidden, requires_grad=True),
        (torch.randn(hidden, 10, generator=g) / math.sqrt(hidden)).requires_grad_(),
        torch.zeros(10, requires_grad=True),
    ]
    want = set(steps)
    out = []
    for t in range(max(want) + 1 if want else 0):
        rows = torch.randint(len(X), (batch,), generator=g)
        W1, b1, W2, b2 = params
        logits = torch.tanh(X[rows] @ W1 + b1) @ W2 + b2
        loss = torch.nn.functional.cross_entropy(logits, labels[rows])
        grads = torch.autograd.grad(loss, params)
        if t in want:
            out.append(torch.cat([gr.reshape(-1) for gr in grads]).detach().clone())
        with torch.no_grad():
            for p, gr in zip(params, grads, strict=True):
                p -= lr * gr
    return out


# --- the CNN of the DDP example on Fashion-MNIST -------------------------------------------

DEFAULT_FASHION = "/usr/share/datasets/fashion-mnist"
DEFAULT_CNN_STEPS = (0, 50, 200)


def cnn_fashion_gradients(
    root: str | Path = DEFAULT_FASHION,
    steps: Sequence[int] = DEFAULT_CNN_STEPS,
    width: int = 256,
    batch: int = 32,
    lr: float = 0.05,
    momentum: float = 0.9,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Mini-batch gradients of the DDP example's CNN (``examples/ddp_fashion_mnist.py``,
    classifier ``width`` wide: d = 410,922 at 256) along an SGD-momentum run on
    Fashion-MNIST, one at each step in ``steps``, all parameters flattened in order."""
    from ..problems.datasets import load_fashion_mnist

    ds = load_fashion_mnist(root)
    X = (ds.X - 0.2860) / 0.3530
    with single_thread():
        return _cnn_run(X, ds.y, steps, width, batch, lr, momentum, seed)


def _cnn_run(X, labels, steps, width, batch, lr, momentum, seed) -> list[torch.Tensor]:
    from torch import nn

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, width), nn.ReLU(), nn.Linear(width, 10),
        )  # fmt: skip
    finally:
        torch.random.set_rng_state(state)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    g = _gen(seed)
    want = set(steps)
    out = []
    for t in range(max(want) + 1 if want else 0):
        rows = torch.randint(len(X), (batch,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(X[rows]), labels[rows]).backward()
        if t in want:
            out.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]).clone())
        opt.step()
    return out


# --- the default set ----------------------------------------------------------------------


def default_sources(
    quick: bool = False, data: str | Path = DEFAULT_LIBSVM, d: int = DEFAULT_D, seed: int = 0
) -> dict[str, Callable[[], list[torch.Tensor]]]:
    """Name -> zero-argument loader for the study: four synthetic kinds and two real runs.

    ``quick`` takes fewer vectors (3 per synthetic kind, 2 points of each run).
    """
    n = 3 if quick else 8
    src: dict[str, Callable[[], list[torch.Tensor]]] = {
        name: partial(fn, d=d, n=n, seed=seed + i) for i, (name, fn) in enumerate(SYNTHETIC.items())
    }
    lr_steps = (0, 1000) if quick else DEFAULT_LOGREG_STEPS
    mlp_steps = (0, 300) if quick else DEFAULT_MLP_STEPS
    src[f"logreg-{Path(data).name}"] = partial(logreg_gradients, data, lr_steps, seed=seed)
    src["mlp-digits"] = partial(mlp_gradients, mlp_steps, seed=seed)
    return src
