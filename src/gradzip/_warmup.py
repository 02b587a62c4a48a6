"""Compile the CPU kernels ahead of time (``gradzip kernels``), so a job pays numba's compile
once per machine instead of in its first steps (each codec's first call compiles for
seconds; a cold ``gradzip train`` spent 16 s, ``cnn-fashion`` 31 s).

Every registered compressor with its default parameters, every preset's uplink and
downlink, and the variants that take other kernels, encode and decode float32, float64,
float16 and bfloat16 vectors of lengths that take the serial, the threaded and (for the
rotations) the pooled paths. numba writes what it compiles to its on-disk cache
(:mod:`gradzip._numba.cache`); the next processes load it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

#: variants whose kernels the defaults do not reach
VARIANTS = (
    "onebit:dither=subtractive",
    "onebit:scale=norm,flatten=true",
    "fosgd:scale=max,rescale=none",
    "topk:values=fp16",
    "topk:values=bf16",
    "randk:unbiased=true",
    "uniform:bits=2,flatten=true",
    "scaled(qsgd(levels=4))",
    "compose(topk(k=0.01),natural_dithering(levels=8))",
)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SIZES = (1000, (1 << 16) + 3, 1 << 20)
#: the rotations' pooled transform (hadamard.POOLED_FROM): float32 only
POOLED = ((1 << 23) + 1, ("fosgd", "drive", "onebit:flatten=true"))


def specs() -> list[str]:
    """The specs :func:`warmup` runs: registered defaults, presets' compressors, variants."""
    from .compressors import available_compressors
    from .methods import PRESETS

    out = [i["name"] for i in available_compressors() if i["unbiased"] is not None]
    for up, _, down, _ in PRESETS.values():
        out += [up, down]
    return list(dict.fromkeys([*out, *VARIANTS]))


def warmup(only: list[str] | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Encode and decode with ``only`` (default :func:`specs`) so numba compiles (and
    caches) their kernels; returns ``{"kernels": n compiled now, "seconds": s, "specs": k}``."""
    from ._numba import cache
    from .compressors import compressor

    say = progress or (lambda _m: None)
    before = len(cache.compiled())
    t0 = time.perf_counter()
    chosen = list(only) if only else specs()
    gen = torch.Generator().manual_seed(0)
    for spec in chosen:
        c = compressor(spec)
        t1 = time.perf_counter()
        runs = [(d, dt) for d in SIZES for dt in DTYPES]
        if spec in POOLED[1]:
            runs.append((POOLED[0], torch.float32))
        for d, dtype in runs:
            x = torch.randn(d, generator=gen).to(dtype)
            try:
                p = c.encode(x, seed=1, step=0, worker=0)
            except (ValueError, TypeError):  # a dtype the codec refuses: no kernel to compile
                continue
            c.decode(p)
        say(f"  {spec} ({time.perf_counter() - t1:.1f} s)")
    return {
        "kernels": len(cache.compiled()) - before,
        "seconds": time.perf_counter() - t0,
        "specs": len(chosen),
    }
