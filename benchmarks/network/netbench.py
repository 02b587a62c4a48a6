"""DDP over a bandwidth-limited network built on this machine: gradzip's hook against
DDP's fp32 allreduce, PyTorch's fp16 hook and PyTorch's PowerSGD hook.

The network (Linux, root or CAP_NET_ADMIN; loopback and the namespaces made here only):
one network namespace per rank (``gznet-r0`` ...) and a switch namespace (``gznet-sw``)
holding a bridge; each rank's ``eth0`` is a veth whose peer is a bridge port. A token
bucket filter (``tc qdisc ... tbf``) on both ends of every veth limits each rank's link
to the rate in each direction, as a switched network of that speed. The root
namespace's interfaces are never touched.

For every repetition, rate and method it runs ``examples/ddp_fashion_mnist.py`` as 4
ranks, one per namespace (gloo over the veths), and reads rank 0's measurements: the
median step time, the accuracy timeline and the training time (evaluation excluded)
until the test accuracy first reaches the target. Repetitions are interleaved (the first
of every rate and method, then the second, ...) so that drifts of a shared machine hit
every method alike; repetition k uses seed ``--seed`` + k for every method. It prints one
table per rate (medians over the repetitions, min-max, ratios to the fp32 baseline
measured in the same run), writes every run to ``--out``/netbench.json and draws
``--out``/netbench-<rate>.png (accuracy against training time, median step times). The
namespaces are deleted at the end, on error, on Ctrl-C and on SIGTERM.

The default run: SGD lr 0.05 momentum 0.9, 4 ranks, batch 32 per rank; fp32 allreduce,
the fp16 hook, PowerSGD at ranks 1, 2 and 4 (the best one reported), fosgd, fosgd-ef and
gradzip's sub-one-bit method (``SUB_ONE_BIT``); at 100 Mbit/s and 1 Gbit/s every run goes
until the test accuracy (4,000 images, every 10 steps) first reaches 85%, at most 300
steps; 3 repetitions. About 85 minutes on a quiet machine, at most about 125 if no run
stops early (``--plan`` prints the estimate; a loaded machine takes longer).

    python benchmarks/network/netbench.py --plan             # the runs and how long they take
    sudo python benchmarks/network/netbench.py               # the default run
    sudo python benchmarks/network/netbench.py --rates 100mbit --methods "none;fosgd" --reps 1
    python benchmarks/network/netbench.py --report benchmarks/network/results/netbench.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "ddp_fashion_mnist.py"
PREFIX = "gznet"
SUBNET = "10.77.0"
#: gradzip's method below one bit per coordinate (issue 15, part 2), by its preset name:
#: skipped with a note while gradzip does not know it (any other unknown method is an
#: error), so the default list runs before that preset lands; set the name once it has one.
SUB_ONE_BIT = "subbit"
#: the default methods; on the command line they are separated by ';' (a spec may hold
#: commas: ``compose(topk(k=0.01),natural)``, ``torch-powersgd:1,2,4``)
METHODS = ("none", "torch-fp16", "torch-powersgd:1,2,4", "fosgd", "fosgd-ef", SUB_ONE_BIT)
POWERSGD = "torch-powersgd"
#: a gradzip entry's suffix for the synchronous hook (``fosgd/sync``: overlap off)
SYNC = "/sync"
POWERSGD_DEFAULT_RANK = 2  # the example's --powersgd-rank default
TORCH = ("none", "torch-fp16")
#: the plan's prior cost of a step: (CPU seconds, MB sent per step and rank). Measured on
#: this 2-core machine with 4 ranks (docs/ddp.md); they only size the time estimate.
PRIORS = {
    "none": (0.08, 19.4),
    "torch-fp16": (0.09, 9.7),
    POWERSGD: (0.12, 0.1),
    "fosgd": (0.15, 0.61),
}
PRIOR_GRADZIP = (0.16, 0.61)
RUN_OVERHEAD_S = 30.0  # start of 4 ranks (torch, data, gloo, numba warm-up), teardown
EVAL_S = 1.0  # one evaluation of 4,000 test images (1,000 per rank, 4 ranks on 2 cores)
LINK_EFFICIENCY = 0.9  # of the tc rate, as gloo's payload (fp32 at 100 Mbit/s: 1.79 s)


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


def split_list(text: str, sep: str) -> list[str]:
    return [x.strip() for x in text.split(sep) if x.strip()]


# --- methods ---------------------------------------------------------------------------------


def expand_methods(text: str) -> list[str]:
    """The ``;``-separated method list as run entries: ``torch-powersgd:1,2,4`` becomes
    ``torch-powersgd@1``, ``@2``, ``@4`` (one entry per rank) and a bare ``torch-powersgd``
    the example's rank 2; everything else is passed to the example's ``--compress`` as
    written. Duplicates are dropped."""
    out: list[str] = []
    for item in split_list(text, ";"):
        if item == POWERSGD or item.startswith((POWERSGD + ":", POWERSGD + "@")):
            ranks = [POWERSGD_DEFAULT_RANK]
            if item != POWERSGD:
                try:
                    ranks = [int(r) for r in item[len(POWERSGD) + 1 :].split(",")]
                except ValueError:
                    ranks = []
                if not ranks or min(ranks) < 1:
                    raise ValueError(f"{item!r}: expected {POWERSGD}:1,2,4 or {POWERSGD}@2")
            entries = [f"{POWERSGD}@{r}" for r in ranks]
        else:
            entries = [item]
        out += [e for e in entries if e not in out]
    return out


def is_powersgd(entry: str) -> bool:
    return entry == POWERSGD or entry.startswith(POWERSGD + "@")


def powersgd_rank(entry: str) -> int:
    return int(entry.split("@", 1)[1]) if "@" in entry else POWERSGD_DEFAULT_RANK


def is_gradzip(entry: str) -> bool:
    return entry not in TORCH and not is_powersgd(entry)


def compress_args(entry: str) -> list[str]:
    """The example's flags for one entry (a gradzip entry ending in ``/sync`` runs the hook
    without its communication thread: ``--no-overlap``)."""
    if is_powersgd(entry):
        return ["--compress", POWERSGD, "--powersgd-rank", str(powersgd_rank(entry))]
    spec, sync = gradzip_spec(entry)
    return ["--compress", spec, *(["--no-overlap"] if sync else [])]


def gradzip_spec(entry: str) -> tuple[str, bool]:
    """(the spec, whether ``/sync`` asked for the synchronous hook) of a gradzip entry."""
    return (entry[: -len(SYNC)], True) if entry.endswith(SYNC) else (entry, False)


def label(entry: str) -> str:
    if entry == "none":
        return "fp32 allreduce (no hook)"
    if entry == "torch-fp16":
        return "torch fp16_compress_hook"
    if is_powersgd(entry):
        return f"torch PowerSGD rank {powersgd_rank(entry)}"
    return f"gradzip {entry}"


def unknown_gradzip_methods(entries: list[str]) -> dict[str, str]:
    """{entry: why} for the gradzip entries that gradzip cannot build (asked in a
    subprocess, as the ranks would); {} when gradzip itself cannot be imported here."""
    specs = [gradzip_spec(e)[0] for e in entries if is_gradzip(e)]
    if not specs:
        return {}
    code = (
        "import json, sys\n"
        "from gradzip import compressor\n"
        "from gradzip.methods import PRESETS\n"
        "bad = {}\n"
        "for s in json.loads(sys.argv[1]):\n"
        "    if s in PRESETS:\n"
        "        continue\n"
        "    try:\n"
        "        compressor(s)\n"
        "    except Exception as e:\n"
        "        bad[s] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__\n"
        "print(json.dumps(bad))\n"
    )
    env = dict(
        os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    r = subprocess.run([sys.executable, "-c", code, json.dumps(specs)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300)  # fmt: skip
    if r.returncode:
        return {}
    bad = json.loads(r.stdout.strip().splitlines()[-1])
    for s in bad:
        if "," in s and ";" not in s:
            bad[s] += " (methods are separated by ';')"
    return bad


# --- the plan and its time estimate ----------------------------------------------------------


def prior_step_s(entry: str, rate: str) -> float:
    key = POWERSGD if is_powersgd(entry) else entry
    cpu, mb = PRIORS.get(key, PRIOR_GRADZIP)
    return cpu + mb * 8e6 / (LINK_EFFICIENCY * parse_rate(rate))


def run_estimate_s(entry: str, rate: str, steps: int, eval_every: int) -> float:
    evals = (steps // eval_every if eval_every else 0) + 1
    return RUN_OVERHEAD_S + steps * prior_step_s(entry, rate) + evals * EVAL_S


def make_plan(a) -> dict:
    """What the run does: per rate, steps and target; the per-run estimates (likely and
    at most) for one repetition."""
    rates = split_list(a.rates, ",")
    for r in rates:
        parse_rate(r)
    target_rates = set(split_list(a.target_rates, ",")) if a.target else set()
    methods = expand_methods(a.methods) + [
        e for e in expand_methods(a.add) if e not in expand_methods(a.methods)
    ]
    plan: dict = {"rates": {}, "methods": methods}
    for rate in rates:
        to_target = rate in target_rates
        steps = a.steps if (to_target or not a.target) else a.timing_steps
        likely = min(steps, a.expect_steps) if (to_target and not a.no_stop) else steps
        ev = a.eval_every if to_target else 0
        plan["rates"][rate] = {
            "to_target": to_target,
            "steps": steps,
            "target": a.target if to_target else 0.0,
            "eval_every": ev,
            "likely_s": {m: run_estimate_s(m, rate, likely, ev) for m in methods},
            "max_s": {m: run_estimate_s(m, rate, steps, ev) for m in methods},
        }
    return plan


def rep_seconds(plan: dict, which: str = "likely_s") -> float:
    return sum(sum(p[which].values()) for p in plan["rates"].values())


def describe_plan(plan: dict, a) -> str:
    lines = []
    for rate, p in plan["rates"].items():
        if p["to_target"]:
            stop = (
                "all of them"
                if a.no_stop
                else f"stopping at the first evaluation >= {p['target']:.0%}"
            )
            what = (
                f"to {p['target']:.0%} test accuracy: at most {p['steps']} steps, "
                f"{stop}, evaluation every {p['eval_every']} steps"
            )
        else:
            what = f"{p['steps']} steps for the step time only (one evaluation at the end)"
        lines.append(
            f"  {rate}: {len(plan['methods'])} runs per repetition, {what}; about "
            f"{sum(p['likely_s'].values()) / 60:.0f} min per repetition "
            f"(at most {sum(p['max_s'].values()) / 60:.0f})"
        )
    likely, most = rep_seconds(plan) * a.reps, rep_seconds(plan, "max_s") * a.reps
    early = any(p["to_target"] for p in plan["rates"].values()) and not a.no_stop
    lines.append(
        f"  {a.reps} repetition(s): about {likely / 60:.0f} min"
        + (
            f" (runs to the target stopping near step {a.expect_steps}, --expect-steps), at "
            f"most {most / 60:.0f} min (every run to its step limit)"
            if early
            else ""
        )
        + "; the slowest: "
        + ", ".join(
            f"{label(m)} at {rate} {p['likely_s'][m] / 60:.1f} min"
            for rate, p in plan["rates"].items()
            for m in sorted(p["likely_s"], key=p["likely_s"].get)[-1:]
        )
    )
    return "\n".join(lines)


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

    def run(self, entry: str, steps: int, target: float, eval_every: int, seed: int,
            out: Path, log: Path, timeout: float) -> dict:  # fmt: skip
        a, n = self.args, self.net.n
        self.port += 1
        common = [
            sys.executable, str(EXAMPLE), *compress_args(entry), "--steps", str(steps),
            "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--width", str(a.width),
            "--momentum", str(a.momentum),
            "--eval-every", str(eval_every), "--eval-size", str(a.eval_size),
            "--target-acc", str(0.0 if a.no_stop else target), "--seed", str(seed),
            "--threads", "1", "--backend", "gloo",
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
            lf.write(" ".join(common[1:]) + "\n")
            lf.flush()
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
            deadline = time.monotonic() + timeout
            try:
                while any(p.poll() is None for p in self.procs):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{entry}: no result after {timeout:.0f} s")
                    if any(p.poll() not in (None, 0) for p in self.procs):
                        time.sleep(2)  # let the others report, then stop them
                        break
                    time.sleep(0.5)
            finally:
                codes = [p.poll() for p in self.procs]
                self.kill()
        if not out.exists():
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{entry} failed (exit codes {codes}); log {log}:\n{tail}")
        res = json.loads(out.read_text())
        if a.no_stop and target and res.get("target_acc") is None:
            # the example ran every step; the time to the target is read off its timeline
            first = next((t for t in res.get("timeline", []) if t["acc"] >= target), None)
            res["reached"] = {"step": first["step"], "time": first["time"]} if first else None
            res["target_acc"] = target
        if any(c not in (0, None) for c in codes):
            # rank 0 wrote its result: every step ran; a rank died afterwards (teardown)
            res["teardown_failure"] = f"exit codes {codes} after the run finished; log {log}"
            print(f"[netbench] {entry}: teardown failure ({codes}), result kept", flush=True)
        return res


# --- medians over repetitions ----------------------------------------------------------------


def upgrade(res: dict) -> dict:
    """A results file of the first format (one run per rate and method, ``rates``:
    {rate: {method: result}}) in this one's (a flat list of ``runs``)."""
    if "runs" in res:
        return res
    a = res.get("args", {})
    runs, methods = [], []
    for rate, rows in res.get("rates", {}).items():
        for m, row in rows.items():
            runs.append({"rate": rate, "method": m, "rep": 0, "seed": a.get("seed", 0), **row})
            methods += [m] if m not in methods else []
    tr = split_list(a.get("target_rates", ""), ",") if a.get("target") else []
    return {
        "version": 1,
        "args": a,
        "methods": methods,
        "rates": list(res.get("rates", {})),
        "target_rates": tr,
        "runs": runs,
        "skipped": {},
    }


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def summarize(runs: list[dict], to_target: bool) -> dict:
    """Medians over one method's repetitions at one rate. The median time to the target
    counts a run that did not reach it (or failed) as infinitely long: it is finite when
    more than half of the repetitions reached the target."""
    ok = [r for r in runs if "error" not in r]
    steps = [r["median_step_s"] for r in ok if r.get("median_step_s") is not None]
    ttt = [r["reached"]["time"] if r.get("reached") else math.inf for r in ok]
    ttt += [math.inf] * (len(runs) - len(ok))
    reached = [t for t in ttt if t < math.inf]
    acc = [r["final_acc"] for r in ok if r.get("final_acc") is not None]
    mb = []
    for r in ok:
        tr = r.get("traffic") or {}
        if tr and r.get("steps"):
            mb.append((tr.get("sent", 0) + tr.get("dense_sent", 0)) / 1e6 / r["steps"])
    return {
        "reps": len(runs),
        "ok": len(ok),
        "errors": [r["error"] for r in runs if "error" in r],
        "step_s": _median(steps),
        "step_min": min(steps, default=math.nan),
        "step_max": max(steps, default=math.nan),
        "ttt_s": _median(ttt) if (to_target and ttt) else math.nan,
        "ttt_min": min(reached, default=math.nan),
        "ttt_max": max(reached, default=math.nan),
        "reached": len(reached),
        "acc": _median(acc),
        "acc_min": min(acc, default=math.nan),
        "acc_max": max(acc, default=math.nan),
        "mb": _median(mb),
        "teardown_failures": sum("teardown_failure" in r for r in ok),
    }


def _key(s: dict, to_target: bool) -> tuple:
    """Order of merit: time to the target (median), then the step time."""
    step = s["step_s"] if s["step_s"] == s["step_s"] else math.inf
    return (s["ttt_s"] if to_target else 0.0, step)


def summaries(res: dict) -> dict[str, dict[str, dict]]:
    """{rate: {entry: summary}} in the run's method order, plus ``best PowerSGD``: the
    PowerSGD rank with the shortest median time to the target, then the shortest step."""
    res = upgrade(res)
    out: dict[str, dict[str, dict]] = {}
    tr = set(res.get("target_rates", []))
    for rate in res["rates"]:
        rows: dict[str, dict] = {}
        for m in res["methods"]:
            runs = [r for r in res["runs"] if r["rate"] == rate and r["method"] == m]
            if runs:
                rows[m] = summarize(runs, rate in tr)
        ps = [m for m in rows if is_powersgd(m) and rows[m]["ok"]]
        if ps:
            best = min(ps, key=lambda m: _key(rows[m], rate in tr))
            rows["best PowerSGD"] = dict(rows[best], entry=best)
        out[rate] = rows
    return out


def _cell(med: float, lo: float, hi: float, fmt: str, rfmt: str) -> str:
    """``median (min-max)``; the median alone where the range is one value."""
    if lo != lo or hi != hi or format(lo, rfmt) == format(hi, rfmt):
        return format(med, fmt)
    return f"{med:{fmt}} ({lo:{rfmt}}-{hi:{rfmt}})"


def _ratio(base: float, x: float) -> str:
    if base != base or x != x or math.isinf(base) or math.isinf(x) or x <= 0:
        return "-"
    return f"{base / x:.2f}x"


def table(rate: str, rows: dict[str, dict], target: float, to_target: bool, reps: int) -> str:
    """One rate's table: medians over the repetitions (min-max), ratios to fp32."""
    base = rows.get("none")
    tcol = f"to {target:.0%} s (min-max)" if to_target else "time to target"
    head = (
        f"{'method':<32} {'step ms (min-max)':>22} {'x fp32':>7} {'MB/step':>8} "
        f"{tcol:>24} {'reached':>7} {'x fp32':>7} {'last acc (min-max)':>22}"
    )
    lines = [
        f"\n{rate}: {reps} repetition(s), medians (min-max); x fp32 = fp32 allreduce's median "
        "/ the method's, measured in this run; last acc: the last evaluation's"
        + (" (at the target where a run stopped there)" if to_target else ""),
        head,
        "-" * len(head),
    ]
    psgd = [m for m in rows if is_powersgd(m)]
    order = [m for m in rows if m != "best PowerSGD"]
    if len(psgd) > 1:  # the best rank stands for them (every rank is listed below)
        order = [m for m in order if not is_powersgd(m) or m == psgd[0]]
        order = ["best PowerSGD" if m == psgd[0] else m for m in order]
    for m in order:
        s = rows[m]
        name = label(m)
        if m == "best PowerSGD":
            name = f"best PowerSGD (rank {powersgd_rank(s['entry'])})"
        if not s["ok"]:
            lines.append(f"{name:<32} failed ({s['reps']}x): {s['errors'][0][:70]}")
            continue
        step = _cell(s["step_s"] * 1e3, s["step_min"] * 1e3, s["step_max"] * 1e3, ".1f", ".0f")
        mb = f"{s['mb']:.3f}" if s["mb"] == s["mb"] else "-"
        if to_target:
            t = s["ttt_s"]
            tt = (
                "not reached"
                if math.isinf(t)
                else _cell(t, s["ttt_min"], s["ttt_max"], ".1f", ".0f")
            )
            reach = f"{s['reached']}/{s['reps']}"
            tsp = _ratio(base["ttt_s"], t) if base and base["ok"] else "-"
        else:
            tt, reach, tsp = "-", "-", "-"
        ssp = _ratio(base["step_s"], s["step_s"]) if base and base["ok"] else "-"
        acc = _cell(s["acc"], s["acc_min"], s["acc_max"], ".4f", ".3f")
        note = ""
        if s["ok"] < s["reps"]:
            note += f"  ({s['reps'] - s['ok']} failed)"
        if s["teardown_failures"]:
            note += f"  ({s['teardown_failures']} teardown failure(s))"
        lines.append(
            f"{name:<32} {step:>22} {ssp:>7} {mb:>8} {tt:>24} {reach:>7} {tsp:>7} {acc:>22}{note}"
        )
    if len(psgd) > 1:
        parts = []
        for m in psgd:
            s = rows[m]
            if not s["ok"]:
                parts.append(f"rank {powersgd_rank(m)} failed")
                continue
            t = s["ttt_s"]
            tt = ""
            if to_target:
                tt = "not reached" if math.isinf(t) else f"{t:.1f} s"
                tt = f", to target {tt} ({s['reached']}/{s['reps']})"
            parts.append(f"rank {powersgd_rank(m)} {s['step_s'] * 1e3:.1f} ms{tt}")
        lines.append("PowerSGD by rank: " + "; ".join(parts))
    lines += verdict(rows, to_target)
    return "\n".join(lines)


def verdict(rows: dict[str, dict], to_target: bool) -> list[str]:
    """gradzip's best method against the best PowerSGD and PyTorch's fp16 hook."""
    gz = [m for m in rows if is_gradzip(m) and m != "best PowerSGD" and rows[m]["ok"]]
    if not gz:
        return []
    best = min(gz, key=lambda m: _key(rows[m], to_target))
    s = rows[best]
    out = []
    for ref, name in (("best PowerSGD", "the best PowerSGD"), ("torch-fp16", "torch fp16")):
        r = rows.get(ref)
        if not r or not r["ok"]:
            continue
        what = f"step time {_ratio(r['step_s'], s['step_s'])}"
        if to_target:
            what = f"time to the target {_ratio(r['ttt_s'], s['ttt_s'])}, " + what
        out.append(f"{name} / gradzip's best ({best}): {what} (> 1x: gradzip's is shorter)")
    return out


def report(res: dict) -> str:
    res = upgrade(res)
    a = res.get("args", {})
    tr = set(res.get("target_rates", []))
    reps = 1 + max((r.get("rep", 0) for r in res["runs"]), default=0)
    lines = [
        f"[netbench] {a.get('ranks', 4)} ranks, SGD lr {a.get('lr')} momentum "
        f"{a.get('momentum')}, batch {a.get('batch_size')} per rank, width {a.get('width')}"
        + (
            f"; target {a.get('target', 0):.0%} at {', '.join(sorted(tr))}"
            + ("" if a.get("no_stop") else " (runs stop there)")
            if tr
            else "; no target"
        )
    ]
    for skipped, why in res.get("skipped", {}).items():
        lines.append(f"[netbench] skipped {skipped}: {why}")
    for rate, rows in summaries(res).items():
        lines.append(table(rate, rows, a.get("target", 0.0), rate in tr, reps))
    return "\n".join(lines)


# --- the plot --------------------------------------------------------------------------------


def plot(res: dict, out_dir: Path) -> list[Path]:
    """Per rate, ``netbench-<rate>.png``: test accuracy against training time (every
    repetition thin, the median one thick) and the median step time (min-max bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    res = upgrade(res)
    a = res.get("args", {})
    tr = set(res.get("target_rates", []))
    written = []
    for rate, rows in summaries(res).items():
        methods = [m for m in rows if m != "best PowerSGD" and rows[m]["ok"]]
        if not methods:
            continue
        to_target = rate in tr
        curves = to_target or any(
            len(r.get("timeline", [])) > 1 for r in res["runs"] if r["rate"] == rate
        )
        fig, axes = plt.subplots(
            1,
            2 if curves else 1,
            figsize=(13, 5) if curves else (7, 4.5),
            squeeze=False,
            gridspec_kw={"width_ratios": [3, 2]} if curves else None,
        )
        ax_bar = axes[0][-1]
        colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
        if curves:
            ax = axes[0][0]
            lo = 1.0
            for m in methods:
                runs = [
                    r
                    for r in res["runs"]
                    if r["rate"] == rate
                    and r["method"] == m
                    and "error" not in r
                    and r.get("timeline")
                ]
                for r in runs:
                    t = [p["time"] for p in r["timeline"]]
                    y = [p["acc"] for p in r["timeline"]]
                    lo = min(lo, *y)
                    ax.plot(t, y, color=colors[m], lw=0.7, alpha=0.35)
                runs.sort(
                    key=lambda r: (
                        r["reached"]["time"] if r.get("reached") else math.inf,
                        r["timeline"][-1]["time"],
                    )
                )
                if runs:
                    r = runs[(len(runs) - 1) // 2]
                    t = [p["time"] for p in r["timeline"]]
                    y = [p["acc"] for p in r["timeline"]]
                    tt = rows[m]["ttt_s"]
                    name = label(m) + (
                        f": {tt:.1f} s to target" if tt < math.inf
                        else ": not reached" if to_target else ""
                    )  # fmt: skip
                    ax.plot(t, y, color=colors[m], lw=2, marker=".", ms=4, label=name)
            target = a.get("target", 0.0)
            if to_target and target:
                ax.axhline(target, color="gray", ls="--", lw=1)
                ax.set_ylim(max(lo, target - 0.25) - 0.01, None)
            ax.set_xscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(plain)
            ax.tick_params(axis="x", which="minor", labelsize=7)
            ax.set_xlabel("training time, s (evaluation excluded; log scale)")
            ax.set_ylabel("test accuracy")
            ax.set_title("accuracy against time (thick: median repetition)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8, loc="lower right")
        s = [rows[m] for m in methods]
        y = range(len(methods))
        med = [x["step_s"] * 1e3 for x in s]
        err = [
            [x["step_s"] * 1e3 - x["step_min"] * 1e3 for x in s],
            [x["step_max"] * 1e3 - x["step_s"] * 1e3 for x in s],
        ]
        ax_bar.barh(list(y), med, xerr=err, color=[colors[m] for m in methods], capsize=3)
        ax_bar.set_yticks(list(y), [label(m) for m in methods], fontsize=8)
        ax_bar.invert_yaxis()
        ax_bar.set_xlim(0, max(x["step_max"] for x in s) * 1.15e3)
        ax_bar.set_xlabel("median step, ms (min-max over repetitions)")
        for i, (v, x) in enumerate(zip(med, s, strict=True)):
            ax_bar.text(x["step_max"] * 1e3, i, f"  {v:.0f}", va="center", fontsize=8)
        ax_bar.grid(alpha=0.3, axis="x", which="both")
        reps = 1 + max((r.get("rep", 0) for r in res["runs"]), default=0)
        fig.suptitle(
            f"netbench {rate}: {a.get('ranks', 4)} ranks, SGD lr {a.get('lr')} momentum "
            f"{a.get('momentum')}, {reps} repetition(s)"
        )
        fig.tight_layout()
        path = out_dir / f"netbench-{rate}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# --- main ------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=(
            "The default run goes to the target at both rates (100mbit and 1gbit): about "
            "85 min on a quiet machine (8 methods, 3 repetitions; at most about 125 if no "
            "run stops early); --target-rates 100mbit makes the 1gbit runs step-time-only "
            "runs of --timing-steps (about 16 min less). --plan prints the runs and the "
            "estimate without running anything; --budget caps the wall time."
        ),
    )
    p.add_argument(
        "--methods",
        default=";".join(METHODS),
        help="';'-separated: none, torch-fp16, torch-powersgd:1,2,4 (each rank; "
        "the best is reported) or torch-powersgd@2, any gradzip preset or spec "
        "(topk:k=0.01)",
    )
    p.add_argument("--add", default="", help="';'-separated methods appended to --methods")
    p.add_argument("--rates", default="100mbit,1gbit", help="','-separated tc rates")
    p.add_argument(
        "--target-rates",
        default="100mbit,1gbit",
        help="rates whose runs go to the target; the others run --timing-steps "
        "for the step time only",
    )
    p.add_argument("--reps", type=int, default=3, help="repetitions per method, interleaved")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--steps", type=int, default=300, help="at most, per run to the target")
    p.add_argument(
        "--timing-steps",
        type=int,
        default=50,
        help="steps per run at rates without a target (step time only)",
    )
    p.add_argument(
        "--target",
        type=float,
        default=0.85,
        help="test accuracy to reach (0: no target, every rate times steps only)",
    )
    p.add_argument(
        "--no-stop",
        action="store_true",
        help="run every step even after the target (final accuracy at --steps "
        "for every method; fp32 at 100mbit then takes ~9 min a run)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument(
        "--eval-every",
        type=int,
        default=10,
        help="steps between evaluations in runs to the target (the time to the "
        "target is read at these points)",
    )
    p.add_argument("--eval-size", type=int, default=4000, help="test images per evaluation")
    p.add_argument("--seed", type=int, default=0, help="repetition k uses seed + k")
    p.add_argument(
        "--expect-steps",
        type=int,
        default=180,
        help="steps to the target assumed by the time estimate (fp32 with the "
        "momentum recipe reaches 85%% near step 160-200)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=0,
        help="minutes: no repetition is started that the estimate (measured "
        "times once known) says would end later (0: no limit)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=0,
        help="seconds per run (0: twice its longest estimate plus 2 min)",
    )
    p.add_argument(
        "--out",
        default="benchmarks/network/results",
        help="folder of netbench.json, the plots and each run's JSON and log",
    )
    p.add_argument("--plan", action="store_true", help="print the plan and estimate, run nothing")
    p.add_argument(
        "--report",
        default="",
        help="a netbench.json: print its tables and redraw its plots, run nothing",
    )
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    if a.reps < 1:
        p.error("--reps must be >= 1")
    return a


class Clock:
    """The time left, from the plan's priors scaled by what the runs so far took against
    theirs, or each (rate, method)'s own measured mean once it has one."""

    def __init__(self, plan: dict):
        self.plan = plan
        self.walls: dict[tuple[str, str], list[float]] = {}
        self.prior_done = self.wall_done = 0.0

    def add(self, rate: str, m: str, wall: float) -> None:
        self.walls.setdefault((rate, m), []).append(wall)
        self.prior_done += self.plan["rates"][rate]["likely_s"][m]
        self.wall_done += wall

    def seconds(self, todo: list[tuple[str, str]]) -> float:
        scale = self.wall_done / self.prior_done if self.prior_done else 1.0
        return sum(
            statistics.fmean(self.walls[k])
            if k in self.walls
            else scale * self.plan["rates"][k[0]]["likely_s"][k[1]]
            for k in todo
        )


def run_all(plan: dict, a, net: Network, runner: Runner, results: dict, json_path: Path,
            t_start: float) -> None:  # fmt: skip
    """Every repetition of every rate and method, interleaved; results.json after each."""
    one_rep = [(rate, m) for rate in plan["rates"] for m in plan["methods"]]
    clock = Clock(plan)
    out = json_path.parent
    for rep in range(a.reps):
        if rep and a.budget:
            nxt = clock.seconds(one_rep)
            if time.time() - t_start + nxt > a.budget * 60:
                print(f"[netbench] --budget {a.budget:g} min: stopping after {rep} "
                      f"repetition(s) (the next would take about {nxt / 60:.0f} min)")  # fmt: skip
                return
        for i, (rate, m) in enumerate(one_rep):
            p = plan["rates"][rate]
            if i == 0 or one_rep[i - 1][0] != rate:
                net.set_rate(rate)
            seed = a.seed + rep
            print(f"[netbench] rep {rep + 1}/{a.reps} {rate}: {m} (seed {seed}, "
                  f"{p['steps']} steps max)...", flush=True)  # fmt: skip
            safe = "".join(ch if ch.isalnum() or ch in "-.@" else "_" for ch in m)
            stem = f"{rate}_{safe}_rep{rep + 1}"
            row = {"rate": rate, "method": m, "rep": rep, "seed": seed}
            t0 = time.time()
            try:
                row |= runner.run(
                    m, p["steps"], p["target"], p["eval_every"], seed, out / f"{stem}.json",
                    out / f"{stem}.log", a.timeout or 2 * p["max_s"][m] + 120,
                )  # fmt: skip
            except (RuntimeError, TimeoutError) as e:
                row["error"] = str(e)
                print(f"[netbench] {m} failed: {str(e)[:2000]}", flush=True)
            row["wall_s"] = wall = time.time() - t0
            clock.add(rate, m, wall)
            results["runs"].append(row)
            results["total_s"] = time.time() - t_start
            _write(results, json_path)
            left = clock.seconds(one_rep[i + 1 :] + one_rep * (a.reps - rep - 1))
            step, reached = row.get("median_step_s"), row.get("reached")
            print(
                f"[netbench]   {wall:.0f} s"
                + (f"; median step {step * 1e3:.1f} ms" if step else "")
                + (f"; target at step {reached['step']}, {reached['time']:.1f} s" if reached
                   else "; target not reached" if p["to_target"] and step else "")
                + f"; about {left / 60:.0f} min left (elapsed {(time.time() - t_start) / 60:.0f})",
                flush=True,
            )  # fmt: skip


def _write(results: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.report:
        res = json.loads(Path(a.report).read_text())
        print(report(res))
        if not a.no_plot:
            for path in plot(res, Path(a.report).parent):
                print(f"[netbench] plot {path}")
        return 0
    try:
        plan = make_plan(a)
    except ValueError as e:
        print(f"netbench: {e}", file=sys.stderr)
        return 2
    unknown = unknown_gradzip_methods(plan["methods"])
    skipped = {m: why for m, why in unknown.items() if m == SUB_ONE_BIT}
    for m, why in skipped.items():
        print(f"[netbench] skipping {m}, gradzip's sub-one-bit method, not there yet ({why})")
    if len(unknown) > len(skipped):
        for m, why in unknown.items():
            if m not in skipped:
                print(f"netbench: gradzip does not know {m!r}: {why}", file=sys.stderr)
        return 2
    if skipped:
        a.methods = ";".join(m for m in plan["methods"] if m not in skipped)
        a.add = ""
        plan = make_plan(a)
    if not plan["methods"]:
        print("netbench: no method to run", file=sys.stderr)
        return 2
    print(f"[netbench] methods: {'; '.join(plan['methods'])}", flush=True)
    print("[netbench] plan (estimates from prior step times; they are revised as runs end):")
    print(describe_plan(plan, a), flush=True)
    one = rep_seconds(plan)
    if a.budget:
        fit = int(a.budget * 60 // one) if one else a.reps
        if fit < 1:
            print(
                f"netbench: --budget {a.budget:g} min is less than one repetition (about "
                f"{one / 60:.0f} min): fewer methods, rates or --steps",
                file=sys.stderr,
            )
            return 2
        if fit < a.reps:
            print(
                f"[netbench] --budget {a.budget:g} min: about {fit} of {a.reps} repetitions "
                "fit; the run stops when the next would not",
                flush=True,
            )
    if a.plan:
        return 0
    try:
        Network.check_privileges()
    except PrivilegeError as e:
        print(f"netbench: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "netbench.json"
    net = Network(a.ranks)
    runner = Runner(net, a)

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, on_signal) for s in sigs}
    results: dict = {
        "version": 2,
        "args": vars(a),
        "methods": plan["methods"],
        "rates": list(plan["rates"]),
        "target_rates": [r for r, p in plan["rates"].items() if p["to_target"]],
        "skipped": skipped,
        "runs": [],
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    t_start = time.time()
    code = 0
    try:
        net.up()
        run_all(plan, a, net, runner, results, json_path, t_start)
    except KeyboardInterrupt as e:
        print(f"\n[netbench] interrupted ({e}); cleaning up", file=sys.stderr)
        code = 130
    finally:
        for s in sigs:  # a second Ctrl-C must not stop the cleanup half way
            signal.signal(s, signal.SIG_IGN)
        runner.kill()
        net.down()
        left = net.stale()
        if left:
            print(f"[netbench] could not delete namespaces {left}", file=sys.stderr)
        for s, h in old.items():
            signal.signal(s, h)
    results["total_s"] = time.time() - t_start
    if results["runs"]:
        _write(results, json_path)
        print(report(results))
        if not a.no_plot:
            for path in plot(results, out):
                print(f"[netbench] plot {path}")
    print(f"\n[netbench] total {results['total_s'] / 60:.1f} min; results in {json_path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
