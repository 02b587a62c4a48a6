"""Liveness of the torch.distributed engines (issue 17, item 3): a rank stopped with SIGSTOP
is named, with the step and the phase, within timeout + 10 s; the run ends non-zero and
leaves no process behind.

Each test runs ``gradzip train`` in its own session, waits until steps are being written,
stops one process (spawned ranks are called ``gradzip-rank-R``) and reads stderr as it
comes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gradzip.engines import torchdist as td

TIMEOUT = 5.0
WITHIN = TIMEOUT + 10.0


def _session_ranks(sid: int) -> dict[int, int]:
    """rank -> pid of the processes of session ``sid`` called gradzip-rank-R."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            comm = (d / "comm").read_text().strip()
            if comm.startswith("gradzip-rank-") and os.getsid(int(d.name)) == sid:
                out[int(comm.rsplit("-", 1)[1])] = int(d.name)
        except (OSError, ValueError):
            pass
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _in_session(sid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid:
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


class _Run:
    """``gradzip train`` in a new session, its stderr lines timestamped as they come."""

    def __init__(self, engine: str, out: Path):
        cmd = [
            sys.executable, "-m", "gradzip", "train", "--engine", engine, "--workers", "2",
            "--problem", "softmax-digits", "--steps", "1000000", "--eval-every", "1000000",
            "--checkpoint-seconds", "0", "--timeout", str(TIMEOUT), "--quiet", "--out", str(out),
        ]  # fmt: skip
        drop = ("RANK", "WORLD_SIZE", td.FAULT_ENV, td.TIMEOUT_ENV)
        env = {k: v for k, v in os.environ.items() if k not in drop}
        self.p = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
            start_new_session=True,
        )  # fmt: skip
        self.lines: list[tuple[float, str]] = []
        self.metrics = out / "metrics.jsonl"
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for ln in self.p.stderr:
            self.lines.append((time.monotonic(), ln.rstrip()))

    def stepping(self, ranks: int) -> dict[int, int]:
        """Wait until the ranks exist and steps are being written; their pids."""
        deadline = time.monotonic() + 180
        while True:
            assert self.p.poll() is None, "\n".join(ln for _, ln in self.lines)[-3000:]
            assert time.monotonic() < deadline, "no steps within 180 s"
            found = _session_ranks(self.p.pid)
            if len(found) >= ranks and self.metrics.exists() and self.metrics.stat().st_size > 3000:
                return found
            time.sleep(0.1)

    def first(self, pattern: str, since: float, limit: float) -> tuple[float, str]:
        """The first stderr line matching ``pattern``: (seconds after ``since``, line)."""
        deadline = since + limit + 30
        while time.monotonic() < deadline:
            for t, ln in list(self.lines):
                if re.search(pattern, ln):
                    return t - since, ln
            time.sleep(0.05)
        raise AssertionError(
            f"no line matching {pattern!r}:\n" + "\n".join(ln for _, ln in self.lines)[-3000:]
        )

    def kill(self) -> None:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.killpg(self.p.pid, sig)
            except OSError:
                pass
        self.p.wait()


@pytest.mark.parametrize(
    "engine, rank, name",
    [("torchdist", 2, "worker 1 (rank 2)"), ("torchdist-sharded", 1, "worker 1 (rank 1)")],
)
def test_a_stopped_worker_is_named(engine, rank, name, tmp_path):
    run = _Run(engine, tmp_path / "run")
    try:
        pid = run.stepping(2 if engine == "torchdist" else 1)[rank]
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        took, line = run.first(r"^gradzip train: error: ", t0, WITHIN)
        assert took < WITHIN, (took, line)
        # that rank, and only it, with the step and the phases, in one line
        head = line.split("gradzip train: error: ", 1)[1]
        assert head.startswith(f"{name} did not answer within {TIMEOUT:g} s at step "), head
        assert re.search(r"at step \d+ \(.* was [a-z' ]+\): " + re.escape(name), head), head
        assert "heartbeat stopped (last: step " in head, head
        run.p.wait(timeout=30)
        assert run.p.returncode == 1
        assert not any("Traceback" in ln for _, ln in run.lines), run.lines[-20:]
        print(f"{engine}: {name} named after {took:.1f} s (timeout {TIMEOUT:g} s)")
        deadline = time.monotonic() + 15
        while _in_session(run.p.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _in_session(run.p.pid) == []  # the stopped worker included
    finally:
        run.kill()


def test_a_stopped_server_is_named_by_the_workers(tmp_path):
    run = _Run("torchdist", tmp_path / "run")
    try:
        workers = run.stepping(2)
        os.kill(run.p.pid, signal.SIGSTOP)  # rank 0: the server, which serves the store too
        t0 = time.monotonic()
        for r in (1, 2):
            took, line = run.first(rf"gradzip worker \(rank {r}\): the server \(rank 0\) did "
                                   "not answer at step", t0, WITHIN)  # fmt: skip
            assert took < WITHIN, (took, line)
            print(f"rank {r} named the server after {took:.1f} s: {line}")
        deadline = time.monotonic() + 15
        while any(_running(p) for p in workers.values()):  # zombies: rank 0 cannot reap
            assert time.monotonic() < deadline, "the workers did not exit"
            time.sleep(0.1)
    finally:
        run.kill()


_STALL_CHILD = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
from gradzip.engines.liveness import Heartbeat
port = int(sys.argv[1])
store = dist.TCPStore("127.0.0.1", port, 2, False, timeout=timedelta(seconds=30))
hb = Heartbeat(store, 0, 2, timeout=2.0).start()
hb.at(7, "uplink", True)
print("ready", flush=True)
time.sleep(float(sys.argv[2]))  # SIGSTOPped meanwhile, or not
err = hb.blame("waiting for the uplink", [1], expired=True)
print("RANKS", err.ranks, flush=True)
print("MSG", err, flush=True)
"""


@pytest.mark.parametrize("stop", [True, False])
def test_a_rank_that_stood_still_names_itself(stop, tmp_path):
    """A stopped process wakes to a record in which every other rank is silent (its own
    heartbeat thread stood still too): it must name itself, not the healthy peers; and a
    rank that did not stand still names the silent peer as before."""
    import torch.distributed as dist

    from gradzip.engines.liveness import Heartbeat

    store = dist.TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)
    peer = Heartbeat(store, 1, 2, timeout=2.0).start()  # rank 1, beating in this process
    script = tmp_path / "child.py"
    script.write_text(_STALL_CHILD)
    child = subprocess.Popen(
        [sys.executable, str(script), str(store.port), "4.5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        if stop:
            os.kill(child.pid, signal.SIGSTOP)
            time.sleep(3.0)  # > 0.75 * timeout: the child's pulse stands still
            os.kill(child.pid, signal.SIGCONT)
        else:
            peer.stop()  # the peer goes silent instead
        out, _ = child.communicate(timeout=60)
    finally:
        child.kill()
        peer.stop()
    ranks = re.search(r"RANKS \[(.*)\]", out).group(1)
    msg = out.split("MSG ", 1)[1]
    if stop:
        assert ranks == "0", out
        assert "rank 0 itself stood still for 3 s at step 7" in msg, msg
    else:
        assert ranks == "1", out
        assert msg.startswith("rank 1 did not answer within 2 s at step 7"), msg
