"""Shared driver: several methods on one problem through gradzip's simulated engine.

The problem is built once and reused by every method (the runner would reload the data
set for each run); each step is exactly :class:`gradzip.engines.SimulatedEngine`'s
parameter-server step (DESIGN 3.4), bits are counted from the payload bytes of both
directions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .. import methods as presets
from ..engines import Algorithm, SimulatedEngine
from ..experiments import tracking
from ..experiments.schedules import Schedule


@dataclass
class Trace:
    label: str
    method: dict
    lr: float
    rows: list[dict] = field(default_factory=list)  # evaluation rows
    seconds: float = 0.0
    diverged: bool = False

    def final(self, key: str) -> float:
        return self.rows[-1].get(key, math.nan)

    def col(self, key: str) -> list[float]:
        return [r.get(key, math.nan) for r in self.rows]


def train(
    problem,
    label: str,
    method,
    steps: int,
    lr: float,
    workers: int,
    eval_every: int,
    seed: int = 0,
    schedule: str = "constant",
    metric=None,
) -> Trace:
    """Run ``method`` for ``steps``; ``metric(x) -> dict`` adds columns to each evaluation."""
    m = presets.method(method) if isinstance(method, str) else method
    algo = Algorithm(m, problem.dim, seed=seed)
    eng = SimulatedEngine(problem, algo, workers, seed=seed)
    sched = Schedule(schedule, lr, max(problem.l2, 1e-12), 1.0, steps)
    tr = Trace(label, m.as_dict(), lr)
    up = down = 0
    t0 = time.perf_counter()

    def evaluate(step: int) -> None:
        row = {"step": step, "bits_up": up, "bits_down": down, **problem.evaluate(eng.x)}
        if metric is not None:
            row.update(metric(eng.x))
        tr.rows.append(row)

    evaluate(0)
    with torch.inference_mode(False), tracking.bar(steps, label, leave=False) as pb:
        for t in range(steps):
            pb.update(t)
            try:
                s = eng.step(t, sched(t))
            except ValueError as e:  # a compressor refuses a non-finite gradient: diverged
                if "non-finite" not in str(e):
                    raise
                eng.x = torch.full_like(eng.x, math.nan)
            else:
                up += s.bits_up
                down += s.bits_down
            if not torch.isfinite(eng.x).all():
                tr.diverged = True
                tr.rows.append(
                    {
                        "step": t + 1,
                        "bits_up": up,
                        "bits_down": down,
                        "train_loss": math.inf,
                        "test_loss": math.inf,
                        "train_acc": 0.0,
                        "test_acc": 0.0,
                    }
                )
                break
            if (t + 1) % eval_every == 0 or t + 1 == steps:
                evaluate(t + 1)
    tr.seconds = time.perf_counter() - t0
    return tr


def steps_to(tr: Trace, key: str, target: float, lower: bool = True) -> float:
    """The first evaluated step at which ``key`` reaches ``target`` (inf if never)."""
    for r in tr.rows:
        v = r.get(key, math.nan)
        if (v <= target) if lower else (v >= target):
            return float(r["step"])
    return math.inf


def bits_to(tr: Trace, key: str, target: float, lower: bool = True, up_only: bool = False) -> float:
    """Cumulative bits (both directions, or the uplink only) when ``key`` reaches ``target``."""
    for r in tr.rows:
        v = r.get(key, math.nan)
        if (v <= target) if lower else (v >= target):
            return float(r["bits_up"] + (0 if up_only else r["bits_down"]))
    return math.inf


def plot_traces(ax_row, traces: dict[str, Trace], key: str, ylabel: str, logy: bool = False,
                up_only: bool = False):  # fmt: skip
    """key against steps (first axis) and against bits (second axis, log scale: the
    starting point with no bits sent is left out there); ``up_only``: uplink bits only."""
    for label, tr in traces.items():
        steps = tr.col("step")
        bits = [r["bits_up"] + (0 if up_only else r["bits_down"]) for r in tr.rows]
        ys = tr.col(key)
        ax_row[0].plot(steps, ys, "-", lw=1.2, label=label)
        ax_row[1].plot(bits[1:], ys[1:], "-", lw=1.2, label=label)
    what = "uplink bits" if up_only else "total bits on the wire (up + down)"
    ax_row[0].set(xlabel="step", ylabel=ylabel)
    ax_row[1].set(xlabel=what, ylabel=ylabel, xscale="log")
    for ax in ax_row:
        if logy:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
