"""``gradzip``: the command line. Each subcommand is a thin shell over a library function.

Diagnostics go to stderr through :mod:`logging` (:mod:`gradzip._log`); tables and reports
to stdout. A failing command prints one line on stderr (no traceback), exits non-zero and
leaves no output folder it created behind empty; one that needs a package of an extra not
installed says which ``pip install 'gradzip[...]'`` before it starts (:mod:`._clisupport`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ._clisupport import NEEDS, CreatedFolders, Parser, missing_extra, require

_created = CreatedFolders()  # output folders of the running command (removed empty on failure)


def _pow2_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            out.append(1 << int(part[2:]) if part.startswith("2^") else int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a size: {part!r} (use e.g. 65536 or 2^16)"
            ) from None
        if out[-1] < 1:
            raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {part!r}")
    return out


def _specs(text: str) -> list[str]:
    from .compressors import compressor

    specs = [s.strip() for s in text.split(";") if s.strip()]
    for s in specs:
        try:
            compressor(s)
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return specs


def cmd_bench(args) -> int:
    from .experiments import bench

    sizes = args.sizes or (bench.QUICK_SIZES if args.quick else bench.DEFAULT_SIZES)
    print(f"gradzip bench: sizes {sizes}, timings are medians, ratios against copy_ in this run")
    rows = bench.bench(args.compressors, sizes, quick=args.quick)
    _created.watch(args.out.parent)
    print(bench.format_table(rows))
    bench.write_json(rows, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_compressors(args) -> int:
    from .compressors import available_compressors

    def num(v):
        return "-" if v is None else f"{v:.4g}"

    d = args.d
    print(f"Registered compressors; omega, delta and bits/coord at d = {d} (header excluded).")
    print("omega: E||C(x)-x||^2 <= omega ||x||^2 (unbiased ones); delta: class B3 constant.\n")
    print(f"{'name':<18}{'unbiased':>9}{'omega':>10}{'delta':>10}{'bits/coord':>12}  bits formula")
    for info in available_compressors(d):
        unb = {True: "yes", False: "no", None: "-"}[info["unbiased"]]
        print(
            f"{info['name']:<18}{unb:>9}{num(info['omega']):>10}{num(info['delta']):>10}"
            f"{num(info['bits_per_coordinate']):>12}  {info['bits_formula']}"
        )
        params = ", ".join(f"{k}={v}" for k, v in info["params"].items())
        print(f"{'':18}{info['summary']}" + (f"  [{params}]" if params else ""))
    return 0


DEMO_METHODS = ["sgd", "fosgd", "memsgd-topk", "ef-signsgd", "qsgd"]


def cmd_demo(args) -> int:
    from .experiments import compare, variance
    from .experiments.config import RunConfig

    out: Path = args.out
    _created.watch(out)
    t0 = time.perf_counter()
    print("== 1. training: MLP on scikit-learn's digits, 4 workers, parameter server ==")
    cfg = RunConfig(problem="mlp-digits", workers=4, steps=300, lr=0.1, eval_every=25,
                    out=str(out / "compare"))  # fmt: skip
    md, fig = compare.compare(cfg, DEMO_METHODS, overwrite=True)  # a demo: redone each time
    print(md)
    print(f"figure: {fig}")
    print("\n== 2. the FO-SGD contrast: one-bit quantization of a 1-sparse vector ==")
    dims = [1 << k for k in range(6, 17, 2)]
    by_dim = variance.dimension_sweep(dims, seeds=10)
    width = max(len(m) for m in by_dim)
    print(f"{'d':>8}  {'d-1':>9}  " + "  ".join(f"{m:>{width}}" for m in by_dim))
    for i, d in enumerate(dims):
        vals = "  ".join(f"{by_dim[m][i]:{width}.3f}" for m in by_dim)
        print(f"{d:>8}  {d - 1:>9}  {vals}")
    d_fixed = 1 << 14
    ks = [1, 4, 16, 64, 256, 1024, 4096, d_fixed]
    by_k = variance.sparsity_sweep(d_fixed, ks, seeds=10)
    fig2 = variance.plot(dims, by_dim, d_fixed, ks, by_k, out / "variance.png")
    print(f"figure: {fig2}\ndone in {time.perf_counter() - t0:.1f} s")
    return 0


def _config_from(args, base=None):
    from .experiments import config

    flags = {k: getattr(args, k) for k in config.RunConfig.__dataclass_fields__}
    return config.load(args.config, args.set or [], base=base, **flags)


def _resume_config(args):
    """``--resume``: the run's saved configuration, overridden only by what is passed, and
    a line naming the keys that change (``out`` is the folder given: it may have moved)."""
    from .experiments.runfolder import saved_config

    out = _config_from(args).out
    saved = saved_config(out)
    cfg = _config_from(args, base=saved)
    changed = [
        f"{k} {getattr(saved, k)!r} -> {getattr(cfg, k)!r}"
        for k in cfg.__dataclass_fields__
        if getattr(saved, k) != getattr(cfg, k)
    ]
    note = f"; changed: {', '.join(changed)}" if changed else ""
    return cfg, f"gradzip train: resuming {out} with its saved configuration{note}"


def cmd_train(args) -> int:
    from .experiments.runfolder import RESUME_OR_OVERWRITE, elastic_restart, restart_group
    from .experiments.runner import train

    if args.resume and args.overwrite:
        raise ValueError(RESUME_OR_OVERWRITE)
    cfg, note = _resume_config(args) if args.resume else (_config_from(args), None)
    resume, overwrite = args.resume, args.overwrite
    if not resume and elastic_restart(cfg):  # torchrun --max-restarts: a later attempt
        resume, overwrite = True, False
        note = f"gradzip train: torchrun restart: resuming {cfg.out} from its checkpoint"
    from .engines import torchdist

    if cfg.engine in torchdist.ENGINES and torchdist.launched_by_torchrun():
        seconds = getattr(cfg, "timeout", 0) or os.environ.get(torchdist.TIMEOUT_ENV, 180)
        restart_group(float(seconds))  # a restarted attempt's group: keys of its own
    from .experiments.tracking import tensorboard

    _created.watch(cfg.out)
    if args.tensorboard is not None:
        _created.watch(args.tensorboard)
    with tensorboard(args.tensorboard):
        summary = train(cfg, resume=resume, progress=not args.quiet, overwrite=overwrite, note=note)
    print(json.dumps(summary, indent=2))
    failed = int("diverged_at" in summary)  # the runner said why, in one line on stderr
    from .engines import torchdist

    if cfg.engine in torchdist.ENGINES and torchdist.launched_by_torchrun():
        # a torchrun rank: its process group is gone and its files are written; end without
        # interpreter finalization, where gloo's threads can abort a finished process
        # (exit -6; see gradzip.ddp.shutdown)
        torchdist.exit_now(failed)
    return failed


def cmd_compare(args) -> int:
    from .experiments import compare

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    from .methods import PRESETS, method

    if not names:
        raise ValueError(f"--methods names no method; presets: {', '.join(PRESETS)}")
    for n in names:
        method(n)  # a bad name fails here, before any run
    cfg = _config_from(args)
    _created.watch(cfg.out)
    md, fig = compare.compare(cfg, names, progress=not args.quiet, overwrite=args.overwrite)
    print(md)
    print(f"figure: {fig}")
    return 0


def cmd_methods(args) -> int:
    from .methods import DESCRIPTIONS, PRESETS

    print(f"{'method':<16}{'uplink (rule)':<56}{'downlink (rule)'}")
    for name, (up, up_rule, down, down_rule) in PRESETS.items():
        print(f"{name:<16}{up + ' (' + up_rule + ')':<56}{down} ({down_rule})")
        print(f"{'':16}{DESCRIPTIONS[name]}")
    return 0


def cmd_reproduce(args) -> int:
    from . import reproduce

    _created.watch(args.out)
    path, secs = reproduce.reproduce(args.paper, args.out, quick=args.quick, data=args.data)
    for s in secs:
        for c in s.claims:
            print(f"{s.name:>7} {c.key:<18} {c.verdict:<14} {c.summary}")
    print(f"report: {path}")
    return 0


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    from .experiments.config import HELP, RunConfig

    p.add_argument("--config", help="TOML file with config keys")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for name, f in RunConfig.__dataclass_fields__.items():
        kind = type(f.default)
        p.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=str if kind is bool else kind,
            default=None,
            help=f"{HELP.get(name, '')} (default {f.default!r})",
        )  # fmt: skip


def cmd_kernels(args) -> int:
    """Drop a stale kernel cache; unless ``--refresh`` alone, then compile every kernel."""
    from ._numba import cache

    rc = cache.refresh()
    if rc or args.refresh:
        return rc
    if not cache.CACHE:
        print("numba cannot cache the kernels here: every process compiles its own")
        return 0
    from . import _warmup

    print("gradzip kernels: compiling ahead of time (minutes, the first time)", flush=True)
    r = _warmup.warmup(args.compressors, progress=lambda m: print(m, file=sys.stderr))
    done = f"{r['kernels']} kernels compiled" if r["kernels"] else "every kernel was cached"
    print(f"{done} ({r['specs']} compressors, {r['seconds']:.1f} s): {cache.cache_dir()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="gradzip", description="Communication-compressed distributed SGD for PyTorch.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"gradzip {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="compressor speed (ratio to copy_), vNMSE and bits")
    b.add_argument("--quick", action="store_true", help="sizes 2^16 and 2^20, fewer repeats")
    b.add_argument("--sizes", type=_pow2_list, help="comma-separated sizes, e.g. 2^16,2^20")
    b.add_argument(
        "--compressors", type=_specs, help="';'-separated specs (default: every registered one)"
    )
    b.add_argument("--out", type=Path, default=Path("results/bench.json"), help="JSON output")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("compressors", help="list registered compressors and their properties")
    c.add_argument("--d", type=int, default=1 << 20, help="length for bits per coordinate")
    c.set_defaults(func=cmd_compressors)

    d = sub.add_parser("demo", help="training comparison on digits and the flattening figure")
    d.add_argument("--out", type=Path, default=Path("results/demo"), help="output folder")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="one training run (writes a run folder)")
    _add_run_flags(t)
    t.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out from its checkpoint, with its saved configuration "
        "(flags given override it, e.g. a larger --steps)",
    )  # fmt: skip
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument(
        "--tensorboard", metavar="DIR", default=None,
        help="write TensorBoard scalars (loss, accuracy, bits up/down, time split) to DIR "
        "(pip install 'gradzip[tensorboard]')",
    )  # fmt: skip
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("compare", help="several methods on one problem: figure and table")
    _add_run_flags(c)
    c.add_argument("--methods", default=",".join(DEMO_METHODS), help="comma-separated presets")
    c.add_argument("--overwrite", action="store_true", help="replace runs already in --out")
    c.set_defaults(func=cmd_compare)

    k = sub.add_parser(
        "kernels", help="compile every kernel ahead of time (once per machine) into numba's cache"
    )
    k.add_argument("--refresh", action="store_true", help="only drop a stale cache")
    k.add_argument(
        "--compressors", type=_specs, help="';'-separated specs (default: every one, presets)"
    )
    k.set_defaults(func=cmd_kernels)

    m = sub.add_parser("methods", help="list method presets")
    m.set_defaults(func=cmd_methods)

    # `classes` and `scales` are dispatched by main() to their own parsers; listed here for
    # the overview
    sub.add_parser("classes", help="estimate the B1/B2/B3 class constants of compressors")
    sub.add_parser("scales", help="FO-SGD's scale rules: error, shrinkage, contraction (plot)")

    r = sub.add_parser("reproduce", help="reproduce a seed paper's claims: figures and report")
    r.add_argument("paper", choices=("memsgd", "biased", "dqgd", "fosgd", "all"))
    r.add_argument("--quick", action="store_true", help="a small version (< 30 s)")
    r.add_argument("--out", type=Path, default=Path("results/reproduce"), help="output folder")
    r.add_argument(
        "--data", type=Path, default=None,
        help="the folder holding libsvm/ (a9a, w8a) and optionally fashion-mnist/ (default "
        "$GRADZIP_DATA, else ../shared/data; Fashion-MNIST else /usr/share/datasets)",
    )  # fmt: skip
    r.set_defaults(func=cmd_reproduce)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from . import _log

    _log.to_stderr()
    command = next((a for a in argv if not a.startswith("-")), "")
    rc = 1
    try:
        require(*NEEDS.get(command, ()))
        rc = _main(argv)
    except ModuleNotFoundError as e:  # an optional package: which extra installs it
        if missing_extra(e) is None:
            raise
        print(f"gradzip {command}: error: {missing_extra(e)}", file=sys.stderr)
        rc = 2
    finally:
        if rc:
            _created.remove_empty()
    return rc


def _main(argv: list[str]) -> int:
    if argv[:1] in (["classes"], ["scales"]):  # own parsers: `gradzip classes --help` is theirs
        from .experiments import classes, scales

        return (classes if argv[0] == "classes" else scales).main(argv[1:])
    args = build_parser().parse_args(argv)
    from .engines.liveness import WorkerError
    from .experiments.runner import RunInterrupted

    try:
        return args.func(args)
    except RunInterrupted as e:  # SIGINT/SIGTERM: checkpointed; one line, 128 + signal
        print(f"gradzip {args.command}: {e}", file=sys.stderr)
        return e.code
    except WorkerError as e:  # a rank failed, stood still or was lost: the message names it
        print(f"gradzip {args.command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `gradzip methods | head` (an OSError: caught first)
        sys.stderr.close()
        return 0
    except (ValueError, TypeError, OSError) as e:  # bad input: one clear line, no traceback
        print(f"gradzip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
