"""Benchmark the sparsifiers: encode and decode ms, and their ratio to a float32 ``copy_``.

    python benchmarks/bench_sparse.py [--log2d 24] [--repeats R] [--min] [--threads T]
                                      [--specs S ...]

``copy_`` copies the same d float32 values into a preallocated tensor, timed in the same run
(before and after the compressors; the smaller median is the reference), so the ratios are
comparable across machines. Every compressor is warmed up first (numba compilation or cache
loading is not timed). Encode includes everything ``c.encode(x)`` does (the finiteness and
norm pass, selection, packing, checksum); decode is ``c.decode(payload)`` into a fresh tensor
whose zeros are written, not left to lazily zeroed pages.

``--threads T`` sets torch's, numba's and gradzip's thread counts (default: all cores). On a
machine shared with other jobs, ``--threads 1`` gives steadier ratios: a multi-threaded op
waits for its slowest thread, and a thread on a busy core waits for a time slice.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from gradzip.experiments.bench import time_ms as _time_ms

SPECS = [
    "topk:k=0.01",
    "randk:k=0.01",
    "randk:k=0.01,unbiased=true",
    "adaptive_sparse:k=0.01",
    "compose(topk(k=0.01),fp16)",
]


def time_ms(fn, repeats: int, stat, warmup: int = 2) -> float:
    return _time_ms(fn, repeats, stat, warmup)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log2d", type=int, default=24, help="d = 2**log2d (default 24)")
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per cell")
    ap.add_argument("--min", action="store_true", help="fastest call instead of the median")
    ap.add_argument("--specs", nargs="*", default=SPECS, help="compressor specs to time")
    ap.add_argument("--threads", type=int, default=None, help="torch and gradzip threads")
    args = ap.parse_args(argv)
    if args.threads:
        # read when gradzip's pool starts and when numba is imported (its parallel kernels
        # would otherwise reset the OpenMP thread count that torch shares)
        os.environ["GRADZIP_THREADS"] = os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    import gradzip as gz

    stat = min if args.min else statistics.median
    d = 1 << args.log2d
    x = torch.randn(d, generator=torch.Generator().manual_seed(0))
    dst = torch.empty_like(x)

    def copy() -> float:
        return time_ms(lambda: dst.copy_(x), args.repeats, stat)

    copy_before = copy()
    rows = []
    for spec in args.specs:
        c = gz.compressor(spec)
        p = c.encode(x, seed=1)
        assert torch.equal(gz.decode(p.data), c.decode(p))
        enc = time_ms(lambda c=c: c.encode(x, seed=1), args.repeats, stat)
        dec = time_ms(lambda c=c, p=p: c.decode(p), args.repeats, stat)
        rows.append((spec, enc, dec, 8 * (p.nbytes - p.header.size) / d))
    copy_after = copy()
    ref = min(copy_before, copy_after)
    print(
        f"d = 2^{args.log2d} float32, {'min' if args.min else 'median'} of {args.repeats}, "
        f"{torch.get_num_threads()} torch threads; "
        f"copy_ {copy_before:.2f} ms before, {copy_after:.2f} ms after (reference {ref:.2f})"
    )
    head = f"{'compressor':32s}{'bits/coord':>11s}{'encode ms':>11s}{'/copy_':>8s}"
    head += f"{'decode ms':>11s}{'/copy_':>8s}"
    print(head)
    print("-" * len(head))
    for spec, enc, dec, b in rows:
        print(f"{spec:32s}{b:11.3f}{enc:11.2f}{enc / ref:8.2f}{dec:11.2f}{dec / ref:8.2f}")


if __name__ == "__main__":
    main()
