"""Benchmark the quantizers: encode and decode ms, and their ratio to a float32 ``copy_``.

    python benchmarks/bench_quantize.py [--log2d 24 20] [--repeats R] [--min] [--threads T]
                                        [--specs S ...]

``copy_`` copies the same d float32 values into a preallocated tensor, timed in the same run
(before and after the compressors; the smaller is the reference), so the ratios are
comparable across machines. Every compressor is warmed up first (numba compilation or cache
loading is not timed). Encode includes everything ``c.encode(x)`` does (the finiteness and
norm pass, rounding, packing, checksum); decode is ``c.decode(payload)`` into a fresh tensor.
The target (issue 3) is at most 10x ``copy_`` for both at d = 2^24.

``--threads T`` sets torch's, numba's and gradzip's thread counts (default: all cores).
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from gradzip.experiments.bench import time_ms as _time_ms

SPECS = [
    "qsgd",
    "qsgd:levels=255",
    "terngrad",
    "natural",
    "natural_dithering",
    "biased_rounding",
    "biased_rounding:base=1.5",
    "scaled(qsgd(levels=4))",
    "scaled(natural)",
]


def time_ms(fn, repeats: int, stat, warmup: int = 2) -> float:
    return _time_ms(fn, repeats, stat, warmup)


def bench(log2d: int, specs, repeats: int, stat) -> None:
    import gradzip as gz

    d = 1 << log2d
    x = torch.randn(d, generator=torch.Generator().manual_seed(0))
    dst = torch.empty_like(x)

    def copy() -> float:
        return time_ms(lambda: dst.copy_(x), repeats, stat)

    copy_before = copy()
    rows = []
    for spec in specs:
        c = gz.compressor(spec)
        p = c.encode(x, seed=1)
        assert torch.equal(gz.decode(p.data), c.decode(p))
        enc = time_ms(lambda c=c: c.encode(x, seed=1), repeats, stat)
        dec = time_ms(lambda c=c, p=p: c.decode(p), repeats, stat)
        rows.append((spec, enc, dec, 8 * (p.nbytes - p.header.size) / d))
    copy_after = copy()
    ref = min(copy_before, copy_after)
    print(
        f"\nd = 2^{log2d} float32, {'min' if stat is min else 'median'} of {repeats}, "
        f"{torch.get_num_threads()} torch threads; "
        f"copy_ {copy_before:.2f} ms before, {copy_after:.2f} ms after (reference {ref:.2f})"
    )
    head = f"{'compressor':28s}{'bits/coord':>11s}{'encode ms':>11s}{'/copy_':>8s}"
    head += f"{'decode ms':>11s}{'/copy_':>8s}"
    print(head)
    print("-" * len(head))
    for spec, enc, dec, b in rows:
        print(f"{spec:28s}{b:11.3f}{enc:11.2f}{enc / ref:8.2f}{dec:11.2f}{dec / ref:8.2f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log2d", type=int, nargs="+", default=[24, 20], help="d = 2**log2d")
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per cell")
    ap.add_argument("--min", action="store_true", help="fastest call instead of the median")
    ap.add_argument("--specs", nargs="*", default=SPECS, help="compressor specs to time")
    ap.add_argument("--threads", type=int, default=None, help="torch and gradzip threads")
    args = ap.parse_args(argv)
    if args.threads:
        os.environ["GRADZIP_THREADS"] = os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    stat = min if args.min else statistics.median
    for log2d in args.log2d:
        bench(log2d, args.specs, args.repeats, stat)


if __name__ == "__main__":
    main()
