"""Run configuration: one frozen dataclass with flat keys (nanoGPT style).

Sources, later ones winning: the defaults, a TOML file, ``--set key=value`` pairs, and
explicit CLI flags. An unknown key or a value of the wrong type is an error naming the key;
every run folder holds the resolved configuration.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class RunConfig:
    problem: str = "mlp-digits"  # see gradzip.problems.PROBLEMS
    data: str = ""  # dataset path, where the problem reads one ("" = its default)
    method: str = "sgd"  # a preset of gradzip.methods
    uplink: str = ""  # overrides of the preset ("" = keep)
    uplink_rule: str = ""
    downlink: str = ""
    downlink_rule: str = ""
    dq_range: float = 0.0  # DQ-GD range r_0 and decay (0 = keep the preset's)
    dq_decay: float = 0.0
    workers: int = 4
    split: str = "iid"  # iid | label
    batch_size: int = 32  # 0 = full gradients
    hidden: int = 128  # MLP width
    l2: float = -1.0  # L2 regularization (-1 = the problem's default)
    steps: int = 300
    schedule: str = "constant"  # constant | memsgd | bottou | cosine
    lr: float = 0.1
    lam: float = 0.0  # schedule's lambda (0 = the problem's L2 constant)
    shift: float = 1.0  # memsgd's a
    momentum: float = 0.0  # server heavy-ball momentum
    nesterov: bool = False  # Nesterov's form of the server momentum
    optimizer: str = "sgd"  # the server's optimizer: sgd | adam | adamw
    weight_decay: float = 0.0  # adamw's decoupled weight decay
    seed: int = 0
    eval_every: int = 25
    engine: str = "simulated"  # simulated | torchdist
    framing: str = "stream"  # torch.distributed engines: stream | payload
    timeout: float = 180.0  # torch.distributed engines: seconds a rank may stay silent
    nonfinite: str = "error"  # NaN or inf in a step: error | skip
    threads: int = 1  # torch's thread count in every process of the run (0 = as set)
    checkpoint_every: int = 0  # steps between checkpoints (0 = by time only)
    checkpoint_seconds: float = 60.0  # seconds between checkpoints (0 = by steps only)
    out: str = "results/run"

    def __post_init__(self):
        """Values out of range are errors naming the key (types are checked on the way in)."""
        bad = {
            "steps": self.steps >= 1,
            "workers": self.workers >= 1,
            "batch_size": self.batch_size >= 0,
            "hidden": self.hidden >= 1,
            "eval_every": self.eval_every >= 0,
            "checkpoint_every": self.checkpoint_every >= 0,
            "checkpoint_seconds": math.isfinite(self.checkpoint_seconds)
            and self.checkpoint_seconds >= 0,
            "lr": math.isfinite(self.lr) and self.lr > 0,
            "l2": math.isfinite(self.l2) and (self.l2 >= 0 or self.l2 == -1),
            "lam": math.isfinite(self.lam) and self.lam >= 0,
            "shift": math.isfinite(self.shift) and self.shift > 0,
            "weight_decay": math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            "dq_range": math.isfinite(self.dq_range) and self.dq_range >= 0,
            "dq_decay": math.isfinite(self.dq_decay) and self.dq_decay >= 0,
            "framing": self.framing in ("stream", "payload"),
            "timeout": math.isfinite(self.timeout) and self.timeout > 0,
            "nonfinite": self.nonfinite in ("error", "skip"),
            "threads": self.threads >= 0,
        }
        for key, ok in bad.items():
            if not ok:
                raise ValueError(f"config key {key!r}: {getattr(self, key)!r} is out of range "
                                 f"({HELP.get(key, '')})")  # fmt: skip

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **_typed(changes))


_FIELDS = {f.name: f for f in fields(RunConfig)}

HELP = {
    "problem": "the training problem (see `gradzip train --problem x` for the list)",
    "data": "dataset path for problems that read one (LIBSVM file, IDX folder)",
    "method": "method preset (`gradzip methods` lists them)",
    "uplink": "override the preset's uplink compressor spec, e.g. topk:k=0.01",
    "uplink_rule": "override the uplink feedback rule: none | ef | dq | auto",
    "downlink": "override the preset's downlink compressor spec",
    "downlink_rule": "override the downlink feedback rule: none | ef | auto",
    "dq_range": "DQ-GD: initial quantizer range r_0 (0 = the preset's)",
    "dq_decay": "DQ-GD: geometric decay of the range per step (0 = the preset's)",
    "workers": "number of workers",
    "split": "how data is split across workers: iid | label",
    "batch_size": "per-worker minibatch size (0 = full gradients)",
    "hidden": "hidden width of the MLPs",
    "l2": "L2 regularization (-1 = the problem's default)",
    "steps": "number of steps",
    "schedule": "step-size schedule: constant | memsgd | bottou | cosine",
    "lr": "base step size (gamma for memsgd, gamma_0 for bottou)",
    "lam": "lambda of the memsgd/bottou schedules (0 = the problem's L2 constant)",
    "shift": "memsgd schedule's shift a in gamma / (lambda (t + a))",
    "momentum": "server heavy-ball momentum (0 = none)",
    "nesterov": "Nesterov momentum on the server (needs momentum > 0)",
    "optimizer": "the server's optimizer on the averaged gradient: sgd | adam | adamw",
    "weight_decay": "adamw's decoupled weight decay",
    "seed": "seed of data order, model init and all compressor randomness",
    "eval_every": "steps between test evaluations (0: only at the end)",
    "engine": "simulated | simulated-sharded | torchdist | torchdist-sharded",
    "framing": "payload framing of the torch.distributed engines: stream (a channel sends "
    "its static header once, then 8 bytes a message) | payload (every message a standalone "
    "payload, as the simulated engines count)",
    "timeout": "torch.distributed engines: seconds a step may wait for a rank before the "
    "run stops and names the rank that did not answer (from the heartbeats), the step and "
    "the phase",
    "nonfinite": "NaN or inf in a gradient, a loss or an update: error (stop, naming the "
    "step, the worker and the first parameter; summary written, exit 1) | skip (every rank "
    "drops the step's update and counts it in skipped_steps, as AMP's GradScaler does)",
    "threads": "torch's intra-op thread count, pinned in every process of the run (results "
    "depend on it: the engines all use this one); 0 = leave torch's setting",
    "checkpoint_every": "steps between checkpoints (0 = by time only); one is always written "
    "at the end and on SIGINT/SIGTERM",
    "checkpoint_seconds": "seconds of running between checkpoints (0 = by steps only)",
    "out": "run folder (config.json, metrics.jsonl, summary.json, checkpoint.pt)",
}


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _convert(key: str, value, typed: bool = False):
    """``value`` as key's type; strings are parsed (``--set``, flags) unless ``typed`` (a
    TOML file, whose values carry their type: ``steps = "5"`` is an error there)."""
    if key not in _FIELDS:
        raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(_FIELDS)}")
    kind = type(_FIELDS[key].default)
    if typed and isinstance(value, str) and kind is not str:
        need = "true or false" if kind is bool else f"a {kind.__name__}"
        raise ValueError(
            f"config key {key!r} needs {need}, got the string {value!r} (TOML: {key} = "
            f"{value.strip()}, without quotes)"
        )
    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {key!r} needs true or false, got {value!r}")
    if isinstance(value, str) and kind is not str:
        try:
            return kind(float(value)) if kind is int and "." not in value else kind(value)
        except ValueError:
            raise ValueError(f"config key {key!r} needs a {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"config key {key!r} needs a {kind.__name__}, got {value!r}")
    return value


def _typed(changes: dict, typed: bool = False) -> dict:
    return {k: _convert(k, v, typed) for k, v in changes.items()}


def load(
    path: str | Path | None = None, sets: list[str] = (), base: RunConfig | None = None, **flags
) -> RunConfig:
    """Defaults (or ``base``: a resumed run's saved configuration) < TOML file <
    ``key=value`` strings < flags (None flags are ignored)."""
    cfg = RunConfig() if base is None else base
    if path:
        p = Path(path)
        if not p.exists():
            raise ValueError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"malformed TOML in {p}: {e}") from None
        cfg = dataclasses.replace(cfg, **_typed(data, typed=True))
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--set takes key=value, got {item!r}")
        cfg = cfg.replace(**{key.strip(): value.strip()})
    return cfg.replace(**{k: v for k, v in flags.items() if v is not None})


def as_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
