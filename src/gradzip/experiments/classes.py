"""``gradzip classes``: the biased-compressor classes B1, B2, B3 measured on real vectors.

Beznosikov, Horváth, Richtárik and Safaryan ("On Biased Compression for Distributed
Learning") define, for a compressor C and every x (DESIGN 3.5):

- B1(alpha, beta): alpha ||x||^2 <= E||C(x)||^2 <= beta <E C(x), x>;
- B2(gamma, beta): max(gamma ||x||^2, E||C(x)||^2 / beta) <= <E C(x), x>;
- B3(delta):       E||C(x) - x||^2 <= (1 - 1/delta) ||x||^2.

For a set of vectors X this module estimates E C(x), E||C(x)||^2 and E||C(x) - x||^2 by
Monte Carlo over fresh seeds (S samples per vector; one when C ignores its seed), and
from them the tightest constants consistent with the samples:

- delta_hat = 1 / (1 - max_x E||C(x) - x||^2 / ||x||^2), infinite (not in B3) when that
  ratio is >= 1;
- alpha_hat = min_x E||C(x)||^2 / ||x||^2, beta_hat = max_x E||C(x)||^2 / <E C(x), x>;
- gamma_hat = min_x <E C(x), x> / ||x||^2.

These are worst cases over X, so they are lower bounds on the constants a compressor
needs for every x (its declared ``delta(d)``, ``omega(d)``), and they say how far real
gradients are from the worst case.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .._clisupport import Parser
from ..compressors import compressor as make_compressor
from ..compressors import names
from ..problems import datasets
from . import gradients, tracking

#: specs added to the registered names (default parameters) when they can be built
EXTRA_SPECS = (
    "topk:k=0.1",
    "randk:k=0.1",
    "randk:k=0.1,unbiased=true",
    "randk:k=0.01,unbiased=true",
    "compose(topk(k=0.1),natural_dithering(levels=8))",
    "scaled(qsgd(levels=4))",
    "scaled(randk(k=0.1,unbiased=true))",
)

QUICK_SAMPLES = 16
FULL_SAMPLES = 200

COLUMNS = (
    "compressor", "spec", "source", "d", "vectors", "samples", "random", "unbiased", "omega",
    "delta", "vnmse", "max_ratio", "max_ratio_se", "delta_hat", "alpha_hat", "beta_hat",
    "gamma_hat", "gamma_se", "rel_bias", "bits_per_coord", "note",
)  # fmt: skip


@dataclass
class Moments:
    """Monte Carlo moments of C(x) for one vector x (all in float64)."""

    norm2: float  # ||x||^2
    mean: torch.Tensor  # estimate of E C(x)
    out2: float  # E||C(x)||^2
    err2: float  # E||C(x) - x||^2
    inner: float  # <E C(x), x> = E <C(x), x>
    err2_se: float  # standard error of err2 (0 with one sample)
    inner_se: float  # standard error of inner
    bias2: float  # ||E C(x) - x||^2, corrected for the Monte Carlo variance of the mean
    samples: int  # draws taken (1 for a compressor that ignores its seed here)
    nbits: float  # mean payload bits, header included


def moments(c, x: torch.Tensor, samples: int, seed0: int = 1000) -> Moments:
    """Moments of ``c`` at ``x`` from ``samples`` fresh seeds (seed ``seed0 + i``, step i).

    When ``samples >= 3`` and the first three draws are identical, ``c`` is taken not to
    depend on its seed at this x and those draws stand for all (``samples`` is then 1).
    """
    x64 = x.detach().reshape(-1).double()
    norm2 = float(x64.square().sum())
    total = torch.zeros_like(x64)
    s_out2 = s_err2 = s_inner = q_err2 = q_inner = nbits = 0.0
    first: list[torch.Tensor] = []
    n = 0
    for i in range(max(1, samples)):
        p = c.encode(x, seed=seed0 + i, step=i)
        y = c.decode(p).reshape(-1).double()
        if i < 3:
            first.append(y)
        if i == 3 and all(torch.equal(first[0], f) for f in first[1:]):
            break  # deterministic at x: three identical draws are the exact moments
        e2 = float((y - x64).square().sum())
        ip = float(y @ x64)
        total += y
        s_out2 += float(y.square().sum())
        s_err2 += e2
        s_inner += ip
        q_err2 += e2 * e2
        q_inner += ip * ip
        nbits += p.nbits
        n += 1
    deterministic = n == 3 and samples > 3
    mean = total / n
    out2, err2, inner = s_out2 / n, s_err2 / n, s_inner / n

    def se(q: float, m: float) -> float:
        if deterministic or n < 2:
            return 0.0
        return math.sqrt(max(q / n - m * m, 0.0) / (n - 1))

    bias2 = float((mean - x64).square().sum())
    if n > 1 and not deterministic:
        # E||mean - x||^2 = ||E C - x||^2 + tr Cov / n: remove an unbiased tr Cov / n
        trace_cov = (out2 - float(mean.square().sum())) * n / (n - 1)
        bias2 = max(bias2 - trace_cov / n, 0.0)
    return Moments(
        norm2, mean, out2, err2, inner, se(q_err2, err2), se(q_inner, inner), bias2,
        1 if deterministic else n, nbits / n,
    )  # fmt: skip


@dataclass
class Constants:
    """The class constants estimated from a set of vectors (see the module docstring)."""

    vnmse: float  # mean over x of E||C(x) - x||^2 / ||x||^2
    max_ratio: float  # max over x of the same ratio
    max_ratio_se: float  # its Monte Carlo standard error at the maximizing x
    delta_hat: float  # B3; inf when max_ratio >= 1
    alpha_hat: float  # B1
    beta_hat: float  # B1 and B2; inf when some <E C(x), x> <= 0
    gamma_hat: float  # B2
    gamma_se: float  # standard error of gamma_hat at the minimizing x
    rel_bias: float  # max over x of ||E C(x) - x||^2 / ||x||^2 (variance-corrected)
    samples: int  # the largest number of draws taken for one vector
    random: bool  # whether C depended on its seed at some x
    bits_per_coord: float
    vectors: int


def constants(c, xs: Sequence[torch.Tensor], samples: int, seed0: int = 1000) -> Constants:
    """Estimate the class constants of ``c`` over the vectors ``xs`` (zero vectors skipped)."""
    with gradients.single_thread():
        ms = [(moments(c, x, samples, seed0), x.numel()) for x in xs if bool(x.any())]
    if not ms:
        raise ValueError("constants: no nonzero vector to measure on")
    ratios = [m.err2 / m.norm2 for m, _ in ms]
    i_max = max(range(len(ms)), key=ratios.__getitem__)
    max_ratio = ratios[i_max]
    gammas = [m.inner / m.norm2 for m, _ in ms]
    i_min = min(range(len(ms)), key=gammas.__getitem__)
    betas = [m.out2 / m.inner if m.inner > 0 else math.inf for m, _ in ms]
    return Constants(
        vnmse=sum(ratios) / len(ratios),
        max_ratio=max_ratio,
        max_ratio_se=ms[i_max][0].err2_se / ms[i_max][0].norm2,
        delta_hat=1.0 / (1.0 - max_ratio) if max_ratio < 1 else math.inf,
        alpha_hat=min(m.out2 / m.norm2 for m, _ in ms),
        beta_hat=max(betas),
        gamma_hat=gammas[i_min],
        gamma_se=ms[i_min][0].inner_se / ms[i_min][0].norm2,
        rel_bias=max(m.bias2 / m.norm2 for m, _ in ms),
        samples=max(m.samples for m, _ in ms),
        random=any(m.samples > 1 for m, _ in ms),
        bits_per_coord=sum(m.nbits / d for m, d in ms) / len(ms),
        vectors=len(ms),
    )


# --- which compressors --------------------------------------------------------------------


def _try_build(spec: str):
    """``(compressor, None)`` or ``(None, why it was skipped)``."""
    try:
        return make_compressor(spec), None
    except (ValueError, TypeError) as e:
        msg = str(e)
        if msg.startswith("unknown compressor"):
            msg = msg.split(";")[0].replace("unknown compressor", "not registered:")
        return None, f"skipped {spec}: {msg}"


def default_specs() -> tuple[list[str], list[str]]:
    """Every registered name that builds with its defaults, then :data:`EXTRA_SPECS`.

    Returns ``(specs, notes)``: the notes say what was skipped and why (wrappers that need
    arguments, extras naming a compressor that is not registered).
    """
    specs, notes = [], []
    for spec in [*names(), *EXTRA_SPECS]:
        c, why = _try_build(spec)
        if c is None:
            notes.append(why)
        else:
            specs.append(spec)
    return specs, notes


def _build(specs: Sequence[str]) -> tuple[list[tuple[str, object]], list[str]]:
    built, notes, seen = [], [], set()
    for spec in specs:
        c, why = _try_build(spec)
        if c is None:
            notes.append(why)
        elif c.spec not in seen:  # the same compressor written twice
            seen.add(c.spec)
            built.append((spec, c))
    return built, notes


def _declared(c, d: int) -> tuple[bool | None, float | None, float | None]:
    def ask(fn):
        try:
            return fn()
        except NotImplementedError:
            return None

    return ask(lambda: c.unbiased), ask(lambda: c.omega(d)), ask(lambda: c.delta(d))


def _note(k: Constants, unbiased, omega, delta) -> str:
    """Flags a measurement that contradicts what the compressor declares.

    Compared in the ratio E||C(x) - x||^2 / ||x||^2 (whose bound is 1 - 1/delta, or
    omega), with three Monte Carlo standard errors of slack: near delta = d/k a tiny
    error in the ratio is a large one in delta_hat. A flag can still be a Monte Carlo
    artefact where a rare draw carries most of the error (rand-k on a heavy-tailed vector
    whose largest coordinate it keeps with probability k/d): the sample standard error
    misses draws that did not happen.
    """
    notes = []
    se = k.max_ratio_se
    slack = 3 * se + 1e-6
    if delta is not None and k.max_ratio > 1 - 1 / delta + slack:
        z = (k.max_ratio - 1 + 1 / delta) / se if se else math.inf
        notes.append(f"error above declared delta ({z:.0f} se)")
    if omega is not None and k.max_ratio > omega + slack:
        z = (k.max_ratio - omega) / se if se else math.inf
        notes.append(f"error above declared omega ({z:.0f} se)")
    if unbiased and abs(k.gamma_hat - 1) > 0.02 + 4 * k.gamma_se:
        notes.append("gamma_hat != 1 for a declared-unbiased C")
    return "; ".join(notes)


# --- the table ----------------------------------------------------------------------------

Source = Callable[[], Sequence[torch.Tensor]] | Sequence[torch.Tensor]


def _resolve_sources(sources, quick: bool, data) -> dict[str, Source]:
    if sources is None:
        return dict(gradients.default_sources(quick=quick, data=data))
    if isinstance(sources, Mapping):
        return dict(sources)
    all_known = gradients.default_sources(quick=quick, data=data)
    out = {}
    for name in sources:
        if name not in all_known:
            raise ValueError(f"unknown source {name!r}; known: {', '.join(all_known)}")
        out[name] = all_known[name]
    return out


def class_table(
    specs: Sequence[str] | None = None,
    sources: Mapping[str, Source] | Sequence[str] | None = None,
    quick: bool = False,
    progress: Callable[[str], None] | None = print,
    samples: int | None = None,
    data: str | Path = gradients.DEFAULT_LIBSVM,
    notes: list[str] | None = None,
) -> list[dict]:
    """One row per (compressor, source): declared properties and measured class constants.

    ``specs`` defaults to :func:`default_specs`; specs that are not registered (or do not
    build) are skipped with a note, given to ``progress`` and appended to ``notes`` when
    a list is passed. A row's own ``note`` flags a measurement that contradicts what the
    compressor declares. ``sources`` maps names to vector lists or zero-argument
    loaders (default :func:`gradients.default_sources`, whose logistic regression reads
    ``data``), or names a subset of the defaults. ``samples`` is S per vector (16 quick,
    200 full).
    """
    skipped: list[str] = []
    if specs is None:
        specs, skipped = default_specs()
    built, more = _build(specs)
    skipped += more
    srcs = _resolve_sources(sources, quick, data)
    pb = tracking.bar(len(srcs) + len(built), "classes", leave=False)  # on a terminal

    def say(msg: str) -> None:
        if progress is not None:
            with pb.outside():
                progress(msg)

    for n in skipped:
        say(f"note: {n}")
    if notes is not None:
        notes += skipped
    S = samples or (QUICK_SAMPLES if quick else FULL_SAMPLES)
    rows = []
    with gradients.single_thread(), pb:
        loaded = {}
        for name, src in srcs.items():
            pb.update(len(loaded), f"loading {name}")
            t0 = time.perf_counter()
            xs = list(src() if callable(src) else src)
            xs = [x.detach().reshape(-1).float() for x in xs]
            dims = {x.numel() for x in xs}
            if len(dims) != 1:
                raise ValueError(f"source {name!r}: vectors of several lengths {sorted(dims)}")
            loaded[name] = xs
            secs = time.perf_counter() - t0
            say(f"source {name}: {len(xs)} vectors of d={dims.pop()} ({secs:.1f} s)")
        for i, (spec, c) in enumerate(built):
            pb.update(len(loaded) + i, spec)
            t0 = time.perf_counter()
            for name, xs in loaded.items():
                d = xs[0].numel()
                k = constants(c, xs, S)
                unbiased, omega, delta = _declared(c, d)
                row = {
                    "compressor": spec, "spec": c.spec, "source": name, "d": d,
                    "vectors": k.vectors, "samples": k.samples, "random": k.random,
                    "unbiased": unbiased, "omega": omega, "delta": delta,
                    "vnmse": k.vnmse, "max_ratio": k.max_ratio, "max_ratio_se": k.max_ratio_se,
                    "delta_hat": k.delta_hat, "alpha_hat": k.alpha_hat, "beta_hat": k.beta_hat,
                    "gamma_hat": k.gamma_hat, "gamma_se": k.gamma_se, "rel_bias": k.rel_bias,
                    "bits_per_coord": k.bits_per_coord, "note": _note(k, unbiased, omega, delta),
                }  # fmt: skip
                rows.append(row)
            say(f"  {spec} ({time.perf_counter() - t0:.1f} s)")
    return rows


def _num(v, width: int) -> str:
    if v is None:
        return f"{'-':>{width}}"
    if isinstance(v, float) and math.isinf(v):
        return f"{'inf':>{width}}"
    return f"{v:>{width}.4g}"


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width table: declared (unb, omega, delta) then measured constants."""
    if not rows:
        return "(no rows)"
    wc = max(10, *(len(r["compressor"]) for r in rows))
    ws = max(6, *(len(r["source"]) for r in rows))
    head = (
        f"{'compressor':<{wc}} {'source':<{ws}} {'d':>5} {'unb':>3} {'omega':>8} {'delta':>8} "
        f"{'vNMSE':>9} {'max err':>9} {'delta_hat':>9} {'alpha':>8} {'beta':>8} {'gamma':>8} "
        f"{'bits/c':>7}  note"
    )
    lines = [head, "-" * len(head)]
    prev = None
    for r in rows:
        unb = "-" if r["unbiased"] is None else ("yes" if r["unbiased"] else "no")
        name = r["compressor"] if r["compressor"] != prev else ""
        prev = r["compressor"]
        lines.append(
            f"{name:<{wc}} {r['source']:<{ws}} {r['d']:>5} {unb:>3} {_num(r['omega'], 8)} "
            f"{_num(r['delta'], 8)} {_num(r['vnmse'], 9)} {_num(r['max_ratio'], 9)} "
            f"{_num(r['delta_hat'], 9)} {_num(r['alpha_hat'], 8)} {_num(r['beta_hat'], 8)} "
            f"{_num(r['gamma_hat'], 8)} {r['bits_per_coord']:>7.3f}  {r['note']}".rstrip()
        )
    return "\n".join(lines)


def format_summary(rows: Sequence[dict], field: str = "delta_hat") -> str:
    """One line per compressor, one column per source: ``field`` (delta_hat by default)."""
    if not rows:
        return "(no rows)"
    comps = list(dict.fromkeys(r["compressor"] for r in rows))
    srcs = list(dict.fromkeys(r["source"] for r in rows))
    val = {(r["compressor"], r["source"]): r[field] for r in rows}
    wc = max(10, *(len(c) for c in comps))
    ws = [max(9, len(s)) for s in srcs]
    head = f"{'compressor':<{wc}}" + "".join(f" {s:>{w}}" for s, w in zip(srcs, ws, strict=True))
    lines = [f"{field} by source", head, "-" * len(head)]
    for c in comps:
        cells = "".join(f" {_num(val.get((c, s)), w)}" for s, w in zip(srcs, ws, strict=True))
        lines.append(f"{c:<{wc}}{cells}")
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})


def _unknown(specs: Sequence[str]) -> list[str]:
    """The error of each spec that does not build (an unknown name or parameter)."""
    bad = []
    for spec in specs:
        try:
            make_compressor(spec)
        except (ValueError, TypeError) as e:
            bad.append(f"--compressors {spec!r}: {e}")
    return bad


def _no_libsvm(path) -> str:
    return (
        f"LIBSVM data file not found: {path} (a9a: {datasets.LIBSVM_URL}; pass --data FILE "
        f"or set {datasets.DATA_ENV}=DIR holding libsvm/a9a)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = Parser(
        prog="gradzip classes",
        description="Estimate the B1/B2/B3 constants of compressors (Beznosikov et al.) by "
        "Monte Carlo on synthetic vectors and on real gradients.",
    )
    ap.add_argument("--quick", action="store_true", help="fewer vectors and samples (~20 s)")
    ap.add_argument("--out", type=Path, default=Path("results/classes"), help="output folder")
    ap.add_argument(
        "--data", default=gradients.DEFAULT_LIBSVM, help="LIBSVM file for logistic regression"
    )
    ap.add_argument(
        "--compressors", help="';'-separated specs (default: every registered one and extras)"
    )
    ap.add_argument("--samples", type=int, help="Monte Carlo samples per vector")
    args = ap.parse_args(list(argv) if argv is not None else None)
    specs = None
    if args.compressors is not None:
        specs = [s.strip() for s in args.compressors.split(";") if s.strip()]
        bad = _unknown(specs) if specs else ["--compressors names no compressor"]
        if bad:  # the specs asked for are checked before anything runs or is written
            print(f"gradzip classes: error: {bad[0]}", file=sys.stderr)
            return 2
    if args.samples is not None and args.samples < 1:
        ap.error("--samples must be >= 1")
    if not Path(args.data).is_file():
        print(f"gradzip classes: error: {_no_libsvm(args.data)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    notes: list[str] = []
    try:
        rows = class_table(
            specs, quick=args.quick, samples=args.samples, data=args.data, notes=notes
        )
    except (ValueError, OSError) as e:
        print(f"gradzip classes: error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"gradzip classes: error: nothing measured ({'; '.join(notes)})", file=sys.stderr)
        return 2
    print(format_table(rows))
    print()
    print(format_summary(rows, "delta_hat"))
    for n in notes:
        print(f"note: {n}")
    out = args.out / "classes.csv"
    write_csv(rows, out)
    print(f"wrote {out} ({len(rows)} rows, {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
