"""The engines' fault-injection hook for tests: ``GRADZIP_TEST_FAULT``.

``GRADZIP_TEST_FAULT="rank=R,step=S,kind=K"`` (a torch.distributed rank) or
``"worker=W,step=S,kind=K"`` (worker W in any engine, the simulated ones included):

- ``corrupt``: the rank corrupts the downlink it received at step S (a ``PayloadError``
  when it decodes);
- ``exit``: the rank exits abruptly (code 3) before sending its uplink of step S;
- ``stop``: the rank stops itself with SIGSTOP before its gradient of step S;
- ``nan`` / ``inf``: the worker's gradient of step S gets a NaN (an inf) at coordinate 0.
"""

from __future__ import annotations

import os
import signal

import torch

FAULT_ENV = "GRADZIP_TEST_FAULT"
KINDS = ("corrupt", "exit", "stop", "nan", "inf")


class Fault:
    """The hook as seen by one party: rank ``rank`` (None in one process) running worker
    ``worker`` (None for rank 0 of the parameter server)."""

    def __init__(self, rank: int | None = None, worker: int | None = None):
        self.step, self.kind = -1, ""
        raw = os.environ.get(FAULT_ENV, "")
        if not raw:
            return
        try:
            spec = dict(kv.split("=", 1) for kv in raw.split(","))
            kind, step = spec["kind"], int(spec["step"])
            if kind not in KINDS or ("rank" in spec) == ("worker" in spec):
                raise ValueError
            if "rank" in spec:
                hit = rank is not None and int(spec["rank"]) == rank
            else:
                hit = worker is not None and int(spec["worker"]) == worker
        except (KeyError, ValueError):
            raise ValueError(
                f"{FAULT_ENV}: expected rank=R|worker=W,step=S,kind={'|'.join(KINDS)}, got {raw!r}"
            ) from None
        if hit:
            self.step, self.kind = step, kind

    def maybe_exit(self, t: int) -> None:
        if t == self.step and self.kind == "exit":
            os._exit(3)
        if t == self.step and self.kind == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)

    def maybe_corrupt(self, t: int, data: torch.Tensor) -> torch.Tensor:
        if self.kind == "corrupt" and t == self.step:
            data = data.clone()
            data[0] ^= 0xFF  # the magic: decode raises PayloadError
        return data

    def maybe_poison(self, t: int, g: torch.Tensor) -> torch.Tensor:
        if self.kind in ("nan", "inf") and t == self.step:
            g = g.clone()
            g.view(-1)[0] = float(self.kind)
        return g


def faults(workers: int) -> list[Fault]:
    """One hook per worker of a one-process engine."""
    return [Fault(worker=i) for i in range(workers)]
