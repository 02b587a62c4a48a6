"""The class study: estimators on compressors with known constants, sources, the CLI."""

import csv
import math
from pathlib import Path

import pytest
import torch

import gradzip as gz
from gradzip.compressors import names
from gradzip.experiments import classes, gradients

A9A = Path(gradients.DEFAULT_LIBSVM)
D = 500


def gauss(d=D, seed=0, scale=1.0):
    return gradients.gaussian(d=d, n=1, seed=seed)[0] * scale


def test_identity_has_the_trivial_constants():
    xs = gradients.gaussian(d=D, n=3, seed=1) + gradients.sparse(d=D, n=2, seed=2)
    k = classes.constants(gz.compressor("identity"), xs, samples=8)
    assert k.max_ratio == 0 and k.delta_hat == 1 and k.vnmse == 0
    assert k.alpha_hat == pytest.approx(1, rel=1e-12)
    assert k.beta_hat == pytest.approx(1, rel=1e-12)
    assert k.gamma_hat == pytest.approx(1, rel=1e-12)
    assert not k.random and k.samples == 1  # deterministic: three equal draws stand for all


def test_scaled_sign_is_in_b3_with_delta_at_most_d():
    c = gz.compressor("scaled_sign")
    xs = (
        gradients.gaussian(d=D, n=2) + gradients.sparse(d=D, n=2) + gradients.heavy_tailed(d=D, n=2)
    )
    k = classes.constants(c, xs, samples=4)
    assert 1 <= k.delta_hat <= D
    assert k.beta_hat == pytest.approx(1, rel=1e-5)  # <C(x), x> = ||C(x)||^2 = ||x||_1^2 / d
    # all |x_i| equal: scaled sign is exact
    signs = torch.where(torch.arange(D) % 3 == 0, -1.0, 1.0)
    k1 = classes.constants(c, [0.5 * signs], samples=4)
    assert k1.delta_hat == pytest.approx(1, abs=1e-6)
    # a 1-sparse vector is the worst case: ratio 1 - 1/d, delta = d
    e = torch.zeros(D)
    e[7] = 3.0
    assert classes.constants(c, [e], samples=4).delta_hat == pytest.approx(D, rel=1e-4)


@pytest.mark.skipif("topk" not in names(), reason="topk is not registered")
def test_topk_delta_at_most_d_over_k():
    k_frac = 0.1
    xs = gradients.gaussian(d=D, n=3) + gradients.laplace(d=D, n=2) + gradients.sparse(d=D, n=2)
    k = classes.constants(gz.compressor(f"topk:k={k_frac}"), xs, samples=4)
    assert 1 <= k.delta_hat <= D / round(k_frac * D) + 1e-9
    assert not k.random
    # top-k keeps coordinates unchanged: <C(x), x> = ||C(x)||^2, so beta = 1 and gamma = alpha
    assert k.beta_hat == pytest.approx(1, rel=1e-6)
    assert k.gamma_hat == pytest.approx(k.alpha_hat, rel=1e-6)


def test_unbiased_onebit_has_gamma_one_within_monte_carlo_error():
    c = gz.compressor("onebit:scale=max")
    assert c.unbiased
    xs = gradients.gaussian(d=D, n=2, seed=3) + gradients.laplace(d=D, n=2, seed=4)
    k = classes.constants(c, xs, samples=40)
    assert k.random and k.samples == 40
    assert abs(k.gamma_hat - 1) <= 4 * k.gamma_se + 1e-3
    assert k.gamma_se < 0.05
    # unbiased with variance omega: E||C||^2 = (1 + ratio) ||x||^2, far outside B3 here
    assert k.max_ratio > 1 and math.isinf(k.delta_hat)
    assert k.max_ratio <= c.omega(D) + 4 * k.max_ratio_se


def test_sign_is_not_in_b3_for_small_vectors():
    c = gz.compressor("sign")
    small = gauss(scale=1e-2)  # ||x||^2 ~ 1e-4 d while ||sign(x)||^2 = d
    k = classes.constants(c, [small], samples=4)
    assert k.max_ratio >= 1 and math.isinf(k.delta_hat)
    row = classes.class_table(["sign"], {"small": [small]}, samples=4, progress=None)[0]
    assert math.isinf(row["delta_hat"]) and "inf" in classes.format_table([row])


def test_moments_are_consistent_and_randomness_is_detected():
    x = gauss(seed=5)
    m = classes.moments(gz.compressor("randk:k=0.1,unbiased=true"), x, samples=30)
    assert m.samples == 30
    assert m.err2 == pytest.approx(m.out2 - 2 * m.inner + m.norm2, rel=1e-9)
    # rand-k scaled by d/k: E||C(x)||^2 = (d/k) ||x||^2 exactly, for every draw
    assert m.out2 / m.norm2 == pytest.approx(10, rel=0.05)
    k = classes.constants(gz.compressor("randk:k=0.1"), [x], samples=8)
    assert k.random and 0 < k.delta_hat < math.inf
    with pytest.raises(ValueError, match="nonzero"):
        classes.constants(gz.compressor("identity"), [torch.zeros(4)], samples=2)


def test_synthetic_sources_are_seeded_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    for name, fn in gradients.SYNTHETIC.items():
        a, b = fn(d=300, n=2, seed=9), fn(d=300, n=2, seed=9)
        assert len(a) == 2 and all(x.shape == (300,) and x.dtype == torch.float32 for x in a)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), name
        assert all(torch.isfinite(x).all() and x.any() for x in a), name
    assert torch.equal(state, torch.random.get_rng_state())
    frac = (gradients.sparse(d=1000, n=1, density=0.03)[0] != 0).float().mean()
    assert frac == pytest.approx(0.03)


def test_mlp_gradients_load_and_are_finite():
    xs = gradients.mlp_gradients(steps=(0, 5), hidden=8)
    assert len(xs) == 2
    d = 64 * 8 + 8 + 8 * 10 + 10
    for x in xs:
        assert x.shape == (d,) and x.dtype == torch.float32
        assert torch.isfinite(x).all() and x.norm() > 0
    assert gradients.mlp_gradients(steps=(0,))[0].numel() == 2410


@pytest.mark.skipif(not A9A.is_file(), reason=f"{A9A} is absent (run from the project root)")
def test_a9a_logreg_gradients_load_and_are_finite():
    xs = gradients.logreg_gradients(A9A, steps=(0, 50))
    assert len(xs) == 4  # full and mini-batch at each point
    for x in xs:
        assert x.shape == (123,) and x.dtype == torch.float32
        assert torch.isfinite(x).all() and x.norm() > 0
    # SGD makes progress: the full gradient shrinks
    assert xs[2].norm() < xs[0].norm()


def _tiny_libsvm(path: Path, n=60, d=5) -> Path:
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        vals = torch.randn(d, generator=g)
        feats = " ".join(f"{j + 1}:{float(v):.4f}" for j, v in enumerate(vals) if j != i % d)
        lines.append(f"{1 if vals[0] > 0 else 0} {feats}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_logreg_on_a_given_file_and_a_missing_one(tmp_path):
    f = _tiny_libsvm(tmp_path / "tiny")
    xs = gradients.logreg_gradients(f, steps=(0, 3), batch=8, full=True, minibatch=False)
    assert [x.shape for x in xs] == [(5,), (5,)]
    missing = tmp_path / "nope" / "a9a"
    with pytest.raises(FileNotFoundError, match="nope/a9a"):
        gradients.logreg_gradients(missing)
    bad = tmp_path / "bad"
    bad.write_text("this is not libsvm\n")
    with pytest.raises(ValueError, match="bad"):
        gradients.load_libsvm(bad)


def test_class_table_skips_unregistered_specs_with_a_note():
    seen = []
    notes = []
    rows = classes.class_table(
        ["identity", "no_such_compressor", "identity"],
        {"g": gradients.gaussian(d=64, n=2)},
        samples=3,
        progress=seen.append,
        notes=notes,
    )
    assert [(r["compressor"], r["source"]) for r in rows] == [("identity", "g")]
    assert any("no_such_compressor" in n and "not registered" in n for n in notes)
    assert any("no_such_compressor" in s for s in seen)
    specs, _ = classes.default_specs()
    assert "identity" in specs and "topk:k=0.1" in specs


def test_cli_writes_csv_and_fails_cleanly(tmp_path, capsys):
    data = _tiny_libsvm(tmp_path / "tiny")
    out = tmp_path / "res"
    argv = ["--quick", "--samples", "3", "--out", str(out), "--data", str(data)]
    # a spec asked for that does not build is an error before anything runs (issue 16)
    rc = classes.main([*argv, "--compressors", "identity; scaled_sign; nope(k=1)"])
    err = capsys.readouterr().err
    assert rc == 2 and "'nope(k=1)'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    rc = classes.main([*argv, "--compressors", "identity; scaled_sign"])
    assert rc == 0
    rows = list(csv.DictReader((out / "classes.csv").open()))
    assert {r["compressor"] for r in rows} == {"identity", "scaled_sign"}
    assert "logreg-tiny" in {r["source"] for r in rows} and "mlp-digits" in {
        r["source"] for r in rows
    }
    assert all(float(r["delta_hat"]) == 1 for r in rows if r["compressor"] == "identity")
    text = capsys.readouterr().out
    assert "delta_hat" in text

    rc = classes.main(["--out", str(out), "--data", str(tmp_path / "missing" / "a9a")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "missing/a9a" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
