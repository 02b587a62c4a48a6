"""One training run, read top to bottom: build, step, log, checkpoint, summarize.

A run folder holds ``config.json`` (the resolved configuration), ``metrics.jsonl`` (one
line per step: loss, step size, bits up and down, wall time split into compute,
compression and communication; evaluation rows every ``eval_every`` steps),
``summary.json``, and ``checkpoint.pt`` (model, every feedback memory, averaging state,
counters, step). ``resume=True`` continues from the checkpoint exactly as an
uninterrupted run would (the randomness is a function of (seed, step, worker)).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from .. import methods
from ..compressors.base import NonFiniteError
from ..engines import Algorithm, SimulatedEngine, torchdist
from ..problems import build
from .config import RunConfig, as_dict
from .schedules import Schedule


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
        optimizer=cfg.optimizer, weight_decay=cfg.weight_decay,
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
        cfg.engine, cfg.workers, cfg.seed, text, build_from_config, framing=cfg.framing
    )


def make_schedule(cfg: RunConfig, problem) -> Schedule:
    lam = cfg.lam or problem.l2
    return Schedule(cfg.schedule, cfg.lr, lam, cfg.shift, cfg.steps)


class Progress:
    """A one-line progress bar on stderr (plain lines when not a terminal)."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last = -1

    def update(self, done: int, info: str = "") -> None:
        if not self.enabled:
            return
        pct = int(100 * done / max(self.total, 1))
        if not self.tty and pct // 10 == self.last // 10 and done != self.total:
            return
        self.last = pct
        bar = "#" * (pct // 5) + "." * (20 - pct // 5)
        el = time.perf_counter() - self.t0
        line = f"{self.label} [{bar}] {done}/{self.total} {el:6.1f}s {info}"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr)
        if self.tty and done == self.total:
            print(file=sys.stderr)


def train(cfg: RunConfig, resume: bool = False, progress: bool = True) -> dict:
    if cfg.engine in torchdist.ENGINES and torchdist.worker_rank() > 0:
        return torchdist.serve(
            make_job(cfg)
        )  # a torchrun rank > 0: a worker; rank 0 writes the run
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
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
        return _run(cfg, resume, progress, out, problem, method, schedule, engine)
    finally:  # stop the workers: at the end, on an error, on Ctrl-C
        if hasattr(engine, "close"):
            engine.close()


def _run(cfg, resume, progress, out, problem, method, schedule, engine) -> dict:
    resolved = {"config": as_dict(cfg), "method": method.as_dict(), "dim": problem.dim}
    (out / "config.json").write_text(json.dumps(resolved, indent=2))

    start, totals, avg = 0, {"cum_bits_up": 0, "cum_bits_down": 0, "cum_time": 0.0}, None
    ckpt = out / "checkpoint.pt"
    if resume:
        if not ckpt.exists():
            raise ValueError(f"nothing to resume: {ckpt} does not exist")
        sd = torch.load(ckpt, weights_only=True)
        if sd["config"] != {k: v for k, v in as_dict(cfg).items() if k != "steps"}:
            raise ValueError(f"{ckpt} was written by a different configuration")
        engine.load_state_dict(sd["engine"])
        start, totals, avg = sd["step"], sd["totals"], sd["average"]
    metrics_path = out / "metrics.jsonl"
    lines = metrics_path.read_text().splitlines() if resume and metrics_path.exists() else []
    kept = [ln for ln in lines if json.loads(ln)["step"] < start]
    metrics = metrics_path.open("w")
    metrics.writelines(ln + "\n" for ln in kept)

    def save(step: int) -> None:
        torch.save(
            {
                "config": {k: v for k, v in as_dict(cfg).items() if k != "steps"},
                "engine": engine.state_dict(), "step": step, "totals": totals, "average": avg,
            },
            ckpt,
        )  # fmt: skip

    def evaluate(step: int) -> dict:
        x = engine.x if avg is None else avg["x"]
        row = {"step": step, "eval": True, **problem.evaluate(x), **totals}
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        return row

    bar = Progress(cfg.steps, f"{cfg.method:>16}", progress)
    last = evaluate(start) if start == 0 else None
    diverged = None
    for t in range(start, cfg.steps):
        lr = schedule(t)
        try:
            s = engine.step(t, lr)
        except NonFiniteError as e:  # a gradient overflowed: the run diverged
            diverged = {"diverged_at": t, "reason": str(e)}
            break
        totals["cum_bits_up"] += s.bits_up
        totals["cum_bits_down"] += s.bits_down
        totals["cum_time"] += s.t_compute + s.t_compress + s.t_comm
        w = schedule.averaging_weight(t)
        if w is not None:  # weighted iterate averaging (Mem-SGD)
            if avg is None:
                avg = {"x": engine.x.clone(), "w": w}
            else:
                avg["w"] += w
                avg["x"] += (w / avg["w"]) * (engine.x - avg["x"])
        row = {
            "step": t, "lr": lr, "loss": s.loss, "bits_up": s.bits_up, "bits_down": s.bits_down,
            "t_compute": s.t_compute, "t_compress": s.t_compress, "t_comm": s.t_comm,
        }  # fmt: skip
        metrics.write(json.dumps(row) + "\n")
        if not (math.isfinite(s.loss) and bool(torch.isfinite(engine.x).all())):
            diverged = {"diverged_at": t + 1, "reason": "loss or parameters not finite"}
            break
        if (cfg.eval_every and (t + 1) % cfg.eval_every == 0) or t + 1 == cfg.steps:
            last = evaluate(t + 1)
        if cfg.checkpoint_every and (t + 1) % cfg.checkpoint_every == 0:
            save(t + 1)
        bar.update(t + 1, f"loss {s.loss:.4f}")
    if diverged is not None:  # stop this run, keep what it measured; no checkpoint
        last = evaluate(diverged["diverged_at"])
        metrics.close()
        bar.update(cfg.steps, f"diverged at step {diverged['diverged_at']}")
        print(
            f"{cfg.method}: diverged at step {diverged['diverged_at']} "
            f"({diverged['reason']}); try a smaller --lr",
            file=sys.stderr,
        )
        summary = {"method": cfg.method, "problem": cfg.problem, "steps": cfg.steps, **last}
        summary.update(diverged)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    metrics.close()
    save(cfg.steps)
    if last is None:
        last = evaluate(cfg.steps)
    summary = {"method": cfg.method, "problem": cfg.problem, "steps": cfg.steps, **last}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(step rows, evaluation rows) of a run folder."""
    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if not r.get("eval")], [r for r in rows if r.get("eval")]
