"""Datasets: read from paths (the project ships none), validated, as float32 tensors.

- LIBSVM files (``libsvm/a9a`` and friends under :func:`data_dir`), binary labels mapped
  to {0, 1};
- Fashion-MNIST IDX files (Debian's ``dataset-fashion-mnist``:
  ``/usr/share/datasets/fashion-mnist``);
- scikit-learn's bundled sets (digits, diabetes): no download;
- synthetic least squares with a chosen condition number.

Every loader raises :class:`DataError` with a one-line message naming the path and what is
wrong (missing file, malformed line, wrong magic number, ...).

The folder of the shared data sets is one setting, :func:`data_dir`: the environment
variable ``GRADZIP_DATA``, else ``../shared/data`` (relative to the working directory: the
project root in a checkout); ``with using_data_dir(path):`` sets it for a block (the
``--data`` of ``gradzip reproduce``). Fashion-MNIST is read from ``data_dir()/fashion-mnist``
where that folder exists, else from Debian's folder (:func:`fashion_dir`). A missing file's
error says where the files come from (:data:`LIBSVM_URL`, :data:`FASHION_SOURCES`);
:func:`check_available` names every missing one at once, before a long job starts. Within
``with reuse():`` each loader reads a data set once.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import os
import struct
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATA_ENV = "GRADZIP_DATA"
DEFAULT_DATA = "../shared/data"
DEFAULT_FASHION = "/usr/share/datasets/fashion-mnist"
#: feature counts of the LIBSVM files in ``data_dir() / "libsvm"`` (a file may omit the last)
LIBSVM_FEATURES = {"a9a": 123, "a9a.t": 123, "w8a": 300, "mushrooms": 112, "phishing": 68}


#: where the LIBSVM binary classification sets (a9a, a9a.t, w8a, mushrooms, ...) come from
LIBSVM_URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary.html"
#: where the four Fashion-MNIST IDX files come from
FASHION_SOURCES = (
    "`apt-get install -y dataset-fashion-mnist` (into /usr/share/datasets/fashion-mnist) or "
    "https://github.com/zalandoresearch/fashion-mnist (data/fashion/*.gz)"
)
FASHION_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)  # fmt: skip


def data_dir() -> Path:
    """The folder of the shared data sets: ``$GRADZIP_DATA``, else ``../shared/data``."""
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA)


@contextlib.contextmanager
def using_data_dir(path: str | Path | None):
    """Within the block, :func:`data_dir` is ``path`` (``None``: unchanged). It sets
    ``GRADZIP_DATA``, so processes started in the block (the torch.distributed engines'
    workers) see it too."""
    if path is None:
        yield
        return
    before = os.environ.get(DATA_ENV)
    os.environ[DATA_ENV] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DATA_ENV, None)
        else:
            os.environ[DATA_ENV] = before


def libsvm_path(name: str = "a9a") -> Path:
    """The LIBSVM file ``name`` in :func:`data_dir` (``a9a``, ``w8a``, ...)."""
    return data_dir() / "libsvm" / name


def fashion_dir() -> Path:
    """Fashion-MNIST's folder: ``data_dir()/fashion-mnist`` where it exists, else Debian's
    ``/usr/share/datasets/fashion-mnist``."""
    here = data_dir() / "fashion-mnist"
    return here if here.is_dir() else Path(DEFAULT_FASHION)


def _libsvm_hint(path: Path) -> str:
    return (
        f"{path.name} is a LIBSVM binary set from {LIBSVM_URL}; pass its path with --data, "
        f"or put it in DIR/libsvm/ and set {DATA_ENV}=DIR (default {DEFAULT_DATA})"
    )


def _fashion_missing(root: Path) -> list[str]:
    return [s for s in FASHION_FILES if not any((root / n).exists() for n in (s + ".gz", s))]


def check_available(libsvm: tuple[str, ...] = (), fashion: bool = False) -> None:
    """Raise one :class:`DataError` naming every missing file (the LIBSVM files ``libsvm``
    under :func:`data_dir`, Fashion-MNIST's four files where ``fashion``) and where to get
    them; nothing when all are there."""
    gone = [str(libsvm_path(n)) for n in libsvm if not libsvm_path(n).is_file()]
    where = []
    if gone:
        where.append(f"LIBSVM sets: {LIBSVM_URL}")
    if fashion and _fashion_missing(fashion_dir()):
        root = fashion_dir()
        gone += [str(root / f"{s}.gz") for s in _fashion_missing(root)]
        where.append(f"Fashion-MNIST: {FASHION_SOURCES}, or into {data_dir() / 'fashion-mnist'}")
    if gone:
        raise DataError(
            f"missing data: {', '.join(gone)} (data folder {data_dir()}: --data DIR or "
            f"{DATA_ENV}=DIR; {'; '.join(where)})"
        )


_REUSE: ContextVar[dict | None] = ContextVar("gradzip_datasets_reuse", default=None)


@contextlib.contextmanager
def reuse():
    """Within the block, each loader call reads its data set once and returns the same
    :class:`Dataset` to later calls with the same arguments (callers must not modify it)."""
    token = _REUSE.set({})
    try:
        yield
    finally:
        _REUSE.reset(token)


def _reusable(load):
    @functools.wraps(load)
    def wrapper(*args, **kwargs):
        memo = _REUSE.get()
        if memo is None:
            return load(*args, **kwargs)
        key = (load.__name__, args, tuple(sorted(kwargs.items())))
        if key not in memo:
            memo[key] = load(*args, **kwargs)
        return memo[key]

    return wrapper


class DataError(ValueError):
    """A dataset that cannot be read; the message says which and why."""


@dataclass
class Dataset:
    X: torch.Tensor  # (n, ...) float32 features
    y: torch.Tensor  # (n,) int64 labels or float32 targets
    X_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int  # 0 for regression
    name: str


def _exists(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    return path


def read_libsvm(path: str | Path, n_features: int | None = None):
    """``(X, y)``: the rows of a LIBSVM file as scikit-learn reads them (a float64 CSR
    matrix) and its raw labels; :class:`DataError` for a missing, malformed or empty file."""
    from sklearn.datasets import load_svmlight_file

    path = Path(path)
    if not path.exists():
        raise DataError(f"LIBSVM file not found: {path} ({_libsvm_hint(path)})")
    try:
        X, y = load_svmlight_file(str(path), n_features=n_features)
    except (ValueError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"malformed LIBSVM file {path}: {msg}") from None
    if X.shape[0] == 0:
        raise DataError(f"LIBSVM file {path} holds no rows")
    return X, y


def _binary_labels(y: np.ndarray, path: Path) -> np.ndarray:
    values = np.unique(y)
    if len(values) != 2:
        raise DataError(f"{path}: expected 2 classes, found labels {values[:10].tolist()}")
    return (y == values[1]).astype(np.int64)


@_reusable
def load_libsvm(
    path: str | Path | None = None,
    test_path: str | Path | None = None,
    n_features: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """A binary LIBSVM set as dense tensors; labels mapped to {0, 1}.

    ``path`` defaults to :func:`libsvm_path` ``("a9a")``. With no ``test_path``,
    ``path + ".t"`` is used when it exists, else a seeded split.
    """
    path = Path(path) if path is not None else libsvm_path("a9a")
    X, y = read_libsvm(path, n_features)
    tp = Path(test_path) if test_path else path.with_name(path.name + ".t")
    if tp.exists():
        Xt, yt = read_libsvm(tp, X.shape[1])
        if Xt.shape[1] != X.shape[1]:
            raise DataError(f"{tp}: {Xt.shape[1]} features, {path} has {X.shape[1]}")
        y_all = _binary_labels(np.concatenate([y, yt]), path)
        y, yt = y_all[: len(y)], y_all[len(y) :]
    else:
        y = _binary_labels(y, path)
        perm = np.random.default_rng(seed).permutation(X.shape[0])
        cut = int(X.shape[0] * (1 - test_fraction))
        X, Xt, y, yt = X[perm[:cut]], X[perm[cut:]], y[perm[:cut]], y[perm[cut:]]
    t = lambda a: torch.from_numpy(np.asarray(a.todense(), dtype=np.float32))  # noqa: E731
    return Dataset(t(X), torch.from_numpy(y), t(Xt), torch.from_numpy(yt), 2, path.name)


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    _exists(path, "IDX file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4 + 4 * dims)
            if len(head) < 4 + 4 * dims:
                raise DataError(f"{path}: truncated IDX header")
            m, *shape = struct.unpack(f">I{dims}I", head)
            if m != magic:
                raise DataError(f"{path}: IDX magic {m}, expected {magic}")
            count = int(np.prod(shape))
            if count > 1 << 31:
                raise DataError(f"{path}: IDX header declares {count} bytes")
            data = np.frombuffer(f.read(count), dtype=np.uint8)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if data.size != count:
        raise DataError(f"{path}: truncated IDX data ({data.size} of {count} bytes)")
    return data.reshape(shape)


@_reusable
def load_fashion_mnist(root: str | Path | None = None) -> Dataset:
    """Fashion-MNIST from the four original IDX files (gzipped or not) in ``root`` (default
    :func:`fashion_dir`)."""
    root = Path(root) if root is not None else fashion_dir()
    if not root.is_dir():
        raise DataError(
            f"Fashion-MNIST folder not found: {root} (its four IDX files {', '.join(FASHION_FILES)}"
            f"(.gz): {FASHION_SOURCES}; or pass --data DIR)"
        )

    def find(stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (root / name).exists():
                return root / name
        raise DataError(f"Fashion-MNIST file {stem}(.gz) not found in {root} ({FASHION_SOURCES})")

    X = _read_idx(find("train-images-idx3-ubyte"), 2051, 3)
    y = _read_idx(find("train-labels-idx1-ubyte"), 2049, 1)
    Xt = _read_idx(find("t10k-images-idx3-ubyte"), 2051, 3)
    yt = _read_idx(find("t10k-labels-idx1-ubyte"), 2049, 1)
    if len(X) != len(y) or len(Xt) != len(yt):
        raise DataError(f"{root}: image and label counts differ")
    img = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)  # noqa: E731
    lab = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    return Dataset(img(X), lab(y), img(Xt), lab(yt), 10, "fashion-mnist")


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), features in [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    X, y = sk_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(X))
    cut = int(len(X) * (1 - test_fraction))
    X = torch.from_numpy((X / 16.0).astype(np.float32))
    y = torch.from_numpy(y.astype(np.int64))
    tr, te = torch.from_numpy(perm[:cut]), torch.from_numpy(perm[cut:])
    return Dataset(X[tr], y[tr], X[te], y[te], 10, "digits")


def load_diabetes(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled diabetes regression set, standardized features and target."""
    from sklearn.datasets import load_diabetes as sk_diabetes

    X, y = sk_diabetes(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    perm = np.random.default_rng(seed).permutation(len(X))
    cut = int(len(X) * (1 - test_fraction))
    f = lambda a: torch.from_numpy(a.astype(np.float32))  # noqa: E731
    return Dataset(
        f(X[perm[:cut]]), f(y[perm[:cut]]), f(X[perm[cut:]]), f(y[perm[cut:]]), 0, "diabetes"
    )


def synthetic_least_squares(
    m: int = 500, n: int = 100, cond: float = 100.0, noise: float = 0.0, seed: int = 0
) -> Dataset:
    """A = U diag(s) V^T with ||A||_2 = 1 and cond(A^T A) = cond; b = A x* + noise."""
    if m < n or cond < 1:
        raise ValueError(f"need m >= n and cond >= 1, got m={m}, n={n}, cond={cond}")
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -0.5 * np.log10(cond), n, dtype=torch.float64)
    A = (U * s) @ V.T * np.sqrt(m)  # rows of unit scale: the mean loss has L = 1
    x_star = torch.randn(n, generator=g, dtype=torch.float64)
    b = A @ x_star + noise * torch.randn(m, generator=g, dtype=torch.float64)
    A, b = A.float(), b.float()
    return Dataset(A, b, A, b, 0, f"lsq-{m}x{n}-cond{cond:g}")
