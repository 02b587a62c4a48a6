"""The reproductions' loops against the library's: each paper's driver, run on the library's
float32 parts, takes the same steps as the simulated engine (or the experiment runner),
bit for bit; the float64 objectives agree with the problems' losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradzip.compressors import compressor
from gradzip.engines import Algorithm, SimulatedEngine
from gradzip.experiments import runner
from gradzip.experiments.config import RunConfig
from gradzip.experiments.schedules import Schedule
from gradzip.methods import Method
from gradzip.problems import Problem, build, datasets
from gradzip.reproduce import biased, common, dqgd, memsgd


def tiny_libsvm(path, n=80, d=6):
    from sklearn.datasets import dump_svmlight_file

    X = np.random.default_rng(1).standard_normal((n, d)).round(4)
    X[np.arange(n), np.arange(n) % d] = 0  # sparse rows
    dump_svmlight_file(X, np.where(X[:, 0] + 0.5 * X[:, 1] > 0, 1, -1), str(path))
    return path


def engine_trajectory(problem, method: Method, lrs, seed: int) -> list[torch.Tensor]:
    eng = SimulatedEngine(problem, Algorithm(method, problem.dim, seed=seed), 1, seed=seed)
    xs = []
    for t, lr in enumerate(lrs):
        eng.step(t, lr)
        xs.append(eng.x.clone())
    return xs


# --- Mem-SGD (Stich et al.): memsgd.descend is the engine's step ---------------------------


@pytest.mark.parametrize(
    "spec, rule, kind",
    [
        ("topk:k=2", "ef", "memsgd"),  # Mem-SGD: top-k with memory, eta = gamma/(lam(t+a))
        ("randk:k=3", "ef", "memsgd"),  # seeded: the same coordinates on both sides
        ("identity", "none", "bottou"),  # the SGD baseline
        ("qsgd:levels=1", "none", "bottou"),  # the QSGD baseline
    ],
)
def test_memsgd_loop_is_the_engine_step(spec, rule, kind):
    seed, steps = 3, 30
    prob = build("lsq-diabetes", workers=1, batch_size=1, l2=0.05, seed=seed)
    sched = Schedule(kind, 0.5, prob.l2, 4.0)
    xs = []
    x_T = memsgd.descend(
        lambda t, x: prob.gradient(x, prob.batch(seed, t, 0))[1],
        prob.dim, compressor(spec), steps, sched, rule, Schedule("memsgd", 1.0, 1.0, 4.0),
        seed, dtype=torch.float32, after_step=lambda t, x, xbar, p: xs.append(x.clone()),
    )  # fmt: skip
    ref = engine_trajectory(
        prob, Method(uplink=spec, uplink_rule=rule), [sched(t) for t in range(steps)], seed
    )
    assert torch.equal(x_T, ref[-1])
    for t in range(steps):
        assert torch.equal(xs[t], ref[t]), t


def test_memsgd_average_is_the_weighted_mean_of_the_iterates():
    """xbar_t = sum_{s<=t} w_s x_s / sum_{s<=t} w_s with w_s = (s + a)^2 (Theorem 2.4)."""
    prob = build("lsq-diabetes", workers=1, batch_size=1, l2=0.05)
    seen = []
    memsgd.descend(
        lambda t, x: prob.gradient(x.float(), prob.batch(0, t, 0))[1].double(),
        prob.dim, compressor("topk:k=2"), 12, Schedule("memsgd", 0.5, 0.05, 3.0), "ef",
        Schedule("memsgd", 0.5, 0.05, 3.0), 0, dtype=torch.float64,
        after_step=lambda t, x, xbar, p: seen.append((x.clone(), xbar.clone())),
    )  # fmt: skip
    iterates = [torch.zeros(prob.dim, dtype=torch.float64)] + [x for x, _ in seen[:-1]]
    for t, (_, xbar) in enumerate(seen):
        w = torch.tensor([(s + 3.0) ** 2 for s in range(t + 1)], dtype=torch.float64)
        want = (w[:, None] * torch.stack(iterates[: t + 1])).sum(0) / w.sum()
        torch.testing.assert_close(xbar, want, rtol=1e-12, atol=1e-12)


def test_memsgd_objective_is_the_problems_logistic_loss(tmp_path):
    prob = memsgd.Logreg(*_logreg_data(tmp_path), 0.1, "tiny")
    lib = Problem(
        "tiny",
        datasets.Dataset(
            torch.from_numpy(prob.X).float(), torch.from_numpy((prob.y > 0).astype(np.int64)),
            torch.zeros(1, prob.d), torch.zeros(1, dtype=torch.int64), 2, "tiny",
        ),
        nn.Linear(prob.d, 1, bias=False), "logistic", l2=prob.lam, batch_size=0,
    )  # fmt: skip
    lib.split(1)
    x = np.random.default_rng(0).standard_normal(prob.d)
    x32 = torch.from_numpy(x).float()
    loss, g = lib.gradient(x32, torch.arange(prob.n))
    assert prob.f(x) == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(prob.grad(x), g.double().numpy(), rtol=1e-4, atol=1e-6)
    _, g5 = lib.gradient(x32, torch.tensor([5]))
    np.testing.assert_allclose(prob.grad_row(x, 5), g5.double().numpy(), rtol=1e-4, atol=1e-6)


def _logreg_data(tmp_path):
    ds = datasets.load_libsvm(tiny_libsvm(tmp_path / "tiny"))
    X = np.hstack([ds.X.double().numpy(), np.ones((len(ds.y), 1))])
    return X / np.linalg.norm(X, axis=1, keepdims=True), ds.y.numpy() * 2.0 - 1.0


# --- DQ-GD (Lin et al.): dqgd.descend is the engine's step with the dq rule ----------------


@pytest.mark.parametrize("rate", [1.0, 2.5])
def test_dqgd_loop_is_the_engine_step(rate):
    """In float32, with the cube quantizer (gradzip's uniform reference) at a fixed range,
    DQ-GD's loop and the engine with ``uniform`` and the ``dq`` rule take the same steps."""
    m, n, T, seed = 40, 6, 25, 0
    g = torch.Generator().manual_seed(0)
    A = torch.randn(m, n, generator=g)
    b = A @ torch.randn(n, generator=g) + 0.1 * torch.randn(m, generator=g)
    model = nn.Linear(n, 1, bias=False)
    nn.init.zeros_(model.weight)
    prob = Problem("lsq", datasets.Dataset(A, b, A, b, 0, "lsq"), model, "mse", batch_size=0)
    prob.split(1)
    rows = prob.batch(seed, 0, 0)

    def grad(x: np.ndarray) -> np.ndarray:
        return prob.gradient(torch.from_numpy(x), rows)[1].numpy()

    x0 = prob.initial_point().numpy()
    r = float(np.linalg.norm(grad(x0)))
    eta = 0.5
    Q = dqgd.Quantizer(n, rate, flat=False)
    x_T = dqgd.descend(grad, Q, x0, eta, r, 1.0, T, np.random.default_rng(0))
    method = Method(
        uplink=f"uniform:bits={rate},flatten=false", uplink_rule="dq", dq_range=r, dq_decay=1.0
    )
    ref = engine_trajectory(prob, method, [eta] * T, seed)
    assert x_T.dtype == np.float32 and Q.sent == T
    assert torch.equal(torch.from_numpy(x_T), ref[-1])
    assert not torch.equal(ref[-1], ref[-2])  # it moved to the end


def test_dqgd_flat_rotation_is_the_orthonormal_walsh_hadamard_matrix():
    from scipy.linalg import hadamard as sylvester

    for D in (1, 2, 16, 128):
        H = dqgd.walsh_hadamard(D)
        assert np.array_equal(H, sylvester(D) / np.sqrt(D))  # the same bits


# --- Beznosikov et al. and FO-SGD: common.train is the experiment runner ------------------


@pytest.mark.parametrize(
    "problem, method, batch, workers",
    [
        ("logreg", Method(uplink="topk:k=0.5", uplink_rule="ef"), 0, 2),  # biased: full grads
        ("logreg", Method(uplink="randk:k=2,unbiased=true"), 8, 2),  # its unbiased side
        ("mlp-digits", "fosgd", 16, 2),  # FO-SGD
        ("mlp-digits", "qsgd", 16, 3),
    ],
)
def test_common_train_is_the_runner(tmp_path, problem, method, batch, workers):
    data = str(tiny_libsvm(tmp_path / "tiny")) if problem == "logreg" else ""
    steps, lr, every, seed = 9, 0.3, 3, 2
    prob = build(problem, data or None, workers=workers, batch_size=batch, l2=0.05, seed=seed,
                 hidden=8)  # fmt: skip
    tr = common.train(prob, "m", method, steps, lr, workers, every, seed)
    m = method if isinstance(method, Method) else None
    cfg = RunConfig(
        problem=problem, data=data, method="sgd" if m else method, workers=workers,
        uplink=m.uplink if m else "", uplink_rule=m.uplink_rule if m else "",
        batch_size=batch, hidden=8, l2=0.05, steps=steps, lr=lr, seed=seed, eval_every=every,
        out=str(tmp_path / "run"),
    )  # fmt: skip
    runner.train(cfg, progress=False)
    _, evals = runner.read_metrics(tmp_path / "run")
    assert [r["step"] for r in tr.rows] == [r["step"] for r in evals]
    for mine, theirs in zip(tr.rows, evals, strict=True):
        assert mine["bits_up"] == theirs["cum_bits_up"]
        assert mine["bits_down"] == theirs["cum_bits_down"]
        for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
            assert mine[key] == theirs[key], (mine["step"], key)


def test_biased_objective_is_the_problems_logistic_loss(tmp_path):
    prob = build("logreg", str(tiny_libsvm(tmp_path / "tiny")), batch_size=0, l2=0.05)
    f, fstar, gnorm = biased._objective(prob)
    x = torch.randn(prob.dim, generator=torch.Generator().manual_seed(0))
    assert f(x.double().numpy()) == pytest.approx(prob.evaluate(x)["train_loss"], rel=1e-5)
    assert fstar <= f(np.zeros(prob.dim)) and gnorm < 1e-6


# --- the data-path setting ------------------------------------------------------------------


def test_reproductions_read_the_data_setting(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.DATA_ENV, str(tmp_path))
    (tmp_path / "libsvm").mkdir()
    tiny_libsvm(tmp_path / "libsvm" / "a9a")
    assert biased.Config().logreg_data == str(tmp_path / "libsvm" / "a9a")
    prob = memsgd.load("a9a", 0, 0)
    assert prob.d == 123 + 1  # a9a's known feature count, and the bias column
