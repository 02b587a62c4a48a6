"""The central contrast of FO-SGD: one-bit quantization with and without flattening.

DESIGN 3.3: without flattening the dithered one-bit quantizer needs lambda >= ||g||_inf
and its variance d lambda^2 - ||g||^2 explodes for sparse g (exactly (d - 1)||g||^2 for a
1-sparse g); with the randomized Hadamard rotation and the ``norm`` scale it is
(2 c^2 ln(2B) B'/B - 1)||g||^2 = O(log d)||g||^2 (B the rotation block, B' = d).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ..compressors import compressor
from .bench import vnmse

METHODS = {
    "onebit (no flattening, max scale)": "onebit:scale=max",
    "fosgd (flattened, norm scale)": "fosgd:scale=norm,c=1,rescale=none",
    "fosgd (flattened, max scale)": "fosgd:scale=max,rescale=none",
}


def sparse_vector(d: int, k: int, seed: int) -> torch.Tensor:
    """A k-sparse vector of length d with Gaussian entries on random coordinates."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(d)
    idx = torch.randperm(d, generator=gen)[:k]
    x[idx] = torch.randn(k, generator=gen)
    return x


def theory_unflattened_1sparse(d: int) -> float:
    """vNMSE of the unflattened max-scale quantizer on a 1-sparse vector: d - 1."""
    return d - 1.0


def theory_fosgd_norm_bound(d: int, c: float = 1.0) -> float:
    """Upper bound on the vNMSE of fosgd's norm scale: c^2 2 ln(2B) d / B - 1 (B <= d < 2B)."""
    b = 1 << (d.bit_length() - 1)
    return c * c * 2 * math.log(2 * b) * d / b - 1


def dimension_sweep(dims: Sequence[int], seeds: int = 20) -> dict[str, list[float]]:
    """vNMSE of each method on a 1-sparse vector as d grows."""
    out: dict[str, list[float]] = {m: [] for m in METHODS}
    for d in dims:
        x = sparse_vector(d, 1, seed=d)
        for label, spec in METHODS.items():
            out[label].append(vnmse(compressor(spec), x, range(seeds)))
    return out


def sparsity_sweep(d: int, ks: Sequence[int], seeds: int = 20) -> dict[str, list[float]]:
    """vNMSE of each method at fixed d as the number of nonzeros k grows to d."""
    out: dict[str, list[float]] = {m: [] for m in METHODS}
    for k in ks:
        x = sparse_vector(d, k, seed=k)
        for label, spec in METHODS.items():
            out[label].append(vnmse(compressor(spec), x, range(seeds)))
    return out


def drawable(label: str, xs, ys) -> tuple[list, list, str]:
    """The points of a series a log-log axis can show (positive and finite), and its label,
    which says what is left out: ``(not drawn: ...)`` when nothing is left."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if 0 < y < math.inf and x > 0]
    gone = len(xs) - len(pts)
    if not pts:
        return [], [], f"{label} (not drawn: no positive finite value on this log axis)"
    if gone:
        label += f" ({gone} of {len(xs)} points <= 0 or not finite, not drawn)"
    return [x for x, _ in pts], [y for _, y in pts], label


def _series(ax, xs, by_label: dict) -> None:
    for label, ys in by_label.items():
        px, py, shown = drawable(label, xs, ys)
        if px:
            ax.loglog(px, py, "o-", label=shown)
        else:  # still in the legend, with why it is not on the axis
            ax.plot([], [], "o-", label=shown)


def plot(dims, by_dim, d_fixed, ks, by_k, path: Path) -> Path:
    """The two panels (vNMSE against d for a 1-sparse vector, against k at ``d_fixed``);
    a series or a point the log axes cannot show is named in the legend, not dropped
    silently."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    _series(ax, dims, by_dim)
    ax.loglog(dims, [theory_unflattened_1sparse(d) for d in dims], "k--", lw=1, label="d - 1")
    ax.loglog(dims, [theory_fosgd_norm_bound(d) for d in dims], "k:", lw=1, label="2 ln(2d) - 1")
    ax.set(xlabel="dimension d", ylabel="vNMSE", title="1-sparse input: variance vs dimension")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    _series(ax, ks, by_k)
    ax.set(xlabel="nonzeros k", ylabel="vNMSE", title=f"d = {d_fixed}: variance vs sparsity")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
