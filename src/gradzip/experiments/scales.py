"""``gradzip scales``: FO-SGD's scale rules studied as a bias-variance trade-off.

FO-SGD quantizes the rotated gradient y = Phi g with a dither of scale lambda and decodes
s b (DESIGN 3.2-3.3, :mod:`gradzip.compressors.onebit`). Two choices set what a step of
training sees:

- the dither's scale lambda, written here as a = lambda / rms(y), rms(y) = ||g||_2 /
  sqrt(d). The paper's ``norm`` rule has a = c sqrt(2 ln(2B) d / B) (about 5.5 at d = 2^20
  for c = 1): almost nothing clips, so the output is nearly unbiased, but its variance is
  about a^2 ||g||^2. The ``rms`` rule sets a = c directly; the ``l1`` rule sets lambda =
  c ||y||_1 / d, the minimiser of the decoded error when every coordinate clips (for a
  Gaussian-like y, a = c sqrt(2 / pi));
- the decode scale s (``rescale``): lambda itself (``none``), the least-squares fit
  <b, y> / d (``mse``: a contraction, class B3) or ||y||^2 / <b, y> (``unbiased``: the
  decoded vector's inner product with g is ||g||^2 exactly).

For each rule, rescale and constant this measures, on synthetic vectors and on real
gradients (:mod:`gradzip.experiments.gradients`), by Monte Carlo over fresh seeds:
vNMSE = E||C(x) - x||^2 / ||x||^2 (mean over the vectors), the shrinkage
gamma = E<C(x), x> / ||x||^2 (its minimum over the vectors: class B2's gamma) and the B3
constant delta_hat = 1 / (1 - max_x E||C(x) - x||^2 / ||x||^2) (infinite: not
contractive, error feedback would diverge). It writes ``scales.csv`` and ``scales.png``.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from .._clisupport import Parser
from ..compressors import compressor
from ..problems import datasets
from . import gradients, tracking
from .classes import moments

RESCALES = ("none", "mse", "unbiased")
#: the rms rule's constants (a = lambda / rms(y)); 0 is no dither (needs a rescale)
RMS_C = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
NORM_C = (0.1, 0.25, 0.5, 1.0)
L1_C = (0.75, 1.0)
QUICK_RMS_C = (0.0, 0.5, 1.0, 2.0)
QUICK_NORM_C = (0.25, 1.0)
QUICK_L1_C = (1.0,)
COLUMNS = (
    "source", "d", "rule", "c", "rescale", "spec", "a", "vnmse", "gamma_min", "gamma_mean",
    "delta_hat", "bits_per_coord", "vectors", "samples",
)  # fmt: skip


def specs(quick: bool = False) -> list[tuple[str, float, str, str]]:
    """``(rule, c, rescale, spec)`` for every configuration studied."""
    rms_c, norm_c, l1_c = (QUICK_RMS_C, QUICK_NORM_C, QUICK_L1_C) if quick else (
        RMS_C, NORM_C, L1_C,
    )  # fmt: skip
    out = []
    for rule, cs in (("rms", rms_c), ("norm", norm_c), ("l1", l1_c)):
        for c in cs:
            for rs in RESCALES:
                if c == 0 and rs == "none":
                    continue  # lambda = 0 decodes to zero
                out.append((rule, c, rs, f"fosgd:scale={rule},c={c:g},rescale={rs}"))
    return out


def dither_ratio(rule: str, c: float, x: torch.Tensor) -> float:
    """a = lambda / rms(y) of ``rule`` with constant ``c`` for the vector ``x``."""
    from .. import hadamard

    d = x.numel()
    if rule == "rms":
        return c
    if rule == "norm":
        B = hadamard.rotation_block(d)
        return c * math.sqrt(2 * math.log(2 * B) * d / B)
    y = hadamard.rotate(x.reshape(-1).float().contiguous(), 12345).double()
    return c * float(y.abs().sum()) / math.sqrt(d * float(y.square().sum()))


def sources(quick: bool, data, fashion) -> dict:
    """Synthetic kinds at d = 2^14, the two real runs of ``gradzip classes`` and, where
    Fashion-MNIST is installed, the DDP example's CNN (d = 410,922)."""
    src = gradients.default_sources(quick=quick, data=data, d=1 << 14)
    if Path(fashion).is_dir():
        steps = (0, 200) if quick else gradients.DEFAULT_CNN_STEPS
        src["cnn-fashion"] = partial(gradients.cnn_fashion_gradients, fashion, steps)
    return src


def study(
    quick: bool = False,
    samples: int | None = None,
    data=gradients.DEFAULT_LIBSVM,
    fashion=gradients.DEFAULT_FASHION,
    only: Sequence[str] | None = None,
    progress=print,
) -> list[dict]:
    """The rows of the study (one per source and configuration)."""
    samples = samples or (8 if quick else 32)
    rows = []
    srcs = sources(quick, data, fashion)
    if only:
        srcs = {k: v for k, v in srcs.items() if k in only}
    confs = specs(quick)
    with tracking.bar(len(srcs) * (1 + len(confs)), "scales", leave=False) as pb:
        for i, (name, load) in enumerate(srcs.items()):
            t0 = time.perf_counter()
            pb.update(i * (1 + len(confs)), f"{name}: loading")
            xs = [x for x in load() if bool(x.any())]
            if not xs:
                continue
            for j, (rule, c, rs, spec) in enumerate(confs):
                pb.update(i * (1 + len(confs)) + 1 + j, f"{name}: {spec}")
                rows.append(measure(rule, c, rs, spec, xs, samples) | {"source": name})
            with pb.outside():
                progress(f"  {name}: {len(xs)} vectors, d = {xs[0].numel()}, "
                         f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    return rows


def measure(rule: str, c: float, rescale: str, spec: str, xs, samples: int) -> dict:
    """One configuration's row over the vectors ``xs`` (nonzero)."""
    comp = compressor(spec)
    with gradients.single_thread():
        ms = [moments(comp, x, samples) for x in xs]
    ratios = [m.err2 / m.norm2 for m in ms]
    gammas = [m.inner / m.norm2 for m in ms]
    worst = max(ratios)
    return {
        "d": xs[0].numel(), "rule": rule, "c": c, "rescale": rescale, "spec": spec,
        "a": sum(dither_ratio(rule, c, x) for x in xs) / len(xs),
        "vnmse": sum(ratios) / len(ratios), "gamma_min": min(gammas),
        "gamma_mean": sum(gammas) / len(gammas),
        "delta_hat": 1.0 / (1.0 - worst) if worst < 1 else math.inf,
        "bits_per_coord": sum(m.nbits for m in ms) / len(ms) / xs[0].numel(),
        "vectors": len(ms), "samples": max(m.samples for m in ms),
    }  # fmt: skip


def format_table(rows: Sequence[dict], source: str | None = None) -> str:
    """Markdown table of the rows of one source (all when ``source`` is None)."""
    out = [
        "| source | rule | c | a = lambda/rms | rescale | vNMSE | gamma min | delta_hat |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if source is not None and r["source"] != source:
            continue
        dl = "inf" if math.isinf(r["delta_hat"]) else f"{r['delta_hat']:.2f}"
        out.append(
            f"| {r['source']} | {r['rule']} | {r['c']:g} | {r['a']:.2f} | {r['rescale']} | "
            f"{r['vnmse']:.3f} | {r['gamma_min']:.3f} | {dl} |"
        )
    return "\n".join(out)


def write_csv(rows: Sequence[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in COLUMNS})


def plot(rows: Sequence[dict], path: Path) -> None:
    """vNMSE, shrinkage and delta against a = lambda / rms(y): one column per rescale,
    one line per source (the rms rule), the norm and l1 rules as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    srcs = list(dict.fromkeys(r["source"] for r in rows))
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(srcs)}
    metrics = (("vnmse", "vNMSE (log)"), ("gamma_min", "shrinkage min <C(x),x>/||x||^2"),
               ("delta_hat", f"B3 delta_hat (dotted: >= {DELTA_CAP:g} or none)"))  # fmt: skip
    fig, axes = plt.subplots(3, 3, figsize=(13, 10), sharex=True)
    marker = {"norm": "s", "l1": "^"}
    for j, rs in enumerate(RESCALES):
        for i, (key, label) in enumerate(metrics):
            ax = axes[i][j]
            for s in srcs:
                mine = [r for r in rows if r["source"] == s and r["rescale"] == rs]
                pts = sorted((r["a"], _shown(key, r[key])) for r in mine if r["rule"] == "rms")
                if pts:
                    lbl = s if (i, j) == (0, 0) else None
                    ax.plot(*zip(*pts, strict=True), "-o", ms=3, color=colors[s], label=lbl)
                for rule, mk in marker.items():
                    pts = [(r["a"], _shown(key, r[key])) for r in mine if r["rule"] == rule]
                    if pts:
                        ax.scatter(*zip(*pts, strict=True), marker=mk, color=colors[s], s=18)
            if key == "vnmse":
                ax.set_yscale("log")
            elif key == "gamma_min":
                ax.set_ylim(0, 1.1)
            else:
                ax.set_ylim(0, DELTA_CAP + 0.5)
                ax.axhline(DELTA_CAP, color="grey", lw=0.8, ls=":")
            if i == 0:
                ax.set_title(f"rescale={rs}")
            if j == 0:
                ax.set_ylabel(label)
            if i == 2:
                ax.set_xlabel("a = lambda / rms(y)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("FO-SGD scale rules: error, shrinkage and contraction (gradzip scales). "
                 "Lines: rms rule; squares: norm rule; triangles: l1 rule")  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


DELTA_CAP = 12.0  # delta_hat above this (or infinite: not contractive) is drawn on this line


def _shown(key: str, v: float) -> float:
    return min(v, DELTA_CAP) if key == "delta_hat" else v


def main(argv: Sequence[str] | None = None) -> int:
    ap = Parser(
        prog="gradzip scales",
        description="FO-SGD's scale rules as a bias-variance trade-off: vNMSE, shrinkage and "
        "the B3 constant against the dither scale, on synthetic vectors and real gradients.",
    )
    ap.add_argument("--quick", action="store_true", help="fewer constants, vectors, samples")
    ap.add_argument("--out", type=Path, default=Path("results/scales"), help="output folder")
    ap.add_argument("--data", default=gradients.DEFAULT_LIBSVM, help="LIBSVM file (logreg)")
    ap.add_argument(
        "--fashion", default=str(datasets.fashion_dir()), help="Fashion-MNIST folder (if any)"
    )
    ap.add_argument("--samples", type=int, help="Monte Carlo samples per vector")
    ap.add_argument("--sources", help="comma-separated subset of the sources")
    args = ap.parse_args(list(argv) if argv is not None else None)
    if args.samples is not None and args.samples < 2:
        ap.error("--samples must be >= 2")
    if not Path(args.data).is_file():
        print(
            f"gradzip scales: error: LIBSVM data file not found: {args.data} (a9a: "
            f"{datasets.LIBSVM_URL}; --data FILE or {datasets.DATA_ENV}=DIR holding libsvm/a9a)",
            file=sys.stderr,
        )
        return 2
    only = [s.strip() for s in args.sources.split(",")] if args.sources else None
    known = sources(args.quick, args.data, args.fashion)
    if only and set(only) - set(known):
        bad = sorted(set(only) - set(known))
        print(f"gradzip scales: error: unknown source(s) {bad}; valid: {', '.join(known)}",
              file=sys.stderr)  # fmt: skip
        return 2
    t0 = time.perf_counter()
    print(f"gradzip scales: {len(specs(args.quick))} configurations per source", flush=True)
    try:
        rows = study(args.quick, args.samples, args.data, args.fashion, only,
                     progress=lambda m: print(m, flush=True))  # fmt: skip
    except (ValueError, OSError) as e:
        print(f"gradzip scales: error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print("gradzip scales: error: no source left to measure", file=sys.stderr)
        return 2
    print(format_table(rows))
    write_csv(rows, args.out / "scales.csv")
    plot(rows, args.out / "scales.png")
    print(f"wrote {args.out / 'scales.csv'} and scales.png ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
