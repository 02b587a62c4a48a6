"""Adam for compressed gradients: the second moment frozen after an uncompressed warm-up.

Why: a one-bit compressor adds noise to every coordinate of the averaged gradient. With
flattening that noise is spread evenly (about ``vNMSE ||g||^2 / d`` per coordinate), so
Adam's second moment ``v = EMA(g_hat^2)`` gains a floor that is not in the gradients:
coordinates with small gradients get their step shrunk, and Adam no longer trains like
Adam (measured in the DDP example, 4 ranks, 300 steps, lr 1e-3: 1.4 points of test
accuracy below uncompressed Adam; see docs/ddp.md). The first moment is an average of
noisy but nearly unbiased gradients, and averaging removes most of the noise.

What (Tang et al., "1-bit Adam", ICML 2021; DeepSpeed's ``OnebitAdam``): run ``warmup``
steps uncompressed (the DDP hook's ``start_step``), during which ``v`` is estimated from
clean gradients, then freeze ``v`` and keep updating only the first moment from the
compressed gradients. DeepSpeed also compresses the momentum instead of the gradient;
here the hook keeps compressing gradients (the hook is unchanged) and only the variance
is frozen, which is what removes the noise floor.

Usage with the DDP hook (the two numbers must agree)::

    state = gradzip.ddp.register(model, "fosgd", start_step=50)
    opt = gradzip.optim.Adam(model.parameters(), lr=1e-3, freeze_after=50)

``freeze_after=None`` is exactly Adam (``decoupled=True``: AdamW), which the tests check
against ``torch.optim.Adam`` / ``AdamW``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Adam", "AdamW"]


class Adam(torch.optim.Optimizer):
    """Adam / AdamW whose second moment stops updating after ``freeze_after`` steps.

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: as ``torch.optim.Adam``.
        decoupled: AdamW's decoupled weight decay (``p <- p (1 - lr wd)``) instead of
            Adam's L2 term added to the gradient.
        freeze_after: steps after which ``v`` (``exp_avg_sq``) is frozen, with its bias
            correction; ``None`` never freezes (plain Adam). Match it to the hook's
            ``start_step`` so that ``v`` is estimated from uncompressed gradients.
        floor: once frozen, ``v`` is at least ``floor`` times its mean over the tensor.
            Coordinates whose gradient was zero during the warm-up (inputs from dead ReLU
            units: 5% of the DDP example's classifier after 60 steps) have ``v = 0``;
            plain Adam would raise ``v`` as soon as their gradient appears, a frozen ``v``
            would divide it by ``eps`` (the run measured NaN within 10 steps).

    State per parameter: ``step`` (a float tensor, as torch's), ``exp_avg`` (m) and
    ``exp_avg_sq`` (v), the names of ``torch.optim.Adam``'s state.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        decoupled: bool = False,
        freeze_after: int | None = None,
        floor: float = 0.01,
    ):
        if not (lr >= 0 and eps >= 0 and weight_decay >= 0):
            raise ValueError(
                f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}"
            )
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if freeze_after is not None and (isinstance(freeze_after, bool) or freeze_after < 1):
            raise ValueError(f"freeze_after must be an integer >= 1 or None, got {freeze_after!r}")
        if not floor >= 0:
            raise ValueError(f"floor must be >= 0, got {floor}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decoupled=decoupled, freeze_after=freeze_after, floor=floor)  # fmt: skip
        super().__init__(params, defaults)
        self._frozen_scale: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # not saved

    @torch.no_grad()
    def preconditioner(self, p: torch.Tensor) -> torch.Tensor | None:
        """sqrt(v_hat) of parameter ``p``, floored at ``floor`` times its mean over the
        tensor (None before the first step): the scale Adam divides the step by, which the
        DDP hook can compress in (:meth:`gradzip.ddp.GradzipState.precondition_with`)."""
        st = self.state.get(p)
        if not st:
            return None
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        b2, freeze = group["betas"][1], group["freeze_after"]
        t = int(st["step"].item())
        frozen = freeze is not None and t >= freeze
        hit = self._frozen_scale.get(id(p))
        if frozen and hit is not None and hit[0] is st["exp_avg_sq"]:
            return hit[1]  # v no longer changes: the same tensor every step
        tv = t if freeze is None else min(t, freeze)
        s = (st["exp_avg_sq"] / (1 - b2**tv)).sqrt_()
        floor = max(group["floor"] * float(s.mean()), group["eps"])
        s = s.clamp_(min=floor)
        if frozen:
            self._frozen_scale[id(p)] = (st["exp_avg_sq"], s)
        return s

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            freeze = group["freeze_after"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("gradzip.optim.Adam does not take sparse gradients")
                g = p.grad
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
                t = int(st["step"].item())
                if wd:
                    if group["decoupled"]:
                        p.mul_(1 - lr * wd)
                    else:
                        g = g.add(p, alpha=wd)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.lerp_(g, 1 - b1)  # 1. m <- b1 m + (1 - b1) g
                tv = t if freeze is None else min(t, freeze)
                if tv == t:  # 2. v <- b2 v + (1 - b2) g^2, until frozen
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    if t == freeze and group["floor"]:  # frozen from now on: floored once
                        v.clamp_(min=group["floor"] * float(v.mean()))
                # 3. bias-corrected step: p <- p - lr m_hat / (sqrt(v_hat) + eps)
                step_size = lr / (1 - b1**t)
                denom = (v.sqrt() / math.sqrt(1 - b2**tv)).add_(eps)
                p.addcdiv_(m, denom, value=-step_size)
        return loss


def AdamW(params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 1e-2, *, freeze_after: int | None = None) -> Adam:  # fmt: skip
    """:class:`Adam` with decoupled weight decay (AdamW's defaults)."""
    return Adam(params, lr, betas, eps, weight_decay, decoupled=True, freeze_after=freeze_after)
