"""gradzip in FSDP2 (``torch.distributed.fsdp.fully_shard``): a compressed reduce-scatter.

::

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    state = gradzip.fsdp.register(model, "topk:k=0.01")

FSDP2 reduces the gradients of each FSDP module (each ``fully_shard`` call) with one
reduce-scatter of a flat vector: n equal chunks, chunk j holding rank j's shard of every
parameter (dim-0 padded). ``FSDPModule.set_custom_reduce_scatter`` replaces that
collective by any :class:`torch.distributed.fsdp.ReduceScatter`; :func:`register` gives
every FSDP module of ``model`` a :class:`GradzipReduceScatter`:

1. rank r forms its uplink vector by its rule (error feedback: g + e) and compresses each
   of the n chunks (the sharded layout's shards: :class:`gradzip.engines.sharded.ShardLayout`
   on n equal shards, seeded from the module);
2. chunk j goes to rank j (one all-to-all of exact sizes: a payload's size is fixed by its
   codec and length), and the memory keeps what the compression lost;
3. rank r decodes the n payloads of its own chunk and writes their sum (``ReduceOp.SUM``)
   or mean (``AVG``, FSDP2's default for float32 and bfloat16) into the output.

The reduced shard stays on rank r (it is the gradient of the parameter shard rank r
owns), so there is no downlink: a preset contributes its uplink compressor and rule only
(``fosgd``: fosgd, no feedback; ``memsgd-topk``: top-1% with error feedback), and a
compressor spec is used with ``rule="auto"`` as in :mod:`gradzip.ddp`. The parameters'
all-gather is not compressed: it carries parameters, not gradients, and a lossy copy
would make the forward pass of each rank use different weights than the optimizer holds.

Options: ``uplink_rule`` (``none``, ``ef``, ``auto``), ``start_step`` (plain
reduce-scatter before that many steps), ``min_numel`` (smaller FSDP modules are reduced
uncompressed), ``seed``. A module's step counts its reduce-scatters (FSDP2 skips them
under ``set_requires_gradient_sync(False)``, the same on every rank).

Checkpoints: :meth:`GradzipFSDPState.state_dict` is a collective (every rank calls it) and
returns, on every rank, the steps, the configuration and every rank's memories;
:meth:`~GradzipFSDPState.load_state_dict` on every rank restores them.

Traffic: :meth:`GradzipFSDPState.traffic` counts this rank's payload bytes sent and
received (headers included; the chunk a rank keeps is not sent), and the bytes of the
uncompressed reduce-scatters by the ring count (n - 1) / n of the input.

FSDP1 (``FullyShardedDataParallel``) is refused: its ``register_comm_hook`` calls
``hook(state, padded_unsharded_grad, new_sharded_grad)`` (``hook(state, grad)`` with
``NO_SHARD``), not DDP's ``hook(state, bucket)``; FSDP2 is the supported path
(docs/integrations.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

try:  # the interface of FSDPModule.set_custom_reduce_scatter; private module in torch 2.13
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
except ImportError as e:  # pragma: no cover (torch without FSDP2 custom collectives)
    raise ImportError(
        "gradzip.fsdp needs FSDP2's custom reduce-scatter (FSDPModule.set_custom_reduce_scatter "
        "and its ReduceScatter interface; tested with torch 2.13), not in torch "
        f"{torch.__version__}"
    ) from e

from . import feedback, rng
from .engines.core import Algorithm, WorkerState
from .engines.sharded import ShardLayout
from .feedback import FeedbackState
from .methods import PRESETS, Method

__all__ = ["FORMAT", "GradzipFSDPState", "GradzipReduceScatter", "register"]

FORMAT = "gradzip.fsdp/1"
_MASK = (1 << 64) - 1
_OPS = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.AVG: "avg"}


def _method(spec: str, uplink_rule: str | None) -> Method:
    """The uplink of a preset or a compressor spec; nothing is sent down."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"expected a method preset or compressor spec, got {spec!r}")
    up, rule = PRESETS[spec][:2] if spec in PRESETS else (spec, "auto")
    rule = rule if uplink_rule is None else uplink_rule
    if rule != "auto" and rule not in feedback.RULES:
        raise ValueError(f"unknown uplink_rule {rule!r}; valid: {', '.join(feedback.RULES)}, auto")
    if rule != "auto" and feedback.rule(rule).needs_gradient_point:
        raise ValueError(f"the {rule} rule takes the gradient at a corrected point: not in FSDP")
    return Method(up, rule, "identity", "none")  # resolves auto; a bad spec fails here


class GradzipReduceScatter(ReduceScatter):
    """FSDP2's reduce-scatter for one FSDP module, compressed (the module docstring)."""

    def __init__(self, state: GradzipFSDPState, key: str):
        self.state = state
        self.key = key

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(tuple(size), dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op,
        async_op: bool = False,
    ) -> None:
        if async_op:  # FSDP2 (torch 2.13) calls it synchronously and ignores the result
            raise ValueError("gradzip's reduce-scatter is synchronous (async_op=False)")
        self.state.reduce_scatter(self.key, output_tensor, input_tensor, group, op)


class GradzipFSDPState:
    """Configuration, per-module memories and steps, traffic counters.

    Args:
        spec: a method preset (its uplink) or a compressor spec.
        uplink_rule: ``none``, ``ef`` or ``auto`` (default: the preset's, or ``auto``).
        start_step: reduce-scatters of each module left uncompressed first.
        min_numel: modules whose reduce-scatter input is smaller are not compressed.
        seed: the run's seed (payload randomness derives from it, the module, the step).
    """

    def __init__(
        self,
        spec: str = "fosgd",
        *,
        uplink_rule: str | None = None,
        start_step: int = 0,
        min_numel: int = 1024,
        seed: int = 0,
    ):
        if start_step < 0 or min_numel < 0:
            raise ValueError("start_step and min_numel must be >= 0")
        self.method = _method(spec, uplink_rule)
        self.spec = spec
        self.config = {"uplink": self.method.uplink, "uplink_rule": self.method.uplink_rule}
        self.start_step = int(start_step)
        self.min_numel = int(min_numel)
        self.seed = int(seed) & _MASK
        self.keys: list[str] = []  # FSDP modules, in the model's order
        self.steps: dict[str, int] = {}
        self.worker_error: dict[str, torch.Tensor] = {}  # key -> this rank's memory
        self._layouts: dict[tuple, ShardLayout] = {}
        # a "bucket" here is one module's reduce-scatter (the names are gradzip.ddp's)
        counters = ("sent", "received", "dense_sent", "dense_received")
        self._traffic = dict.fromkeys((*counters, "compressed_buckets", "dense_buckets"), 0)

    def traffic(self) -> dict:
        """Bytes this rank sent and received so far (see the module docstring)."""
        return dict(self._traffic)

    def reset_traffic(self) -> None:
        for k in self._traffic:
            self._traffic[k] = 0

    def _layout(self, key: str, d: int, n: int, dev) -> ShardLayout:
        lay = self._layouts.get((key, d, n, dev))
        if lay is None:
            mseed = rng.fold(self.seed, self.keys.index(key) + 1, rng.BUCKET_MIX)
            lay = ShardLayout(Algorithm(self.method, d, seed=mseed, device=dev), n)
            self._layouts[(key, d, n, dev)] = lay
        return lay

    def reduce_scatter(self, key: str, out: torch.Tensor, inp: torch.Tensor, group, op) -> None:
        """out <- the sum (or mean) over ranks of the decoded chunk ``rank`` of each
        rank's compressed ``inp`` (steps 1-3 of the module docstring)."""
        how = _OPS.get(op)
        if how is None:
            raise ValueError(
                f"gradzip's reduce-scatter sums or averages; FSDP2 asked for {op} (a custom "
                "set_gradient_divide_factor?): leave the divide factor at its default"
            )
        n, r, t = group.size(), group.rank(), self.steps[key]
        d = inp.numel()
        if d != n * out.numel():
            raise RuntimeError(f"reduce-scatter of {d} into {n} x {out.numel()} coordinates")
        self.steps[key] = t + 1
        if t < self.start_step or d < max(self.min_numel, n):
            ring = (n - 1) * out.numel() * out.element_size()
            self._traffic["dense_sent"] += ring
            self._traffic["dense_received"] += ring
            self._traffic["dense_buckets"] += 1
            dist.reduce_scatter_single(out, inp, op=op, group=group)
            return
        dev = inp.device
        cdev = dev if dist.get_backend(group) == "nccl" else torch.device("cpu")
        lay = self._layout(key, d, n, dev)
        # 1. the uplink vector by its rule, one payload per chunk
        g = inp.detach().reshape(-1).to(torch.float32)
        e = self.worker_error.get(key)
        ups, ws = lay.encode_uplink(t, r, g, 1.0, WorkerState(FeedbackState(e)))
        if ws.feedback.error is not None:
            self.worker_error[key] = ws.feedback.error
        # 2. chunk j to rank j
        sizes = lay.payload_sizes()[0]  # equal chunks: equal sizes, fixed by the codec
        if [u.numel() for u in ups] != sizes:
            raise RuntimeError(
                f"gradzip.fsdp: {self.method.uplink} made payloads of "
                f"{[u.numel() for u in ups]} bytes where its codec fixes {sizes}"
            )
        size = sizes[r]
        send = torch.cat([u.reshape(-1).to(cdev) for j, u in enumerate(ups) if j != r])
        recv = torch.empty((n - 1) * size, dtype=torch.uint8, device=cdev)
        sizes_out = [0 if j == r else ups[j].numel() for j in range(n)]
        sizes_in = [0 if i == r else size for i in range(n)]
        dist.all_to_all_single(recv, send, sizes_in, sizes_out, group=group)
        self._traffic["sent"] += send.numel()
        self._traffic["received"] += recv.numel()
        self._traffic["compressed_buckets"] += 1
        got = list(recv.split(size)) if n > 1 else []
        got.insert(r, ups[r].reshape(-1))
        # 3. decode this rank's chunk from every rank, reduce
        acc = torch.zeros(out.numel(), dtype=torch.float32, device=dev)
        for i, data in enumerate(got):
            acc += lay.algos[r].decode_uplink(data, f"rank {i}", t, i)
        if how == "avg":
            acc /= n
        out.copy_(acc.reshape(out.shape))

    # --- checkpoints ----------------------------------------------------------------------
    def state_dict(self, group=None) -> dict:
        """Steps, configuration and every rank's memories. A collective: every rank."""
        group = group if group is not None else dist.group.WORLD
        n = dist.get_world_size(group)
        backend = dist.get_backend(group)
        cdev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
        memories = {}
        for key in self.keys:  # every rank holds a memory for the same modules
            if key not in self.worker_error:
                continue
            mine = self.worker_error[key].to(cdev or "cpu", torch.float32)
            parts = [torch.empty_like(mine) for _ in range(n)]
            dist.all_gather(parts, mine, group=group)
            memories[key] = torch.stack(parts).cpu()
        return {
            "format": FORMAT,
            "world": n,
            "seed": self.seed,
            "config": dict(self.config),
            "steps": dict(self.steps),
            "worker_error": memories,
        }

    def load_state_dict(self, sd: dict, group=None) -> None:
        """Restore a :meth:`state_dict` on every rank (no communication)."""
        group = group if group is not None else dist.group.WORLD
        if not isinstance(sd, dict) or sd.get("format") != FORMAT:
            raise ValueError(f"not a gradzip.fsdp state dict (expected format {FORMAT!r})")
        if sd["world"] != dist.get_world_size(group):
            raise ValueError(f"the checkpoint holds the memories of {sd['world']} ranks")
        if sd["config"] != self.config:
            raise ValueError(f"the checkpoint was made with {sd['config']}, this is {self.config}")
        unknown = (set(sd["steps"]) | set(sd["worker_error"])) - set(self.keys)
        if unknown:
            raise ValueError(f"checkpoint state for unknown FSDP modules: {sorted(unknown)[:5]}")
        rank = dist.get_rank(group)
        self.seed = int(sd["seed"])
        self._layouts.clear()
        self.steps = dict.fromkeys(self.keys, 0) | {k: int(v) for k, v in sd["steps"].items()}
        self.worker_error = {k: m[rank].clone().float() for k, m in sd["worker_error"].items()}


def register(model: torch.nn.Module, spec: str = "fosgd", **options) -> GradzipFSDPState:
    """Give every FSDP2 module of ``model`` (after ``fully_shard``) gradzip's compressed
    reduce-scatter; returns their shared state. Options: :class:`GradzipFSDPState`'s."""
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise TypeError(
            "gradzip.fsdp works with FSDP2 (torch.distributed.fsdp.fully_shard), not with "
            "FullyShardedDataParallel (FSDP1), whose comm hooks receive tensors without the "
            "parameter names gradzip keys its memories by"
        )
    state = GradzipFSDPState(spec, **options)
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            state.keys.append(name)
            state.steps[name] = 0
            module.set_custom_reduce_scatter(GradzipReduceScatter(state, name))
    if not state.keys:
        raise ValueError("no FSDP2 module in the model: call fully_shard before register")
    return state
