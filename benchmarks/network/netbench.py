"""DDP over a bandwidth-limited network built on this machine: gradzip's hook against
DDP's fp32 allreduce, PyTorch's fp16 hook and PyTorch's PowerSGD hook.

The network (Linux, root or CAP_NET_ADMIN; loopback and the namespaces made here only):
one network namespace per rank (``gznet-r0`` ...) and a switch namespace (``gznet-sw``)
holding a bridge; each rank's ``eth0`` is a veth whose peer is a bridge port. A token
bucket filter (``tc qdisc ... tbf``) on both ends of every veth limits each rank's link
to the rate in each direction, as a switched network of that speed. The root
namespace's interfaces are never touched.

For every rate and method it runs ``examples/ddp_fashion_mnist.py`` as 4 ranks, one per
namespace (gloo over the veths), and reads rank 0's measurements: the median step time,
and the training time (evaluation excluded) until the test accuracy first reaches the
target. It prints one table per rate with ratios to the fp32 baseline measured in the
same run, and writes everything to ``--out`` as JSON. The namespaces are deleted at the
end, on error, on Ctrl-C and on SIGTERM.

    sudo python benchmarks/network/netbench.py                       # the default run
    python benchmarks/network/netbench.py --rates 100mbit --methods none,fosgd --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "ddp_fashion_mnist.py"
PREFIX = "gznet"
SUBNET = "10.77.0"
METHODS = (
    "none", "torch-fp16", "torch-powersgd", "fosgd", "memsgd-topk", "ef-signsgd", "topk:k=0.01",
)  # fmt: skip
LABELS = {
    "none": "fp32 allreduce (no hook)",
    "torch-fp16": "torch fp16_compress_hook",
    "torch-powersgd": "torch PowerSGD (rank 2)",
    "topk:k=0.01": "gradzip topk:k=0.01 (EF both)",
}


class PrivilegeError(RuntimeError):
    pass


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


# --- the network -----------------------------------------------------------------------------


class Network:
    """n rank namespaces on one bridge; every link limited by tc (see the module doc)."""

    def __init__(self, n: int, prefix: str = PREFIX):
        self.n, self.p = n, prefix
        self.sw = f"{prefix}-sw"
        self.ranks = [f"{prefix}-r{i}" for i in range(n)]
        self.made: list[str] = []

    @staticmethod
    def check_privileges() -> None:
        missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
        if missing:
            raise PrivilegeError(f"this benchmark needs {' and '.join(missing)} (iproute2)")
        if os.geteuid() != 0:
            raise PrivilegeError(
                "this benchmark builds network namespaces, veth pairs and tc qdiscs: run it as "
                "root (sudo), or with CAP_NET_ADMIN and CAP_SYS_ADMIN"
            )
        probe = f"{PREFIX}-probe{os.getpid()}"
        r = sh("ip", "netns", "add", probe, check=False)
        if r.returncode:
            raise PrivilegeError(
                f"cannot create a network namespace (`ip netns add` said: {r.stderr.strip()}); "
                "this needs CAP_SYS_ADMIN and CAP_NET_ADMIN (a container may need --privileged)"
            )
        sh("ip", "netns", "del", probe, check=False)

    def _ns(self, ns: str, *cmd: str) -> None:
        r = sh("ip", "netns", "exec", ns, *cmd, check=False)
        if r.returncode:
            raise RuntimeError(f"in {ns}: {' '.join(cmd)}: {r.stderr.strip()}")

    def stale(self) -> list[str]:
        out = sh("ip", "netns", "list", check=False).stdout.split()
        return [x for x in out if x.startswith(self.p + "-")]

    def up(self) -> None:
        for ns in self.stale():  # left by a run that was killed with SIGKILL
            sh("ip", "netns", "del", ns, check=False)
        for ns in (self.sw, *self.ranks):
            r = sh("ip", "netns", "add", ns, check=False)
            if r.returncode:
                raise RuntimeError(f"ip netns add {ns}: {r.stderr.strip()}")
            self.made.append(ns)
            self._ns(ns, "ip", "link", "set", "lo", "up")
        self._ns(self.sw, "ip", "link", "add", "br0", "type", "bridge")
        self._ns(self.sw, "ip", "link", "set", "br0", "up")
        for i, ns in enumerate(self.ranks):
            port = f"s{i}"
            r = sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth",
                   "peer", "name", port, "netns", self.sw, check=False)  # fmt: skip
            if r.returncode:
                raise RuntimeError(f"veth for {ns}: {r.stderr.strip()}")
            self._ns(self.sw, "ip", "link", "set", port, "master", "br0")
            self._ns(self.sw, "ip", "link", "set", port, "up")
            self._ns(ns, "ip", "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
            self._ns(ns, "ip", "link", "set", "eth0", "up")

    def set_rate(self, rate: str) -> None:
        """Limit every link to ``rate`` (a tc rate: 1gbit, 100mbit, ...) both ways."""
        bps = parse_rate(rate)
        burst = max(32 * 1024, int(bps / 8 / 250))  # >= one timer tick's worth at HZ=250
        spec = ["tbf", "rate", rate, "burst", str(burst), "latency", "100ms"]
        for i, ns in enumerate(self.ranks):
            for where, dev in ((ns, "eth0"), (self.sw, f"s{i}")):
                self._ns(where, "tc", "qdisc", "replace", "dev", dev, "root", *spec)

    def down(self) -> None:
        for ns in reversed(self.made):
            sh("ip", "netns", "del", ns, check=False)
        self.made.clear()


def parse_rate(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
    r = rate.strip().lower()
    for u in ("kbit", "mbit", "gbit", "bit"):
        if r.endswith(u):
            return float(r[: -len(u)]) * units[u]
    raise ValueError(f"rate {rate!r}: expected a number and kbit, mbit or gbit")


# --- one training run ------------------------------------------------------------------------


class Runner:
    def __init__(self, net: Network, args):
        self.net, self.args = net, args
        self.procs: list[subprocess.Popen] = []
        self.port = 29400 + os.getpid() % 500

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()

    def run(self, method: str, steps: int, target: float, out: Path, log: Path) -> dict:
        a, n = self.args, self.net.n
        self.port += 1
        common = [
            sys.executable, str(EXAMPLE), "--compress", method, "--steps", str(steps),
            "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--width", str(a.width),
            "--momentum", str(a.momentum),
            "--eval-every", str(a.eval_every if target else 0), "--eval-size", str(a.eval_size),
            "--target-acc", str(target), "--seed", str(a.seed), "--threads", "1",
            "--backend", "gloo",
        ]  # fmt: skip
        env = dict(
            os.environ,
            WORLD_SIZE=str(n),
            MASTER_ADDR=f"{SUBNET}.1",
            MASTER_PORT=str(self.port),
            GLOO_SOCKET_IFNAME="eth0",
            OMP_NUM_THREADS="1",
            GRADZIP_THREADS="1",
            PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        if out.exists():
            out.unlink()
        with open(log, "w") as lf:
            for r, ns in enumerate(self.net.ranks):
                cmd = ["ip", "netns", "exec", ns, *common]
                if r == 0:
                    cmd += ["--json", str(out)]
                self.procs.append(
                    subprocess.Popen(
                        cmd,
                        env=dict(env, RANK=str(r)),
                        stdout=lf,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        cwd=ROOT,
                    )  # fmt: skip
                )
            deadline = time.monotonic() + a.timeout
            try:
                while any(p.poll() is None for p in self.procs):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{method}: no result after {a.timeout} s")
                    if any(p.poll() not in (None, 0) for p in self.procs):
                        time.sleep(2)  # let the others report, then stop them
                        break
                    time.sleep(0.5)
            finally:
                codes = [p.poll() for p in self.procs]
                self.kill()
        if not out.exists():
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{method} failed (exit codes {codes}); log {log}:\n{tail}")
        res = json.loads(out.read_text())
        if any(c not in (0, None) for c in codes):
            # rank 0 wrote its result: every step ran; a rank died afterwards (teardown)
            res["teardown_failure"] = f"exit codes {codes} after the run finished; log {log}"
            print(f"[netbench] {method}: teardown failure ({codes}), result kept", flush=True)
        return res


# --- the table -------------------------------------------------------------------------------


def table(rate: str, rows: dict[str, dict], target: float) -> str:
    base = rows.get("none")
    head = (
        f"\n{rate}: 4 ranks, fp32 baseline measured in this run; speedup = baseline / method\n"
        f"{'method':<30} {'step ms':>8} {'speedup':>8} {'MB/step/rank':>12} {'final acc':>9} "
        f"{('to ' + format(target, '.0%') + ' (s)') if target == target else 'no target':>12} "
        f"{'speedup':>8}"
    )
    lines = [head, "-" * len(head.splitlines()[-1])]
    for m, r in rows.items():
        if "error" in r:
            lines.append(f"{LABELS.get(m, 'gradzip ' + m):<30} failed: {r['error'][:60]}")
            continue
        step = r["median_step_s"]
        sp = base["median_step_s"] / step if base and "error" not in base else float("nan")
        tr = r.get("traffic") or {}
        sent = tr.get("sent", 0) + tr.get("dense_sent", 0)
        mb = f"{sent / 1e6 / max(r['steps'], 1):.3f}" if tr else "-"
        reach = r.get("reached")
        tt = f"{reach['time']:.1f}" if reach else ("not reached" if target == target else "-")
        bt = base.get("reached") if base and "error" not in base else None
        tsp = f"{bt['time'] / reach['time']:.2f}x" if (reach and bt) else "-"
        acc = r.get("final_acc")
        lines.append(
            f"{LABELS.get(m, 'gradzip ' + m):<30} {step * 1e3:8.1f} {sp:7.2f}x {mb:>12} "
            f"{(acc or 0):9.4f} {tt:>12} {tsp:>8}"
            + ("  (a rank crashed at exit: teardown failure)" if "teardown_failure" in r else "")
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="1gbit,100mbit")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--steps", type=int, default=300, help="at most, per run to the target")
    p.add_argument("--timing-steps", type=int, default=40,
                   help="steps per run at rates without a target (step time only)")  # fmt: skip
    p.add_argument("--target", type=float, default=0.75, help="test accuracy to reach")
    p.add_argument("--target-rates", default="100mbit", help="rates where runs go to the target")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-size", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--out", default="benchmarks/network/results")
    p.add_argument("--report", default="", help="only print the tables of a results.json")
    a = p.parse_args(argv)
    if a.report:
        res = json.loads(Path(a.report).read_text())
        tr = {r.strip() for r in res["args"]["target_rates"].split(",")}
        for r, rows in res["rates"].items():
            print(table(r, rows, res["args"]["target"] if r in tr else float("nan")))
        return 0
    rates = [r.strip() for r in a.rates.split(",") if r.strip()]
    for r in rates:
        parse_rate(r)
    target_rates = {r.strip() for r in a.target_rates.split(",")}
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    try:
        Network.check_privileges()
    except PrivilegeError as e:
        print(f"netbench: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    net = Network(a.ranks)
    runner = Runner(net, a)

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    results: dict = {"args": vars(a), "rates": {}}
    t_start = time.time()
    try:
        net.up()
        for rate in rates:
            net.set_rate(rate)
            to_target = rate in target_rates
            steps = a.steps if to_target else a.timing_steps
            target = a.target if to_target else 0.0
            rows: dict[str, dict] = {}
            for m in methods:
                t0 = time.time()
                print(f"[netbench] {rate}: {m} ({steps} steps max)...", flush=True)
                try:
                    safe = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in m)
                    stem = f"{rate}_{safe}"
                    rows[m] = runner.run(m, steps, target, out / f"{stem}.json",
                                         out / f"{stem}.log")  # fmt: skip
                except (RuntimeError, TimeoutError) as e:
                    rows[m] = {"error": str(e)}
                    print(f"[netbench] {m} failed: {str(e)[:2000]}", flush=True)
                print(f"[netbench]   done in {time.time() - t0:.0f} s", flush=True)
            results["rates"][rate] = rows
            print(table(rate, rows, target if to_target else float("nan")), flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=1))
    except KeyboardInterrupt as e:
        print(f"\n[netbench] interrupted ({e}); cleaning up", file=sys.stderr)
        return 130
    finally:
        runner.kill()
        net.down()
        for s, h in old.items():
            signal.signal(s, h)
        left = net.stale()
        if left:
            print(f"[netbench] could not delete namespaces {left}", file=sys.stderr)
    print(f"\n[netbench] total {time.time() - t_start:.0f} s; results in {out}/results.json")
    print("\n".join(table(r, rows, a.target if r in target_rates else float("nan"))
                    for r, rows in results["rates"].items()))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
