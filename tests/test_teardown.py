"""A finished DDP job exits 0 under torchrun (issue 18): consecutive runs of the example,
each ending with gradzip.ddp.shutdown(); benchmarks/teardown.py runs the long tally."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from test_problems import fake_fashion

ROOT = Path(__file__).resolve().parents[1]


def _teardown():
    spec = importlib.util.spec_from_file_location("teardown", ROOT / "benchmarks" / "teardown.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_finished_torchrun_jobs_exit_zero(tmp_path, capsys):
    fake_fashion(tmp_path, n=256, nt=64)
    out = tmp_path / "runs.json"
    argv = ["--runs", "2:3", "--methods", "drive,fosgd,topk:k=0.01", "--steps", "2",
            "--data", str(tmp_path), "--out", str(out)]  # fmt: skip
    rc = _teardown().main(argv)
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["drive", "fosgd", "topk:k=0.01"]
    assert rc == 0, [(r["exit"], r["tail"]) for r in rows]
    assert all(r["exit"] == 0 and not r["aborted"] for r in rows)
    assert "exit 0" in capsys.readouterr().out
