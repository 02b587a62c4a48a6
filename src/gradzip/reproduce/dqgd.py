"""Lin, Kostina & Hassibi, "Differentially Quantized Gradient Descent" (DQ-GD).

Least squares f(x) = ||A x - b||^2 / (2 m), L and mu the extreme eigenvalues of A^T A / m,
step eta = 2 / (L + mu), sigma = (L - mu) / (L + mu). For R bits per dimension:

- DQ-GD (DESIGN 3.4, the ``dq`` rule of :mod:`gradzip.feedback`): z_t = x_t + eta e_{t-1};
  u_t = grad f(z_t) - e_{t-1}; q_t = Q_t(u_t); e_t = q_t - u_t; x_{t+1} = x_t - eta q_t.
  Q_t covers the ball of radius r_t = r_0 kappa^t fixed in advance, kappa =
  min(1, max(sigma, rho 2^-R)), r_0 = ||grad f(x_0)|| (one float, sent once);
- naive: x_{t+1} = x_t - eta Q(grad f(x_t)), the range r_t = ||grad f(x_t)|| sent with
  every message (a favourable, adaptive naive quantizer).

Q is gradzip's ``uniform`` scalar quantizer (same Bresenham bit allocation for fractional
R, same cells and clipping): its reference (:func:`gradzip.compressors.uniform.cell_index`
and ``cell_centre``) run in float64, because contraction rates over many steps reach 1e-10
relative errors, below float32's precision; the DQ-GD loop is :mod:`gradzip.feedback`'s
``dq`` rule:

- ``cube``: the ball of radius r is put in the cube [-r, r]^n (rho = sqrt(n));
- ``flat``: a randomized Hadamard rotation (n padded to D = 2^ceil(log2 n), fresh signs
  per step and seed) flattens u, so the cube's half side can shrink to
  r sqrt(2 ln(2D) / D) (coordinates beyond it are clipped and counted), and the floor(R n)
  bits are spread over the D rotated coordinates: rho = sqrt(2 ln 2D).

The empirical rate is (||x_T - x*|| / ||x_0 - x*||)^(1/T), averaged over seeds (the seed
draws x_0 and the rotation signs).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import feedback, hadamard
from ..compressors import uniform
from ..problems import datasets
from .report import Claim, Section, fmt, grade, md_table, pyplot, savefig

DQ = feedback.rule("dq")  # DQ-GD's memory: gradient at z_t, u_t = g(z_t) - e_{t-1}


@dataclass(frozen=True)
class Config:
    m: int = 500  # synthetic rows
    n: int = 116  # synthetic columns
    dof: float = 2.5  # Student-t degrees of freedom of A's entries (heavy tails)
    rates: tuple[float, ...] = (
        0.1,
        0.25,
        0.5,
        0.75,
        1.0,
        1.5,
        2.0,
        2.5,
        3.0,
        3.25,
        3.5,
        3.75,
        4.0,
        4.25,
        4.5,
        5.0,
    )
    seeds: int = 5
    steps_synthetic: int = 0  # 0: enough for GD to gain 1e-8
    steps_real: int = 1500
    seed: int = 0


QUICK = Config(rates=(0.5, 2.0, 3.5, 5.0), seeds=2, steps_real=300)
FULL = Config()


@dataclass
class LSQ:
    name: str
    A: np.ndarray
    b: np.ndarray
    L: float
    mu: float
    x_star: np.ndarray

    @property
    def n(self) -> int:
        return self.A.shape[1]

    @property
    def eta(self) -> float:
        return 2.0 / (self.L + self.mu)

    @property
    def sigma(self) -> float:
        return (self.L - self.mu) / (self.L + self.mu)

    def grad(self, x: np.ndarray) -> np.ndarray:
        return self.A.T @ (self.A @ x - self.b) / len(self.b)


def make(name: str, A: np.ndarray, b: np.ndarray) -> LSQ:
    H = A.T @ A / len(b)
    ev = np.linalg.eigvalsh(H)
    x_star = np.linalg.solve(H, A.T @ b / len(b))
    return LSQ(name, A, b, float(ev[-1]), float(ev[0]), x_star)


def synthetic(cfg: Config) -> LSQ:
    rng = np.random.default_rng(cfg.seed)
    A = rng.standard_t(cfg.dof, size=(cfg.m, cfg.n))
    b = A @ rng.standard_normal(cfg.n) + 0.1 * rng.standard_normal(cfg.m)
    return make(f"synthetic {cfg.m}x{cfg.n} (Student-t({cfg.dof:g}) entries)", A, b)


def diabetes() -> LSQ:
    ds = datasets.load_diabetes()
    A = ds.X.double().numpy()
    A = np.hstack([A, np.ones((len(A), 1))])
    return make(
        f"diabetes {A.shape[0]}x{A.shape[1]} (scikit-learn, with bias)", A, ds.y.double().numpy()
    )


# --- the quantizer -------------------------------------------------------------------------


def widths(d: int, rate: float) -> np.ndarray:
    """Bits per coordinate: floor((i+1) R) - floor(i R), gradzip's ``uniform`` allocation."""
    return uniform.widths(d, rate).numpy()


def quantize(y: np.ndarray, w: np.ndarray, half: float) -> tuple[np.ndarray, int]:
    """Cells of [-half, half] per coordinate (2^w_i of them), centres; clipped count.

    gradzip's ``uniform`` reference, run in the dtype of ``y`` (float64 here)."""
    clipped = int((np.abs(y) > half).sum())
    yt, wt = torch.from_numpy(y), torch.as_tensor(w)
    return uniform.cell_centre(uniform.cell_index(yt, wt, half), wt, half).numpy(), clipped


def walsh_hadamard(D: int) -> np.ndarray:
    """The orthonormal D x D Walsh-Hadamard matrix (natural order), from gradzip's transform.
    D <= 128 here: a matrix product is as fast as butterflies, and it keeps the bits of the
    published numbers (a butterfly transform rounds differently)."""
    H = hadamard.fwht_reference(torch.eye(D, dtype=torch.float64)).numpy()  # entries +-1
    return H / math.sqrt(D)


class Quantizer:
    """Q(u; r): a ball of radius r, covered by a cube (optionally after flattening)."""

    def __init__(self, n: int, rate: float, flat: bool):
        self.n, self.rate, self.flat = n, rate, flat
        self.D = 1 << max(0, math.ceil(math.log2(n))) if flat else n
        self.w = uniform.widths(self.D, rate * n / self.D)  # floor(R n) bits in all
        self.H = walsh_hadamard(self.D) if flat else None
        self.rho = math.sqrt(2 * math.log(2 * self.D)) if flat else math.sqrt(n)
        self.shrink = math.sqrt(2 * math.log(2 * self.D) / self.D) if flat else 1.0
        self.clipped = 0
        self.sent = 0

    def __call__(self, u: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
        self.sent += 1
        if not self.flat:
            q, c = quantize(u, self.w, r)
            self.clipped += c
            return q
        s = rng.choice((-1.0, 1.0), self.D)
        y = self.H @ (s * np.concatenate([u, np.zeros(self.D - self.n)]))
        q, c = quantize(y, self.w, r * self.shrink)
        self.clipped += c
        return (s * (self.H @ q))[: self.n]


# --- the two algorithms --------------------------------------------------------------------


def rate_of(err0: float, errT: float, T: int) -> float:
    if not math.isfinite(errT) or errT > 1e30:
        return math.inf
    return (max(errT, 1e-300) / err0) ** (1.0 / T)


def descend(grad, Q, x0: np.ndarray, eta: float, r: float, kappa: float, T: int, rng):
    """x_T of DQ-GD: gradzip's ``dq`` feedback rule with the quantizer Q on the ball of
    radius r kappa^t, in the dtype of x0 (``grad`` and ``Q`` take and return arrays)."""
    x = torch.from_numpy(x0.copy())
    state = feedback.FeedbackState(torch.zeros_like(x))  # e_{-1} = 0
    for _ in range(T):
        z = DQ.gradient_point(x, eta, state)  # z_t = x_t + eta e_{t-1}
        u = DQ.prepare(torch.from_numpy(grad(z.numpy())), eta, state)
        q = torch.from_numpy(Q(u.numpy(), r, rng))
        state = DQ.update(state, u, q)  # e_t = q_t - u_t
        x = x - eta * q
        r *= kappa
    return x.numpy()


def dqgd(p: LSQ, Q: Quantizer, x0: np.ndarray, T: int, rng) -> float:
    kappa = min(1.0, max(p.sigma, Q.rho * 2.0**-Q.rate))
    r = float(np.linalg.norm(p.grad(x0)))
    with np.errstate(all="ignore"):
        x = descend(p.grad, Q, x0, p.eta, r, kappa, T, rng)
    return rate_of(np.linalg.norm(x0 - p.x_star), float(np.linalg.norm(x - p.x_star)), T)


def naive(p: LSQ, Q: Quantizer, x0: np.ndarray, T: int, rng) -> float:
    eta, x = p.eta, x0.copy()
    with np.errstate(all="ignore"):
        for _ in range(T):
            g = p.grad(x)
            r = float(np.linalg.norm(g))
            if not math.isfinite(r) or r == 0:
                break
            x = x - eta * Q(g, r, rng)
    return rate_of(np.linalg.norm(x0 - p.x_star), float(np.linalg.norm(x - p.x_star)), T)


def sweep(p: LSQ, cfg: Config, T: int) -> dict:
    """Mean rate over seeds for every (algorithm, quantizer, R)."""
    out = {"rates": list(cfg.rates), "T": T}
    for flat in (False, True):
        qn = "flat" if flat else "cube"
        for algo, fn in (("dqgd", dqgd), ("naive", naive)):
            vals, clip = [], []
            for R in cfg.rates:
                rs, c, sent = [], 0, 0
                for s in range(cfg.seeds):
                    rng = np.random.default_rng([cfg.seed, s, int(R * 1000), flat])
                    x0 = p.x_star + rng.standard_normal(p.n) * max(1.0, np.abs(p.x_star).max())
                    Q = Quantizer(p.n, R, flat)
                    rs.append(fn(p, Q, x0, T, rng))
                    c, sent = c + Q.clipped, sent + Q.sent
                vals.append(float(np.mean(rs)) if all(map(math.isfinite, rs)) else math.inf)
                clip.append(c / max(sent * Q.D, 1))
            out[f"{algo}-{qn}"] = vals
            out[f"{algo}-{qn}-clipped"] = clip
        out[f"rho-{qn}"] = Quantizer(p.n, 1.0, flat).rho
    return out


# --- claims --------------------------------------------------------------------------------


def curves(sigma: float, rho: float, rates) -> dict[str, list[float]]:
    return {
        "rate function max(sigma, 2^-R)": [max(sigma, 2.0**-R) for R in rates],
        "max(sigma, rho 2^-R)": [max(sigma, rho * 2.0**-R) for R in rates],
        "sigma + rho 2^-R": [sigma + rho * 2.0**-R for R in rates],
    }


def _claims(results: dict[str, dict], probs: dict[str, LSQ]) -> list[Claim]:
    claims = []
    # 1. DQ-GD achieves max(sigma, rho 2^-R) and sigma once R >= log2(rho / sigma)
    checks, detail = [], []
    for name, res in results.items():
        sig = probs[name].sigma
        for qn in ("cube", "flat"):
            rho = res[f"rho-{qn}"]
            bound = [max(sig, rho * 2.0**-R) for R in res["rates"]]
            meas = res[f"dqgd-{qn}"]
            ok = [m <= 1.02 * b for m, b in zip(meas, bound, strict=True) if b < 1]
            r_star = math.log2(rho / sig)
            at = [m for R, m in zip(res["rates"], meas, strict=True) if R >= r_star]
            sig_ok = [abs(m - sig) <= 0.02 * sig for m in at]
            checks.append((ok, sig_ok))
            worst = max((m / b for m, b in zip(meas, bound, strict=True) if b < 1), default=0)
            detail.append(
                f"{name.split()[0]}/{qn}: worst measured/bound {fmt(worst)}, "
                f"at R >= {fmt(r_star, 2)}: {sum(sig_ok)}/{len(at)} at sigma"
            )
    n_ok = sum(sum(a) + sum(b) for a, b in checks)
    n_all = sum(len(a) + len(b) for a, b in checks)
    claims.append(
        Claim(
            "dqgd-rate",
            "DQ-GD contracts at max(sigma, rho 2^-R) and at sigma once R >= log2(rho / sigma)",
            "for every R where max(sigma, rho 2^-R) < 1, the mean measured rate is <= 1.02x that "
            "bound, and for every R >= log2(rho/sigma) it is within 2% of sigma (both "
            "quantizers, both problems): holds if all checks pass, partly if >= 80% do",
            grade(n_ok == n_all, n_ok >= 0.8 * n_all),
            {"passed": n_ok, "checks": n_all},
            f"{n_ok}/{n_all} checks pass; " + "; ".join(detail),
        )
    )
    # 2. the naive quantizer does not
    gaps, detail = [], []
    for name, res in results.items():
        sig = probs[name].sigma
        for qn in ("cube", "flat"):
            r_star = math.log2(res[f"rho-{qn}"] / sig)
            pairs = [
                (n_, d_)
                for R, n_, d_ in zip(
                    res["rates"], res[f"naive-{qn}"], res[f"dqgd-{qn}"], strict=True
                )
                if R >= r_star
            ]
            worse = [n_ > 1.02 * d_ for n_, d_ in pairs]
            gaps.append(any(worse))
            mx = max((n_ / d_ for n_, d_ in pairs), default=math.nan)
            detail.append(
                f"{name.split()[0]}/{qn}: naive/DQ-GD up to {fmt(mx)} at R >= {fmt(r_star, 2)}"
            )
    claims.append(
        Claim(
            "naive",
            "the naive quantizer (quantizing the gradient itself) does not achieve it",
            "at some R >= log2(rho/sigma) (where DQ-GD is at sigma) the naive rate is > 1.02x "
            "DQ-GD's: holds if so for every (problem, quantizer), partly if for some",
            grade(all(gaps), any(gaps)),
            {"naive_worse": gaps},
            "; ".join(detail),
        )
    )
    # 3. flattening moves DQ-GD closer to the rate function
    better, detail = [], []
    for name, res in results.items():
        rf = [max(probs[name].sigma, 2.0**-R) for R in res["rates"]]
        gap = {
            qn: float(
                np.mean([min(m, 1.5) - f for m, f in zip(res[f"dqgd-{qn}"], rf, strict=True)])
            )
            for qn in ("cube", "flat")
        }
        better.append(gap["flat"] < gap["cube"])
        detail.append(
            f"{name.split()[0]}: mean gap to the rate function cube "
            f"{fmt(gap['cube'])}, flattened {fmt(gap['flat'])}"
        )
    claims.append(
        Claim(
            "flattening",
            "flattening moves DQ-GD closer to the rate function",
            "mean over R of (measured rate - max(sigma, 2^-R)), rates capped at 1.5: holds if "
            "smaller with flattening on both problems, partly if on one",
            grade(all(better), any(better)),
            {"flat_better": better},
            "; ".join(detail),
        )
    )
    return claims


def _plot(out: Path, name: str, p: LSQ, res: dict) -> str:
    plt = pyplot()
    Rs = res["rates"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, qn in zip(axes, ("cube", "flat"), strict=True):
        rho = res[f"rho-{qn}"]
        for (label, ys), st in zip(
            curves(p.sigma, rho, Rs).items(), ("k-", "k--", "k:"), strict=True
        ):
            ax.plot(Rs, ys, st, lw=1, label=label)
        ax.plot(Rs, [min(v, 1.5) for v in res[f"dqgd-{qn}"]], "o-", label="DQ-GD (measured)")
        ax.plot(Rs, [min(v, 1.5) for v in res[f"naive-{qn}"]], "s-", label="naive (measured)")
        ax.axvline(math.log2(rho / p.sigma), color="gray", lw=0.8)
        title = "scalar quantizer on a cube" if qn == "cube" else "Hadamard-flattened"
        ax.set(
            xlabel="R (bits per dimension)",
            ylim=(p.sigma - 0.1 * (1 - p.sigma) - 0.02, 1.3),
            title=f"{title}, rho = {rho:.2f}",
        )
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("contraction rate (mean over seeds)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{name}: sigma = {p.sigma:.4f}, T = {res['T']} (rates capped at 1.5)")
    fig.tight_layout()
    file = f"dqgd_{name.split()[0]}.png"
    savefig(fig, out / file)
    return file


def reproduce(out: Path, quick: bool = False, progress=print) -> Section:
    cfg = QUICK if quick else FULL
    sec = Section(
        "dqgd",
        "Differentially Quantized Gradient Descent (Lin, Kostina, Hassibi)",
        'C.-Y. Lin, V. Kostina, B. Hassibi, "Achieving the fundamental '
        "convergence-communication tradeoff with Differentially Quantized Gradient "
        'Descent" (2020)',
        {},
        quick=quick,
    )
    probs = {p.name: p for p in (synthetic(cfg), diabetes())}
    results, rows, info = {}, [], {}
    for name, p in probs.items():
        t0 = time.perf_counter()
        if name.startswith("synthetic"):
            T = cfg.steps_synthetic or math.ceil(math.log(1e-8) / math.log(p.sigma))
        else:
            T = cfg.steps_real
        res = sweep(p, cfg, T)
        results[name] = res
        progress(f"dqgd {name}: sigma {p.sigma:.4f}, T {T} ({time.perf_counter() - t0:.1f} s)")
        sec.figures.append(
            (
                _plot(out, name, p, res),
                f"{name}: measured contraction rates against R and the three "
                "curves; the gray line is R = log2(rho / sigma)",
            )
        )
        for i, R in enumerate(res["rates"]):
            rows.append(
                [name.split()[0], R, max(p.sigma, 2.0**-R)]
                + [res[f"{a}-{q}"][i] for q in ("cube", "flat") for a in ("dqgd", "naive")]
                + [res["dqgd-flat-clipped"][i]]
            )
        info[name] = {
            "L": p.L,
            "mu": p.mu,
            "sigma": p.sigma,
            "eta": p.eta,
            "T": T,
            "rho cube": res["rho-cube"],
            "rho flat": res["rho-flat"],
            "log2(rho/sigma) cube": math.log2(res["rho-cube"] / p.sigma),
            "log2(rho/sigma) flat": math.log2(res["rho-flat"] / p.sigma),
        }
    sec.claims = _claims(results, probs)
    sec.tables.append(
        (
            "Measured rates",
            md_table(
                [
                    "problem",
                    "R",
                    "max(sigma,2^-R)",
                    "DQ-GD cube",
                    "naive cube",
                    "DQ-GD flat",
                    "naive flat",
                    "flat clipped fraction",
                ],
                rows,
            ),
        )
    )
    sec.config = {"reproduction": asdict(cfg), "problems": info}
    sec.notes += [
        "The real regression set is scikit-learn's diabetes (442 x 10, standardized, plus a "
        "bias column): its n = 11 makes rho small for both quantizers (sqrt(11) = 3.3 against "
        "sqrt(2 ln 32) = 2.6), so flattening can gain little there.",
        "DQ-GD's range r_t = ||grad f(x_0)|| kappa^t with kappa = min(1, max(sigma, "
        "rho 2^-R)) is fixed in advance, as the paper's analysis prescribes; where kappa = 1 "
        "the range does not shrink and DQ-GD need not converge (rates >= 1 there).",
        "The naive quantizer gets the exact gradient norm as its range every step (32 more "
        "bits per step), which favours it.",
        "The quantizer is gradzip's `uniform` design (fractional R by Bresenham allocation; "
        "with R < 1 some coordinates get no bits and decode to 0), its reference run in "
        "float64; the library's float32 compressor cannot resolve relative errors of 1e-10.",
    ]
    return sec
