"""Per-message framing overhead: standalone payloads against stream frames (gradzip.stream).

For every registered compressor (default parameters) on a float32 vector of d = 124 (a9a
with a bias) and d = 2^20: the header of a standalone payload, the bytes of a message sent
standalone and as a stream frame (after the channel's opener), and bits per coordinate of
each, headers included. The frame's overhead is 8 bytes whatever the codec.

    python benchmarks/stream_overhead.py [--json results/stream_overhead.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import gradzip as gz
from gradzip.compressors import names
from gradzip.stream import StreamSender, frame_size

DIMS = (124, 1 << 20)


def measure(spec: str, d: int) -> dict:
    c = gz.compressor(spec)
    x = torch.randn(d, generator=torch.Generator().manual_seed(0))
    p0, p1 = (c.encode(x, seed=1, step=t) for t in (0, 1))
    tx = StreamSender(0)
    opener, frame = tx.pack(p0), tx.pack(p1)
    assert frame.numel() == frame_size(p1)
    return {
        "spec": spec,
        "d": d,
        "header": p1.header.size,
        "standalone": p1.nbytes,
        "opener": opener.numel(),
        "frame": frame.numel(),
        "overhead_bits_per_coord": {"standalone": 8 * p1.header.size / d, "stream": 64 / d},
        "bits_per_coord": {"standalone": 8 * p1.nbytes / d, "stream": 8 * frame.numel() / d},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()
    rows = [measure(s, d) for d in DIMS for s in names()]
    print(
        f"{'compressor':<18} {'d':>8} {'header B':>8} {'standalone B':>12} {'frame B':>9} "
        f"{'hdr bits/coord':>15} {'frame bits/coord':>17} {'bits/coord':>17}"
    )
    for r in rows:
        o, b = r["overhead_bits_per_coord"], r["bits_per_coord"]
        print(
            f"{r['spec']:<18} {r['d']:>8} {r['header']:>8} {r['standalone']:>12} "
            f"{r['frame']:>9} {o['standalone']:>15.4g} {o['stream']:>17.4g} "
            f"{b['standalone']:>8.4g} -> {b['stream']:<.4g}"
        )
    for d in DIMS:
        hs = [r["header"] for r in rows if r["d"] == d]
        print(
            f"d = {d}: headers {min(hs)}-{max(hs)} B = {8 * min(hs) / d:.3g}-"
            f"{8 * max(hs) / d:.3g} bits/coord; stream frame overhead 8 B = {64 / d:.3g} "
            f"bits/coord ({min(hs) / 8:.1f}-{max(hs) / 8:.1f}x less)"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
