"""Accuracy with the recipes users run: the DDP example under SGD momentum and Adam.

For every optimizer recipe, method and seed it runs ``examples/ddp_fashion_mnist.py``
(4 local ranks, gloo) and reads rank 0's final test accuracy; it prints, per recipe, the
median over seeds of each method, the spread, and the gap to ``--compress none`` (DDP's own
fp32 allreduce) measured in the same run, and writes every run to ``--out`` as JSON. A run
that fails (NaN, crash) counts as accuracy 0 and is reported as failed.

    python benchmarks/recipes.py                                # the issue-13 targets
    python benchmarks/recipes.py --recipes sgd --methods none,fosgd --seeds 0 --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ddp_fashion_mnist.py"
#: recipe name -> the example's optimizer flags
RECIPES = {
    "sgd": ["--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9"],
    "nesterov": ["--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--nesterov"],
    "adam": ["--optimizer", "adam", "--lr", "1e-3"],
    "adamw": ["--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0.01"],
    "plain": ["--optimizer", "sgd", "--lr", "0.05", "--momentum", "0"],
    # gradzip.optim.Adam: variance frozen after 30 fp32 steps, gradients compressed in its
    # preconditioned coordinates (none: fp32 all along, the same optimizer)
    "gradzip-adam": ["--optimizer", "gradzip-adam", "--lr", "1e-3", "--start-step", "30"],
    "gradzip-adamw": [
        "--optimizer",
        "gradzip-adamw",
        "--lr",
        "1e-3",
        "--weight-decay",
        "0.01",
        "--start-step",
        "30",
    ],
}
METHODS = ("none", "fosgd", "drive", "torch-powersgd")


def run_one(method: str, recipe: str, seed: int, args, log_dir: Path) -> dict:
    tag = f"{recipe}-{method.replace(':', '_').replace(',', '_')}-s{seed}"
    out = log_dir / f"{tag}.json"
    cmd = [
        sys.executable, str(EXAMPLE), "--nproc", str(args.nproc), "--compress", method,
        "--steps", str(args.steps), "--seed", str(seed), "--eval-every", "0",
        "--json", str(out), *RECIPES[recipe], *args.extra,
    ]  # fmt: skip
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    wall = time.perf_counter() - t0
    (log_dir / f"{tag}.log").write_text(p.stdout + p.stderr)
    ok = p.returncode == 0 and out.exists()
    res = json.loads(out.read_text()) if ok else {}
    acc = res.get("final_acc") if ok else None
    tail = "" if ok else (p.stdout + p.stderr).strip().splitlines()[-1:]
    return {
        "method": method, "recipe": recipe, "seed": seed, "ok": ok, "acc": acc or 0.0,
        "median_step_s": res.get("median_step_s"), "wall_s": wall,
        "wire_bits_per_coord": wire_bits(res) if ok else None,
        "error": tail[0] if tail else "", "cmd": " ".join(cmd[1:]),
    }  # fmt: skip


def wire_bits(res: dict) -> float | None:
    """Bits per coordinate on the wire: the bytes rank 0 sent (payloads, framing and dense
    allreduces, headers included) per step and parameter, divided by the ring's 2 (n-1)/n,
    so that DDP's fp32 allreduce is 32 and a codec of b bits a coordinate both ways is b."""
    t = res.get("traffic")
    if not t or not res.get("steps") or res.get("world", 1) < 2:
        return None
    n = res["world"]
    sent = t["sent"] + t.get("framing_sent", 0) + t.get("dense_sent", 0)
    return 8 * sent / (res["steps"] * res["params"] * 2 * (n - 1) / n)


def summarize(rows: list[dict], recipes, methods) -> str:
    lines = []
    for recipe in recipes:
        base = [r["acc"] for r in rows if r["recipe"] == recipe and r["method"] == "none"]
        b = statistics.median(base) if base else None
        lines.append(f"\n## {recipe}: {' '.join(RECIPES[recipe])}")
        lines.append(
            "| method | median acc | min - max | gap to none (points) | failed | step ms "
            "| bits/coord |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        for m in methods:
            rs = [r for r in rows if r["recipe"] == recipe and r["method"] == m]
            if not rs:
                continue
            accs = [r["acc"] for r in rs]
            med = statistics.median(accs)
            gap = "" if b is None else f"{100 * (med - b):+.2f}"
            steps = [r["median_step_s"] for r in rs if r["median_step_s"]]
            ms = f"{1e3 * statistics.median(steps):.0f}" if steps else "-"
            failed = sum(not r["ok"] for r in rs)
            wb = [r["wire_bits_per_coord"] for r in rs if r.get("wire_bits_per_coord")]
            bits = f"{statistics.median(wb):.4g}" if wb else ("32" if m == "none" else "-")
            lines.append(
                f"| {m} | {100 * med:.2f}% | {100 * min(accs):.2f} - {100 * max(accs):.2f} | "
                f"{gap} | {failed}/{len(rs)} | {ms} | {bits} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default="sgd,adam", help=f"of {', '.join(RECIPES)}")
    p.add_argument("--methods", default=",".join(METHODS), help="';'-separated if specs hold ','")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--out", default="results/recipes")
    p.add_argument("extra", nargs="*", help="after --: more flags for the example")
    args = p.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    bad = set(recipes) - set(RECIPES)
    if bad:
        p.error(f"unknown recipe(s) {sorted(bad)}; valid: {', '.join(RECIPES)}")
    sep = ";" if ";" in args.methods else ","
    methods = [m.strip() for m in args.methods.split(sep) if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = Path(args.out)
    log_dir = out / "runs"
    log_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    total = len(recipes) * len(methods) * len(seeds)
    for recipe in recipes:
        for m in methods:
            for seed in seeds:
                r = run_one(m, recipe, seed, args, log_dir)
                rows.append(r)
                status = f"{100 * r['acc']:.2f}%" if r["ok"] else f"FAILED ({r['error']})"
                print(
                    f"[{len(rows)}/{total}] {recipe:8s} {m:40s} seed {seed}: {status} "
                    f"({r['wall_s']:.0f} s)",
                    flush=True,
                )
                (out / "runs.json").write_text(json.dumps(rows, indent=1))
    table = summarize(rows, recipes, methods)
    print(table)
    (out / "summary.md").write_text(
        f"# DDP example, {args.nproc} ranks, {args.steps} steps, seeds {args.seeds}\n{table}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
