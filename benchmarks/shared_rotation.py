"""The error of the mean of n FO-SGD payloads: one rotation per sender, or one shared.

With ``fosgd:rotation=shared`` a server adds the payloads in the rotated domain (no
transform), but the senders' quantization errors are no longer independent: where their
gradients agree, so do their errors. For n senders with gradients g_i = g + sigma z_i
(g with heavy-tailed coordinates, z_i standard normal scaled to rms(g)), this prints the
normalized error ||mean_i C(g_i) - mean_i g_i||^2 / ||mean_i g_i||^2 of both, averaged over
draws (docs/fosgd.md, "rotation").

    python benchmarks/shared_rotation.py
    python benchmarks/shared_rotation.py --senders 8 --dim 1048576 --draws 5
"""

from __future__ import annotations

import argparse
import math

import torch

import gradzip as gz
from gradzip import hadamard


def mean_error(spec: str, gs: list[torch.Tensor], step: int) -> float:
    c = gz.compressor(spec)
    ps = [c.encode(g, seed=7, step=step, worker=i) for i, g in enumerate(gs)]
    if c.adds_rotated:  # the server's way: one pass over the signs, one inverse rotation
        got = hadamard.unrotate(
            c.mean_rotated(ps, torch.empty(gs[0].numel())), c.rotation_key(7, step, 0)
        )
    else:
        got = sum(c.decode(p) for p in ps) / len(ps)
    mean = sum(gs) / len(gs)
    return float((got - mean).square().sum() / mean.square().sum())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--senders", type=int, default=4)
    p.add_argument("--dim", type=int, default=1 << 16)
    p.add_argument("--draws", type=int, default=20)
    p.add_argument(
        "--sigmas", default="0,0.5,1,3", help="per-sender noise / rms of the common part"
    )
    a = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    print(f"{a.senders} senders, d = {a.dim}, {a.draws} draws: error of the mean")
    print(f"{'sigma':>6} {'sender':>8} {'shared':>8}")
    for sigma in (float(s) for s in a.sigmas.split(",")):
        err = {"sender": 0.0, "shared": 0.0}
        for t in range(a.draws):
            g = torch.randn(a.dim, generator=gen) * torch.rand(a.dim, generator=gen) ** 4
            rms = float(g.norm()) / math.sqrt(a.dim)
            gs = [g + sigma * rms * torch.randn(a.dim, generator=gen) for _ in range(a.senders)]
            for r in err:
                err[r] += mean_error(f"fosgd:rotation={r}", gs, t) / a.draws
        print(f"{sigma:6.2f} {err['sender']:8.3f} {err['shared']:8.3f}")


if __name__ == "__main__":
    main()
