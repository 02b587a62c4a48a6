"""``gradzip bench``: compressor speed, error and size, measured honestly.

For each length d and each compressor: median encode and decode times, each as a ratio
to a ``copy_`` of the same tensor timed in the same run (these machines are shared and
noisy; ratios travel, absolute times do not); vNMSE = E||decode(encode(x)) - x||^2/||x||^2
over fresh seeds; and bits on the wire per coordinate counted from the payload's bytes,
header included.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..compressors import compressor as make_compressor
from ..compressors import names

DEFAULT_SIZES = (1 << 16, 1 << 20, 1 << 24)
QUICK_SIZES = (1 << 16, 1 << 20)


@dataclass
class Row:
    compressor: str
    d: int
    copy_ms: float
    encode_ms: float
    decode_ms: float
    encode_ratio: float  # encode time / copy_ time
    decode_ratio: float
    vnmse: float
    vnmse_seeds: int
    bits_per_coord: float  # from the payload's bytes, header included


def time_ms(
    fn: Callable[[], object], repeats: int, stat=statistics.median, warmup: int = 1
) -> float:
    """``stat`` (median by default) of ``repeats`` timed calls of ``fn``, in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * stat(times)


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    return time_ms(fn, repeats, statistics.median, warmup)


def vnmse(c, x: torch.Tensor, seeds: Sequence[int], step: int = 0) -> float:
    """Mean over seeds of ||decode(encode(x)) - x||^2 / ||x||^2 (in float64)."""
    x64 = x.double()
    ref = float(x64.square().sum())
    errs = [
        float((c.decode(c.encode(x, seed=s, step=step)).double() - x64).square().sum())
        for s in seeds
    ]
    return sum(errs) / len(errs) / ref


def _repeats(d: int, quick: bool) -> int:
    base = 7 if d >= 1 << 22 else 15
    return max(3, base // 2) if quick else base


def bench(
    specs: Sequence[str] | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    quick: bool = False,
    progress: Callable[[str], None] | None = print,
) -> list[Row]:
    specs = list(specs) if specs else names()
    rows = []
    for d in sizes:
        gen = torch.Generator().manual_seed(d)
        x = torch.randn(d, generator=gen)
        buf = torch.empty_like(x)
        reps = _repeats(d, quick)
        nseeds = 3 if d >= 1 << 22 else (5 if quick else 20)
        for spec in specs:
            c = make_compressor(spec)
            p = c.encode(x, seed=1)
            # The baseline is timed again for every compressor, right before it: on a shared
            # machine the bandwidth a copy_ gets drifts over seconds (here 2.5-5.5 ms for
            # 64 MiB), so a ratio compares two timings taken under the same conditions. Each
            # timing is a median of back-to-back calls after warm-up calls; the warm-up also
            # outlasts the spinning of torch's OpenMP workers after the copy_ (see README).
            copy_ms = median_ms(lambda x=x, buf=buf: buf.copy_(x), reps * 2, warmup=2)
            enc = median_ms(lambda c=c, x=x: c.encode(x, seed=1, step=3), reps, warmup=2)
            dec = median_ms(lambda c=c, p=p: c.decode(p), reps, warmup=2)
            err = vnmse(c, x, range(100, 100 + nseeds))
            row = Row(
                spec, d, copy_ms, enc, dec, enc / copy_ms, dec / copy_ms, err, nseeds, p.nbits / d
            )
            rows.append(row)
            if progress:
                progress(f"  d={_size(d)} {spec:<14} enc {enc:8.2f} ms  dec {dec:8.2f} ms")
    return rows


def _size(d: int) -> str:
    return f"2^{d.bit_length() - 1}" if d & (d - 1) == 0 else str(d)


def format_table(rows: Sequence[Row]) -> str:
    head = (
        f"{'compressor':<16}{'d':>6} {'copy_ ms':>9} {'enc ms':>9} {'enc/copy':>9} "
        f"{'dec ms':>9} {'dec/copy':>9} {'vNMSE':>10} {'bits/coord':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.compressor:<16}{_size(r.d):>6} {r.copy_ms:9.3f} "
            f"{r.encode_ms:9.3f} {r.encode_ratio:9.2f} {r.decode_ms:9.3f} {r.decode_ratio:9.2f} "
            f"{r.vnmse:10.4g} {r.bits_per_coord:11.5f}"
        )
    return "\n".join(lines)


def write_json(rows: Sequence[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
