"""A run folder's files, checked before anything is written, and kept consistent.

``config.json`` (the resolved configuration), ``metrics.jsonl`` (one JSON row a line),
``checkpoint.pt`` and ``summary.json``. Every whole-file write is atomic
(:mod:`gradzip.checkpoint`); ``metrics.jsonl`` is appended to and flushed (and fsynced)
before every checkpoint, so the rows up to a checkpoint's step are on disk whenever the
checkpoint is.

:func:`prepare` decides, reading only, whether a call may go on: a new run refuses a
folder that holds a finished run (``summary.json``) or an interrupted one
(``checkpoint.pt``) unless told to overwrite; ``resume`` needs a readable checkpoint,
``steps`` at or above its step and the keys that shape the saved state unchanged. The
metrics to keep are the step rows before the checkpoint's step and the evaluation rows up
to and including it; later rows (written after the checkpoint by a run that was then
killed) are dropped, and a damaged last line (a write cut short) is dropped with a note.
A damaged line elsewhere is a one-line error naming the file and the line. Only then does
:func:`begin` write: the configuration, the kept rows (atomically), and it opens the
metrics for appending.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from .. import checkpoint
from .config import RunConfig, as_dict

CHECKPOINT, METRICS = "checkpoint.pt", "metrics.jsonl"
CONFIG, SUMMARY = "config.json", "summary.json"
RESUME_OR_OVERWRITE = "--resume continues the run in --out and --overwrite replaces it: pick one"
CHECKPOINT_KEYS = ("config", "engine", "step", "totals")

#: keys whose change would not fit the checkpoint's state (its shapes, its memories)
FIXED_ON_RESUME = (
    "problem", "workers", "hidden", "method", "uplink", "uplink_rule", "downlink",
    "downlink_rule", "optimizer",
)  # fmt: skip


@dataclass
class Resume:
    """What a resumed run starts from (read by :func:`prepare`, nothing written yet)."""

    step: int
    state: dict  # the checkpoint
    rows: list[str] = field(default_factory=list)  # the metrics lines to keep
    last_eval: dict | None = None  # the evaluation row at ``step``, if there is one
    notes: list[str] = field(default_factory=list)


def _finished_steps(out: Path) -> str:
    try:
        return f", {json.loads((out / SUMMARY).read_text())['steps']} steps"
    except Exception:
        return ""


def check_new(out: Path, overwrite: bool) -> None:
    """Raise ValueError if a new run may not write ``out``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if overwrite:
        return
    if (out / SUMMARY).exists():
        raise ValueError(
            f"{out} holds a finished run ({SUMMARY}{_finished_steps(out)}): pass --overwrite "
            "to replace it, or --resume with a larger --steps to continue it"
        )
    if (out / CHECKPOINT).exists():
        raise ValueError(
            f"{out} holds an interrupted run ({CHECKPOINT}): pass --resume to continue it, "
            "or --overwrite to start over"
        )


def saved_config(out: str | Path) -> RunConfig:
    """The configuration the run in ``out`` was written with (``config.json``, else the
    checkpoint's), with ``out`` set to the folder given here: a moved folder resumes."""
    out = Path(out)
    path, data = out / CONFIG, None
    if path.exists():
        try:
            data = json.loads(path.read_text())["config"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a run configuration ({type(e).__name__}: {e})") from None
    elif (out / CHECKPOINT).exists():
        data = checkpoint.load(out / CHECKPOINT, keys=CHECKPOINT_KEYS)["config"]
    else:
        raise ValueError(f"nothing to resume in {out}: no {CHECKPOINT}")
    known = {f.name for f in fields(RunConfig)}
    known.discard("out")
    return RunConfig().replace(**{k: v for k, v in data.items() if k in known}, out=str(out))


def prepare(cfg: RunConfig, resume: bool, overwrite: bool) -> Resume | None:
    """Check that the call may go on, writing nothing (see the module docstring); the
    resume point, or None for a new run. Errors are one-line ValueErrors."""
    out = Path(cfg.out)
    if resume and overwrite:
        raise ValueError(RESUME_OR_OVERWRITE)
    if not resume:
        check_new(out, overwrite)
        return None
    ckpt = out / CHECKPOINT
    if not ckpt.exists():
        raise ValueError(f"nothing to resume: {ckpt} does not exist")
    sd = checkpoint.load(ckpt, keys=CHECKPOINT_KEYS)
    step = int(sd["step"])
    if cfg.steps < step:
        raise ValueError(
            f"--steps {cfg.steps} is below the step of {ckpt} ({step}): pass --steps {step} "
            "or more (nothing was changed)"
        )
    for key in FIXED_ON_RESUME:
        if key in sd["config"] and sd["config"][key] != getattr(cfg, key):
            raise ValueError(
                f"{key!r} cannot change on --resume ({ckpt} holds the state of {key} = "
                f"{sd['config'][key]!r}, asked {getattr(cfg, key)!r}); start a new run instead"
            )
    rows, last_eval, notes = metrics_until(out / METRICS, step)
    return Resume(step, sd, rows, last_eval, notes)


def elastic_restart(cfg: RunConfig) -> bool:
    """Whether this process is a later attempt of a ``torchrun --max-restarts`` job
    (``TORCHELASTIC_RESTART_COUNT`` > 0) on rank 0 whose folder holds a checkpoint of this
    very configuration (``out`` aside, ``steps`` included): then the same command resumes
    from it instead of starting over. (A checkpoint of an identical configuration is a
    point of the same trajectory, whichever attempt wrote it.)"""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) < 1:
        return False
    if int(os.environ.get("RANK", "0") or 0) != 0:  # the workers follow rank 0
        return False
    ckpt = Path(cfg.out) / CHECKPOINT
    try:
        sd = checkpoint.load(ckpt, keys=CHECKPOINT_KEYS)
    except checkpoint.CheckpointError:
        return False
    mine = {k: v for k, v in as_dict(cfg).items() if k != "out"}
    return {k: v for k, v in sd["config"].items() if k != "out"} == mine


def restart_group(timeout_s: float) -> None:
    """A restarted attempt's process group, with store keys of its own.

    torchrun keeps one store for every attempt of a job (the agent's), and the default
    group publishes each rank's address under the same keys every time, so a rank of a
    restarted attempt can read the address of a rank of the dead one (gloo:
    ``connectFullMesh failed ... Connection refused``) when it gets there first. Called
    on every rank before the engine starts, on a restart (``TORCHELASTIC_RESTART_COUNT`` >
    0) only; the engine then uses this group."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    import torch.distributed as dist

    if attempt < 1 or dist.is_initialized():
        return
    from datetime import timedelta

    timeout = timedelta(seconds=timeout_s)
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"gradzip/attempt{attempt}", store)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)


def _row(line: bytes):
    row = json.loads(line)
    if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        raise ValueError("not a metrics row (no integer 'step')")
    return row


def metrics_until(path: Path, step: int) -> tuple[list[str], dict | None, list[str]]:
    """(the lines to keep, the evaluation row at ``step``, notes) of the metrics file of a
    run resumed at ``step``."""
    if not path.exists():
        return [], None, [f"{path} is missing: the rows before step {step} are lost"]
    lines = path.read_bytes().split(b"\n")
    tail = lines.pop()  # b"" after a final newline, else a line cut short
    if tail:
        lines.append(tail)
    notes, kept, last_eval, count = [], [], None, 0
    for i, line in enumerate(lines, 1):
        try:
            row = _row(line)
        except ValueError as e:
            if i < len(lines):
                raise ValueError(
                    f"{path}, line {i}: damaged ({e}); remove the line and resume again"
                ) from None
            notes.append(f"{path}: dropped a damaged last line ({len(line)} bytes, cut short)")
            break
        if row.get("eval") and row["step"] <= step:
            if row["step"] == step:
                if last_eval is not None:
                    continue  # written twice: keep the first
                last_eval = row
            kept.append(line.decode())
        elif not row.get("eval") and row["step"] < step:
            kept.append(line.decode())
            count += 1
    if count != step:
        notes.append(f"{path} holds {count} step rows before step {step}, not {step}")
    return kept, last_eval, notes


def begin(out: Path, resolved: dict, resume: Resume | None, overwrite: bool):
    """Write the folder's start (after :func:`prepare` and the engine's load succeeded):
    ``config.json``, the kept metrics rows; return the metrics file, open for appending."""
    out.mkdir(parents=True, exist_ok=True)
    stale = [checkpoint.tmp_path(out / n) for n in (CHECKPOINT, METRICS, CONFIG, SUMMARY)]
    if resume is not None or overwrite:  # a resumed run writes its summary at its end
        stale.append(out / SUMMARY)
    if overwrite and resume is None:
        stale.append(out / CHECKPOINT)
    for p in stale:
        p.unlink(missing_ok=True)
    checkpoint.write_text(out / CONFIG, json.dumps(resolved, indent=2))
    rows = resume.rows if resume is not None else []
    checkpoint.write_text(out / METRICS, "".join(r + "\n" for r in rows))
    return (out / METRICS).open("a")


def sync(metrics) -> None:
    """The metrics rows written so far, on disk (before a checkpoint)."""
    metrics.flush()
    os.fsync(metrics.fileno())


def resolved_config(cfg: RunConfig, method, dim: int) -> dict:
    return {"config": as_dict(cfg), "method": method.as_dict(), "dim": dim}
