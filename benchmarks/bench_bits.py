"""Benchmark gradzip.bits: median milliseconds and ratio to a float32 ``copy_`` of the same n.

    python benchmarks/bench_bits.py [--quick] [--reference] [--repeats R] [--min]

``copy_`` copies n float32 values into a preallocated tensor (it reads and writes 4n bytes),
timed in the same run, so the ratio is comparable across machines. Every function is warmed up
first (numba compilation or cache loading is not timed). ``unpack_signs`` is timed twice: into a
fresh tensor (the allocation and its page faults included) and into a preallocated ``out``.
``pack_uints``/``unpack_uints`` use width 24 and n values. ``--reference`` adds the pure-torch
reference paths (the CUDA code path, timed here on CPU).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from gradzip import bits
from gradzip.experiments.bench import time_ms as _time_ms


def time_ms(fn, repeats: int, stat, warmup: int = 2) -> float:
    return _time_ms(fn, repeats, stat, warmup)


def cases(n: int, reference: bool):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)
    dst = torch.empty_like(x)
    signs = bits.pack_signs(x)
    flags = x < 0
    flags_np = flags.numpy()
    out = torch.empty(n)
    vals = torch.randint(0, 1 << 24, (n,), generator=g)
    packed = bits.pack_uints(vals, 24)
    yield "copy_ (float32)", lambda: dst.copy_(x)
    yield "pack_signs (float32)", lambda: bits.pack_signs(x)
    yield "unpack_signs (scale, new tensor)", lambda: bits.unpack_signs(signs, n, 0.5)
    yield "unpack_signs (scale, out=)", lambda: bits.unpack_signs(signs, n, 0.5, out=out)
    yield "pack_bits (bool)", lambda: bits.pack_bits(flags)
    yield "unpack_bits", lambda: bits.unpack_bits(signs, n)
    yield "pack_uints (width 24)", lambda: bits.pack_uints(vals, 24)
    yield "unpack_uints (width 24)", lambda: bits.unpack_uints(packed, n, 24)
    yield "np.packbits (bool, for scale)", lambda: np.packbits(flags_np, bitorder="little")
    if reference:
        yield "pack_signs_reference", lambda: bits.pack_signs_reference(x)
        yield "unpack_signs_reference", lambda: bits.unpack_signs_reference(signs, n, 0.5)
        yield "pack_uints_reference (w 24)", lambda: bits.pack_uints_reference(vals, 24)
        yield "unpack_uints_reference (w 24)", lambda: bits.unpack_uints_reference(packed, n, 24)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n up to 2**20 and fewer repeats")
    ap.add_argument("--reference", action="store_true", help="also time the torch references")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per cell")
    ap.add_argument(
        "--min",
        action="store_true",
        help="report the fastest call instead of the median (robust on a shared, busy machine)",
    )
    args = ap.parse_args(argv)
    exps = (16, 20) if args.quick else (16, 20, 24)
    repeats = args.repeats or (5 if args.quick else 25)
    stat = min if args.min else statistics.median

    import numba

    print(
        f"torch {torch.__version__}, numba {numba.__version__}, "
        f"torch threads {torch.get_num_threads()}, numba threads {numba.get_num_threads()}, "
        f"{'min' if args.min else 'median'} of {repeats}"
    )
    results: dict[str, dict[int, float]] = {}
    for e in exps:
        n = 1 << e
        for name, fn in cases(n, args.reference):
            results.setdefault(name, {})[e] = time_ms(fn, repeats, stat)
    head = f"{'function':34s}" + "".join(
        f"{'n=2^' + str(e) + ' ms':>13s}{'/copy_':>8s}" for e in exps
    )
    print(head)
    print("-" * len(head))
    for name, row in results.items():
        line = f"{name:34s}"
        for e in exps:
            ms = row[e]
            line += f"{ms:13.3f}{ms / results['copy_ (float32)'][e]:8.2f}"
        print(line)

    n = 1 << 18  # the size the uint kernels are specified for
    vals = torch.randint(0, 1 << 24, (n,), generator=torch.Generator().manual_seed(0))
    packed = bits.pack_uints(vals, 24)
    p_ms = time_ms(lambda: bits.pack_uints(vals, 24), repeats, stat)
    u_ms = time_ms(lambda: bits.unpack_uints(packed, n, 24), repeats, stat)
    print(f"width 24, n=2^18 values: pack_uints {p_ms:.3f} ms, unpack_uints {u_ms:.3f} ms")


if __name__ == "__main__":
    main()
