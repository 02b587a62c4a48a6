"""The DDP hook's communication thread (gradzip._pipeline): order, results, failures."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from gradzip._pipeline import Pipeline


def test_jobs_run_in_order_on_one_thread():
    p = Pipeline()
    seen, threads = [], set()

    def job(i):
        def run():
            time.sleep(0.002 * (5 - i))  # later jobs are quicker: order must still hold
            seen.append(i)
            threads.add(threading.get_ident())
            return torch.tensor([float(i)])

        return run

    futs = [p.submit(job(i)) for i in range(5)]
    assert [f.wait().item() for f in futs] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert seen == list(range(5))
    assert len(threads) == 1 and threading.get_ident() not in threads
    p.drain()
    p.close()
    assert p.submit(job(0)).wait().item() == 0.0  # a new thread after close
    p.close()


def test_a_failure_fails_every_later_job():
    p = Pipeline()

    def boom():
        raise ValueError("bad bucket")

    first = p.submit(boom)
    later = p.submit(lambda: torch.zeros(1))
    with pytest.raises(ValueError, match="bad bucket"):
        first.wait()
    with pytest.raises(RuntimeError, match="earlier bucket failed.*bad bucket"):
        later.wait()
    assert isinstance(p.failure, ValueError)
    p.drain()
    p.close()
