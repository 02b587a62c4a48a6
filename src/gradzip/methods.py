"""Method presets: a name expands to uplink and downlink compressors and feedback rules.

A method is the four choices of DESIGN 3.4: the workers' compressor and rule (uplink) and
the server's compressor and rule (downlink). Every part can be overridden:
``method("memsgd-topk", uplink="topk:k=0.001")``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from . import feedback
from .compressors import Compressor, compressor
from .compressors.onebit import PAPER_FOSGD

CAPPED_FOSGD = "fosgd:rescale=capped"  # gradzip's fosgd whose scale keeps it a contraction
# k a count, not a fraction: every shard sends its 5400 largest coordinates, so a small
# bucket's shards (the DDP example's convolutions: 1200 each) go whole and its large ones
# sparse (0.67% of the 808k of each classifier shard); 0.097 bit/coord there (docs/ddp.md)
SUBBIT = "topk_compact:k=5400,values=fp4"


@dataclass(frozen=True)
class Method:
    """Who sends what. Compressors are spec strings (see gradzip.compressors.registry)."""

    uplink: str = "identity"  # workers -> server
    uplink_rule: str = "none"  # none | ef | dq | auto (ef where the compressor contracts)
    downlink: str = "identity"  # server -> workers
    downlink_rule: str = "none"  # none | ef | auto
    # DQ-GD only: the quantizer's range r_t = dq_range * dq_decay**t, fixed in advance
    dq_range: float = 1.0
    dq_decay: float = 1.0

    def __post_init__(self):
        for side in ("uplink", "downlink"):  # auto: resolved here, as the DDP hook does
            if getattr(self, side + "_rule") == "auto":
                object.__setattr__(
                    self, side + "_rule", feedback.auto(compressor(getattr(self, side)))
                )
        ur, dr = self.up_rule, self.down_rule  # unknown names: a clear error
        up = compressor(self.uplink)  # validates the specs early, with a clear error
        down = compressor(self.downlink)
        ur.check(up, "uplink")
        dr.check(up, "uplink")
        feedback.check_feedback(ur, up, "uplink")
        feedback.check_feedback(dr, down, "downlink")
        if not (self.dq_range > 0 and 0 < self.dq_decay <= 1):
            raise ValueError("dq_range must be > 0 and dq_decay in (0, 1]")

    @property
    def up_rule(self) -> feedback.Rule:
        return feedback.rule(self.uplink_rule)

    @property
    def down_rule(self) -> feedback.Rule:
        return feedback.rule(self.downlink_rule)

    def uplink_at(self, t: int) -> Compressor:
        """The uplink compressor at step t (DQ-GD: its range r_t, fixed in advance)."""
        return self.up_rule.compressor_at(compressor(self.uplink), t, self)

    def uplink_compressor(self) -> Compressor:
        return compressor(self.uplink)

    def downlink_compressor(self) -> Compressor:
        return compressor(self.downlink)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# name -> (uplink, uplink_rule, downlink, downlink_rule); built (and validated) on use
PRESETS: dict[str, tuple[str, str, str, str]] = {
    "sgd": ("identity", "none", "identity", "none"),
    "fosgd": ("fosgd", "none", "fosgd", "none"),
    "fosgd-up": ("fosgd", "none", "identity", "none"),
    "fosgd-paper": (PAPER_FOSGD, "none", PAPER_FOSGD, "none"),
    "fosgd-ef": (CAPPED_FOSGD, "ef", CAPPED_FOSGD, "ef"),
    "onebit": ("onebit:scale=max", "none", "onebit:scale=max", "none"),
    "memsgd-topk": ("topk:k=0.01", "ef", "identity", "none"),
    "memsgd-randk": ("randk:k=0.01", "ef", "identity", "none"),
    "ef-signsgd": ("scaled_sign", "ef", "identity", "none"),
    "signsgd": ("scaled_sign", "none", "scaled_sign", "none"),
    "qsgd": ("qsgd:levels=16", "none", "identity", "none"),
    "natural": ("natural", "none", "natural", "none"),
    "topk-natural-ef": (
        "compose(topk(k=0.01),natural_dithering(levels=8))",
        "ef",
        "identity",
        "none",
    ),
    "drive": ("drive", "none", "drive", "none"),
    "dqgd": ("uniform(bits=2.0,flatten=true)", "dq", "identity", "none"),
    "subbit": (SUBBIT, "ef", SUBBIT, "ef"),
}

DESCRIPTIONS = {
    "sgd": "uncompressed parameter-server SGD (float32 both ways)",
    "fosgd": "FO-SGD: flattened one-bit both directions, gradzip's fitted scale",
    "fosgd-up": "FO-SGD on the uplink only",
    "fosgd-paper": "FO-SGD as in the paper: norm scale rule (Stollenwerk & Jacques)",
    "fosgd-ef": "FO-SGD with error feedback both ways (capped scale: a contraction); "
    "with gradzip.optim.Adam, the Adam recipe",
    "onebit": "dithered one-bit without flattening, both directions",
    "memsgd-topk": "Mem-SGD: top-1% with error feedback (Stich et al.)",
    "memsgd-randk": "Mem-SGD: rand-1% with error feedback",
    "ef-signsgd": "EF-signSGD: scaled sign with error feedback (Karimireddy et al.)",
    "signsgd": "signSGD with majority vote (Bernstein et al.), votes and result scaled by "
    "mean |g| so that it trains at SGD's step sizes (the paper's: uplink/downlink sign)",
    "qsgd": "QSGD, 16 levels (Alistarh et al.)",
    "natural": "natural compression both directions (Horvath et al.)",
    "topk-natural-ef": "top-1% + natural dithering with error feedback (Beznosikov et al.)",
    "drive": "DRIVE rotated sign both directions (Vargaftik et al.)",
    "dqgd": "DQ-GD: 2 bits/dim flattened uniform quantizer, shrinking range (Lin et al.)",
    "subbit": "below 0.1 bit/coord: the 5400 largest of each vector (all of a shorter one) "
    "with Elias-Fano indices and 4-bit values, error feedback both ways (docs/ddp.md)",
}


def method(name: str | Method, **overrides) -> Method:
    """A preset by name, with any field overridden."""
    if isinstance(name, Method):
        return replace(name, **overrides) if overrides else name
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(PRESETS)}")
    valid = {f.name for f in fields(Method)}
    bad = set(overrides) - valid
    if bad:
        raise ValueError(f"unknown method field(s) {sorted(bad)}; valid: {sorted(valid)}")
    parts = dict(
        zip(("uplink", "uplink_rule", "downlink", "downlink_rule"), PRESETS[name], strict=True)
    )
    return Method(**(parts | overrides))
