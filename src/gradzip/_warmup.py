"""Compile the CPU kernels ahead of time (``gradzip kernels``), so a job pays numba's compile
once per machine instead of in its first steps (each codec's first call compiles for
seconds; a cold ``gradzip train`` spent 16 s, ``cnn-fashion`` 31 s).

Every registered compressor with its default parameters, every preset's uplink and
downlink, and the variants that take other kernels (k > d/2 selects by its complement),
encode and decode float32, float64, float16 and bfloat16 vectors of lengths that take the
serial, the threaded and (for the rotations) the pooled paths, and float32 vectors whose
values take data-dependent paths (one dominant entry: adaptive sparsification's
water-filling; a few non-zeros), and the rotation itself on vectors and batches of rows
(float32, float64). numba writes what it compiles to its on-disk cache
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
    "fosgd:rotation=shared",
    "topk:values=fp16",
    "topk:values=bf16",
    "randk:unbiased=true",
    "topk:k=0.75",
    "randk:k=0.75",
    "adaptive_sparse:k=0.75",
    "uniform:bits=2,flatten=true",
    "scaled(qsgd(levels=4))",
    "compose(topk(k=0.01),natural_dithering(levels=8))",
)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SIZES = (1000, (1 << 16) + 3, 1 << 20)
#: the rotations' pooled transform (hadamard.POOLED_FROM): float32 only
POOLED = ((1 << 23) + 1, ("fosgd", "drive", "onebit:flatten=true"))


def _shaped(d: int, gen: torch.Generator) -> list[torch.Tensor]:
    """float32 vectors of length d whose values take other paths than Gaussian noise."""
    peaked = torch.randn(d, generator=gen) * 1e-3
    peaked[d // 3] = 1e4  # one entry dominates: weights saturate, water-filling
    few = torch.zeros(d)
    few[:: max(1, d // 8)] = 1.0  # a handful of non-zeros
    return [peaked, few]


def rotated(c, p, x: torch.Tensor) -> None:
    """A shared rotation's server path (``OneBit.mean_rotated``, ``encode_rotated``) on the
    payload ``p`` of ``x``, where the codec has one and ``x`` is a float32 vector."""
    if getattr(c, "adds_rotated", False) and x.dtype == torch.float32 and x.dim() == 1:
        c.encode_rotated(c.mean_rotated([p, p], torch.empty(x.numel())), seed=1)


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
        runs = [torch.randn(d, generator=gen).to(dt) for d in SIZES for dt in DTYPES]
        runs += [x for d in SIZES for x in _shaped(d, gen)]
        if spec in POOLED[1]:
            runs.append(torch.randn(POOLED[0], generator=gen))
        for x in runs:
            try:
                p = c.encode(x, seed=1, step=0, worker=0)
            except (ValueError, TypeError):  # a dtype the codec refuses: no kernel to compile
                continue
            c.decode(p)
            rotated(c, p, x)
        say(f"  {spec} ({time.perf_counter() - t1:.1f} s)")
    if not only:  # the rotation on its own (DQ-GD's flattened quantizer, batches of rows)
        from . import hadamard

        t1 = time.perf_counter()
        for dtype in (torch.float32, torch.float64):
            for shape in [(8,), (6,), (3, 8), (3, 6), *[(d,) for d in SIZES], (2, SIZES[1])]:
                x = torch.randn(shape, generator=gen, dtype=dtype)
                hadamard.unrotate(hadamard.rotate(x, 1), 1)
                n = 1 << (shape[-1].bit_length() - 1)
                hadamard.fwht_(x[..., :n].contiguous())
        say(f"  rotations ({time.perf_counter() - t1:.1f} s)")
    return {
        "kernels": len(cache.compiled()) - before,
        "seconds": time.perf_counter() - t0,
        "specs": len(chosen),
    }
