"""The DDP hook's communication thread: buckets' work, in the order the hook saw them.

The hook (:func:`gradzip.ddp.hook`) hands each bucket's work (encode, exchange, serve,
exchange, decode) to one thread and returns a future at once, so that the backward pass
goes on computing the next buckets' gradients while this one is compressed and sent. One
thread, first in first out: the collectives leave every rank in bucket order, the order
DDP launches buckets in on every rank, which gloo and NCCL both need (PyTorch's PowerSGD
hook issues its collectives from future callbacks instead, whose order differs between
ranks on gloo when there are several buckets).

After a failure the thread fails every later job with the same error: the ranks'
collectives are then out of step, and a job that went on would hang or mix buckets.

The hook runs a step's last bucket with :meth:`Pipeline.run_here`, on its own thread once
the others are done: DDP reads no bucket's result before the backward ends, so a step
found non-finite at its last bucket can still zero the earlier ones, and a failure is
raised from the backward as itself (DDP reports a failed future as "Unable to cast ...").
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

_STOP = object()


class Pipeline:
    """One worker thread running submitted jobs in order; each job completes a Future."""

    def __init__(self, name: str = "gradzip-ddp"):
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._idle = threading.Condition()
        self.failure: BaseException | None = None

    def submit(self, job: Callable[[], torch.Tensor]) -> torch.futures.Future:
        """Run ``job`` on the thread after the jobs submitted before it; its result (or
        exception) completes the returned future."""
        fut: torch.futures.Future = torch.futures.Future()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()
        with self._idle:
            self._pending += 1
        self._queue.put((job, fut))
        return fut

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            job, fut = item
            try:
                if self.failure is not None:
                    raise RuntimeError(
                        "gradzip.ddp: an earlier bucket failed on this rank "
                        f"({type(self.failure).__name__}: {self.failure}); the ranks' "
                        "collectives are out of step, so no later bucket can run"
                    ) from self.failure
                result = job()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                if self.failure is None:
                    self.failure = e
                fut.set_exception(e)
            else:
                fut.set_result(result)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def run_here(self, job: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run ``job`` on the calling thread after every submitted job; an earlier job's
        failure is raised instead, and this one's becomes the thread's."""
        self.drain()
        if self.failure is not None:
            raise self.failure
        try:
            return job()
        except BaseException as e:
            self.failure = e
            raise

    def drain(self) -> None:
        """Wait until every submitted job has run."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)

    def close(self) -> None:
        """Finish the submitted jobs and stop the thread (a later submit starts a new one)."""
        t = self._thread
        if t is not None and t.is_alive():
            self._queue.put(_STOP)
            t.join()
        self._thread = None
