"""Datasets and problems: real files, malformed files, splits, deterministic batches."""

import gzip
import struct
from pathlib import Path

import pytest
import torch

from gradzip.problems import PROBLEMS, DataError, Recipe, build, datasets, models, smoothness

A9A = datasets.libsvm_path("a9a")


def write_idx(path: Path, magic: int, shape: tuple, data: bytes, gz: bool = True) -> None:
    raw = struct.pack(f">I{len(shape)}I", magic, *shape) + data
    path.write_bytes(gzip.compress(raw) if gz else raw)


def fake_fashion(root: Path, n: int = 20, nt: int = 10) -> None:
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for stem, count in (("train", n), ("t10k", nt)):
        img = torch.randint(0, 256, (count, 28, 28), generator=g, dtype=torch.uint8)
        lab = torch.arange(count, dtype=torch.uint8) % 10
        write_idx(
            root / f"{stem}-images-idx3-ubyte.gz", 2051, (count, 28, 28), img.numpy().tobytes()
        )
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", 2049, (count,), lab.numpy().tobytes())


def test_fashion_idx_round_trip(tmp_path):
    fake_fashion(tmp_path)
    ds = datasets.load_fashion_mnist(tmp_path)
    assert ds.X.shape == (20, 1, 28, 28) and ds.X_test.shape == (10, 1, 28, 28)
    assert 0 <= float(ds.X.min()) and float(ds.X.max()) <= 1
    assert ds.y.tolist() == [i % 10 for i in range(20)]


@pytest.mark.parametrize("damage, message", [("magic", "magic"), ("truncate", "truncated")])
def test_fashion_malformed(tmp_path, damage, message):
    fake_fashion(tmp_path)
    p = tmp_path / "train-labels-idx1-ubyte.gz"
    raw = gzip.decompress(p.read_bytes())
    raw = struct.pack(">I", 1234) + raw[4:] if damage == "magic" else raw[:-5]
    p.write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match=message):
        datasets.load_fashion_mnist(tmp_path)


def test_fashion_missing_folder_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install"):
        datasets.load_fashion_mnist(tmp_path / "nope")


@pytest.mark.skipif(not A9A.exists(), reason=f"{A9A} not present beside the project")
def test_a9a_loads_with_its_test_split():
    ds = datasets.load_libsvm(A9A, n_features=123)
    assert ds.X.shape == (32560, 123) and ds.X_test.shape == (16281, 123)
    assert set(ds.y.unique().tolist()) == {0, 1} and set(ds.y_test.unique().tolist()) == {0, 1}


def test_libsvm_malformed_and_missing(tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("+1 1:0.5 2:x\n")
    with pytest.raises(DataError, match="malformed LIBSVM file"):
        datasets.load_libsvm(bad)
    with pytest.raises(DataError, match="not found"):
        datasets.load_libsvm(tmp_path / "missing")
    three = tmp_path / "three"
    three.write_text("1 1:1\n2 1:2\n3 2:1\n")
    with pytest.raises(DataError, match="expected 2 classes"):
        datasets.load_libsvm(three)


def test_splits_and_batches():
    p = build("softmax-digits", workers=4, split="label", batch_size=8, seed=1)
    assert sum(len(s) for s in p.shards) == len(p.data.y)
    assert len(torch.cat(p.shards).unique()) == len(p.data.y)  # a partition
    first = p.data.y[p.shards[0]]
    assert first.max() <= p.data.y[p.shards[-1]].min()  # sorted by label
    b1, b2 = p.batch(3, 5, 2), p.batch(3, 5, 2)
    assert torch.equal(b1, b2) and not torch.equal(b1, p.batch(3, 6, 2))
    assert set(b1.tolist()) <= set(p.shards[2].tolist())
    iid = build("softmax-digits", workers=4, split="iid", seed=1)
    counts = torch.bincount(iid.data.y[iid.shards[0]], minlength=10)
    assert int(counts.min()) > 0  # every class on every worker


def test_gradient_matches_finite_differences():
    p = build("lsq-diabetes", workers=1, batch_size=0)
    x = torch.randn(p.dim, generator=torch.Generator().manual_seed(0)) * 0.1
    rows = p.batch(0, 0, 0)
    _, g = p.gradient(x, rows)
    e = torch.zeros(p.dim)
    e[3] = 1e-3
    f = lambda z: p.gradient(z, rows)[0]  # noqa: E731
    assert abs((f(x + e) - f(x - e)) / 2e-3 - float(g[3])) < 1e-3


def test_synthetic_least_squares_condition_number():
    ds = datasets.synthetic_least_squares(m=300, n=40, cond=50.0)
    s = torch.linalg.svdvals(ds.X.double() / 300**0.5)
    assert float((s[0] / s[-1]) ** 2) == pytest.approx(50.0, rel=1e-3)
    L, mu = smoothness(build("lsq-synthetic", workers=1))
    assert L > mu >= 0


def test_unknown_problem():
    with pytest.raises(ValueError, match="available: .*mlp-digits"):
        build("nope")


def test_problems_are_values(monkeypatch):
    """A problem is a recipe in one map: a new one is one entry, and build takes it."""
    assert all(isinstance(r, Recipe) for r in PROBLEMS.values())
    recipe = Recipe(
        lambda data, seed: datasets.load_diabetes(seed=seed),
        lambda ds, hidden: models.mlp(ds.X.shape[1], 1, hidden),
        "mse",
    )
    monkeypatch.setitem(PROBLEMS, "mlp-diabetes", recipe)
    p = build("mlp-diabetes", workers=2, hidden=4)
    assert p.dim == 10 * 4 + 4 + 4 + 1 and p.loss == "mse" and len(p.shards) == 2
    assert torch.isfinite(p.gradient(p.initial_point(), p.batch(0, 0, 0))[1]).all()


def test_data_dir_is_one_setting(monkeypatch, tmp_path):
    monkeypatch.delenv(datasets.DATA_ENV, raising=False)
    assert datasets.data_dir() == Path("../shared/data")
    assert str(datasets.libsvm_path("w8a")) == "../shared/data/libsvm/w8a"
    monkeypatch.setenv(datasets.DATA_ENV, str(tmp_path))
    assert datasets.libsvm_path() == tmp_path / "libsvm" / "a9a"
    with pytest.raises(DataError, match=f"not found: {tmp_path}"):
        build("logreg")  # the default file, under the setting


def test_reuse_reads_each_data_set_once(tmp_path):
    f = tmp_path / "tiny"
    f.write_text("1 1:1\n0 2:1\n1 1:0.5\n0 2:2\n1 1:2\n")
    load = datasets.load_libsvm
    assert datasets.load_libsvm(f) is not datasets.load_libsvm(f)
    with datasets.reuse():
        a = datasets.load_libsvm(f)
        assert datasets.load_libsvm(f) is a and datasets.load_libsvm(f, seed=1) is not a
    assert datasets.load_libsvm(f) is not a
    assert datasets.load_libsvm is load  # nothing is patched
