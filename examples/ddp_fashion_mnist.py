"""Plain PyTorch DDP training on Fashion-MNIST, with gradzip's comm hook in one line.

Run it with torchrun (any number of ranks, gloo on CPU or NCCL on GPUs)::

    torchrun --standalone --nproc-per-node 4 examples/ddp_fashion_mnist.py --compress fosgd

or let it spawn the ranks itself on this machine::

    python examples/ddp_fashion_mnist.py --nproc 4 --compress memsgd-topk

``--compress`` picks what the gradients go through: ``none`` (DDP's own fp32 allreduce),
``torch-fp16`` (PyTorch's ``fp16_compress_hook``), ``torch-powersgd`` (PyTorch's PowerSGD
hook, ``--powersgd-rank``), or anything gradzip knows: a method preset (``fosgd``,
``memsgd-topk``, ``ef-signsgd``, ... see ``gradzip methods``) or a compressor spec
(``topk:k=0.001``, ``qsgd(levels=16)``, ...). The gradzip line is::

    gradzip.ddp.register(model, args.compress)

The model is a small CNN whose classifier makes it large in parameters (about 3.2M with
the default ``--width 2048``): cheap to compute, heavy to communicate, like the dense
layers of bigger models. Each rank draws its own batches; the test set is split between
the ranks for evaluation. ``--json FILE`` (rank 0) writes per-step times, the accuracy
timeline (against training time, evaluation excluded) and the hook's traffic.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

TORCH_HOOKS = ("none", "torch-fp16", "torch-powersgd")
OPTIMIZERS = ("sgd", "adam", "adamw", "gradzip-adam", "gradzip-adamw")


class CNN(nn.Module):
    def __init__(self, width: int = 2048):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, width)
        self.fc2 = nn.Linear(width, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compress", default="none", help="none | torch-fp16 | torch-powersgd | "
                   "a gradzip method preset or compressor spec")  # fmt: skip
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS,
                   help="gradzip-adam/-adamw: v frozen after --start-step fp32 steps and the "
                   "hook preconditioned by it; with --compress fosgd-ef, the Adam recipe "
                   "(docs/ddp.md)")  # fmt: skip
    p.add_argument("--lr", type=float, default=None,
                   help="step size (default: 0.05 for sgd, 1e-3 for adam and adamw)")  # fmt: skip
    p.add_argument("--momentum", type=float, default=0.9, help="sgd's momentum")
    p.add_argument("--nesterov", action="store_true", help="sgd: Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--width", type=int, default=2048, help="hidden units of the classifier")
    p.add_argument("--eval-every", type=int, default=50, help="steps (0: only at the end)")
    p.add_argument("--eval-size", type=int, default=10000, help="test images used")
    p.add_argument("--target-acc", type=float, default=0.0, help="stop once reached (0: never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-step", type=int, default=0, help="gradzip: steps of fp32 first")
    p.add_argument("--min-numel", type=int, default=1024, help="gradzip: smaller buckets fp32")
    p.add_argument("--layout", default="sharded", help="gradzip: sharded | allgather")
    p.add_argument("--no-overlap", action="store_true",
                   help="gradzip: run the hook's work on the backward's thread")  # fmt: skip
    p.add_argument("--nonfinite", default="error", choices=("error", "skip"),
                   help="gradzip: NaN/inf in a step: error (every rank raises, naming step, "
                   "rank and parameter) or skip (every rank skips the step)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=180.0,
                   help="gradzip: seconds a collective of the hook may wait before naming the "
                   "rank that did not answer (0: the process group's timeout)")  # fmt: skip
    p.add_argument("--downlink", default=None,
                   help="gradzip: the downlink's compressor spec (override)")  # fmt: skip
    p.add_argument("--uplink-rule", default=None, help="gradzip: none | ef | auto (override)")
    p.add_argument("--downlink-rule", default=None, help="gradzip: none | ef | auto (override)")
    p.add_argument("--powersgd-rank", type=int, default=2)
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--nproc", type=int, default=0, help="spawn this many local ranks")
    p.add_argument("--backend", default="", help="gloo | nccl (default: nccl on GPUs)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: auto)")
    p.add_argument("--save", default="",
                   help="checkpoint file (rank 0; written atomically) at the end and every "
                   "--save-every steps")  # fmt: skip
    p.add_argument("--save-every", type=int, default=0, help="steps between saves (0: at the end)")
    p.add_argument("--resume", default="", help="checkpoint to start from (e.g. --save's; a "
                   "torchrun --max-restarts restart starts from --save's by itself)")  # fmt: skip
    p.add_argument("--json", default="", help="rank 0 writes its measurements here")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 0.05 if args.optimizer == "sgd" else 1e-3
    if args.nesterov and (args.optimizer != "sgd" or args.momentum <= 0):
        p.error("--nesterov needs --optimizer sgd and --momentum > 0")
    if args.optimizer.startswith("gradzip-") and args.start_step < 1:
        p.error(f"--optimizer {args.optimizer} freezes Adam's variance after the fp32 warm-up "
                "of --start-step steps: give one (e.g. --start-step 30)")  # fmt: skip
    return args


def make_optimizer(params, args) -> torch.optim.Optimizer:
    """The recipe: SGD with momentum (Nesterov or not), Adam or AdamW."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
            weight_decay=args.weight_decay,
        )  # fmt: skip
    if args.optimizer.startswith("gradzip-"):  # variance frozen after the fp32 warm-up
        import gradzip.optim

        return gradzip.optim.Adam(
            params, lr=args.lr, weight_decay=args.weight_decay,
            decoupled=args.optimizer == "gradzip-adamw", freeze_after=args.start_step,
        )  # fmt: skip
    cls = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=args.lr, weight_decay=args.weight_decay)


def load_data(root: str):
    from gradzip.problems.datasets import load_fashion_mnist

    ds = load_fashion_mnist(root)
    # keep the images as uint8 (4x less memory per rank); normalized per batch
    u8 = lambda x: (x * 255).round().to(torch.uint8)  # noqa: E731
    return u8(ds.X), ds.y, u8(ds.X_test), ds.y_test


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255.0 - 0.2860) / 0.3530


def attach_hook(model, args):
    """The one line (or PyTorch's own hooks, for comparison)."""
    if args.compress == "none":
        return None
    if args.compress == "torch-fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None
    if args.compress == "torch-powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

        st = ps.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=args.powersgd_rank,
            start_powerSGD_iter=2,
            random_seed=args.seed,
        )
        model.register_comm_hook(st, ps.powerSGD_hook)
        return None
    import gradzip.ddp

    state = gradzip.ddp.register(  # <- the line
        model, args.compress, start_step=args.start_step, min_numel=args.min_numel,
        layout=args.layout, seed=args.seed, uplink_rule=args.uplink_rule,
        downlink=args.downlink, downlink_rule=args.downlink_rule, overlap=not args.no_overlap,
        nonfinite=args.nonfinite, timeout=args.timeout or None,
    )  # fmt: skip
    state.warmup()  # numba's kernels compiled (or loaded) before the clock starts
    return state


def evaluate(model, Xt, yt, rank, world, device) -> float:
    model.eval()
    idx = torch.arange(rank, len(Xt), world)
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for chunk in idx.split(1000):
            out = model(normalize(Xt[chunk]).to(device))
            correct[0] += (out.argmax(1).cpu() == yt[chunk]).sum().item()
            correct[1] += len(chunk)
    dist.all_reduce(correct)
    model.train()
    return float(correct[0] / correct[1])


def save_checkpoint(path: str, model, opt, state, step: int, rank: int) -> None:
    """Every rank calls it (the hook's ``state_dict`` is a collective); rank 0 writes the
    file atomically (``gradzip.checkpoint.save``: a temporary file in the same folder,
    fsync, rename), so a kill mid-write leaves the previous checkpoint whole."""
    ck = {
        "model": model.module.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "gradzip": state.state_dict() if state is not None else None,  # a collective
    }
    if rank == 0:
        import gradzip.checkpoint

        gradzip.checkpoint.save(ck, path)


def train(rank: int, world: int, args) -> dict:
    torch.manual_seed(args.seed)  # the same initial model on every rank
    use_cuda = torch.cuda.is_available() and args.backend != "gloo"
    device = torch.device("cuda", rank % torch.cuda.device_count()) if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(device)
    X, y, Xt, yt = load_data(args.data)
    Xt, yt = Xt[: args.eval_size], yt[: args.eval_size]
    kw = {}
    if args.compress == "torch-powersgd" and not use_cuda:
        # PyTorch's PowerSGD hook chains collectives in future callbacks; on gloo, with
        # several buckets, those of different buckets interleave differently on different
        # ranks (a "collective mismatch" abort or a hang). One bucket avoids it.
        kw["bucket_cap_mb_list"] = [4096]
    model = DDP(CNN(args.width).to(device), device_ids=[device] if use_cuda else None, **kw)
    opt = make_optimizer(model.parameters(), args)
    state = attach_hook(model, args)
    if state is not None and args.optimizer.startswith("gradzip-"):
        state.precondition_with(opt)  # compress g / sqrt(v): Adam's own scale (gradzip.optim)
    start, resume = 0, args.resume
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    if not resume and restarted and args.save and os.path.exists(args.save):
        resume = args.save  # torchrun --max-restarts: a later attempt goes on from --save
    if resume:
        import gradzip.checkpoint  # a damaged file: one line naming it

        ck = gradzip.checkpoint.load(resume, keys=("model", "optimizer", "step"))
        model.module.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if state is not None:
            state.load_state_dict(ck["gradzip"])
        start = ck["step"]
    nparams = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"[ddp] {world} ranks, {dist.get_backend()}, {nparams:,} parameters, "
              f"--compress {args.compress}, {args.optimizer} lr {args.lr}", flush=True)  # fmt: skip
    times, timeline, train_time = [], [], 0.0
    reached = None
    for step in range(start, args.steps):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 997 + rank)
        idx = torch.randint(len(X), (args.batch_size,), generator=g)
        xb, yb = normalize(X[idx]).to(device), y[idx].to(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        if state is not None:
            state.optimizer_step(opt)  # not after a step the hook skipped (--nonfinite skip)
        else:
            opt.step()
        if use_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        times.append(dt)
        train_time += dt
        last = step + 1 == args.steps
        if args.save and args.save_every and (step + 1) % args.save_every == 0 and not last:
            save_checkpoint(args.save, model, opt, state, step + 1, rank)
        if (args.eval_every and (step + 1) % args.eval_every == 0) or last:
            acc = evaluate(model, Xt, yt, rank, world, device)
            timeline.append({"step": step + 1, "time": train_time, "acc": acc,
                             "loss": loss.item()})  # fmt: skip
            if rank == 0:
                med = statistics.median(times) * 1e3
                print(f"[ddp] step {step + 1:5d}  loss {loss.item():.4f}  test acc {acc:.4f}  "
                      f"train time {train_time:7.2f}s  median step {med:.1f} ms",
                      flush=True)  # fmt: skip
            if args.target_acc and acc >= args.target_acc and reached is None:
                reached = {"step": step + 1, "time": train_time}
                break
    steps_run = len(times)
    skip = min(3, steps_run - 1) if steps_run > 1 else 0  # warm-up steps
    result = {
        "compress": args.compress,
        "world": world,
        "backend": dist.get_backend(),
        "params": nparams,
        "steps": steps_run,
        "median_step_s": statistics.median(times[skip:]) if times else None,
        "mean_step_s": statistics.fmean(times[skip:]) if times else None,
        "timeline": timeline,
        "final_acc": timeline[-1]["acc"] if timeline else None,
        "target_acc": args.target_acc or None,
        "reached": reached,
        "traffic": state.traffic() if state is not None else None,
        "skipped_steps": state.skipped_steps if state is not None else 0,
    }
    if args.save:
        save_checkpoint(args.save, model, opt, state, start + steps_run, rank)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _threads(args, world: int) -> None:
    """Each rank gets its share of the cores, for torch and for numba (gradzip's kernels).
    Oversubscribed OpenMP/numba thread pools spin: with 4 ranks on 2 cores and numba's
    default (one thread per core), fosgd's step was 15x slower. Call before importing
    gradzip (numba reads NUMBA_NUM_THREADS when it is first imported)."""
    n = args.threads or max(1, (os.cpu_count() or 1) // max(world, 1))
    torch.set_num_threads(n)
    for var in ("GRADZIP_THREADS", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(var, str(n))


def _run(rank: int, world: int, args, port: int | None = None) -> None:
    if port is not None:  # spawned locally
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _threads(args, world)
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    kw = {}
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt:  # torchrun keeps one store for all attempts: this one's keys, not the dead one's
        kw["store"] = dist.PrefixStore(f"attempt{attempt}", next(dist.rendezvous("env://"))[0])
    dist.init_process_group(backend, rank=rank, world_size=world, **kw)
    try:
        train(rank, world, args)
    except BaseException:
        dist.destroy_process_group()
        raise
    import gradzip.ddp

    gradzip.ddp.shutdown()  # the supported end of a job: barrier, teardown, exit 0


def _spawned(rank: int, world: int, args, port: int) -> None:
    """A rank started by ``--nproc``: the same as under torchrun (``gradzip.ddp.shutdown``
    ends the process with exit code 0 on success; an error still raises)."""
    _run(rank, world, args, port)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.nproc:
        import torch.multiprocessing as mp

        _threads(args, args.nproc)  # the children inherit the environment
        mp.spawn(_spawned, args=(args.nproc, args, _free_port()), nprocs=args.nproc)
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        _run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
    else:
        sys.exit("start it with torchrun, or pass --nproc N to spawn N local ranks")


if __name__ == "__main__":
    main()
