"""One training run, read top to bottom: build, step, log, checkpoint, summarize.

A run folder holds ``config.json`` (the resolved configuration), ``metrics.jsonl`` (one
line per step: loss, step size, bits up and down, wall time split into compute,
compression and communication; evaluation rows every ``eval_every`` steps),
``summary.json``, and ``checkpoint.pt`` (model, every feedback memory, averaging state,
counters, step). ``resume=True`` continues from the checkpoint exactly as an
uninterrupted run would (the randomness is a function of (seed, step, worker)).

Checkpoints are atomic (:mod:`gradzip.checkpoint`: a temporary file, fsync, rename; the
previous one stays until the new one is complete) and written every ``checkpoint_every``
steps, every ``checkpoint_seconds`` (default 60) of the run, at the end, and on SIGINT or
SIGTERM (after the current step; then :class:`RunInterrupted`, exit status 128 + signal).
The metrics rows are flushed and fsynced before each checkpoint, and a resumed run keeps
exactly the rows up to its checkpoint (:mod:`.runfolder`), so a run killed at any instant
resumes with no row lost or repeated.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from pathlib import Path

import torch

from .. import checkpoint, methods
from .._log import get as _logger
from ..compressors.base import NonFiniteError
from ..engines import Algorithm, SimulatedEngine, torchdist
from ..engines.policy import pinned_threads
from ..problems import build
from . import runfolder
from .config import RunConfig, as_dict
from .schedules import Schedule
from .tracking import Reporter, jsonable


def make_method(cfg: RunConfig) -> methods.Method:
    over = {
        k: getattr(cfg, k)
        for k in ("uplink", "uplink_rule", "downlink", "downlink_rule", "dq_range", "dq_decay")
        if getattr(cfg, k)
    }
    return methods.method(cfg.method, **over)


def make_algorithm(cfg: RunConfig, dim: int) -> Algorithm:
    """The step of the run: its method and the server's optimizer."""
    return Algorithm(
        make_method(cfg), dim, seed=cfg.seed, momentum=cfg.momentum, nesterov=cfg.nesterov,
        optimizer=cfg.optimizer, weight_decay=cfg.weight_decay, nonfinite=cfg.nonfinite,
    )  # fmt: skip


def make_problem(cfg: RunConfig):
    return build(
        cfg.problem, cfg.data or None, workers=cfg.workers, split=cfg.split,
        batch_size=cfg.batch_size, l2=None if cfg.l2 < 0 else cfg.l2, seed=cfg.seed,
        hidden=cfg.hidden,
    )  # fmt: skip


def build_from_config(text: str):
    """A torch.distributed worker's ``(problem, algorithm)`` from the run's configuration
    (JSON text): the ``build`` of :class:`gradzip.engines.torchdist.Job`."""
    cfg = RunConfig().replace(**json.loads(text))
    problem = make_problem(cfg)
    return problem, make_algorithm(cfg, problem.dim)


def make_job(cfg: RunConfig) -> torchdist.Job:
    """What every rank of a torch.distributed run needs."""
    text = json.dumps(as_dict(cfg))
    return torchdist.Job(
        cfg.engine, cfg.workers, cfg.seed, text, build_from_config, framing=cfg.framing,
        timeout=cfg.timeout, threads=cfg.threads,
    )  # fmt: skip


def make_schedule(cfg: RunConfig, problem) -> Schedule:
    lam = cfg.lam or problem.l2
    return Schedule(cfg.schedule, cfg.lr, lam, cfg.shift, cfg.steps)


class RunInterrupted(Exception):
    """SIGINT or SIGTERM stopped a run after its final checkpoint (the message says where
    it is and how to continue); ``code`` is the exit status, 128 + the signal's number."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class _Signals:
    """SIGINT and SIGTERM, while a run steps: the first sets :attr:`got` (the loop then
    checkpoints and stops after the current step), a second one stops at once with
    KeyboardInterrupt (the previous checkpoint stays, being replaced atomically). Only
    in the main thread, where Python delivers signals; elsewhere they keep their handlers."""

    def __init__(self):
        self.got: int | None = None
        self.old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.got is not None:
            raise KeyboardInterrupt
        self.got = signum

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def train(
    cfg: RunConfig,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    note: str | None = None,
) -> dict:
    """Run ``cfg`` into its folder ``cfg.out`` and return the summary.

    A new run refuses a folder holding a finished or interrupted run unless ``overwrite``;
    ``resume`` continues from its checkpoint (see :mod:`.runfolder`; every check happens
    before any file is written). Checkpoints: every ``checkpoint_every`` steps and every
    ``checkpoint_seconds`` of training, at the end, and on SIGINT/SIGTERM (then
    :class:`RunInterrupted` is raised). ``note`` (the command line's "resuming ...,
    changed: ...") is logged once the checks have passed."""
    if cfg.engine in torchdist.ENGINES and torchdist.worker_rank() > 0:
        return torchdist.serve(
            make_job(cfg)
        )  # a torchrun rank > 0: a worker; rank 0 writes the run
    out = Path(cfg.out)
    start = runfolder.prepare(cfg, resume, overwrite)  # reads only
    problem = make_problem(cfg)
    method = make_method(cfg)
    schedule = make_schedule(cfg, problem)
    algo = make_algorithm(cfg, problem.dim)
    if cfg.engine == "simulated":
        engine = SimulatedEngine(problem, algo, cfg.workers, seed=cfg.seed)
    elif cfg.engine in torchdist.ALL:
        engine = torchdist.make_engine(make_job(cfg), problem, algo)  # starts the workers
    else:
        valid = ", ".join(("simulated", *torchdist.ALL))
        raise ValueError(f"unknown engine {cfg.engine!r}; valid: {valid}")
    try:
        if start is not None:
            try:
                engine.load_state_dict(start.state["engine"])
            except (ValueError, KeyError) as e:
                raise ValueError(f"{out / runfolder.CHECKPOINT}: {e}") from None
        if note:
            _logger("train").info(note)
        resolved = runfolder.resolved_config(cfg, method, problem.dim)
        metrics = runfolder.begin(out, resolved, start, overwrite)
        try:
            with pinned_threads(cfg.threads):  # as in every process of the run
                return _run(cfg, start, progress, out, problem, schedule, engine, metrics)
        finally:
            metrics.close()
    finally:  # stop the workers: at the end, on an error, on Ctrl-C
        if hasattr(engine, "close"):
            engine.close()


def _run(cfg, start, progress, out, problem, schedule, engine, metrics) -> dict:
    for note in start.notes if start is not None else ():
        _logger("train").warning(f"gradzip: note: {note}")
    first, avg, last = 0, None, None
    totals = {"cum_bits_up": 0, "cum_bits_down": 0, "cum_time": 0.0}
    if start is not None:
        first, totals, avg = start.step, start.state["totals"], start.state.get("average")
        last = start.last_eval
    ckpt = out / runfolder.CHECKPOINT
    saved = {"step": first if start is not None else None, "at": time.monotonic()}

    def save(step: int) -> None:
        runfolder.sync(metrics)  # the rows up to ``step`` first: on disk whenever it is
        checkpoint.save(
            {
                "config": as_dict(cfg), "engine": engine.state_dict(), "step": step,
                "totals": totals, "average": avg,
            },
            ckpt,
        )  # fmt: skip
        saved.update(step=step, at=time.monotonic())

    def due(t: int) -> bool:
        return (
            t == cfg.steps
            or (cfg.checkpoint_every and t % cfg.checkpoint_every == 0)
            or (cfg.checkpoint_seconds and time.monotonic() - saved["at"] >= cfg.checkpoint_seconds)
        )

    def evaluate(step: int) -> dict:
        x = engine.x if avg is None else avg["x"]
        row = jsonable({"step": step, "eval": True, **problem.evaluate(x), **totals})
        bar.evaluation(row)
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        return row

    def interrupted(signum: int, t: int) -> RunInterrupted:
        name = signal.Signals(signum).name
        try:
            save(t)
            where = f"checkpoint at step {t} in {ckpt}"
        except Exception as e:  # e.g. the workers got the signal too
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            where = f"the final checkpoint failed ({first_line}); " + (
                f"{ckpt} holds step {saved['step']}" if saved["step"] else "no checkpoint"
            )
        return RunInterrupted(
            f"interrupted by {name} after step {t}: {where}; continue with: "
            f"gradzip train --out {out} --resume",
            128 + signum,
        )

    bar = Reporter(cfg.steps, f"{cfg.method:>16}", progress, first)  # and TensorBoard
    if start is None:
        last = evaluate(0)
    diverged = None
    with _Signals() as sig:
        for t in range(first, cfg.steps):
            lr = schedule(t)
            try:
                s = engine.step(t, lr)
            except NonFiniteError as e:  # a gradient overflowed: the run diverged
                diverged = {"diverged_at": t, "reason": str(e)}
                break
            totals["cum_bits_up"] += s.bits_up
            totals["cum_bits_down"] += s.bits_down
            totals["cum_time"] += s.t_compute + s.t_compress + s.t_comm
            if s.skipped:  # nonfinite="skip": every rank dropped this step's update
                totals["skipped_steps"] = totals.get("skipped_steps", 0) + 1
            w = schedule.averaging_weight(t)
            if w is not None:  # weighted iterate averaging (Mem-SGD)
                if avg is None:
                    avg = {"x": engine.x.clone(), "w": w}
                else:
                    avg["w"] += w
                    avg["x"] += (w / avg["w"]) * (engine.x - avg["x"])
            row = {
                "step": t, "lr": lr, "loss": jsonable(s.loss), "bits_up": s.bits_up,
                "bits_down": s.bits_down, "t_compute": s.t_compute,
                "t_compress": s.t_compress, "t_comm": s.t_comm,
                **({"skipped": s.skipped} if s.skipped else {}),
            }  # fmt: skip
            metrics.write(json.dumps(row) + "\n")
            bar.step(row, totals)
            if not s.skipped and not (
                math.isfinite(s.loss) and bool(torch.isfinite(engine.x).all())
            ):
                diverged = {"diverged_at": t + 1, "reason": "loss or parameters not finite"}
                break
            if (cfg.eval_every and (t + 1) % cfg.eval_every == 0) or t + 1 == cfg.steps:
                last = evaluate(t + 1)
            if sig.got is not None and t + 1 < cfg.steps:
                bar.update(t + 1, "interrupted")
                raise interrupted(sig.got, t + 1)
            if due(t + 1):
                save(t + 1)
            bar.update(t + 1, f"loss {s.loss:.4f}")
    if diverged is not None:  # stop this run, keep what it measured; no checkpoint
        last = evaluate(diverged["diverged_at"])
        bar.update(cfg.steps, f"diverged at step {diverged['diverged_at']}")
        _logger("train").warning(
            f"{cfg.method}: diverged at step {diverged['diverged_at']} "
            f"({diverged['reason']}); try a smaller --lr"
        )
        summary = {"method": cfg.method, "problem": cfg.problem, "steps": cfg.steps, **last}
        summary.update(diverged)
        checkpoint.write_text(out / runfolder.SUMMARY, json.dumps(summary, indent=2))
        return summary
    if last is None or last["step"] != cfg.steps:  # resumed at its last step, not evaluated
        last = evaluate(cfg.steps)
    if saved["step"] != cfg.steps:
        save(cfg.steps)
    runfolder.sync(metrics)
    summary = {"method": cfg.method, "problem": cfg.problem, "steps": cfg.steps, **last}
    checkpoint.write_text(out / runfolder.SUMMARY, json.dumps(summary, indent=2))
    return summary


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(step rows, evaluation rows) of a run folder."""
    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if not r.get("eval")], [r for r in rows if r.get("eval")]
