"""What the DDP hook sends: a method preset or compressor spec resolved into the uplink and
downlink compressors and their feedback rules (:func:`resolve`), checked for the hook; the
models it refuses (:func:`refuse_fsdp`)."""

from __future__ import annotations

from dataclasses import dataclass

from . import feedback
from .compressors import compressor
from .methods import PRESETS

LAYOUTS = ("sharded", "allgather")


@dataclass(frozen=True)
class Config:
    """What the hook sends (the resolved spec)."""

    uplink: str
    uplink_rule: str
    downlink: str
    downlink_rule: str
    layout: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def resolve(spec, uplink_rule, downlink, downlink_rule, layout) -> Config:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"expected a method preset or compressor spec, got {spec!r}")
    if spec in PRESETS:
        up, ur, down, dr = PRESETS[spec]
    else:
        up, ur, down, dr = spec, "auto", spec, "auto"
    ur = ur if uplink_rule is None else uplink_rule
    down = down if downlink is None else downlink
    dr = dr if downlink_rule is None else downlink_rule
    for what, rule in (("uplink_rule", ur), ("downlink_rule", dr)):
        if rule == "auto":
            continue
        if rule not in feedback.RULES:
            valid = ", ".join((*feedback.RULES, "auto"))
            raise ValueError(f"unknown {what} {rule!r}; valid: {valid}")
        if feedback.rule(rule).needs_gradient_point:
            raise ValueError(
                f"{what}: the {rule} rule takes the gradient at a corrected point, which "
                "a comm hook cannot do; use the gradzip train engines for it"
            )
    cu, cd = compressor(up), compressor(down)  # the registry's error for a bad spec
    ur = _auto(cu) if ur == "auto" else ur
    dr = _auto(cd) if dr == "auto" else dr
    feedback.check_feedback(ur, cu, "gradzip.ddp uplink")
    if layout != "allgather":
        feedback.check_feedback(dr, cd, "gradzip.ddp downlink")
    if layout == "allgather":
        down, dr = "identity", "none"  # nothing is sent down
    return Config(cu.spec, ur, cd.spec, dr, layout)


_auto = feedback.auto  # the engines' Method resolves ``auto`` the same way


def refuse_fsdp(model) -> None:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel | FSDPModule):
        raise TypeError(
            f"gradzip.ddp's hook is for DistributedDataParallel, not {type(model).__name__} "
            "(FSDP calls comm hooks with other arguments); for FSDP2 (fully_shard) use "
            "gradzip.fsdp.register; FSDP1 is not supported"
        )
