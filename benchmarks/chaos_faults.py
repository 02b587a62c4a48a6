"""Chaos, the faults: a stopped rank, decode bombs and stale payloads, NaN at step k.

    python benchmarks/chaos_faults.py                       # every scenario (~15 min, 2 cores)
    python benchmarks/chaos_faults.py --only sigstop nan    # some of them
    python benchmarks/chaos_faults.py --stop-trials 3 --timeout 5
    python benchmarks/chaos_faults.py --ddp-hook            # + the DDP hook's, see below
    python benchmarks/chaos_faults.py --only ddp --out /tmp/ddp.json   # the hook's alone
    python benchmarks/chaos.py --faults                     # after chaos.py's own rows

Every scenario runs real processes (``python -m gradzip train``, or ``torchrun`` where
said), each in a session of its own under a wall-clock cap (``--cap``); nothing is left
behind (what outlives a trial is counted, then killed by its session).

- ``SIGSTOP of <role>`` (``--only sigstop``): ``gradzip train --engine torchdist`` (rank 0
  the server, ranks 1-2 the workers, spawned as ``gradzip-rank-R``) or
  ``torchdist-sharded`` (ranks 0-1) with ``--timeout T``; once steps are being written
  the rank is stopped. Passes when the first error line names that rank, and only it, as
  the one that did not answer, and every other process exits (a stopped spawned rank is
  killed by rank 0; a stopped rank 0, whose workers exit, is sent SIGCONT and must exit
  non-zero by itself). Time: from the SIGSTOP to that line; target ``T + 10`` s.
- ``decode ...`` (``--only decode``): payloads built here, each case decoded in a fresh
  subprocess through the engines' bounded path (``Algorithm.decode_uplink`` /
  ``decode_downlink`` with the step, the sender, the codec and the dimension ``--dim``
  expected), one trial per codec (top-k, 1-bit, QSGD): the 77-byte CRC-valid top-k
  payload declaring 2^31 elements (its header restamped, CRC made valid; the same for the
  other codecs) on the uplink and the downlink, a payload of the previous step (stale),
  of another worker (misrouted), of another codec, cut in half; and, as the control, the
  expected payload, which decodes. Passes when refused with ``PayloadError`` and the peak
  RSS grew by less than 2x the expected tensor (4 x dim bytes); growth is
  ``ru_maxrss`` after the decode minus ``VmRSS`` before it, an upper bound. Time: the
  decode call.
- ``NaN at step k`` (``--only nan``): ``GRADZIP_TEST_FAULT=worker=1,step=k,kind=nan``
  (``gradzip.engines.faults``, the tests' hook) for ``--engine simulated``,
  ``simulated-sharded``, ``torchdist``, ``torchdist-sharded``, and the last two under
  ``torchrun`` (every rank its own process and stderr), ``--nonfinite error`` and
  ``skip``. ``error`` passes when the run exits non-zero, every rank's stderr holds
  exactly one line naming the step and the worker (with its rank), and summary.json has
  ``diverged_at = k``; ``skip`` when it exits 0 with ``skipped_steps = 1``, step k's row
  marked skipped and every step written. Time: the whole run (start-up included).
- ``--ddp-hook`` (off by default): the same for the DDP hook, ``examples/ddp_fashion_mnist.py``
  under ``torchrun`` with 2 ranks: NaN at step k on rank 1 (put in the gradient of its
  largest parameter by a tensor hook: this script's ``--ddp-example`` runs the example so),
  ``--nonfinite error`` (every rank exits non-zero naming step k and rank 1) and ``skip``
  (the job ends, ``skipped_steps`` 1 in its ``--json``); SIGSTOP of rank 1 with
  ``--timeout T`` (rank 0 names rank 1 within T + 10 s). It needs the example's
  ``--nonfinite`` and ``--timeout``; without them the row says not run.

Prints chaos.py's table and writes it with every trial and the command to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from chaos import table  # noqa: E402

PY = sys.executable
EXAMPLE = HERE.parent / "examples" / "ddp_fashion_mnist.py"
FAULT_ENV = "GRADZIP_TEST_FAULT"
MARK = "GRADZIP_CHAOS_JOB"  # in every process a trial starts: found again through /proc
TRAIN = ["--workers", "2", "--problem", "softmax-digits", "--eval-every", "0",
         "--checkpoint-seconds", "0", "--quiet"]  # fmt: skip


def _env(run: Path, **extra: str) -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", FAULT_ENV, "GRADZIP_DIST_TIMEOUT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update({MARK: str(run), **extra})
    return env


def _marked(run: Path) -> list[int]:
    """Live (not zombie) processes started for ``run``, whatever their session."""
    want, pids = f"{MARK}={run}".encode(), []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and want in (d / "environ").read_bytes().split(b"\0"):
                if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(d.name))
        except OSError:
            continue
    return pids


def _reap(run: Path, grace: float = 15.0) -> list[int]:
    """Wait up to ``grace`` s for the trial's processes to end; kill (SIGCONT, SIGKILL)
    and return those still there."""
    deadline = time.monotonic() + grace
    while (left := _marked(run)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    return left


class Job:
    """A command in a session of its own; its stderr lines timestamped as they come."""

    def __init__(self, cmd: list[str], env: dict[str, str]):
        self.p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, env=env, start_new_session=True)  # fmt: skip
        self.t0 = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for ln in self.p.stderr:
            self.lines.append((time.monotonic(), ln.rstrip()))

    def text(self) -> str:
        return "\n".join(ln for _, ln in list(self.lines))

    def ranks(self) -> dict[int, int]:
        """rank -> pid: the processes called gradzip-rank-R in this session, and rank 0."""
        out = {0: self.p.pid}
        for d in Path("/proc").iterdir():
            try:
                comm = (d / "comm").read_text().strip()
                if comm.startswith("gradzip-rank-") and os.getsid(int(d.name)) == self.p.pid:
                    out[int(comm.rsplit("-", 1)[1])] = int(d.name)
            except (OSError, ValueError):
                continue
        return out

    def first(self, pattern: str, since: float, limit: float) -> tuple[float, str] | None:
        """The first stderr line after ``since`` matching ``pattern``: (seconds, line)."""
        deadline = since + limit
        while True:
            for t, ln in list(self.lines):
                if t >= since and re.search(pattern, ln):
                    return t - since, ln
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def wait(self, limit: float) -> int | None:
        try:
            return self.p.wait(timeout=max(limit, 0.01))
        except subprocess.TimeoutExpired:
            return None


# --- SIGSTOP of a rank -----------------------------------------------------------------

# role -> (engine, rank stopped, ranks spawned besides rank 0, how the error names it)
ROLES = {
    "the PS server (torchdist rank 0)": ("torchdist", 0, 2, "the server (rank 0)"),
    "a PS worker (torchdist rank 2)": ("torchdist", 2, 2, "worker 1 (rank 2)"),
    "a sharded rank (torchdist-sharded rank 1)": ("torchdist-sharded", 1, 1, "worker 1 (rank 1)"),
    "a sharded rank (torchdist-sharded rank 0)": ("torchdist-sharded", 0, 1, "worker 0 (rank 0)"),
}  # fmt: skip
NAMED = re.compile(r"(worker \d+ \(rank \d+\)|the server \(rank \d+\)|rank \d+) did not answer")


def sigstop(role: str, run: Path, timeout: float, cap: float) -> dict:
    engine, rank, spawned, name = ROLES[role]
    cmd = [PY, "-m", "gradzip", "train", "--engine", engine, *TRAIN, "--steps", "1000000",
           "--timeout", str(timeout), "--out", str(run)]  # fmt: skip
    job, metrics = Job(cmd, _env(run)), run / "metrics.jsonl"
    row = {"scenario": f"SIGSTOP of {role}, --timeout {timeout:g}", "ok": False,
           "detect_s": None, "target_s": timeout + 10}  # fmt: skip
    try:
        while True:  # ranks up and steps being written
            found = job.ranks()
            if len(found) > spawned and metrics.exists() and metrics.stat().st_size > 3000:
                break
            if job.p.poll() is not None or time.monotonic() - job.t0 > cap:
                row["problem"] = "no steps: " + job.text()[-1500:]
                return row
            time.sleep(0.1)
        os.kill(found[rank], signal.SIGSTOP)
        t_stop = time.monotonic()
        got = job.first(NAMED.pattern, t_stop, timeout + 10 + 60)
        if got is None:
            row["problem"] = "no rank named within timeout + 70 s: " + job.text()[-3000:]
            return row
        took, line = got
        row.update(detect_s=took, line=line[:400])
        others = [p for r, p in found.items() if r != rank]
        deadline = time.monotonic() + 30
        while any(p in _marked(run) for p in others) and time.monotonic() < deadline:
            time.sleep(0.1)
        row["others_left"] = [r for r, p in found.items() if r != rank and p in _marked(run)]
        t_cont = None
        if rank == 0:  # the workers are gone: woken, rank 0 must find out and exit
            os.kill(found[0], signal.SIGCONT)
            t_cont = time.monotonic()
            row["stopped_rc"] = job.wait(30)
        else:  # rank 0 ends the run and its spawned ranks, the stopped one too
            row["rc"] = job.wait(30)
            row["stopped_left"] = found[rank] in _marked(run)
        ok_rc = row.get("stopped_rc", row.get("rc")) not in (0, None)
        job.reader.join(5)
        after = [ln for t, ln in job.lines if t >= t_stop]  # every rank named, by any line
        culprits = {m.group(1) for ln in after for m in NAMED.finditer(ln)}
        woken = [ln for t, ln in job.lines if t_cont is not None and t >= t_cont]
        row.update(named=sorted(culprits), stderr=after[-40:])
        row["woken_named"] = sorted({m.group(1) for ln in woken for m in NAMED.finditer(ln)})
        row["ok"] = (culprits == {name} and took <= timeout + 10 and not row["others_left"]
                     and not row.get("stopped_left") and ok_rc)  # fmt: skip
        return row
    finally:
        row["left_killed"] = len(_reap(run, 5))
        job.wait(10)


# --- decode bombs and stale payloads ---------------------------------------------------

SPECS = ("topk:k=10", "fosgd", "qsgd:levels=4")
CASES = {  # name -> what it is
    "bomb-up": "decode bomb (CRC-valid header declaring 2^31 elements), uplink",
    "bomb-down": "decode bomb (CRC-valid header declaring 2^31 elements), downlink",
    "stale": "stale payload (the previous step's)",
    "misrouted": "misrouted payload (another worker's)",
    "codec": "payload of another codec (identity)",
    "truncated": "truncated payload (cut in half)",
    "control": "control: the expected payload",
    "unbounded": "control: a top-k bomb declaring 2^24 elements, gz.decode's default cap",
}
STEP, WORKER = 5, 1


def _restamp(b: bytes, offset: int, fmt: str, value: int) -> bytes:
    """``b`` with one header field rewritten and its CRC made valid again."""
    from gradzip.wire import CRC_OFFSET

    b = bytearray(b)
    struct.pack_into(fmt, b, offset, value)
    struct.pack_into("<I", b, CRC_OFFSET, zlib.crc32(bytes(b[:CRC_OFFSET] + b[CRC_OFFSET + 4 :])))
    return bytes(b)


def bomb(small: bytes, numel: int) -> bytes:
    """A CRC-valid payload like ``small`` declaring ``numel`` elements. Top-k's is whole:
    10 indices of ``ceil(log2 numel)`` bits and 10 values, which parse as a valid payload
    under a cap above ``numel`` (gz.decode's default, 2^31); other codecs' keep their body
    and only the header's shape[0] is rewritten."""
    from gradzip import bits
    from gradzip.compressors.sparse import index_width
    from gradzip.wire import Payload, PayloadWriter

    h = Payload.from_bytes(small).header
    if len(h.section_lengths) != 2 or h.section_lengths[1] != 40:  # not top-k (k=10)
        return _restamp(small, 36, "<Q", numel)
    import torch

    w = PayloadWriter(h.codec, h.dtype, (numel,), [bits.packed_size(10, index_width(numel)), 40],
                      seed=h.seed, step=h.step, worker=h.worker, params=h.params)  # fmt: skip
    idx = torch.arange(10) * (numel // 10)  # spread up to the end: all of it touched
    w.sections[0][:] = bits.pack_uints(idx, index_width(numel))
    w.put_f32(1, *[1.0] * 10)
    return w.finish().to_bytes()


def payloads(spec: str, dim: int) -> dict[str, bytes]:
    """Every case's bytes for the codec ``spec`` at the dimension ``dim``."""
    import torch

    import gradzip as gz
    from gradzip.engines.core import SERVER, Algorithm
    from gradzip.methods import method

    def raw(p) -> bytes:
        return p.data.numpy().tobytes()

    a = Algorithm(method("sgd", uplink=spec, downlink=spec), dim, seed=5)
    x = torch.randn(dim, generator=torch.Generator().manual_seed(0))
    small = Algorithm(method("sgd", uplink=spec, downlink=spec), 1000, seed=5)
    tiny = raw(small.up.encode(x[:1000], seed=5, step=STEP, worker=WORKER))  # 77 B for top-k
    tiny_down = raw(small.down.encode(x[:1000], seed=5, step=STEP, worker=SERVER))
    good = raw(a.up.encode(x, seed=5, step=STEP, worker=WORKER))
    return {
        "bomb-up": bomb(tiny, 1 << 31),
        "bomb-down": bomb(tiny_down, 1 << 31),
        "stale": raw(a.up.encode(x, seed=5, step=STEP - 1, worker=WORKER)),
        "misrouted": raw(a.up.encode(x, seed=5, step=STEP, worker=WORKER + 1)),
        "codec": raw(gz.compressor("identity").encode(x, seed=5, step=STEP, worker=WORKER)),
        "truncated": good[: len(good) // 2],
        "control": good,
        # the measure's other control: what an unchecked decode allocates (top-k only:
        # its body parses under any shape larger than its indices)
        **({"unbounded": bomb(tiny, 1 << 24)} if spec.startswith("topk") else {}),
    }


def _status() -> dict[str, int]:
    """VmRSS, VmHWM (the peak RSS since the last reset) and VmSize of this process, KiB."""
    out = {}
    for ln in Path("/proc/self/status").read_text().splitlines():
        if ln.startswith(("VmRSS:", "VmHWM:", "VmSize:")):
            out[ln.split(":")[0]] = int(ln.split()[1])
    return out


def decode_child(case: str, dim: int, folder: Path) -> None:
    """(In a fresh process) decode ``case``'s payload for every codec in turn, as the
    engines do, under an address-space limit of 2x the expected tensor more than the
    process holds; print one JSON line per codec."""
    import ctypes
    import gc
    import resource

    import torch

    import gradzip as gz
    from gradzip.engines.core import Algorithm
    from gradzip.methods import method
    from gradzip.wire import PayloadError

    libc = ctypes.CDLL("libc.so.6")
    clear = Path("/proc/self/clear_refs")  # "5": the peak RSS reset (Linux >= 4.0)
    for i, spec in enumerate(SPECS):
        if not (folder / f"{i}-{case}.bin").exists():
            continue
        m = method("sgd", uplink=spec, downlink=spec)
        a = Algorithm(m, dim, seed=5)
        data, warm = (torch.frombuffer(bytearray((folder / f"{i}-{c}.bin").read_bytes()),
                                       dtype=torch.uint8) for c in (case, "warm"))  # fmt: skip
        Algorithm(m, dim, seed=5).decode_uplink(warm, "w", STEP, WORKER)  # kernels, threads
        gc.collect()
        libc.malloc_trim(0)  # freed memory back to the system: a new block shows in the RSS
        clear.write_text("5")
        before, out = _status(), None
        limit = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (before["VmSize"] * 1024 + 8 * dim, limit[1]))
        t0 = time.perf_counter()
        try:
            if case == "bomb-down":
                out = a.decode_downlink(data, "server", STEP)
            elif case == "unbounded":  # as the engines did before issue 17
                out = gz.decode(data)
            else:
                out = a.decode_uplink(data, f"worker {WORKER}", STEP, WORKER)
            outcome = "decoded"
        except PayloadError as e:
            outcome = f"PayloadError: {e}"
        except Exception as e:  # noqa: BLE001 - a wrong outcome, reported
            outcome = f"{type(e).__name__}: {e}"
        took = time.perf_counter() - t0
        resource.setrlimit(resource.RLIMIT_AS, limit)
        after = _status()  # the decoded tensor, if any, still held
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; see the docstring
        del out, a
        row = {"spec": spec, "bytes": data.numel(), "outcome": outcome[:300],
               "decode_s": took, "rss_before_kib": before["VmRSS"],
               "peak_rss_kib": after["VmHWM"], "ru_maxrss_kib": ru,
               "growth_kib": after["VmHWM"] - before["VmRSS"],
               "vm_growth_kib": after["VmSize"] - before["VmSize"]}  # fmt: skip
        print(json.dumps(row), flush=True)


def decode_cases(work: Path, dim: int, cap: float) -> list[dict]:
    import torch

    from gradzip.engines.core import Algorithm
    from gradzip.methods import method

    folder = work / "payloads"
    folder.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(SPECS):
        for case, b in payloads(spec, dim).items():
            (folder / f"{i}-{case}.bin").write_bytes(b)
        small = Algorithm(method("sgd", uplink=spec, downlink=spec), dim, seed=5)
        warm = small.up.encode(torch.ones(dim), seed=5, step=STEP, worker=WORKER)
        (folder / f"{i}-warm.bin").write_bytes(warm.data.numpy().tobytes())
    limit_kib = 2 * 4 * dim / 1024
    # a fixed mmap threshold: every block over 128 KiB is mapped afresh and unmapped when
    # freed, so an allocation shows in the RSS even after earlier ones were freed
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    rows = []
    for case, what in CASES.items():
        cmd = [PY, __file__, "--decode-child", case, "--dim", str(dim), "--work", str(folder)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=cap, env=env)
            got = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
            err = r.stderr[-1500:]
        except subprocess.TimeoutExpired:
            got, err = [], f"no result within {cap:g} s"
        for g in got:
            if case == "control":
                ok = g["outcome"] == "decoded"
            elif case == "unbounded":  # the limit bites: 2^24 floats cannot be allocated
                ok = "allocate" in g["outcome"] and not g["outcome"].startswith("PayloadError")
            else:
                ok = g["outcome"].startswith("PayloadError") and g["growth_kib"] < limit_kib
            rows.append({"scenario": f"{what}, dim {dim}" if case != "unbounded" else what,
                         "ok": ok, "detect_s": g["decode_s"], **g})  # fmt: skip
        if len(got) < (1 if case == "unbounded" else len(SPECS)):
            rows.append({"scenario": f"{what}, dim {dim}", "ok": False, "detect_s": None,
                         "problem": err})  # fmt: skip
    return rows


# --- NaN at step k ---------------------------------------------------------------------

ENGINES = ("simulated", "simulated-sharded", "torchdist", "torchdist-sharded",
           "torchrun torchdist", "torchrun torchdist-sharded")  # fmt: skip


def nan_run(engine: str, policy: str, run: Path, k: int, steps: int, cap: float) -> dict:
    """``gradzip train`` with a NaN in worker 1's gradient at step k under ``policy``."""
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    logs = run.with_name(run.name + "-logs")
    shutil.rmtree(logs, ignore_errors=True)
    name = engine.split()[-1]
    train = ["--engine", name, *TRAIN, "--steps", str(steps), "--nonfinite", policy,
             "--timeout", "30", "--out", str(run)]  # fmt: skip
    nproc = 3 if name == "torchdist" else 2
    if engine.startswith("torchrun"):  # every rank's stderr in logs/<id>/attempt_0/<rank>/
        cmd = [*_torchrun(nproc, logs), "-m", "gradzip", "train", *train]
    else:
        cmd = [PY, "-m", "gradzip", "train", *train]
    job = Job(cmd, _env(run, **{FAULT_ENV: f"worker=1,step={k},kind=nan"}))
    rc = job.wait(cap)
    took = time.monotonic() - job.t0
    row = {"scenario": f"NaN at step {k} on worker 1, --nonfinite {policy} ({engine})",
           "ok": False, "detect_s": took, "rc": rc}  # fmt: skip
    row["left_killed"] = len(_reap(run, 10))
    if rc is None:
        row["problem"] = f"still running after {cap:g} s (killed)"
        return row
    if engine.startswith("torchrun"):
        texts = {int(p.parent.name): p.read_text() for p in logs.glob("*/attempt_0/*/stderr.log")}
    else:
        job.reader.join(5)  # its last lines
        texts = {0: job.text()}
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()] if (
        run / "metrics.jsonl").exists() else []  # fmt: skip
    rank = {"torchdist": " (rank 2)", "torchdist-sharded": " (rank 1)"}.get(name, "")
    msg = f"non-finite values at step {k}: worker 1{rank}: gradient has 1 NaN"
    if policy == "error":
        per_rank = {r: sum(msg in ln for ln in t.splitlines()) for r, t in texts.items()}
        lines = [ln for t in texts.values() for ln in t.splitlines() if msg in ln]
        row.update(lines_per_rank=per_rank, message=(lines or [""])[0][:300])
        want_ranks = nproc if engine.startswith("torchrun") else 1
        row["ok"] = (
            rc != 0
            and len(per_rank) == want_ranks
            and all(n == 1 for n in per_rank.values())
            and summary.get("diverged_at") == k
            and msg in summary.get("reason", "")
        )
    else:
        skipped = [r["step"] for r in rows if r.get("skipped")]
        steps_written = sum(1 for r in rows if not r.get("eval"))
        row.update(skipped_steps=summary.get("skipped_steps"), skipped_rows=skipped,
                   steps_written=steps_written)  # fmt: skip
        row["ok"] = (rc == 0 and summary.get("skipped_steps") == 1 and skipped == [k]
                     and steps_written == steps and "diverged_at" not in summary)  # fmt: skip
    if not row["ok"]:
        row["stderr"] = "\n".join(t[-1500:] for t in texts.values())
    return row


# --- the DDP hook (examples/ddp_fashion_mnist.py) ---------------------------------------

DDP_ARGS = ["--backend", "gloo", "--compress", "fp16", "--uplink-rule", "ef", "--width", "64",
            "--eval-every", "0", "--eval-size", "200", "--threads", "1"]  # fmt: skip


NAN_ENV = "GRADZIP_CHAOS_NAN"  # "rank=R,step=K": the example's rank R, backward K


def ddp_example(argv: list[str]) -> int:
    """(A torchrun rank) the DDP example with, where ``GRADZIP_CHAOS_NAN`` names this rank,
    a NaN put in the gradient of its largest parameter at its backward number ``step``
    (a tensor hook: DDP's bucket, and so the comm hook, receives it)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("ddp_example", EXAMPLE)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    want = dict(kv.split("=") for kv in os.environ.get(NAN_ENV, "").split(",") if kv)
    attach = ex.attach_hook

    def attach_poisoned(model, args):
        state = attach(model, args)
        if want and int(os.environ["RANK"]) == int(want["rank"]):
            p, calls = max(model.parameters(), key=lambda q: q.numel()), [0]

            def poison(g: torch.Tensor) -> torch.Tensor:
                calls[0] += 1
                if calls[0] - 1 == int(want["step"]):
                    g = g.clone()
                    g.view(-1)[0] = float("nan")
                return g

            p.register_hook(poison)
        return state

    ex.attach_hook = attach_poisoned
    ex.main(argv)
    return 0


def ddp_support() -> str:
    """'' when the example has --nonfinite and --timeout, else what is missing."""
    r = subprocess.run([PY, str(EXAMPLE), "--help"], capture_output=True, text=True)
    missing = [f for f in ("--nonfinite", "--timeout") if f not in r.stdout]
    return f"the example has no {' / '.join(missing)} yet" if missing else ""


def _torchrun(nproc: int, logs: Path) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "--log-dir", str(logs), "-r", "2"]  # fmt: skip


def ddp_nan(policy: str, run: Path, k: int, steps: int, cap: float) -> dict:
    """The example under torchrun (2 ranks), a NaN in rank 1's gradient at step k (put by
    :func:`ddp_example`): error: every rank exits non-zero with an error naming the step and
    rank 1; skip: the job ends normally and counts one skipped step."""
    logs = run / "logs"
    cmd = [*_torchrun(2, logs), __file__, "--ddp-example", *DDP_ARGS, "--steps", str(steps),
           "--nonfinite", policy, "--json", str(run / "result.json")]  # fmt: skip
    run.mkdir(parents=True, exist_ok=True)
    job = Job(cmd, _env(run, **{NAN_ENV: f"rank=1,step={k}"}))
    rc = job.wait(cap)
    row = {"scenario": f"DDP hook: NaN at step {k} on rank 1, --nonfinite {policy}",
           "ok": False, "detect_s": time.monotonic() - job.t0, "rc": rc}  # fmt: skip
    row["left_killed"] = len(_reap(run, 10))
    texts = {int(p.parent.name): p.read_text() for p in logs.glob("*/attempt_0/*/stderr.log")}
    named = re.compile(rf"step {k}\b.*rank 1|rank 1\b.*step {k}\b")
    if rc is None:
        row["problem"] = f"still running after {cap:g} s (killed)"
    elif policy == "error":
        per_rank = {r: sum(bool(named.search(ln)) for ln in t.splitlines()
                           if "non-finite" in ln) for r, t in texts.items()}  # fmt: skip
        row["lines_per_rank"] = per_rank
        row["ok"] = rc != 0 and len(per_rank) == 2 and all(n >= 1 for n in per_rank.values())
    else:
        res = run / "result.json"
        said = json.loads(res.read_text()) if res.exists() else {}
        row["skipped_steps"] = said.get("skipped_steps")
        row["ok"] = rc == 0 and said.get("skipped_steps") == 1
    if not row["ok"]:
        row["stderr"] = "\n".join(t[-1500:] for t in texts.values()) or job.text()[-1500:]
    return row


def ddp_sigstop(run: Path, timeout: float, cap: float) -> dict:
    """The example under torchrun (2 ranks, ``--timeout T``), rank 1 stopped once it steps:
    rank 0's error names rank 1 within T + 10 s and every rank exits."""
    run.mkdir(parents=True, exist_ok=True)
    cmd = [*_torchrun(2, run / "logs"), str(EXAMPLE), *DDP_ARGS, "--steps", "1000000",
           "--save", str(run / "ck.pt"), "--save-every", "5",
           "--timeout", str(timeout)]  # fmt: skip
    job = Job(cmd, _env(run))
    row = {"scenario": f"DDP hook: SIGSTOP of rank 1, --timeout {timeout:g}", "ok": False,
           "detect_s": None, "target_s": timeout + 10}  # fmt: skip
    try:
        while not (run / "ck.pt").exists():  # stepping
            if job.p.poll() is not None or time.monotonic() - job.t0 > cap:
                row["problem"] = "no checkpoint: " + job.text()[-1500:]
                return row
            time.sleep(0.1)
        want = f"{MARK}={run}".encode()
        pid = next(p for p in _marked(run) if b"RANK=1" in
                   Path(f"/proc/{p}/environ").read_bytes().split(b"\0") and
                   want in Path(f"/proc/{p}/environ").read_bytes().split(b"\0"))  # fmt: skip
        os.kill(pid, signal.SIGSTOP)
        t_stop = time.monotonic()
        rank0 = None
        while time.monotonic() - t_stop < timeout + 70 and rank0 is None:
            for p in (run / "logs").glob("*/attempt_0/0/stderr.log"):
                for ln in p.read_text().splitlines():
                    if re.search(r"\brank 1\b", ln) and re.search(r"answer|timed? ?out", ln):
                        rank0 = ln
            time.sleep(0.1)
        if rank0 is None:
            row["problem"] = "rank 0 named no rank 1 within timeout + 70 s"
            return row
        row.update(detect_s=time.monotonic() - t_stop, line=rank0[:400])
        row["rc"] = job.wait(60)
        row["ok"] = row["detect_s"] <= timeout + 10 and row["rc"] not in (0, None)
        return row
    finally:
        row["left_killed"] = len(_reap(run, 5))
        job.wait(10)


# --- the run ---------------------------------------------------------------------------

SCENARIOS = ("sigstop", "decode", "nan", "ddp")  # ddp: only when asked for


def run_faults(args, work: Path, log=print) -> list[dict]:
    """Every selected scenario's rows (``args``: this script's options)."""
    results: list[dict] = []
    only = set(args.only or SCENARIOS[:3]) | ({"ddp"} if args.ddp_hook else set())
    if "sigstop" in only:
        for role in ROLES:
            for _ in range(args.stop_trials):
                run = work / f"stop-{len(results)}"
                results.append(sigstop(role, run, args.timeout, args.cap))
                r = results[-1]
                log(f"{r['scenario']}: {'ok' if r['ok'] else 'FAILED'} {r['detect_s']}")
    if "decode" in only:
        results += decode_cases(work, args.dim, args.cap)
        log(f"decode: {sum(r['ok'] for r in results if 'spec' in r)} ok")
    if "nan" in only:
        for engine in args.engines:
            for policy in ("error", "skip"):
                for i in range(args.nan_trials):
                    run = work / f"nan-{engine.replace(' ', '-')}-{policy}-{i}"
                    results.append(nan_run(engine, policy, run, args.k, args.nan_steps, args.cap))
                    r = results[-1]
                    log(f"{r['scenario']}: {'ok' if r['ok'] else 'FAILED'} {r['detect_s']:.1f} s")
    if "ddp" in only:
        why = ddp_support()
        if why:
            results.append({"scenario": "DDP hook: NaN (both policies) and SIGSTOP", "ok": False,
                            "detect_s": None, "not_run": why,
                            "what": f"not run: {why}"})  # fmt: skip
        else:
            for policy in ("error", "skip"):
                results.append(ddp_nan(policy, work / f"ddp-nan-{policy}", args.k, 20, args.cap))
            for i in range(args.stop_trials):
                results.append(ddp_sigstop(work / f"ddp-stop-{i}", args.timeout, args.cap))
        log(f"ddp hook: {[r['ok'] for r in results if r['scenario'].startswith('DDP')]}")
    return results


def describe(results: list[dict]) -> None:
    """The outcome column of each row (chaos.table reads the first trial's ``what``)."""
    for r in results:
        if "what" in r:
            continue
        s = r["scenario"]
        if s.startswith("SIGSTOP"):
            name = s.split("(")[1].split(")")[0] if "(" in s else ""
            r["what"] = (
                f"named the stopped rank alone ({name}) within the target "
                f"({r['target_s']:g} s), every process exited"
            )
            same = [q for q in results if q["scenario"] == s]
            extra = {n for q in same for n in q.get("named", []) if n != ROLES[role_of(s)][3]}
            if extra:  # who else was named, and when (rank 0 stopped: once woken)
                bad = sum(not q["ok"] for q in same)
                when = " by rank 0 once woken (SIGCONT)" if ROLES[role_of(s)][1] == 0 else ""
                r["what"] += (f"; in {bad}, {', '.join(sorted(extra))} also named{when}, "
                              "after the stopped rank was")  # fmt: skip
        elif s.startswith("DDP hook: SIGSTOP"):
            r["what"] = f"rank 0 named rank 1 within {r['target_s']:g} s, every rank exited"
        elif s.startswith("decode") or s.startswith(("stale", "misrouted", "payload", "trunc")):
            r["what"] = ("PayloadError under an address-space limit of 2x the expected "
                         "tensor, peak RSS growth below it")  # fmt: skip
        elif s.startswith("control: a top-k bomb"):
            r["what"] = ("not decoded: the 64 MiB it asks for exceed the address-space "
                         "limit (2x the tensor): the limit bites")  # fmt: skip
        elif s.startswith("control"):
            r["what"] = "decoded under the address-space limit (2x the tensor)"
        elif s.startswith("DDP hook: NaN") and "error" in s:
            r["what"] = "exit non-zero, every rank's error names the step and rank 1"
        elif s.startswith("DDP hook: NaN"):
            r["what"] = "exit 0, the step skipped on every rank and counted (skipped_steps 1)"
        elif "--nonfinite error" in s:
            r["what"] = ("exit non-zero, one error naming the step and worker (rank) on every "
                         "rank's stderr, summary.json diverged_at = k")  # fmt: skip
        elif "--nonfinite skip" in s:
            r["what"] = "exit 0, the step skipped on every rank and counted (skipped_steps 1)"


def role_of(scenario: str) -> str:
    return next(role for role in ROLES if scenario.startswith(f"SIGSTOP of {role}"))


def summarize(results: list[dict]) -> str:
    """The peak RSS growth of the decode rows, as one line per case."""
    out, by = [], {}
    for r in results:
        if "growth_kib" in r:
            by.setdefault(r["scenario"], []).append(r)
    for s, rs in by.items():
        g = ", ".join(f"{r['spec']} {r['growth_kib'] / 1024:.2f}" for r in rs)
        out.append(f"- {s}: peak RSS growth (MiB) {g}; payload bytes "
                   f"{', '.join(str(r['bytes']) for r in rs)}")  # fmt: skip
    return "\n".join(out)


def add_options(p) -> None:
    """This script's scenario options (also chaos.py's, with --faults)."""
    p.add_argument("--only", nargs="*", choices=SCENARIOS,
                   help="default: sigstop decode nan (+ ddp with --ddp-hook)")  # fmt: skip
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="SIGSTOP: gradzip train --timeout, s (default %(default)s)",
    )
    p.add_argument(
        "--stop-trials",
        type=int,
        default=2,
        help="SIGSTOP: trials per rank role (default %(default)s)",
    )
    p.add_argument(
        "--dim",
        type=int,
        default=1 << 20,
        help="decode: the dimension the receiver expects (default %(default)s)",
    )
    p.add_argument(
        "--engines",
        nargs="*",
        default=list(ENGINES),
        metavar="ENGINE",
        help="NaN: engines, 'torchrun NAME' for a torchrun job (default: "
        + ", ".join(ENGINES)
        + ")",
    )
    p.add_argument(
        "--nan-trials",
        type=int,
        default=1,
        help="NaN: trials per engine and policy (default %(default)s)",
    )
    p.add_argument("--k", type=int, default=3, help="NaN: the step (default %(default)s)")
    p.add_argument(
        "--nan-steps", type=int, default=8, help="NaN: steps of each run (default %(default)s)"
    )
    p.add_argument("--cap", type=float, default=300.0,
                   help="wall-clock cap of each run, s (default %(default)s)")  # fmt: skip
    p.add_argument("--ddp-hook", action="store_true",
                   help="also the DDP hook's NaN and SIGSTOP scenarios (the example under "
                   "torchrun; needs its --nonfinite and --timeout)")  # fmt: skip


def tree() -> dict:
    """The commit measured and the files of src/ that differ from it (shared tree)."""
    import gradzip

    git = ["git", "-C", str(Path(gradzip.__file__).resolve().parents[2])]  # the code run
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run([*git, "status", "--short", "--", "src"], capture_output=True,
                           text=True).stdout.splitlines()  # fmt: skip
    return {"commit": head.strip(), "src_changes": dirty}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    add_options(p)
    p.add_argument("--out", default="benchmarks/results/chaos-faults.json")
    p.add_argument("--decode-child", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    if sys.argv[1:2] == ["--ddp-example"]:  # a rank of ddp_nan's torchrun job
        return ddp_example(sys.argv[2:])
    args = p.parse_args()
    if args.decode_child:
        decode_child(args.decode_child, args.dim, Path(args.work))
        return 0
    work = Path(tempfile.mkdtemp(prefix="gradzip-chaos-faults-"))
    t0 = time.monotonic()
    results = run_faults(args, work, log=lambda s: print(s, file=sys.stderr, flush=True))
    describe(results)
    text = table(results)
    print(text)
    print(summarize(results))
    took = time.monotonic() - t0
    print(f"({took:.0f} s; runs in {work})")
    command = " ".join(["python", "benchmarks/chaos_faults.py", *sys.argv[1:]])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out = {"command": command, "seconds": took, "tree": tree(), "table": text, "results": results}
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
