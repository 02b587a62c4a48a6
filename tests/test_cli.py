"""The command line: flags reach the run, bad input is a one-line error, JSON is written."""

import json
import subprocess
import sys

import pytest

from gradzip.cli import main


def test_bench_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["bench", "--sizes", "2^10,3000", "--compressors", "fosgd;sign", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["compressor"], r["d"]) for r in rows] == [
        ("fosgd", 1024), ("sign", 1024), ("fosgd", 3000), ("sign", 3000),
    ]  # fmt: skip
    for r in rows:
        assert r["encode_ratio"] > 0 and r["decode_ratio"] > 0 and r["copy_ms"] > 0
        # one bit per coordinate plus a header of under 100 bytes
        assert 1.0 <= r["bits_per_coord"] <= 1.0 + 800 / r["d"]
    text = capsys.readouterr().out
    assert "enc/copy" in text and "fosgd" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--sizes", "2^x"], "not a size"),
        (["bench", "--sizes", "0"], "sizes must be"),
        (["bench", "--compressors", "nope"], "unknown compressor"),
        (["bench", "--compressors", "fosgd:zz=1"], "no parameter"),
    ],
)
def test_bad_arguments_are_clear(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_compressors_lists_registry(capsys):
    assert main(["compressors", "--d", "1000"]) == 0
    out = capsys.readouterr().out
    for name in ("identity", "fosgd", "drive", "scaled_sign"):
        assert name in out


def test_python_m_gradzip_help():
    r = subprocess.run([sys.executable, "-m", "gradzip", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "bench" in r.stdout


def test_every_config_key_has_a_help_text(capsys):
    from gradzip.experiments.config import HELP, RunConfig

    assert set(HELP) == set(RunConfig.__dataclass_fields__)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "step-size schedule" in out and "(default 'constant')" in out


def test_classes_help_is_its_own(capsys):
    with pytest.raises(SystemExit) as e:
        main(["classes", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--samples" in out


def test_kernels_refresh_reports_the_cache(capsys):
    """`gradzip kernels --refresh`: the explicit step after an upgrade or a kernel edit; on
    this checkout's fresh cache it changes nothing and says so."""
    from gradzip._numba import cache

    assert cache.cache_dir(cache.HERE) is not None
    assert main(["kernels", "--refresh"]) == 0
    out = capsys.readouterr().out
    assert "kernel cache is fresh" in out or "stale kernel cache dropped" in out
    # without --refresh it also compiles ahead of time (tests/test_reporting.py)


def test_version_matches_the_package(capsys):
    import importlib.metadata

    import gradzip

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"gradzip {gradzip.__version__}"
    assert gradzip.__version__ == importlib.metadata.version("gradzip")


@pytest.mark.parametrize(
    "flags, key",
    [(["--steps", "0"], "steps"), (["--steps", "-5"], "steps"), (["--l2", "nan"], "l2"),
     (["--lr", "0"], "lr"), (["--workers", "0"], "workers"),
     (["--eval-every", "-1"], "eval_every")],
)  # fmt: skip
def test_out_of_range_values_are_one_line_errors(flags, key, tmp_path, capsys):
    out = tmp_path / "run"
    try:
        rc = main(["train", *flags, "--out", str(out)])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert f"config key {key!r}" in capsys.readouterr().err
    assert not out.exists()


def test_eval_every_zero_evaluates_at_the_end_only(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--steps", "3", "--eval-every", "0", "--quiet", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("eval")]
    assert [r["step"] for r in evals] == [0, 3]  # the starting point and the end
