"""What runs report (issue 16): TensorBoard scalars, the cold-compile notice and
``gradzip kernels`` compiling ahead of time, logging for diagnostics, and figures that say
what they show."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gradzip.cli import main


def test_tensorboard_gets_the_scalars(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb, out = tmp_path / "tb", tmp_path / "run"
    argv = ["train", "--quiet", "--problem", "softmax-digits", "--method", "fosgd",
            "--steps", "6", "--eval-every", "3", "--workers", "2", "--out", str(out),
            "--tensorboard", str(tb)]  # fmt: skip
    assert main(argv) == 0
    ea = EventAccumulator(str(tb))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "bits/up", "bits/down", "bits/total_up", "bits/total_down",
            "time/compute", "time/compress", "time/comm", "eval/test_loss", "eval/test_acc",
            "eval/train_loss"} <= tags  # fmt: skip
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if not r.get("eval")]
    loss = ea.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in steps] == list(range(6))
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in steps])
    assert [e.value for e in ea.Scalars("bits/up")] == [r["bits_up"] for r in steps]
    total = ea.Scalars("bits/total_down")
    assert total[-1].step == 6 and total[-1].value == sum(r["bits_down"] for r in steps)
    assert [e.step for e in ea.Scalars("eval/test_acc")] == [0, 3, 6]


def test_tensorboard_missing_says_which_extra(tmp_path):
    """Checked before the run: one line, nothing written."""
    code = (
        "import sys; sys.modules['tensorboard'] = None\n"
        "from gradzip.cli import main\n"
        f"sys.exit(main(['train', '--steps', '2', '--out', {str(tmp_path / 'r')!r}, "
        f"'--tensorboard', {str(tmp_path / 'tb')!r}]))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "gradzip train: error: this needs tensorboard, which is not installed: "
        "pip install 'gradzip[tensorboard]'"
    ], r.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "tb").exists()


def test_diagnostics_go_through_logging(tmp_path, caplog):
    """The runner's divergence message is a WARNING record of gradzip.train (a library
    user's logging configuration decides where it goes)."""
    import logging

    from gradzip.experiments.config import RunConfig
    from gradzip.experiments.runner import train

    cfg = RunConfig(problem="mlp-digits", method="onebit", lr=1e6, steps=20, eval_every=0,
                    out=str(tmp_path / "r"))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="gradzip"):
        summary = train(cfg, progress=False)
    assert "diverged_at" in summary
    rec = [r for r in caplog.records if r.name == "gradzip.train"]
    assert len(rec) == 1 and "diverged at step" in rec[0].getMessage()


@pytest.mark.slow
def test_a_cold_compile_is_announced_and_kernels_compile_ahead(tmp_path):
    """With an empty numba cache, the first kernel a process compiles prints one notice;
    `gradzip kernels` compiles ahead of time, after which a process compiles nothing and
    prints nothing."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "nb")}
    use = (
        "import torch, gradzip as gz\n"
        "c = gz.compressor('sign'); c.decode(c.encode(torch.randn(3000), seed=1))\n"
        "from gradzip._numba import cache; print(len(cache.compiled()))\n"
    )
    r = subprocess.run([sys.executable, "-m", "gradzip", "kernels", "--compressors", "sign"],
                       capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    notices = [ln for ln in r.stderr.splitlines() if "compiling kernels" in ln]
    assert len(notices) == 1 and "once per machine" in notices[0], r.stderr
    assert "kernels compiled" in r.stdout and str(tmp_path / "nb") in r.stdout
    r = subprocess.run([sys.executable, "-c", use], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "0", (r.stdout, r.stderr)
    assert "compiling" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "gradzip", "kernels", "--compressors", "sign"],
                       capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 0 and "every kernel was cached" in r.stdout, r.stdout


def test_compile_notice_without_logging_configured(monkeypatch, capsys):
    """A library process that configured no logging still sees the notice on stderr."""
    import logging

    from gradzip import _log

    log = logging.getLogger("gradzip.test-notice")
    monkeypatch.setattr(log, "hasHandlers", lambda: False)
    _log.notice(log, "gradzip: compiling kernels (test)...")
    assert capsys.readouterr().err == "gradzip: compiling kernels (test)...\n"


def test_engines_print_nothing():
    """The engines' diagnostics (a worker's last words, notes while stopping) are logging
    records of gradzip.engines: no print() call in src/gradzip/engines."""
    import ast
    from pathlib import Path

    import gradzip.engines

    found = []
    for path in sorted(Path(gradzip.engines.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                found.append(f"{path.name}:{node.lineno}")
    assert found == []


def test_a_workers_last_words_are_a_logging_record(monkeypatch, caplog):
    """The watchdog of a worker whose server went silent: one ERROR record, then exit."""
    import logging

    from gradzip.engines import liveness

    hb = object.__new__(liveness.Heartbeat)
    hb._stop, hb.rank, hb.step, hb.phase = __import__("threading").Event(), 2, 7, "computing"
    monkeypatch.setattr(hb, "name", lambda r: "the server (rank 0)", raising=False)
    monkeypatch.setattr(liveness.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    with caplog.at_level(logging.ERROR, logger="gradzip"), pytest.raises(SystemExit):
        hb._exit("its heartbeat stopped 9 s ago")
    (rec,) = [r for r in caplog.records if r.name == "gradzip.engines"]
    assert rec.levelno == logging.ERROR and rec.getMessage().startswith(
        "gradzip worker (rank 2): the server (rank 0) did not answer at step 7"
    )


# --- progress bars ------------------------------------------------------------------------


class _Terminal(__import__("io").StringIO):
    def isatty(self) -> bool:
        return True


def _terminal(monkeypatch) -> _Terminal:
    """stderr as a terminal (where the bars are drawn), its text kept; called in the test
    itself (pytest's capture sets sys.stderr again when the test's call starts)."""
    pytest.importorskip("tqdm")
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    return term


def test_a_resumed_runs_bar_starts_at_its_checkpoint(tmp_path, monkeypatch):
    terminal = _terminal(monkeypatch)
    out = str(tmp_path / "run")
    argv = ["train", "--problem", "lsq-synthetic", "--eval-every", "0", "--out", out]
    assert main([*argv, "--steps", "3", "--quiet"]) == 0
    terminal.seek(0), terminal.truncate()
    assert main([*argv, "--steps", "6", "--resume"]) == 0
    bar = terminal.getvalue()
    assert "3/6" in bar and "6/6" in bar, bar
    assert " 0/6" not in bar and "1/6" not in bar, bar  # tqdm counts from the checkpoint


def test_classes_scales_and_reproduce_runs_draw_a_bar_on_a_terminal(capsys, monkeypatch):
    import torch

    from gradzip.experiments import classes, scales
    from gradzip.problems import build
    from gradzip.reproduce import common

    terminal = _terminal(monkeypatch)
    xs = [torch.randn(64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    rows = classes.class_table(["sign", "topk:k=0.5"], sources={"v": xs}, samples=4)
    assert len(rows) == 2 and "classes" in terminal.getvalue()
    lines = capsys.readouterr().out.splitlines()  # the progress lines stay whole on stdout
    assert lines[0] == "source v: 2 vectors of d=64 (0.0 s)"
    assert [ln.split(" (")[0] for ln in lines[1:]] == ["  sign", "  topk:k=0.5"]

    terminal.seek(0), terminal.truncate()
    rows = scales.study(quick=True, samples=2, only=["gaussian"], progress=print)
    assert rows and "scales" in terminal.getvalue()
    assert capsys.readouterr().out.startswith("  gaussian: 3 vectors")

    terminal.seek(0), terminal.truncate()
    prob = build("lsq-synthetic", workers=2, batch_size=8, seed=0)
    common.train(prob, "sgd-run", "sgd", 5, 0.01, 2, 5)
    bar = terminal.getvalue()
    assert "sgd-run" in bar and bar.endswith("\r"), repr(bar)  # erased when it ends


def test_no_bar_where_stderr_is_not_a_terminal(capsys):
    import torch

    from gradzip.experiments import classes

    classes.class_table(["sign"], sources={"v": [torch.ones(8)]}, samples=2, progress=None)
    assert capsys.readouterr().err == ""


# --- figures ------------------------------------------------------------------------------


@pytest.fixture
def keep_figures(monkeypatch):
    """The figures the plotting code makes, kept open instead of closed after saving."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    yield kept
    for fig in kept:
        close(fig)


def _results(method, bits, losses):
    evals = [
        {"step": 10 * i, "cum_bits_up": b, "cum_bits_down": b, "cum_time": 0.1 * i,
         "train_loss": v, "test_acc": 0.5}
        for i, (b, v) in enumerate(zip(bits, losses, strict=True))
    ]  # fmt: skip
    return {"method": method, "summary": evals[-1], "steps": [], "evals": evals}


def test_compare_figure_drops_zero_bits_and_labels_its_time(tmp_path, keep_figures):
    from gradzip.experiments import compare
    from gradzip.experiments.config import RunConfig

    res = [_results("sgd", [0, 100, 200], [1.0, 0.5, 0.2]),
           _results("onebit", [0, 4, 8], [1.0, None, None])]  # diverged: nulls  # fmt: skip
    compare.plot(RunConfig(), res, tmp_path / "c.png")
    (fig,) = keep_figures
    axes = fig.get_axes()
    bits_ax, time_ax = axes[1], axes[2]
    assert bits_ax.get_xscale() == "log"
    for line in bits_ax.get_lines():
        assert min(line.get_xdata()) > 0  # the start (0 bits) is not on the log axis
    assert "compute + compression" in time_ax.get_xlabel()
    assert "wall" not in time_ax.get_xlabel()  # the simulated engine's time is not wall time
    assert "wall time" in compare.time_label("torchdist")


def test_variance_figure_names_what_its_log_axes_cannot_show(tmp_path, keep_figures):
    from gradzip.experiments import variance

    assert variance.drawable("a", [1, 2], [0.5, 2.0]) == ([1, 2], [0.5, 2.0], "a")
    xs, ys, label = variance.drawable("b", [1, 2, 4], [0.0, 1.0, float("nan")])
    assert (xs, ys) == ([2], [1.0]) and "2 of 3 points" in label
    assert "not drawn" in variance.drawable("c", [1, 2], [0.0, -1.0])[2]
    by_dim = {"ok": [1.0, 2.0], "zero": [0.0, 0.0]}
    by_k = {"ok": [1.0, 2.0], "zero": [0.0, 0.0]}
    variance.plot([64, 128], by_dim, 128, [1, 128], by_k, tmp_path / "v.png")
    (fig,) = keep_figures
    for ax in fig.get_axes():
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(t.startswith("zero (not drawn") for t in texts), texts
