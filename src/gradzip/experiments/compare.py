"""``gradzip compare``: several methods on one problem, same seeds, one figure, one table.

The figure has loss and (where the problem has classes) test accuracy against steps,
against total bits on the wire (both directions, log axis: the start, at 0 bits, is left
out) and against the time the steps spent (:func:`time_label` says which time that is: the
simulated engines sum compute and compression over the workers, one after another, and
move no bytes; the torch.distributed engines measure each step's wall time); the table
gives the final accuracy, the total bits up and down, and the compression factor against
``sgd`` (its bits are computed from the same problem even when ``sgd`` is not compared).
A diverged run's losses are ``null`` in its summary and ``-`` in the table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .config import RunConfig
from .runfolder import check_new
from .runner import read_metrics, train


def run(
    cfg: RunConfig, method_names: list[str], progress: bool = True, overwrite: bool = False
) -> list[dict]:
    out = Path(cfg.out)
    for name in method_names:  # every folder checked before the first run
        check_new(out / name, overwrite)
    results = []
    for name in method_names:
        run_cfg = cfg.replace(method=name, out=str(out / name))
        summary = train(run_cfg, progress=progress, overwrite=overwrite)
        steps, evals = read_metrics(run_cfg.out)
        results.append({"method": name, "summary": summary, "steps": steps, "evals": evals})
    return results


def _sgd_bits(cfg: RunConfig, results: list[dict]) -> float | None:
    for r in results:
        if r["method"] == "sgd":
            return r["summary"]["cum_bits_up"] + r["summary"]["cum_bits_down"]
    return None


def _num(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def time_label(engine: str) -> str:
    """What ``cum_time`` (the sum of t_compute + t_compress + t_comm) measures on ``engine``."""
    if engine.startswith("simulated"):
        return "compute + compression time (s)\nworkers summed; simulated: no communication"
    return "step wall time (s)\ncompute + compression + communication"


def table(cfg: RunConfig, results: list[dict]) -> str:
    base = _sgd_bits(cfg, results)
    has_acc = "test_acc" in results[0]["summary"]
    head = "| method | test loss | " + ("test acc | " if has_acc else "")
    head += "bits up | bits down | vs sgd | compute+compress+comm (s) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        s = r["summary"]
        total = s["cum_bits_up"] + s["cum_bits_down"]
        factor = f"{base / total:.1f}x fewer" if base else "-"
        if r["method"] == "sgd":
            factor = "baseline"
        acc = f"{100 * s['test_acc']:.2f}% | " if s.get("test_acc") is not None else "- | "
        acc = acc if has_acc else ""
        if "diverged_at" in s:
            acc = f"diverged at step {s['diverged_at']} | " if has_acc else ""
        lines.append(
            f"| {r['method']} | {_num(s['test_loss'], '.4f')} | {acc}{s['cum_bits_up']:.3g} | "
            f"{s['cum_bits_down']:.3g} | {factor} | {s['cum_time']:.1f} |"
        )
    return "\n".join(lines)


def plot(cfg: RunConfig, results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_acc = "test_acc" in results[0]["summary"]
    rows = 2 if has_acc else 1
    fig, axes = plt.subplots(rows, 3, figsize=(15, 4.2 * rows), squeeze=False)
    for r in results:
        ev = r["evals"]
        steps = [e["step"] for e in ev]
        bits = [e["cum_bits_up"] + e["cum_bits_down"] for e in ev]
        secs = [e["cum_time"] for e in ev]
        for row, key in enumerate(["train_loss", "test_acc"][:rows]):
            ys = [math.nan if e.get(key) is None else e[key] for e in ev]  # null: diverged
            for col, xs in enumerate((steps, bits, secs)):
                pts = [(x, y) for x, y in zip(xs, ys, strict=True) if col != 1 or x > 0]
                if pts:  # the bits axis is logarithmic: the start (0 bits) has no place
                    axes[row][col].plot(*zip(*pts, strict=True), "o-", ms=3, label=r["method"])
    xlabels = ("step", "total bits on the wire (up + down)", time_label(cfg.engine))
    for row, ylabel in enumerate(["training loss", "test accuracy"][:rows]):
        for col, xl in enumerate(xlabels):
            ax = axes[row][col]
            ax.set(xlabel=xl, ylabel=ylabel)
            if col == 1:
                ax.set_xscale("log")
            if row == 0:
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{cfg.problem}, {cfg.workers} workers, {cfg.steps} steps, seed {cfg.seed}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(
    cfg: RunConfig, method_names: list[str], progress: bool = True, overwrite: bool = False
) -> tuple[str, Path]:
    results = run(cfg, method_names, progress, overwrite)
    md = table(cfg, results)
    out = Path(cfg.out)
    fig = plot(cfg, results, out / "compare.png")
    (out / "compare.md").write_text(md + "\n")
    (out / "compare.json").write_text(
        json.dumps([{"method": r["method"], **r["summary"]} for r in results], indent=2)
    )
    return md, fig
