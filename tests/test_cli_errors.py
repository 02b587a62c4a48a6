"""Bad input on the command line (issue 16): one line on stderr, a non-zero exit, no
traceback, and nothing created or overwritten; a diverged run exits non-zero and writes
valid JSON."""

from __future__ import annotations

import json
import sys

import pytest

from gradzip.cli import main

COMPILING = "compiling kernels"  # a cold numba cache's notice, not part of the error


def run_cli(argv, capsys) -> tuple[int, list[str], str]:
    """(exit status, stderr lines but a cold compile's notice, stdout)."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.strip() and COMPILING not in ln]
    return rc, lines, cap.out


def assert_one_line_error(rc, lines, *fragments):
    assert rc not in (0, None), lines
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else None


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 3-step run (its folder is copied by the tests that damage it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--quiet", "--steps", "3", "--problem", "lsq-synthetic",
                 "--out", str(out)]) == 0  # fmt: skip
    return out


def _toml(tmp_path, text):
    p = tmp_path / "run.toml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    "make_argv, fragments",
    [
        (lambda t: ["compare", "--methods", ""], ["--methods names no method", "sgd"]),
        (lambda t: ["compare", "--methods", " , "], ["--methods names no method"]),
        (lambda t: ["train", "--batch-size", "-1"], ["config key 'batch_size'"]),
        (lambda t: ["train", "--config", _toml(t, 'steps = "5"\n')],
         ["config key 'steps'", "string '5'"]),
        (lambda t: ["train", "--config", _toml(t, 'nesterov = "true"\n')],
         ["config key 'nesterov'", "true or false"]),
        (lambda t: ["train", "--config", _toml(t, 'lr = "0.1"\n')], ["config key 'lr'"]),
        (lambda t: ["classes", "--compressors", "foo"], ["unknown compressor 'foo'"]),
        (lambda t: ["classes", "--compressors", "sign;topk:zz=1"], ["'topk:zz=1'"]),
        (lambda t: ["classes", "--compressors", ";"], ["names no compressor"]),
        (lambda t: ["train", "--problem", "logreg", "--data", str(t / "none" / "a9a")],
         ["LIBSVM file not found", "csie.ntu.edu.tw", "--data"]),
        (lambda t: ["classes", "--data", str(t / "none" / "a9a")],
         ["LIBSVM data file not found", "csie.ntu.edu.tw"]),
        (lambda t: ["reproduce", "memsgd", "--quick", "--data", str(t / "empty")],
         ["missing data", "libsvm/a9a", "libsvm/w8a", "csie.ntu.edu.tw"]),
        (lambda t: ["reproduce", "fosgd", "--quick", "--data", str(t / "empty")],
         ["missing data", "libsvm/w8a"]),
        # argparse's own errors: one line too (no usage block)
        (lambda t: ["train", "--steps", "abc"], ["gradzip train: error:", "--steps", "'abc'"]),
        (lambda t: ["train", "--bogus", "1"], ["unrecognized arguments: --bogus 1", "--help"]),
        (lambda t: ["reproduce", "nope"], ["gradzip reproduce: error:", "invalid choice"]),
        (lambda t: ["classes", "--samples", "0"], ["gradzip classes: error: --samples"]),
        (lambda t: ["scales", "--samples", "1"], ["gradzip scales: error: --samples"]),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_creates_nothing(make_argv, fragments, tmp_path, capsys):
    out = tmp_path / "new" / "out"  # two levels that do not exist yet
    (tmp_path / "empty").mkdir()
    rc, lines, _ = run_cli([*make_argv(tmp_path), "--out", str(out)], capsys)
    assert_one_line_error(rc, lines, *fragments)
    assert not (tmp_path / "new").exists()  # no folder left behind, not even an empty one


def test_a_failed_run_leaves_no_empty_out_folder(tmp_path, capsys):
    """The data file is found missing after the command started: the folders it made go."""
    out = tmp_path / "a" / "b" / "run"
    rc, lines, _ = run_cli(
        ["train", "--problem", "mlp-fashion", "--data", str(tmp_path / "nope"), "--out", str(out)],
        capsys,
    )
    assert_one_line_error(rc, lines, "Fashion-MNIST folder not found", "dataset-fashion-mnist")
    assert not (tmp_path / "a").exists()


def test_a_folder_that_existed_is_kept(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    rc, lines, _ = run_cli(["compare", "--methods", "", "--out", str(out)], capsys)
    assert_one_line_error(rc, lines, "--methods")
    assert out.is_dir()


@pytest.mark.parametrize("damage", ["empty", "truncated", "foreign"])
def test_a_damaged_checkpoint_on_resume_is_one_line_naming_it(damage, finished_run, tmp_path,
                                                               capsys):  # fmt: skip
    import shutil

    import torch

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    ckpt = out / "checkpoint.pt"
    if damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    else:
        torch.save({"something": 1}, ckpt)
    before = snapshot(out)
    rc, lines, _ = run_cli(["train", "--quiet", "--out", str(out), "--steps", "5", "--resume"],
                           capsys)  # fmt: skip
    assert_one_line_error(rc, lines, str(ckpt))
    assert snapshot(out) == before


def test_a_finished_run_is_not_overwritten_unless_asked(finished_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    argv = ["train", "--quiet", "--steps", "2", "--problem", "lsq-synthetic", "--out", str(out)]
    rc, lines, _ = run_cli(argv, capsys)
    assert_one_line_error(rc, lines, str(out), "--overwrite")
    assert snapshot(out) == before
    assert run_cli([*argv, "--overwrite"], capsys)[0] == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_a_diverged_run_exits_non_zero_and_writes_valid_json(tmp_path, capsys):
    """The runner's policy: a run that diverges stops, keeps what it measured (no
    checkpoint), and says so in one line; its summary has null, never NaN."""
    out = tmp_path / "run"
    argv = ["train", "--quiet", "--method", "onebit", "--problem", "mlp-digits", "--lr", "1e6",
            "--steps", "30", "--eval-every", "10", "--out", str(out)]  # fmt: skip
    rc, lines, stdout = run_cli(argv, capsys)
    assert rc == 1
    assert len(lines) == 1 and "onebit: diverged at step" in lines[0], lines

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))

    summary = strict((out / "summary.json").read_text())
    assert 1 <= summary["diverged_at"] <= 30 and summary["train_loss"] is None
    assert strict(stdout)["diverged_at"] == summary["diverged_at"]
    for line in (out / "metrics.jsonl").read_text().splitlines():
        strict(line)


def test_compare_of_a_diverged_method_has_no_nan(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--quiet", "--methods", "onebit,sgd", "--problem", "mlp-digits",
            "--lr", "1e6", "--steps", "12", "--eval-every", "4", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0  # the comparison itself completed: divergence is a result
    table = capsys.readouterr().out
    assert "| onebit | - |" in table and "diverged at step" in table
    json.loads((out / "compare.json").read_text(), parse_constant=lambda c: pytest.fail(c))


def test_python_m_gradzip_error_has_no_traceback(tmp_path):
    import subprocess

    r = subprocess.run(
        [sys.executable, "-m", "gradzip", "compare", "--methods", "", "--out", str(tmp_path / "o")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()
