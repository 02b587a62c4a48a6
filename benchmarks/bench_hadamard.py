"""Speed of the Walsh-Hadamard transform and the rotation, relative to ``Tensor.copy_``.

    python benchmarks/bench_hadamard.py [--quick] [--sizes 16,20,24] [--dtype float32]

For each d = 2**k (float32 by default) it times, in the same process and interleaved:
``y.copy_(x)`` (the yardstick), ``fwht_`` (in place), ``rotate`` and ``unrotate`` (fast path,
``out=`` preallocated), the fused FO-SGD paths where they apply (float32, d >= 2**16:
``rotate_quantize_``, the rotation with the norm and the dithered one-bit quantization, and
``unrotate_signs``, the inverse rotation of packed signs), and the pure-torch references.
Each op is warmed up, then timed in several rounds of repeated calls; the table shows the
median over all calls (ms) and the ratio of that median to the median of ``copy_``. The
minimum is shown too: on a shared machine it is the better estimate of the uncontended
time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradzip import hadamard

KEY = 0x1234_5678_9ABC_DEF0


def _time(fn, setup=None) -> float:
    if setup is not None:
        setup()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(d: int, dtype: torch.dtype, rounds: int, reps: int, ref_reps: int) -> list[tuple]:
    g = torch.Generator().manual_seed(d)
    x = torch.randn(d, generator=g, dtype=dtype)
    y = torch.empty_like(x)
    z = torch.empty_like(x)

    def reset_z():
        z.copy_(x)  # fwht_ is unnormalized: start from x each time so values stay finite

    ops = {
        "copy_": (lambda: y.copy_(x), None, reps),
        "fwht_": (lambda: hadamard.fwht_(z), reset_z, reps),
        "rotate": (lambda: hadamard.rotate(x, KEY, out=y), None, reps),
        "unrotate": (lambda: hadamard.unrotate(x, KEY, out=y), None, reps),
        "fwht_reference": (lambda: hadamard.fwht_reference(x), None, ref_reps),
    }
    if hadamard.can_rotate_quantize(x):
        packed = torch.empty(d // 8, dtype=torch.uint8)
        ops["rotate_quantize_"] = (
            lambda: hadamard.rotate_quantize_(x, KEY, lambda sq, finite: 0.5, KEY + 1, packed),
            None,
            reps,
        )
        ops["unrotate_signs"] = (
            lambda: hadamard.unrotate_signs(packed, d, 0.5, KEY, out=y),
            None,
            reps,
        )
    ops["rotate_reference"] = (lambda: hadamard.rotate_reference(x, KEY), None, ref_reps)
    times: dict[str, list[float]] = {name: [] for name in ops}
    for fn, setup, _ in ops.values():  # warm-up (JIT cache load, page faults)
        for _ in range(2):
            _time(fn, setup)
    for _ in range(rounds):
        for name, (fn, setup, n) in ops.items():
            times[name].extend(_time(fn, setup) for _ in range(n))
    base = statistics.median(times["copy_"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append((d, name, med * 1e3, min(ts) * 1e3, med / base))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--sizes", default="16,20,24", help="comma-separated log2 of d")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    rounds, reps, ref_reps = (3, 5, 1) if args.quick else (5, 11, 2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}")
    print(f"{'d':>10} {'op':>17} {'median ms':>10} {'min ms':>9} {'x copy_':>8}")
    for k in (int(s) for s in args.sizes.split(",")):
        for _, name, med, mn, ratio in bench(1 << k, dtype, rounds, reps, ref_reps):
            print(f"{f'2^{k}':>10} {name:>17} {med:10.3f} {mn:9.3f} {ratio:8.2f}")


if __name__ == "__main__":
    main()
