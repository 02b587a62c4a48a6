"""``gradzip``: the command line. Each subcommand is a thin shell over a library function."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


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


def cmd_demo(args) -> int:
    from .experiments import bench, variance

    out: Path = args.out
    t0 = time.perf_counter()
    print("== 1. compressor benchmark (quick) ==")
    rows = bench.bench(None, bench.QUICK_SIZES, quick=True, progress=None)
    print(bench.format_table(rows))
    bench.write_json(rows, out / "bench.json")
    print("\n== 2. the FO-SGD contrast: one-bit quantization of a 1-sparse vector ==")
    dims = [1 << k for k in range(6, 17, 2)]
    by_dim = variance.dimension_sweep(dims, seeds=10)
    print(f"{'d':>8}  {'d-1':>9}  " + "  ".join(f"{m[:30]:>30}" for m in by_dim))
    for i, d in enumerate(dims):
        vals = "  ".join(f"{by_dim[m][i]:30.3f}" for m in by_dim)
        print(f"{d:>8}  {d - 1:>9}  {vals}")
    d_fixed = 1 << 14
    ks = [1, 4, 16, 64, 256, 1024, 4096, d_fixed]
    by_k = variance.sparsity_sweep(d_fixed, ks, seeds=10)
    fig = variance.plot(dims, by_dim, d_fixed, ks, by_k, out / "variance.png")
    print(f"\nwrote {out / 'bench.json'} and {fig} in {time.perf_counter() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradzip", description="Communication-compressed distributed SGD for PyTorch."
    )
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

    d = sub.add_parser("demo", help="quick benchmark and the flattening variance figure")
    d.add_argument("--out", type=Path, default=Path("results/demo"), help="output folder")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `gradzip compressors | head`
        sys.stderr.close()
        return 0
