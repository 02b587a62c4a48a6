"""gradzip scales: FO-SGD's scale rules measured on vectors (issue 13's study)."""

import csv
import math

import pytest

from gradzip.cli import main
from gradzip.experiments import gradients, scales


def test_measure_gives_the_known_constants_of_the_rules():
    """On Gaussian vectors: undithered sign with the least-squares scale has error
    1 - 2/pi and shrinkage 2/pi; the fitted unbiased scale has shrinkage exactly 1; the
    paper's norm rule has an error near 2 ln(2d) - 1 and is not a contraction."""
    xs = gradients.gaussian(d=4096, n=2, seed=3)
    r = scales.measure("rms", 0.0, "mse", "fosgd:scale=rms,c=0,rescale=mse", xs, 4)
    assert r["vnmse"] == pytest.approx(1 - 2 / math.pi, abs=0.02)
    assert r["gamma_min"] == pytest.approx(2 / math.pi, abs=0.02)
    assert r["delta_hat"] == pytest.approx(1 / (2 / math.pi), rel=0.05)
    r = scales.measure("rms", 0.5, "unbiased", "fosgd:scale=rms,c=0.5,rescale=unbiased", xs, 4)
    assert r["gamma_min"] == pytest.approx(1.0, abs=1e-5) and r["a"] == 0.5
    assert 0.6 < r["vnmse"] < 0.8
    r = scales.measure("norm", 1.0, "none", "fosgd:scale=norm,c=1,rescale=none", xs, 4)
    assert r["a"] == pytest.approx(math.sqrt(2 * math.log(2 * 4096)), rel=1e-9)
    assert r["vnmse"] == pytest.approx(2 * math.log(2 * 4096) - 1, rel=0.1)
    assert math.isinf(r["delta_hat"])
    # the l1 rule lands at sqrt(2/pi) of the rms for a Gaussian-like rotated vector
    assert scales.dither_ratio("l1", 1.0, xs[0]) == pytest.approx(math.sqrt(2 / math.pi), abs=0.02)


def test_specs_cover_every_rule_and_rescale_and_skip_the_zero_decode():
    got = scales.specs(quick=True)
    assert {r for r, *_ in got} == {"rms", "norm", "l1"}
    assert {s for _, _, s, _ in got} == set(scales.RESCALES)
    assert ("rms", 0.0, "none") not in {(r, c, s) for r, c, s, _ in got}


def test_cli_writes_csv_and_figure(tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["scales", "--quick", "--sources", "gaussian", "--samples", "2", "--out", str(out)]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "scales.csv").open()))
    assert len(rows) == len(scales.specs(quick=True)) and {r["source"] for r in rows} == {
        "gaussian"
    }
    assert (out / "scales.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| gaussian | rms |" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["scales", "--samples", "1"])
    assert main(["scales", "--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["scales", "--sources", "nothing", "--out", str(tmp_path)]) == 2
    assert "unknown source(s) ['nothing']; valid: gaussian" in capsys.readouterr().err
