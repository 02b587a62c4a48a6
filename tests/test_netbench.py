"""benchmarks/network/netbench.py without a network: method lists, the plan's estimate,
medians over repetitions, the best PowerSGD rank, the tables and the plots of a saved
results file (no namespace is made; nothing is trained)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    path = ROOT / "benchmarks" / "network" / "netbench.py"
    spec = importlib.util.spec_from_file_location("netbench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


nb = _load()


def test_method_lists():
    got = nb.expand_methods(" none; torch-powersgd:1,2,4 ;topk:k=0.01;torch-powersgd@2;; ")
    assert got == ["none", "torch-powersgd@1", "torch-powersgd@2", "torch-powersgd@4",
                   "topk:k=0.01"]  # fmt: skip
    assert nb.expand_methods("torch-powersgd") == ["torch-powersgd@2"]
    assert nb.compress_args("torch-powersgd@4") == ["--compress", "torch-powersgd",
                                                    "--powersgd-rank", "4"]  # fmt: skip
    assert nb.compress_args("qsgd(levels=16)") == ["--compress", "qsgd(levels=16)"]
    assert nb.compress_args("fosgd/sync") == ["--compress", "fosgd", "--no-overlap"]
    kinds = [nb.is_gradzip(m) for m in ("none", "torch-fp16", "torch-powersgd@1", "fosgd")]
    assert kinds == [False, False, False, True]
    for bad in ("torch-powersgd:", "torch-powersgd:0", "torch-powersgd:a,b"):
        with pytest.raises(ValueError):
            nb.expand_methods(bad)
    assert nb.SUB_ONE_BIT in nb.expand_methods(";".join(nb.METHODS))


def test_plan_and_estimate():
    a = nb.parse_args(["--methods", "none;fosgd", "--reps", "2"])
    plan = nb.make_plan(a)
    assert a.momentum == 0.9 and a.target == 0.85 and a.reps == 2
    assert all(p["to_target"] for p in plan["rates"].values()) and len(plan["rates"]) == 2
    a.target_rates = "100mbit"
    plan = nb.make_plan(a)
    r100, r1g = plan["rates"]["100mbit"], plan["rates"]["1gbit"]
    assert r100["to_target"] and r100["steps"] == 300 and r100["eval_every"] == 10
    assert not r1g["to_target"] and r1g["steps"] == 50 and r1g["target"] == 0.0
    # fp32's ring allreduce of 19.4 MB at 100 Mbit/s: about 1.8 s a step (measured 1.76-1.79)
    assert 1.6 < nb.prior_step_s("none", "100mbit") < 2.0
    assert nb.prior_step_s("fosgd", "100mbit") < 0.3
    assert r100["likely_s"]["none"] < r100["max_s"]["none"]
    assert r1g["likely_s"] == r1g["max_s"]
    assert "3 repetition" not in nb.describe_plan(plan, a)
    # --target 0: every rate runs --steps for the step time (the smoke test's form)
    a = nb.parse_args(["--rates", "100mbit", "--steps", "20", "--target", "0"])
    p = nb.make_plan(a)["rates"]["100mbit"]
    assert p["steps"] == 20 and not p["to_target"] and p["eval_every"] == 0


def _run(rate, method, rep, step, reached=None, acc=0.86, timeline=None, **kw):
    tl = timeline or [{"step": 10, "time": 1.0, "acc": 0.7}, {"step": 20, "time": 2.0, "acc": acc}]
    return {
        "rate": rate, "method": method, "rep": rep, "seed": rep, "median_step_s": step,
        "steps": 20, "final_acc": acc, "timeline": tl,
        "reached": {"step": 20, "time": reached} if reached is not None else None, **kw,
    }  # fmt: skip


def test_medians_count_unreached_runs_as_infinite():
    runs = [_run("r", "m", i, s, t) for i, (s, t) in enumerate([(0.3, 10), (0.1, None), (0.2, 30)])]
    s = nb.summarize(runs, to_target=True)
    assert s["step_s"] == 0.2 and (s["step_min"], s["step_max"]) == (0.1, 0.3)
    assert s["ttt_s"] == 30 and s["reached"] == 2 and (s["ttt_min"], s["ttt_max"]) == (10, 30)
    runs[2] = {"rate": "r", "method": "m", "rep": 2, "error": "boom"}
    s = nb.summarize(runs, to_target=True)
    assert math.isinf(s["ttt_s"]) and s["ok"] == 2 and s["errors"] == ["boom"]
    assert s["step_s"] == pytest.approx(0.2)
    assert math.isnan(nb.summarize(runs, to_target=False)["ttt_s"])


def _results():
    runs = []
    for rep in range(3):
        for rate, tt in (("100mbit", True), ("1gbit", False)):
            t = (lambda x: x) if tt else (lambda x: None)  # noqa: E731

            runs += [
                _run(rate, "none", rep, 1.8, t(300 + rep)),
                _run(rate, "torch-fp16", rep, 0.9, t(150 + rep)),
                _run(rate, "torch-powersgd@1", rep, 0.10, t(None if rep else 20)),
                _run(rate, "torch-powersgd@2", rep, 0.12, t(25 + rep)),
                _run(rate, "torch-powersgd@4", rep, 0.15, t(30 + rep)),
                _run(rate, "fosgd", rep, 0.11, t(14 + rep), traffic={"sent": 12.2e6}),
            ]
    return {
        "version": 2, "methods": ["none", "torch-fp16", "torch-powersgd@1", "torch-powersgd@2",
                                  "torch-powersgd@4", "fosgd"],
        "rates": ["100mbit", "1gbit"], "target_rates": ["100mbit"], "skipped": {"subbit": "?"},
        "args": {"target": 0.85, "lr": 0.05, "momentum": 0.9, "ranks": 4}, "runs": runs,
    }  # fmt: skip


def test_best_powersgd_by_time_to_target_then_step():
    s = nb.summaries(_results())
    # rank 1 steps fastest but reached the target once in three: rank 2 is the best
    assert s["100mbit"]["best PowerSGD"]["entry"] == "torch-powersgd@2"
    assert s["1gbit"]["best PowerSGD"]["entry"] == "torch-powersgd@1"  # step time only
    text = nb.report(_results())
    assert "best PowerSGD (rank 2)" in text and "best PowerSGD (rank 1)" in text
    assert "PowerSGD by rank: rank 1 100.0 ms, to target not reached (1/3)" in text
    assert "the best PowerSGD / gradzip's best (fosgd): time to the target 1.73x" in text
    assert "skipped subbit" in text
    line = next(x for x in text.splitlines() if x.startswith("gradzip fosgd"))
    assert "110.0" in line and "16.36x" in line and "0.610" in line and "3/3" in line
    assert "20.07x" in line  # fp32: 301 s, fosgd: 15 s (medians)


def test_report_redraws_plots_from_json(tmp_path, capsys):
    path = tmp_path / "netbench.json"
    path.write_text(json.dumps(_results()))
    assert nb.main(["--report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "100mbit: 3 repetition(s)" in out
    for rate in ("100mbit", "1gbit"):
        png = tmp_path / f"netbench-{rate}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_report_reads_the_first_format():
    res = json.loads((ROOT / "benchmarks/network/results/results.json").read_text())
    text = nb.report(res)
    assert "fp32 allreduce (no hook)" in text and "torch PowerSGD rank 2" in text
    assert "271.1" in text  # fp32's time to 75% in that run


class _FakeNet:
    def __init__(self):
        self.rates = []

    def set_rate(self, rate):
        self.rates.append(rate)


class _FakeRunner:
    def __init__(self, fail=()):
        self.calls, self.fail = [], fail

    def run(self, entry, steps, target, eval_every, seed, out, log, timeout):
        self.calls.append((entry, steps, target, eval_every, seed))
        if entry in self.fail:
            raise RuntimeError(f"{entry} failed")
        return {"median_step_s": 0.1, "steps": steps, "final_acc": 0.9, "timeline": [],
                "reached": {"step": 10, "time": 1.0} if target else None}  # fmt: skip


def test_repetitions_are_interleaved_and_saved_after_each_run(tmp_path):
    a = nb.parse_args(["--methods", "none;torch-powersgd:1,2", "--target-rates", "100mbit",
                       "--reps", "2", "--seed", "5"])  # fmt: skip
    plan = nb.make_plan(a)
    net, runner = _FakeNet(), _FakeRunner(fail=("torch-powersgd@2",))
    results = {"methods": plan["methods"], "rates": list(plan["rates"]), "runs": [],
               "target_rates": ["100mbit"], "args": vars(a)}  # fmt: skip
    path = tmp_path / "netbench.json"
    nb.run_all(plan, a, net, runner, results, path, nb.time.time())
    order = [(c[0], c[4]) for c in runner.calls]
    one = ["none", "torch-powersgd@1", "torch-powersgd@2"]
    assert order == [(m, 5) for m in one * 2] + [(m, 6) for m in one * 2]
    assert net.rates == ["100mbit", "1gbit"] * 2
    assert [c[1:4] for c in runner.calls[:4]] == [(300, 0.85, 10)] * 3 + [(50, 0.0, 0)]
    saved = json.loads(path.read_text())
    assert len(saved["runs"]) == 12 and all("wall_s" in r for r in saved["runs"])
    assert sum("error" in r for r in saved["runs"]) == 4
    text = nb.report(saved)
    assert "PowerSGD by rank: rank 1 100.0 ms, to target 1.0 s (2/2); rank 2 failed" in text


def test_budget_stops_between_repetitions(tmp_path):
    a = nb.parse_args(["--methods", "none", "--rates", "100mbit", "--reps", "3",
                       "--budget", "0.001"])  # fmt: skip
    plan = nb.make_plan(a)
    runner = _FakeRunner()
    results = {"runs": []}
    nb.run_all(plan, a, _FakeNet(), runner, results, tmp_path / "n.json", nb.time.time() - 1)
    assert len(runner.calls) == 1  # the first repetition always runs
    clock = nb.Clock(plan)
    prior = plan["rates"]["100mbit"]["likely_s"]["none"]
    assert clock.seconds([("100mbit", "none")]) == pytest.approx(prior)
    clock.add("100mbit", "none", 2 * prior)
    assert clock.seconds([("100mbit", "none")] * 2) == pytest.approx(4 * prior)
