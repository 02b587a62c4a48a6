"""Chaos: kill ``gradzip train`` while it writes checkpoints, resume, check nothing is lost.

    python benchmarks/chaos.py                      # 4 runs x 5 kills during writes, ...
    python benchmarks/chaos.py --runs 2 --kills 3 --random-kills 0 --sigterms 1   # quicker
    python benchmarks/chaos.py --elastic torchdist torchdist-sharded ddp-example  # + restarts
    python benchmarks/chaos.py --faults             # + benchmarks/chaos_faults.py's scenarios

Every scenario runs real ``python -m gradzip train`` processes checkpointing every step
(``--checkpoint-every 1``) on a small problem and compares with an uninterrupted run made
in this process, which records its state at every step:

- ``SIGKILL during a checkpoint write``: a chain of ``--kills`` kills per run, each sent
  while ``checkpoint.pt.tmp`` exists (after 1-5 more writes, at random), each followed by
  ``gradzip train --out R --resume``; after the last kill the resume runs to the end.
  A kill counts as bit-identical when the surviving checkpoint equals the uninterrupted
  run's state at its step (parameters, every memory, counters); a run is lost when a
  resume fails or its end differs (final state, every metrics row, the summary).
- ``SIGKILL at a random time``: the same with kills at uniform random instants.
- ``SIGTERM``: exit status 143, one line naming the final checkpoint, whose step is the
  number of steps the metrics hold; resumed as above.
- ``truncated checkpoint.pt``: the resume is refused with one line naming the file.
- ``metrics line cut short``: the resume drops it with a note and ends bit-identical.
- ``--elastic torchdist torchdist-sharded ddp-example``: a ``torchrun --max-restarts 3``
  job (``gradzip train`` with the parameter server, with the sharded server, or the DDP
  example with ``--save``), a random rank SIGKILLed at a random step; the restarted
  attempt resumes from the latest checkpoint by itself; the end is compared with an
  uninterrupted run (the simulated engine of the same layout with one thread, or the
  example's own uninterrupted job). Time: from the kill to the job's end.

``--faults`` adds the scenarios of ``benchmarks/chaos_faults.py`` (which also runs on its
own): SIGSTOP of each rank role with ``--timeout``, decode bombs and stale, misrouted,
foreign or truncated payloads under a memory limit, NaN at step k under both
``--nonfinite`` policies in every engine (and the DDP hook's with ``--ddp-hook``).

Time: from the kill to the resumed process's first new checkpoint (process start, reading
the checkpoint and the metrics, one step), or to the error. Prints the table and writes it
with every trial to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FLAGS = [
    "--problem", "softmax-digits", "--method", "sgd", "--uplink", "fp16", "--uplink-rule",
    "ef", "--downlink", "fp16", "--downlink-rule", "ef", "--momentum", "0.9", "--workers",
    "2", "--eval-every", "10", "--quiet",
]  # fmt: skip
EVERY_STEP = ["--checkpoint-every", "1"]
TIMES = ("t_compute", "t_compress", "t_comm", "cum_time")


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k not in TIMES} for ln in lines]


def comparable(sd: dict) -> dict:
    """A checkpoint without what wall time and the folder's place change."""
    totals = {k: v for k, v in sd["totals"].items() if k not in TIMES}
    return {"step": sd["step"], "engine": sd["engine"], "average": sd["average"], "t": totals}


def reference(folder: Path, steps: int, flags: list[str]) -> dict[int, dict]:
    """The uninterrupted run (in this process), and its state after every step."""
    from gradzip.cli import main
    from gradzip.experiments import runner

    states, real = {}, runner.checkpoint.save

    def save(obj, path):
        states[obj["step"]] = comparable(copy.deepcopy(obj))
        return real(obj, path)

    runner.checkpoint.save = save
    argv = ["train", *flags, "--steps", str(steps), "--out", str(folder), "--overwrite"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the summary
            rc = main(argv)
    finally:
        runner.checkpoint.save = real
    assert rc == 0, "the reference run failed"
    return states


def load(path: Path) -> dict | None:
    try:
        return torch.load(path, weights_only=True)
    except Exception:
        return None


class Trial:
    """One ``gradzip train`` process on the run folder ``run``."""

    def __init__(self, run: Path, argv: list[str]):
        self.run, self.ckpt = run, run / "checkpoint.pt"
        self.tmp = run / "checkpoint.pt.tmp"
        cmd = [sys.executable, "-m", "gradzip", "train", *argv, "--out", str(run)]
        self.p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def _ino(self) -> int | None:
        try:
            return os.stat(self.ckpt).st_ino  # a rename gives the name a new inode
        except FileNotFoundError:
            return None

    def wait(self, cond, limit: float = 600.0) -> bool:
        """Poll every millisecond until ``cond()``; False if the process ended first."""
        t0 = time.monotonic()
        while not cond():
            if self.p.poll() is not None or time.monotonic() - t0 > limit:
                return False
            time.sleep(0.001)
        return True

    def new_checkpoint(self) -> bool:
        ino = self._ino()
        return self.wait(lambda: self._ino() not in (None, ino))

    def kill_during_write(self, writes: int) -> bool:
        """SIGKILL while the ``writes``-th checkpoint write from now is under way."""
        for _ in range(writes - 1):
            if not (self.wait(self.tmp.exists) and self.wait(lambda: not self.tmp.exists())):
                return False
        if not self.wait(self.tmp.exists):
            return False
        self.p.send_signal(signal.SIGKILL)
        self.p.wait()
        return True

    def finish(self, timeout: float = 900.0) -> tuple[int, str]:
        err = self.p.communicate(timeout=timeout)[1]
        return self.p.returncode, err


def chain(
    scenario: str, run: Path, ref: Path, states: dict, flags: list[str], kills: int,
    steps: int, rng: random.Random, how: str,
) -> dict:  # fmt: skip
    """One run, ``kills`` interruptions (``how``: write | random | term), resumed each
    time, then resumed to its end and compared."""
    trials, resume_s, problems = [], [], []
    t = Trial(run, [*flags, "--steps", str(steps), "--overwrite"])
    if not t.new_checkpoint():
        problems.append(f"the run did not start: {t.finish()[1].strip()[-300:]}")
        kills = 0
    for _ in range(kills):
        if how == "write":
            ok = t.kill_during_write(rng.randint(1, 5))
            rc = -signal.SIGKILL
        elif how == "random":
            time.sleep(rng.uniform(0.0, 0.5))
            ok = t.p.poll() is None  # still running
            t.p.send_signal(signal.SIGKILL)
            t.p.wait()
            rc = -signal.SIGKILL
        else:  # SIGTERM
            time.sleep(rng.uniform(0.0, 0.5))
            ok = t.p.poll() is None
            t.p.send_signal(signal.SIGTERM)
            rc, err = t.finish()
            last = (err.strip().splitlines() or [""])[-1]
            ok = ok and rc == 143 and "interrupted by SIGTERM" in last
        t_kill = time.monotonic()
        if not ok:
            problems.append(f"the run ended before the interruption (rc {t.p.returncode})")
            break
        mid_write = t.tmp.exists()
        sd = load(t.ckpt)
        same = sd is not None and equal(comparable(sd), states.get(sd["step"]))
        if how == "term":  # the final checkpoint is the step the metrics reached
            same = same and sum(1 for r in rows(run) if not r.get("eval")) == sd["step"]
        trials.append({"step": None if sd is None else sd["step"], "mid_write": mid_write,
                       "identical": same, "rc": rc})  # fmt: skip
        t = Trial(run, ["--resume", "--quiet"])
        if not t.new_checkpoint():
            rc, err = t.finish()
            problems.append(f"resume failed (rc {rc}): {err.strip()[-300:]}")
            break
        resume_s.append(time.monotonic() - t_kill)
    rc, err = t.finish()
    final = rc == 0 and not problems
    if final:
        final = (
            equal(comparable(load(t.ckpt)), states[steps])
            and rows(ref) == rows(run)
            and json.loads((ref / "summary.json").read_text())["test_loss"]
            == json.loads((run / "summary.json").read_text())["test_loss"]
        )
        if not final:
            problems.append("the resumed run's end differs from the uninterrupted run")
    elif rc != 0:
        problems.append(f"the last resume failed (rc {rc}): {err.strip()[-300:]}")
    return {"scenario": scenario, "kills": trials, "resume_s": resume_s, "final_identical": final,
            "problems": problems}  # fmt: skip


def truncated(run: Path, ref: Path, flags: list[str]) -> dict:
    """A truncated checkpoint: the resume is refused with one line naming the file."""
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(ref, run)
    (run / "summary.json").unlink()
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    t0 = time.monotonic()
    rc, err = Trial(run, ["--resume", "--quiet"]).finish()
    lines = [ln for ln in err.splitlines() if ln.strip() and "kernel" not in ln]
    ok = (rc == 2 and len(lines) == 1 and str(run / "checkpoint.pt") in lines[0]
          and before == {p.name: p.read_bytes() for p in run.iterdir()})  # fmt: skip
    return {"scenario": "truncated checkpoint.pt", "ok": ok, "detect_s": time.monotonic() - t0,
            "message": lines[-1] if lines else ""}  # fmt: skip


def cut_metrics(run: Path, ref: Path, states: dict, flags: list[str], steps: int) -> dict:
    """Killed after its checkpoint at step k with half a metrics line written: the resume
    drops the line with a note and ends bit-identical."""
    k = steps // 2
    t = Trial(run, [*flags, "--steps", str(k), "--overwrite"])
    rc, _ = t.finish()
    (run / "summary.json").unlink()
    nxt = [
        ln for ln in (ref / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["step"] >= k
    ]
    with open(run / "metrics.jsonl", "a") as f:
        f.write(nxt[1][: len(nxt[1]) // 2])  # half of step k's row (nxt[0]: the eval at k)
    t0 = time.monotonic()
    rc2, err = Trial(run, ["--resume", "--quiet", "--steps", str(steps)]).finish()
    sd = load(run / "checkpoint.pt")
    ok = (rc == 0 and rc2 == 0 and "dropped a damaged last line" in err
          and equal(comparable(sd), states[steps]))  # fmt: skip
    return {"scenario": "metrics line cut short", "ok": ok, "detect_s": time.monotonic() - t0}


def rank_pid(marker: str, rank: int, attempt: int = 0) -> int | None:
    """The pid of the process whose environment holds ``marker`` that torchrun started as
    ``rank`` in its attempt ``attempt`` (torchrun gives each rank a session of its own;
    tests/test_checkpoints.py uses it too)."""
    want = {marker.encode(), f"RANK={rank}".encode(),
            f"TORCHELASTIC_RESTART_COUNT={attempt}".encode()}  # fmt: skip
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and want <= set((d / "environ").read_bytes().split(b"\0")):
                return int(d.name)
        except OSError:
            continue
    return None


def elastic(kind: str, run: Path, steps: int, rng: random.Random) -> dict:
    """``torchrun --max-restarts 3``: a random rank SIGKILLed at a random step of the
    job ``kind`` (a ``gradzip train`` engine, or ``ddp-example``); the same command's
    restarted attempt resumes by itself; the end is compared with an uninterrupted run
    (the simulated engine of the same layout, in this process, or the example's own
    uninterrupted job)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", GRADZIP_THREADS="1", GRADZIP_DIST_TIMEOUT="60")
    marker = f"GRADZIP_CHAOS_JOB={run}"
    env["GRADZIP_CHAOS_JOB"] = str(run)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--max-restarts",
        "3",
    ]
    if kind == "ddp-example":
        nproc, ck = 2, run / "ck.pt"
        example = Path(__file__).resolve().parents[1] / "examples" / "ddp_fashion_mnist.py"
        args = ["--backend", "gloo", "--compress", "fp16", "--uplink-rule", "ef", "--width", "64",
                "--eval-every", "0", "--eval-size", "200", "--threads", "1",
                "--steps", str(steps), "--save-every", "10"]  # fmt: skip
        cmd = [*torchrun, "--nproc-per-node", "2", str(example), *args]

        def progress() -> int:
            sd = load(ck)
            return 0 if sd is None else sd["step"]
    else:
        nproc = 3 if kind == "torchdist" else 2
        flags = [*FLAGS, "--checkpoint-every", "10", "--framing", "payload", "--steps", str(steps)]
        cmd = [*torchrun, "--nproc-per-node", str(nproc), "-m", "gradzip", "train",
               "--engine", kind, *flags, "--out", str(run)]  # fmt: skip

        def progress() -> int:
            try:
                return (run / "metrics.jsonl").read_text().count("\n")
            except FileNotFoundError:
                return 0

    run.mkdir(parents=True, exist_ok=True)
    at, victim_rank = rng.randint(steps // 10, steps * 7 // 10), rng.randrange(nproc)
    extra = ["--save", str(ck)] if kind == "ddp-example" else []
    p = subprocess.Popen([*cmd, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, env=env)  # fmt: skip
    while p.poll() is None and progress() < at:
        time.sleep(0.05)
    killed = p.poll() is None and (pid := rank_pid(marker, victim_rank)) is not None
    if killed:
        os.kill(pid, signal.SIGKILL)
    t_kill = time.monotonic()
    err = p.communicate(timeout=1800)[1]
    done_s = time.monotonic() - t_kill
    ok = killed and p.returncode == 0
    if ok and kind == "ddp-example":
        ref = run / "uninterrupted.pt"
        r = subprocess.run([*cmd, "--save", str(ref)], capture_output=True, text=True, env=env)
        a, b = load(ref), load(ck)
        ok = (
            r.returncode == 0
            and equal(a["model"], b["model"])
            and equal(a["gradzip"], b["gradzip"])
        )
    elif ok:
        from gradzip.cli import main as gz

        ref = run.with_name(run.name + "-uninterrupted")
        sim = "simulated" if kind == "torchdist" else "simulated-sharded"
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the ranks ran
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                rc = gz(["train", *flags, "--engine", sim, "--out", str(ref), "--overwrite"])
        finally:
            torch.set_num_threads(threads)
        same = equal(
            comparable(load(ref / "checkpoint.pt")), comparable(load(run / "checkpoint.pt"))
        )
        ok = rc == 0 and same and rows(ref) == rows(run)
    return {"scenario": f"torchrun --max-restarts 3, a rank SIGKILLed ({kind})", "ok": ok,
            "detect_s": done_s, "killed": {"rank": victim_rank, "at_step": at},
            "stderr": "" if ok else err[-2000:]}  # fmt: skip


def trial_times(rs: list[dict]) -> str:
    """The trials' times (s): each, or the median and the max of many; '-' for none."""
    ts = [r["detect_s"] for r in rs if r.get("detect_s") is not None]
    if not ts:
        return "-"
    f = lambda t: f"{t:.1f}" if t >= 0.1 else f"{t:.2g}"  # noqa: E731 - decodes take ms
    if len(ts) > 4:
        return f"median {f(statistics.median(ts))}, max {f(max(ts))}"
    return ", ".join(f(t) for t in ts)


def table(results: list[dict]) -> str:
    out = ["| scenario | trials | outcome | time to detect/resume (s) |", "|---|---|---|---|"]
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["scenario"], []).append(r)
    for name, rs in by.items():
        if "kills" in rs[0]:
            kills = [k for r in rs for k in r["kills"]]
            times = [s for r in rs for s in r["resume_s"]]
            lost = sum(not r["final_identical"] for r in rs)
            same = sum(k["identical"] for k in kills)
            mid = sum(k["mid_write"] for k in kills)
            where = f", {mid} landed mid-write" if "write" in name else ""
            outcome = (f"{len(rs) - lost}/{len(rs)} runs completed bit-identical ({lost} lost); "
                       f"{same}/{len(kills)} resumed checkpoints identical{where}")  # fmt: skip
            tm = f"median {statistics.median(times):.1f}, max {max(times):.1f}" if times else "-"
            out.append(f"| {name} | {len(kills)} | {outcome} | {tm} |")
        else:
            ok = sum(r["ok"] for r in rs)
            what = rs[0].get("what") or (  # chaos_faults.py's rows say theirs
                "refused with one line naming the file" if "checkpoint." in name else
                "dropped with a note, resumed bit-identical" if "metrics" in name else
                "job completed, bit-identical to an uninterrupted run")  # fmt: skip
            out.append(f"| {name} | {len(rs)} | {ok}/{len(rs)} {what} | {trial_times(rs)} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=4, help="runs with kills during writes")
    p.add_argument("--kills", type=int, default=5, help="kills during writes per run")
    p.add_argument("--random-kills", type=int, default=5, help="kills at random instants (1 run)")
    p.add_argument("--sigterms", type=int, default=3, help="SIGTERMs (1 run)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", default="simulated", help="e.g. torchdist, torchdist-sharded")
    p.add_argument("--out", default="benchmarks/results/chaos.json")
    p.add_argument("--elastic", nargs="*", default=[], metavar="JOB",
                   help="torchrun --max-restarts jobs, a rank killed in each: torchdist, "
                   "torchdist-sharded, ddp-example")  # fmt: skip
    p.add_argument("--elastic-steps", type=int, default=300)
    p.add_argument("--faults", action="store_true",
                   help="also chaos_faults.py's scenarios (a stopped rank, decode bombs and "
                   "stale payloads, NaN at step k), whose options follow")  # fmt: skip
    import chaos_faults  # noqa: PLC0415 - it imports this module

    chaos_faults.add_options(p.add_argument_group("with --faults"))
    args = p.parse_args()
    rng = random.Random(args.seed)
    flags = [*FLAGS, *EVERY_STEP, "--engine", args.engine]
    work = Path(tempfile.mkdtemp(prefix="gradzip-chaos-"))
    ref = work / "ref"
    t0 = time.monotonic()
    states = reference(ref, args.steps, flags)
    results = []
    for i in range(args.runs):
        results.append(chain("SIGKILL during a checkpoint write", work / f"w{i}", ref, states,
                             flags, args.kills, args.steps, rng, "write"))  # fmt: skip
        print(f"run {i + 1}/{args.runs}: {results[-1]['problems'] or 'ok'}", file=sys.stderr)
    if args.random_kills:
        results.append(chain("SIGKILL at a random time", work / "r", ref, states, flags,
                             args.random_kills, args.steps, rng, "random"))  # fmt: skip
    if args.sigterms:
        results.append(chain("SIGTERM (final checkpoint, exit 143)", work / "t", ref, states,
                             flags, args.sigterms, args.steps, rng, "term"))  # fmt: skip
    for i, kind in enumerate(args.elastic):
        results.append(elastic(kind, work / f"elastic-{i}-{kind}", args.elastic_steps, rng))
        print(f"elastic {kind}: {'ok' if results[-1]['ok'] else 'FAILED'}", file=sys.stderr)
    results.append(truncated(work / "c", ref, flags))
    results.append(cut_metrics(work / "m", ref, states, flags, args.steps))
    if args.faults:
        log = lambda s: print(s, file=sys.stderr)  # noqa: E731
        results += chaos_faults.run_faults(args, work / "faults", log=log)
        chaos_faults.describe(results)
    text = table(results)
    print(text)
    print(
        f"(engine {args.engine}, {args.steps} steps; {time.monotonic() - t0:.0f} s; runs in {work})"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "benchmarks/chaos.py", *sys.argv[1:]])
    Path(args.out).write_text(
        json.dumps({"command": command, "table": text, "results": results}, indent=1)
    )
    return 0 if all(r.get("final_identical", r.get("ok")) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
