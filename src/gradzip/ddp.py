"""gradzip as a ``DistributedDataParallel`` communication hook.

One line in an existing DDP job (gloo or NCCL)::

    import gradzip.ddp
    state = gradzip.ddp.register(model, "fosgd")  # model: the DDP-wrapped module

or, in PyTorch's own terms::

    model.register_comm_hook(gradzip.ddp.GradzipState(model, "fosgd"), gradzip.ddp.hook)

The spec is a method preset (``gradzip methods``: ``fosgd``, ``memsgd-topk``,
``ef-signsgd``, ...; each names an uplink and a downlink compressor and their feedback
rules) or any compressor spec of the registry (``topk:k=0.001``, ``qsgd(levels=16)``, ...),
which is then used in both directions with error feedback on each side where the
compressor is biased and contractive (``rule="auto"``: top-k, rand-k, scaled sign, fp16;
not plain sign or fosgd, whose error can exceed the input and would make the memory
grow). Every part can be overridden (``downlink=``, ``uplink_rule=``, ``downlink_rule=``).

Layout ``sharded`` (the default): the step of :class:`gradzip.engines.sharded.ShardLayout`
(DESIGN 3.4 with every rank a worker and the server of one shard), one layout per gradient
bucket seeded from the bucket, in gradient units (lr = 1). Rank r compresses each of the n
shards of its uplink vector and sends shard j to rank j (one all-to-all of exact sizes: a
payload's size is fixed by its codec and length, so no lengths are exchanged); it averages
the n payloads of shard r, applies the server's rule, compresses, and sends the result to
every rank (again exact sizes); every rank decodes all n shards, the same bytes, so the
replicas never drift.

Layout ``allgather``: no server: every rank's compressed bucket goes to every rank, which
decodes and averages them (uplink compression and worker feedback only; n - 1 copies of
each payload leave each rank instead of about 2 (n - 1) / n).

Feedback works in gradient units (the step size is not known to a comm hook), as in
PyTorch's PowerSGD hook. The ``dq`` rule needs the gradient at a corrected point and is
not available here.

Memories are kept per parameter, keyed by its name, so they survive DDP's bucket
rebuilds; each bucket is taken in a canonical order (parameters by decreasing index), and
server memories move to their new owners when the buckets change (:mod:`gradzip._memory`,
which also holds the checkpoint: :meth:`GradzipState.state_dict` is a collective).
Messages are framed per channel (:mod:`gradzip._exchange`: an opener, then 8 bytes a
message); :meth:`GradzipState.traffic` counts the bytes actually sent and received, and
the dense allreduces (warm-up, small buckets, identity) by the ring's 2 (n - 1) / n.

Overlap (``overlap=True``, the default): the hook hands a CPU bucket's work to one
communication thread (:mod:`gradzip._pipeline`) and returns a future at once, so the
backward pass computes the next buckets' gradients meanwhile. That one thread issues every
collective of the hook, in bucket order on every rank, as gloo and NCCL need; the results
are those of ``overlap=False``. :meth:`GradzipState.timings` tells where the time goes.
The options, checkpoints and traffic are described in docs/ddp.md.
"""

# no `from __future__ import annotations`: DDP checks the hook's annotations at runtime
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist

from . import _guard, _memory, _warmup, feedback, rng
from ._ddpconfig import LAYOUTS, refuse_fsdp, resolve
from ._exchange import BucketLinks
from ._memory import FORMAT
from ._memory import Memory as _Memory
from ._pipeline import Pipeline
from .compressors import compressor
from .compressors.base import NonFiniteError
from .engines.cluster import exit_now
from .engines.core import Algorithm, ServerState
from .engines.links import check_framing
from .engines.liveness import RankTimeout
from .engines.policy import OK, UPDATE, NonFiniteStep
from .engines.sharded import ShardLayout
from .feedback import FeedbackState
from .methods import Method

__all__ = ["GradzipState", "hook", "register", "shutdown", "LAYOUTS", "FORMAT"]
__all__ += ["NonFiniteStep", "RankTimeout"]  # what a failed step raises

#: The phases of a compressed bucket's work, as :meth:`GradzipState.timings` reports them.
PHASES = ("encode", "uplink", "serve", "downlink", "decode")
_MASK = (1 << 64) - 1
_TRAFFIC = ("sent", "received", "framing_sent", "framing_received", "dense_sent")
_TRAFFIC += ("dense_received", "compressed_buckets", "dense_buckets")


class GradzipState:
    """The hook's state: configuration, per-parameter memories, step, traffic counters.

    Built before or after the process group, with or without the model: it binds to the
    process group at its first use, and to the parameters either by :meth:`bind` (implied
    by ``model``: they are named as the model names them) or, without a model, at the
    first step (``param.0``, ``param.1``, ... in the order DDP's first step hands them to
    the hook, the same on every rank and after a restart). The two namings give different
    payload seeds and checkpoint keys; a checkpoint loads into a state of its own naming.
    A pickled state (``torch.multiprocessing`` or a launcher sending it to its processes)
    keeps its configuration and nothing bound, like ``PowerSGDState``.

    Args:
        model: the DDP-wrapped model (or its module), optional: its parameter names key
            the memories.
        spec: a method preset (``gradzip methods``) or a compressor spec.
        uplink_rule, downlink, downlink_rule: overrides (rules: ``none``, ``ef``, ``auto``).
        layout: ``sharded`` (default) or ``allgather``.
        start_step: steps of plain allreduce before compressing.
        min_numel: buckets with fewer coordinates are allreduced uncompressed.
        allreduce_identity: identity both ways without feedback is a plain allreduce.
        seed: the run's seed (payload randomness derives from it, the bucket and the step).
        process_group: defaults to the world.
        overlap: run CPU buckets' work on a communication thread, so that it overlaps the
            rest of the backward pass (the same bytes and results as without; CUDA
            buckets run on the hook's thread, whose kernels are queued asynchronously).
        framing: ``stream`` (each channel's static header once, then 8 bytes a message)
            or ``payload`` (standalone payloads); the same results either way.
        nonfinite: ``error`` (default: every rank raises :class:`NonFiniteStep` at the
            same bucket, naming step, rank and parameter) or ``skip`` (every rank zeroes
            the step's gradient and drops its memory updates; see :meth:`optimizer_step`).
        timeout: seconds a collective of the hook may wait (None, the default: the
            process group's own timeout); on expiry :class:`RankTimeout` names the rank
            that did not answer, the step and the phase (:mod:`gradzip._guard`).
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        spec: str = "fosgd",
        *,
        uplink_rule: str | None = None,
        downlink: str | None = None,
        downlink_rule: str | None = None,
        layout: str = "sharded",
        start_step: int = 0,
        min_numel: int = 1024,
        allreduce_identity: bool = True,
        seed: int = 0,
        process_group=None,
        overlap: bool = True,
        framing: str = "stream",
        nonfinite: str = "error",
        timeout: float | None = None,
    ):
        self.config = resolve(spec, uplink_rule, downlink, downlink_rule, layout)
        if start_step < 0 or min_numel < 0:
            raise ValueError("start_step and min_numel must be >= 0")
        self._options = dict(
            spec=spec, uplink_rule=uplink_rule, downlink=downlink, downlink_rule=downlink_rule,
            layout=layout, start_step=start_step, min_numel=min_numel,
            allreduce_identity=allreduce_identity, seed=seed, overlap=overlap, framing=framing,
            nonfinite=nonfinite, timeout=timeout,
        )  # fmt: skip
        self._guard = _guard.Guard(nonfinite, timeout)
        self.framing = check_framing(framing)
        self.spec = spec
        self.up = compressor(self.config.uplink)
        self.down = compressor(self.config.downlink)
        c = self.config
        with warnings.catch_warnings():  # resolve has warned, naming the hook
            warnings.simplefilter("ignore", feedback.NonContractiveFeedbackWarning)
            self.method = Method(c.uplink, c.uplink_rule, c.downlink, c.downlink_rule)
        self._layouts: dict[tuple, ShardLayout] = {}
        self.start_step = int(start_step)
        self.min_numel = int(min_numel)
        self.seed = int(seed) & _MASK
        self._group_arg = process_group
        self.group = None  # bound at first use (_bind_group)
        c = self.config
        self.dense = (
            allreduce_identity
            and self.up.name == "identity"
            and self.down.name == "identity"
            and c.uplink_rule == "none"
            and c.downlink_rule == "none"
        )
        # parameter identity -> index into names; names stable across restarts
        self.names: list[str] = []
        self._index: dict[int, int] = {}
        self._pos: dict[str, int] = {}
        self._by_model = False
        self._named = False  # without a model: every parameter has been seen (one step)
        if model is not None:
            self.bind(model)
        self.step = 0
        self.worker_error = _Memory()  # this rank's uplink memory
        self.server_error = _Memory()  # per parameter, zero outside the coordinates served
        self._owner: dict[str, object] = {}  # name -> bucket signature that placed it
        self._traffic = dict.fromkeys(_TRAFFIC, 0)
        self._precond = None  # the optimizer, see precondition_with
        self._pending_names: set[str] = set()  # loaded memories of a naming not yet seen
        self.overlap = bool(overlap)
        self._pipeline = Pipeline()
        self._timings = dict.fromkeys(PHASES, 0.0)

    # --- binding ------------------------------------------------------------------------
    def bind(self, model: torch.nn.Module) -> None:
        """Name the parameters as ``model`` (the DDP model or its module) names them
        (those that require a gradient). Before the first step only."""
        if self.names and not self._by_model:
            raise RuntimeError("bind(model) after the first step: the parameters are named")
        refuse_fsdp(model)
        module = model.module if hasattr(model, "module") else model
        self.names, self._index = [], {}
        for name, p in module.named_parameters():
            if p.requires_grad:
                self._index[id(p)] = len(self.names)
                self.names.append(name)
        self._pos = {nm: i for i, nm in enumerate(self.names)}
        self._by_model = True

    def _bind_group(self) -> None:
        if self.group is not None:
            return
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "GradzipState needs an initialized torch.distributed process group "
                "(init_process_group before the first step)"
            )
        self.group = self._group_arg if self._group_arg is not None else dist.group.WORLD
        self.n = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.backend = dist.get_backend(self.group)
        self._guard.start(self.group, self.rank, self.n)

    # --- non-finite steps ---------------------------------------------------------------
    @property
    def skipped_steps(self) -> int:
        """Steps skipped by the ``skip`` policy (every rank counts the same)."""
        return self._guard.skipped_steps

    def optimizer_step(self, optimizer) -> bool:
        """``optimizer.step()`` unless the hook skipped the step that just ended (its
        gradient is zero, but momentum or weight decay would still move the parameters),
        as AMP's ``GradScaler.step`` does; returns whether it stepped."""
        if self._guard.skipped_at == self.step - 1 >= 0:
            return False
        optimizer.step()
        return True

    def __getstate__(self) -> dict:
        return {"options": self._options}

    def __setstate__(self, st: dict) -> None:
        self.__init__(None, **st["options"])

    # --- small helpers ------------------------------------------------------------------
    def warmup(self) -> None:
        """Run the compressors once on small vectors, locally: numba compiles (or loads
        from its cache) its kernels on first use, which otherwise lands in the first
        training steps. Optional."""
        for size in (300, 1 << 17):
            x = torch.randn(size, generator=torch.Generator().manual_seed(size))
            for c in (self.up, self.down):
                p = c.encode(x, seed=1, step=0, worker=0)
                c.decode(p)
                _warmup.rotated(c, p, x)

    def traffic(self) -> dict:
        """Bytes this rank sent and received so far (see the module docstring)."""
        return dict(self._traffic)

    def reset_traffic(self) -> None:
        for k in self._traffic:
            self._traffic[k] = 0
        for k in self._timings:
            self._timings[k] = 0.0

    def timings(self) -> dict:
        """Seconds this rank spent so far in each phase of the compressed buckets' work
        (:data:`PHASES`: encoding, the uplink exchange, serving its shard, the downlink
        exchange, decoding), wherever it ran (the hook's thread or the communication
        thread). An exchange's time includes waiting for the slowest rank."""
        return dict(self._timings)

    def _comm_device(self, like: torch.device) -> torch.device:
        return like if self.backend == "nccl" else torch.device("cpu")

    def _names_of(self, bucket) -> list[str]:
        out = []
        for p in bucket.parameters():
            i = self._index.get(id(p))
            if i is None and not self._by_model and not self._named:
                i = self._index[id(p)] = len(self.names)  # named by appearance
                self.names.append(f"param.{i}")
                self._pos[self.names[i]] = i
            if i is None:
                raise ValueError(
                    "a bucket holds a parameter the GradzipState does not know: bind the "
                    "state to the model the hook is registered on"
                )
            out.append(self.names[i])
        return out

    def _canonical(self, name: str) -> int:
        """Sort key of a bucket's parameters: by decreasing index in the model (DDP's
        usual order), or by appearance."""
        return -self._pos[name] if self._by_model else self._pos[name]

    def _bucket_seed(self, names: list[str]) -> int:
        return rng.fold(self.seed, self._pos[names[0]] + 1, rng.BUCKET_MIX)

    def _a2a(self, sends, sizes: list[int], dev, phase: str, t: int) -> list[torch.Tensor]:
        """Exact-size all-to-all: sends[j] goes to rank j, sizes[i] bytes come from rank i
        (within the timeout, if any)."""
        out = torch.empty(sum(sizes), dtype=torch.uint8, device=dev)
        inp = torch.cat([s.to(dev) for s in sends])
        lens, timed = [s.numel() for s in sends], self._guard.timeout is not None
        w = dist.all_to_all_single(out, inp, sizes, lens, group=self.group, async_op=timed)
        self._guard.wait(w, phase, t)
        self._traffic["sent"] += inp.numel()
        self._traffic["received"] += out.numel()
        return list(out.split(sizes))

    # --- preconditioning --------------------------------------------------------------------
    def precondition_with(self, optimizer) -> None:
        """Compress each gradient divided by the optimizer's per-coordinate scale (for
        :class:`gradzip.optim.Adam`, sqrt(v_hat), the same on every rank), and multiply
        the decoded average back: the compression noise then scales with each coordinate's
        typical gradient, as Adam's step does, instead of being spread evenly (which Adam's
        division by sqrt(v) amplifies on coordinates with small gradients). With the spec
        ``fosgd-ef`` (error feedback both ways) this is the Adam recipe of docs/ddp.md. Not part of
        :meth:`state_dict`: call it again when the job restarts (the scales are read from
        the optimizer's state at every step, so a loaded optimizer is picked up)."""
        if not hasattr(optimizer, "preconditioner"):
            raise TypeError(
                f"{type(optimizer).__name__} has no preconditioner(param); use gradzip.optim.Adam"
            )
        self._precond = optimizer
        self._precond_flat_cache: dict[tuple, tuple[list, torch.Tensor]] = {}
        if self._by_model:
            self._precond_params(self.names)  # the optimizer must hold every parameter

    def _precond_params(self, names) -> list:
        held = {}
        for group in self._precond.param_groups:
            for p in group["params"]:
                i = self._index.get(id(p))
                if i is not None:
                    held[self.names[i]] = p
        missing = [nm for nm in names if nm not in held]
        if missing:
            raise ValueError(f"the optimizer does not hold the parameters {missing[:5]}")
        return [held[nm] for nm in names]

    def _precond_flat(self, names, sizes, dev) -> torch.Tensor | None:
        if self._precond is None:
            return None
        opt = self._precond
        key = tuple(names)
        params = self._precond_flat_cache.get(("params", key))
        if params is None:
            params = self._precond_flat_cache[("params", key)] = self._precond_params(names)
        parts = [opt.preconditioner(p) for p in params]
        if any(s is None for s in parts):
            return None  # before the optimizer's first step: nothing to scale by yet
        hit = self._precond_flat_cache.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], parts, strict=True)):
            return hit[1]  # the same scales as last step (a frozen v): no new copy
        flat = torch.cat([s.reshape(-1).to(dev, torch.float32) for s in parts])
        self._precond_flat_cache[key] = (parts, flat)
        return flat

    # --- the hook's work ------------------------------------------------------------------
    def _use_dense(self, d: int) -> bool:
        return self.dense or self.step < self.start_step or d < max(self.min_numel, self.n)

    def _migrate(self, names, sizes, sig, lo: int, hi: int, dev) -> None:
        _memory.migrate(self, names, sizes, sig, lo, hi, dev)

    def reduce(self, bucket) -> torch.Tensor:
        """The averaged (compressed) gradient of one bucket, written into its buffer
        (zeros in a step skipped for non-finite values)."""
        return self._plan(bucket)()

    def _plan(self, bucket) -> Callable[[], torch.Tensor]:
        """The bucket's work at this step, to run now or on the communication thread.

        What may change before it runs is read here, on the hook's thread: the bucket's
        parameters, the step, the preconditioner. The bucket's vector is taken in a
        canonical order (parameters by decreasing index in the model, which is DDP's usual
        order), so that the payloads depend on which parameters share the bucket, not on
        the order DDP put them in."""
        buf = bucket.buffer()
        names = self._names_of(bucket)
        sizes = [p.numel() for p in bucket.parameters()]
        d = buf.numel()
        if sum(sizes) != d:
            raise RuntimeError(f"bucket of {d} coordinates holds parameters of {sum(sizes)}")
        order = sorted(range(len(names)), key=lambda k: self._canonical(names[k]))
        views = buf.detach().split(sizes)
        reordered = order != list(range(len(names)))
        if reordered:
            names = [names[k] for k in order]
            sizes = [sizes[k] for k in order]
            views = [views[k] for k in order]
        scale = self._precond_flat(names, sizes, buf.device)
        t = self.step

        def run() -> str | None:
            if reordered:
                g = torch.cat([v.reshape(-1) for v in views]).to(torch.float32)
            else:
                g = buf.detach().to(torch.float32)  # no copy for a float32 bucket
            if scale is not None:  # compress g / s, decode, multiply back: noise scaled like v
                g.div_(scale)  # g is a copy or the bucket's memory, which the result replaces
            bad = self._reduce_flat(names, sizes, g, t)
            if scale is not None:
                g.mul_(scale)
            if g is not buf:
                for v, part in zip(views, g.split(sizes), strict=True):
                    v.copy_(part)
            return bad

        return self._guard.job(t, bucket.is_last(), buf, run)

    def _layout(self, names: list[str], d: int, dev, t: int) -> tuple[ShardLayout, BucketLinks]:
        """The bucket's step: the engines' :class:`ShardLayout` (one shard per rank, or one
        shard for ``allgather``), seeded from the bucket, and this rank's channels for it;
        cached per bucket and device."""
        key = (tuple(names), d, dev)
        hit = self._layouts.get(key)
        if hit is None:
            bseed = self._bucket_seed(names)
            algo = Algorithm(self.method, d, seed=bseed, device=dev)
            lay = ShardLayout(algo, self.n if self.config.layout == "sharded" else 1)
            c = self.config
            links = BucketLinks(lay, self.rank, self.n, self.framing, (c.uplink, c.downlink))
            hit = self._layouts[key] = (lay, links)
            self._guard.fresh(t)  # its kernels compile in this step: a longer deadline
        return hit

    def _reduce_flat(self, names, sizes, g: torch.Tensor, t: int) -> str | None:
        """Replace g (the bucket in canonical order, float32) by the decoded average: the
        step t of :class:`gradzip.engines.sharded.ShardLayout` in gradient units (lr = 1),
        with this rank as worker r and as the server of shard r. Returns the message of a
        non-finite finding (:mod:`gradzip._guard`), the same on every rank, or None."""
        d = g.numel()
        dev, cdev = g.device, self._comm_device(g.device)
        n, r, gd = self.n, self.rank, self._guard
        lay, bl = self._layout(names, d, dev, t)
        clock = gd.clock(self._timings, t)
        none, where = torch.empty(0, dtype=torch.uint8), _guard.Where(names, sizes)

        # 1. the uplink payloads, one per shard (of zeros where g is not finite)
        e = self.worker_error.get_flat(names, sizes, dev)
        ups, ws, mine = _guard.encode_up(self, lay, t, g, e)
        if ws is not None and ws.feedback.error is not e:
            new = ws.feedback.error  # committed at the end of a finite step
            gd.commit(lambda: self.worker_error.put_flat(names, sizes, new))
        mine = [*mine, r]
        self._traffic["compressed_buckets"] += 1

        if self.config.layout == "allgather":  # rank i's one payload to every rank
            msg = bl.pack_up(0, ups[0], mine[:4]).to(cdev)
            clock("encode")
            got = self._a2a(
                [msg if j != r else none for j in range(n)],
                [bl.size("up", 0) if i != r else 0 for i in range(n)],
                cdev, "uplink", t,
            )  # fmt: skip
            clock("uplink")
            got = [(ups[0], mine) if i == r else bl.unpack_up(i, 0, got[i], t) for i in range(n)]
            g.copy_(lay.algos[0].mean_uplink(t, [data for data, _ in got], "rank"))
            bl.opened = True
            clock("decode")
            return gd.verdict(t, where, [f for _, f in got], g)

        # 2. shard j to rank j
        sends = [bl.pack_up(j, u, mine[:4]) if j != r else none for j, u in enumerate(ups)]
        clock("encode")
        sz = [bl.size("up", r) if i != r else 0 for i in range(n)]
        got = self._a2a(sends, sz, cdev, "uplink", t)
        got = [(ups[r], mine) if i == r else bl.unpack_up(i, r, got[i], t) for i in range(n)]
        clock("uplink")

        # 3. serve shard r: average, server rule, compress (zeros if that is refused)
        lo, hi = lay.bounds[r], lay.bounds[r + 1]
        sig = tuple(names)
        if any(nm in self.server_error and self._owner.get(nm) != sig for nm in names):
            self._migrate(names, sizes, sig, lo, hi, dev)
        es_full = self.server_error.get_flat(names, sizes, dev)
        es = None if es_full is None else es_full[lo:hi]
        found = _guard.first_bad([f for _, f in got])
        try:
            down, ss = lay.aggregate(r, t, [x for x, _ in got], 1.0, ServerState(FeedbackState(es)))
        except NonFiniteError:  # the average overflowed: zeros, and say so
            down, ss, found = _guard.zero_down(lay, r, t, dev), None, found or [UPDATE, 0, 0, -1, r]
        found, down = found or [OK, 0, 0, -1, r], down.reshape(-1)
        msg = bl.pack_down(r, down, found)
        if ss is not None and ss.feedback.error is not es:
            gd.commit(lambda: self._commit_server(names, sizes, sig, lo, hi, ss.feedback.error))
        clock("serve")

        # 4. every shard to every rank; all decode the same bytes
        got = self._a2a(
            [msg if j != r else none for j in range(n)],
            [bl.size("down", i) if i != r else 0 for i in range(n)],
            cdev, "downlink", t,
        )  # fmt: skip
        downs = [(down, found) if j == r else bl.unpack_down(j, got[j], t) for j in range(n)]
        bl.opened = True
        clock("downlink")
        for j, (x, _) in enumerate(downs):  # every payload is decoded (and g read) before
            g[lay.bounds[j] : lay.bounds[j + 1]] = lay.algos[j].decode_downlink(x, f"rank {j}", t)
        clock("decode")
        return gd.verdict(t, where, [f for _, f in downs], g)

    def _commit_server(self, names, sizes, sig, lo: int, hi: int, err: torch.Tensor) -> None:
        es_full = self.server_error.get_flat(names, sizes, err.device)
        if es_full is None:
            es_full = torch.zeros(sum(sizes), device=err.device)
            self.server_error.put_flat(names, sizes, es_full)
        es_full[lo:hi] = err
        for nm in names:
            self._owner[nm] = sig

    def _after(self, bucket) -> None:
        if bucket.is_last():
            self.step += 1
            self._named = True
            if self._pending_names:  # loaded before the names were known: check them now
                _memory.check_names(self, self._pending_names)
                self._pending_names = set()

    # --- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The full state (every rank's memories). A collective: call it on every rank."""
        return _memory.gather(self)

    def load_state_dict(self, sd: dict) -> None:
        """Restore a :meth:`state_dict` (on every rank; no communication)."""
        _memory.restore(self, sd)


def hook(state: GradzipState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP communication hook: ``model.register_comm_hook(state, hook)``."""
    state._bind_group()
    buf = bucket.buffer()
    last = bucket.is_last()
    try:
        if state._use_dense(buf.numel()):
            where, t = _guard.names_of(state, bucket), state.step
            job = state._guard.job(t, last, buf, lambda: _guard.dense(state, buf, where, t))
        else:
            job = state._plan(bucket)
    finally:
        state._after(bucket)
    if state.overlap and buf.device.type == "cpu" and not last:
        return state._pipeline.submit(job)  # on the communication thread
    fut = torch.futures.Future()  # the last bucket here, after the others (_pipeline)
    fut.set_result(state._pipeline.run_here(job))
    return fut


def register(model, spec: str = "fosgd", **options) -> GradzipState:
    """Register the hook on a DDP model in one line; returns its state."""
    refuse_fsdp(model)
    state = GradzipState(model, spec, **options)
    model.register_comm_hook(state, hook)
    return state


def shutdown(state: GradzipState | None = None, *, exit_code: int | None = 0) -> None:
    """The end of a DDP job that used the hook (call it on every rank, last): a barrier
    (no collective left in flight), the hook's references to its last tensors dropped, the
    default process group destroyed, and, with ``exit_code`` (default 0), the process
    ended at once after flushing stdout and stderr, without interpreter finalization:
    gloo's threads outlive ``destroy_process_group`` once a DDP model has existed (plain
    torch), and one that drops a tensor while the interpreter finalizes aborts a finished
    job (exit -6, "terminate called without an active exception"; docs/ddp.md). With
    ``exit_code=None`` it returns."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if state is not None:
        state._pipeline.close()
        state._guard.stop()
        state._layouts.clear()
        state._precond = None
        state._precond_flat_cache = {}
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if exit_code is None:
        return
    import gc

    gc.collect()
    exit_now(exit_code)
