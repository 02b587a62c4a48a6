"""Where a DDP step's time goes, hook by hook: the example's model and data, n local ranks.

For each method it runs ``--steps`` training steps of ``examples/ddp_fashion_mnist.py``'s
CNN (SGD, momentum 0.9) and prints rank 0's median time per step, split into forward,
backward (which includes the hook's work for a synchronous hook, and the wait for its
futures) and the optimizer step, with the ratio to fp32 allreduce measured in the same
run, and the CPU time of all ranks per step (every thread: backward, hook, gloo) with the
cores that keeps busy: near the machine's core count the step is CPU-bound, and only less
CPU work makes it shorter. ``--profile`` adds a cProfile of rank 0's steps (the functions
with the most own time), so that the hook's CPU cost can be read function by function.

    python benchmarks/hook_profile.py                               # none, powersgd, fosgd
    python benchmarks/hook_profile.py --methods fosgd --profile --steps 40
    python benchmarks/hook_profile.py --methods none,fosgd/sync,fosgd --reps 3  # overlap off/on

A method is ``--compress`` of the example; ``/sync`` runs gradzip's hook without its
communication thread (``overlap=False``), ``/allgather`` its ``layout="allgather"`` (both may be
given: ``fosgd/sync/allgather``). For gradzip's hook it also prints the phases of
the compressed buckets' work per step (``GradzipState.timings``: encode, uplink exchange,
serve, downlink exchange, decode; the exchanges include waiting for the slowest rank).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import ddp_fashion_mnist as ex  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402


def _rank(rank: int, world: int, opts, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    method, *variants = opts.method.split("/")  # "fosgd/sync": overlap off; /allgather
    bad = set(variants) - {"sync", "allgather"}
    if bad:
        raise SystemExit(f"hook_profile: unknown variant(s) {sorted(bad)} of {opts.method!r}")
    args = ex.parse_args(
        ["--compress", method, "--lr", "0.05", "--momentum", "0.9", "--seed", "0"]
        + (["--powersgd-rank", str(opts.powersgd_rank)] if opts.powersgd_rank else [])
        + (["--no-overlap"] if "sync" in variants else [])
        + (["--layout", "allgather"] if "allgather" in variants else [])
    )
    ex._threads(args, world)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    X, y, _, _ = ex.load_data(args.data)
    kw = {"bucket_cap_mb": opts.bucket_cap_mb} if opts.bucket_cap_mb else {}
    if method == "torch-powersgd":
        kw = {"bucket_cap_mb_list": [4096]}  # see the example: one bucket on gloo
    model = DDP(ex.CNN(args.width), **kw)
    opt = ex.make_optimizer(model.parameters(), args)
    state = ex.attach_hook(model, args)
    phases = {"forward": [], "backward": [], "step": [], "total": []}
    prof = cProfile.Profile() if (opts.profile and rank == 0) else None
    for step in range(opts.steps):
        g = torch.Generator().manual_seed(step * 997 + rank)
        idx = torch.randint(len(X), (args.batch_size,), generator=g)
        xb, yb = ex.normalize(X[idx]), y[idx]
        if step == opts.warmup:
            cpu0, wall0 = time.process_time(), time.perf_counter()  # this process, all threads
            if prof is not None:
                prof.enable()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if step >= opts.warmup:
            for v, dt in zip(phases.values(), (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
                v.append(dt)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if prof is not None:
        prof.disable()
    res = {k: statistics.median(v) for k, v in phases.items()}
    # CPU seconds of every rank (all its threads: backward, hook, gloo) per measured step:
    # with cores_busy = that / the wall time near the machine's core count, the step is
    # CPU-bound, and a faster step needs less CPU work, not more overlap
    total = torch.tensor([cpu], dtype=torch.float64)
    dist.all_reduce(total)
    measured = opts.steps - opts.warmup
    res["cpu_per_step"] = float(total) / measured
    res["cores_busy"] = float(total) / wall
    res["traffic"] = state.traffic() if state is not None else None
    res["timings"] = state.timings() if state is not None else None
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(opts.top)
        res["profile"] = s.getvalue()
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    import gradzip.ddp

    gradzip.ddp.shutdown(state)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(method: str, opts) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    opts.method = method
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r0.json")
        mp.spawn(_rank, args=(opts.nproc, opts, _free_port(), out), nprocs=opts.nproc)
        return json.loads(Path(out).read_text())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="none,torch-powersgd,fosgd", help="comma-separated")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps not measured")
    p.add_argument("--reps", type=int, default=1, help="runs per method (medians reported)")
    p.add_argument("--powersgd-rank", type=int, default=2)
    p.add_argument("--bucket-cap-mb", type=float, default=0, help="DDP's (0: its default)")
    p.add_argument("--profile", action="store_true", help="cProfile rank 0")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", help="write the results here")
    opts = p.parse_args(argv)
    if opts.steps <= opts.warmup:
        p.error("--steps must exceed --warmup")
    methods = [m for m in opts.methods.split(",") if m]
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for rep in range(opts.reps):
        for m in methods:  # interleaved: slow drifts of a shared machine hit every method
            r = run(m, opts)
            results[m].append(r)
            print(f"[rep {rep + 1}/{opts.reps}] {m:<16} step {1e3 * r['total']:7.1f} ms",
                  flush=True)  # fmt: skip
    base = statistics.median(r["total"] for r in results[methods[0]])
    print(f"\n{opts.nproc} ranks, median of {opts.reps} run(s) of the median step "
          f"(ratios to {methods[0]}):")  # fmt: skip
    w = max(18, *(len(m) + 1 for m in methods))
    print(f"{'method':<{w}}{'forward':>9}{'backward':>10}{'opt.step':>10}{'step':>9}{'ratio':>7}"
          f"{'cpu/step':>10}{'busy':>6}")  # fmt: skip
    for m in methods:
        med = {k: statistics.median(r[k] for r in results[m]) for k in
               ("forward", "backward", "step", "total", "cpu_per_step", "cores_busy")}  # fmt: skip
        spread = [1e3 * r["total"] for r in results[m]]
        print(f"{m:<{w}}{1e3 * med['forward']:9.1f}{1e3 * med['backward']:10.1f}"
              f"{1e3 * med['step']:10.1f}{1e3 * med['total']:9.1f}{med['total'] / base:7.2f}"
              f"{1e3 * med['cpu_per_step']:10.1f}{med['cores_busy']:6.2f}"
              f"   runs {', '.join(f'{s:.1f}' for s in spread)}")  # fmt: skip
    print(f"cpu/step: CPU ms of all {opts.nproc} ranks per step (every thread); busy: that over "
          f"the wall time, in cores (this machine has {os.cpu_count()})")  # fmt: skip
    for m in methods:
        tim = [r["timings"] for r in results[m] if r.get("timings")]
        if tim:
            per = {k: statistics.median(t[k] for t in tim) / opts.steps * 1e3 for k in tim[0]}
            print(f"{m:<{w}}hook phases, ms per step (median of runs, all steps): "
                  + "  ".join(f"{k} {v:.1f}" for k, v in per.items()))  # fmt: skip
    for m in methods:
        for r in results[m]:
            if "profile" in r:
                print(f"\n--- cProfile of rank 0, {m} ---\n{r['profile']}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
