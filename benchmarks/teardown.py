"""Do finished DDP jobs exit 0? Consecutive torchrun runs of the example, tallied (issue 18).

Each run is ``torchrun --standalone --nproc-per-node N examples/ddp_fashion_mnist.py``
with a gradzip method and a few steps; a run counts as clean when torchrun and so every
rank exit 0. The example ends with ``gradzip.ddp.shutdown()``: barrier, teardown, exit
without interpreter finalization (gloo's threads outlive the process group and abort a
finalizing interpreter about one run in ten otherwise).

    python benchmarks/teardown.py                       # 50 x 2 ranks and 20 x 4 ranks
    python benchmarks/teardown.py --runs 2:3 --methods drive   # what the test runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ddp_fashion_mnist.py"
METHODS = ("drive", "fosgd", "topk:k=0.01")


def one_run(nproc: int, method: str, steps: int, timeout: float, data: str = "") -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", str(EXAMPLE), "--compress", method,
        "--steps", str(steps), "--eval-every", "0", "--eval-size", "200",
        *(["--data", data] if data else []),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADZIP_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        code, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        code, out = None, f"timed out after {timeout} s: {e}"
    aborted = "terminate called" in out or "Signal 6" in out or "SIGABRT" in out
    return {
        "nproc": nproc, "method": method, "exit": code, "aborted": aborted,
        "seconds": round(time.perf_counter() - t0, 2),
        "tail": "" if code == 0 else out.strip()[-600:],
    }  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="2:50,4:20", help="NPROC:COUNT pairs")
    p.add_argument("--methods", default=",".join(METHODS), help="cycled through, comma-separated")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", default="", help="write every run here (JSON)")
    p.add_argument("--data", default="", help="the example's --data (Fashion-MNIST IDX folder)")
    a = p.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m]
    plan = []
    for pair in a.runs.split(","):
        nproc, count = (int(v) for v in pair.split(":"))
        plan += [(nproc, methods[k % len(methods)]) for k in range(count)]
    rows = []
    for k, (nproc, method) in enumerate(plan):
        r = one_run(nproc, method, a.steps, a.timeout, a.data)
        rows.append(r)
        mark = (
            "ok" if r["exit"] == 0 else f"EXIT {r['exit']}" + (" (abort)" if r["aborted"] else "")
        )
        print(f"[teardown] {k + 1}/{len(plan)} {nproc} ranks {method:<12} {mark} "
              f"({r['seconds']} s)", flush=True)  # fmt: skip
    print("\nranks  runs  exit 0  aborted  other")
    for nproc in sorted({r["nproc"] for r in rows}):
        rs = [r for r in rows if r["nproc"] == nproc]
        ok = sum(r["exit"] == 0 for r in rs)
        ab = sum(r["aborted"] for r in rs)
        print(f"{nproc:5d} {len(rs):5d} {ok:7d} {ab:8d} {len(rs) - ok - ab:6d}")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
