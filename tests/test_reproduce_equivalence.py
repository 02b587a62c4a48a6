"""The reproductions' loops against the library's: each paper's driver, run on the library's
float32 parts, takes the same steps as the simulated engine (or the experiment runner),
bit for bit; the one float64 logistic objective (gradzip.problems.logistic) against its
formula, finite differences and the problems' loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradzip.compressors import compressor, uniform
from gradzip.engines import Algorithm, SimulatedEngine
from gradzip.experiments import runner
from gradzip.experiments.config import RunConfig
from gradzip.experiments.schedules import Schedule
from gradzip.methods import Method
from gradzip.problems import Problem, build, datasets, logistic
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
    prob = logistic.Logistic(*_logreg_data(tmp_path), 0.1)
    lib = Problem(
        "tiny",
        datasets.Dataset(
            prob.A.float(), (prob.y > 0).long(),
            torch.zeros(1, prob.d), torch.zeros(1, dtype=torch.int64), 2, "tiny",
        ),
        nn.Linear(prob.d, 1, bias=False), "logistic", l2=prob.lam, batch_size=0,
    )  # fmt: skip
    lib.split(1)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(prob.d))
    loss, g = lib.gradient(x.float(), torch.arange(prob.n))
    assert prob.loss(x) == pytest.approx(loss, rel=1e-5)
    torch.testing.assert_close(prob.gradient(x), g.double(), rtol=1e-4, atol=1e-6)
    _, g5 = lib.gradient(x.float(), torch.tensor([5]))
    torch.testing.assert_close(prob.row_gradient(x, 5), g5.double(), rtol=1e-4, atol=1e-6)


def _logreg_data(tmp_path):
    """memsgd's layout: a bias column, rows of unit norm, labels in {-1, +1}."""
    f = logistic.from_dataset(datasets.load_libsvm(tiny_libsvm(tmp_path / "tiny")), 0.0)
    return f.A / torch.linalg.vector_norm(f.A, dim=1, keepdim=True), f.y


# --- DQ-GD (Lin et al.): dqgd.descend is the engine's step with the dq rule ----------------


@pytest.mark.parametrize("rate, flat", [(1.0, False), (2.5, False), (2.0, True), (2.5, True)])
def test_dqgd_loop_is_the_engine_step(rate, flat):
    """In float32, with the cube or the flattened quantizer (gradzip's uniform reference,
    gradzip's rotation) at a fixed range, DQ-GD's loop and the engine with ``uniform`` and
    the ``dq`` rule take the same steps (n = 8: no padding, the engine's rotation)."""
    m, n, T, seed = 40, 8, 25, 3
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
    Q = dqgd.Quantizer(n, rate, flat=flat, seed=seed)
    x_T = dqgd.descend(grad, Q, x0, eta, r, 1.0, T)
    method = Method(
        uplink=f"uniform:bits={rate},flatten={str(flat).lower()}", uplink_rule="dq",
        dq_range=r * Q.shrink, dq_decay=1.0,
    )  # fmt: skip
    ref = engine_trajectory(prob, method, [eta] * T, seed)
    assert x_T.dtype == np.float32 and Q.sent == T and Q.D == n
    assert torch.equal(torch.from_numpy(x_T), ref[-1])
    assert not torch.equal(ref[-1], ref[-2])  # it moved to the end


def test_dqgd_flat_step_is_the_uniform_compressor_on_the_padded_vector():
    """Message t of the flattened quantizer (n = 6 padded to D = 8) is what
    ``uniform:flatten=true`` encodes and decodes from the padded vector at (seed, step t):
    the same rotation signs, cells and bits (floor(R n) = 12 over 8 coordinates)."""
    n, D, rate, seed, r = 6, 8, 2.0, 5, 0.75
    Q = dqgd.Quantizer(n, rate, flat=True, seed=seed)
    assert Q.D == D and int(Q.w.sum()) == 12 == math.floor(rate * n)
    c = uniform.Uniform(bits=rate * n / D, range=r * Q.shrink, flatten=True)
    g = torch.Generator().manual_seed(1)
    for t in range(4):
        u = torch.randn(n, generator=g) * 0.3
        q = Q(u, r)
        p = c.encode(torch.nn.functional.pad(u, (0, D - n)), seed=seed, step=t)
        assert torch.equal(q, c.decode(p)[:n]), t


@pytest.mark.parametrize("flat", [False, True])
def test_dqgd_rows_run_as_they_would_alone(flat):
    """The sweep's batch (one row per R, one seed) gives each run the bits it has alone."""
    cfg = dqgd.Config(m=50, n=6, rates=(0.5, 2.0, 4.0), seeds=1)
    p = dqgd.synthetic(cfg)
    x0 = np.stack([dqgd.start(p, cfg, 0, R, flat) for R in cfg.rates])
    for fn in (dqgd.dqgd, dqgd.naive):
        together = dqgd.Quantizer(p.n, cfg.rates, flat, seed=7)
        rates = fn(p, together, x0, 30)
        for i, R in enumerate(cfg.rates):
            alone = dqgd.Quantizer(p.n, R, flat, seed=7)
            assert rates[i] == fn(p, alone, x0[i], 30), (fn.__name__, R)
            assert together.clipped[i] == alone.clipped and together.sent[i] == alone.sent


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
    f = logistic.from_dataset(prob.data, prob.l2)  # as biased's f*
    _, fstar, gnorm = f.solve()
    x = torch.randn(prob.dim, generator=torch.Generator().manual_seed(0))
    assert f.loss(x.double()) == pytest.approx(prob.evaluate(x)["train_loss"], rel=1e-5)
    assert fstar <= f.loss(torch.zeros(prob.dim, dtype=torch.float64)) and gnorm < 1e-6


# --- the one logistic objective (gradzip.problems.logistic) ---------------------------------


def _tiny_logistic(dtype=torch.float64, lam=0.1):
    g = torch.Generator().manual_seed(4)
    A = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([1.0, -1, -1, 1, 1, -1, 1], dtype=torch.float64)
    return logistic.Logistic(A.to(dtype), y.to(dtype), lam), A, y


def test_logistic_loss_is_the_formula():
    f, A, y = _tiny_logistic()
    x = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    rows = [math.log1p(math.exp(-yi * sum(a * b for a, b in zip(ai, x.tolist(), strict=True))))
            for ai, yi in zip(A.tolist(), y.tolist(), strict=True)]  # fmt: skip
    want = sum(rows) / len(rows) + 0.05 * sum(v * v for v in x.tolist())
    assert f.loss(x) == pytest.approx(want, rel=1e-14)
    big = torch.tensor([800.0, 0.0, 0.0], dtype=torch.float64)  # margins of +-800: no overflow
    assert math.isfinite(f.loss(big)) and torch.isfinite(f.gradient(big)).all()


def test_logistic_derivatives_are_finite_differences():
    f, _, _ = _tiny_logistic()
    x = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    h = 1e-6
    eye = torch.eye(3, dtype=torch.float64)
    fd = torch.tensor([(f.loss(x + h * e) - f.loss(x - h * e)) / (2 * h) for e in eye]).double()
    torch.testing.assert_close(f.gradient(x), fd, rtol=1e-7, atol=1e-9)
    fd2 = torch.stack([(f.gradient(x + h * e) - f.gradient(x - h * e)) / (2 * h) for e in eye])
    torch.testing.assert_close(f.hessian(x), fd2, rtol=1e-6, atol=1e-8)
    # a mini-batch (repeats counted) is the mean of its rows' gradients; one row, both ways
    rows = torch.tensor([2, 5, 2])
    per_row = [f.row_gradient(x, int(i)) for i in rows]
    torch.testing.assert_close(f.gradient(x, rows), sum(per_row) / 3, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(f.row_gradient(x, 4), f.gradient(x, torch.tensor([4])),
                               rtol=1e-14, atol=1e-15)  # fmt: skip


def test_logistic_solve_and_dtype():
    f, _, _ = _tiny_logistic()
    xs, fstar, gnorm = f.solve()
    assert gnorm < 1e-13 and fstar == f.loss(xs)
    for v in torch.eye(3, dtype=torch.float64):
        assert f.loss(xs + 1e-3 * v) > fstar and f.loss(xs - 1e-3 * v) > fstar
    f32, _, _ = _tiny_logistic(torch.float32)
    x = torch.tensor([0.3, -1.2, 2.0])
    assert f32.gradient(x).dtype == torch.float32 == f32.row_gradient(x, 1).dtype
    torch.testing.assert_close(
        f32.gradient(x).double(), f.gradient(x.double()), rtol=1e-6, atol=1e-7
    )


# --- the data-path setting ------------------------------------------------------------------


def test_reproductions_read_the_data_setting(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.DATA_ENV, str(tmp_path))
    (tmp_path / "libsvm").mkdir()
    tiny_libsvm(tmp_path / "libsvm" / "a9a")
    assert datasets.libsvm_path(biased.Config().logreg_data) == tmp_path / "libsvm" / "a9a"
    prob = memsgd.load("a9a", 0, 0)
    assert prob.d == 123 + 1  # a9a's known feature count, and the bias column
