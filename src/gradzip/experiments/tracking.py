"""What a run reports while it runs: a progress bar, TensorBoard scalars, and JSON rows that
stay JSON (a diverged run's NaN becomes ``null``).

- :class:`Progress`: tqdm on a terminal where tqdm is installed (``gradzip[experiments]``),
  else a one-line bar; plain lines every 10 % when stderr is not a terminal (logs).
- :class:`TensorBoard`: ``gradzip train --tensorboard DIR`` (``gradzip[tensorboard]``), or
  ``with tracking.tensorboard(DIR): runner.train(cfg)``: per step ``train/loss``,
  ``train/lr``, ``bits/up``, ``bits/down``, ``bits/total_up``, ``bits/total_down``,
  ``time/compute``, ``time/compress``, ``time/comm`` (seconds); per evaluation
  ``eval/<key>`` (train and test loss and accuracy), at the step they describe.
- :class:`Reporter`: both, as the runner's step loop calls them.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from contextvars import ContextVar
from pathlib import Path

_TENSORBOARD: ContextVar[Path | None] = ContextVar("gradzip_tensorboard", default=None)


@contextlib.contextmanager
def tensorboard(log_dir: str | Path | None):
    """Within the block, runs write TensorBoard scalars to ``log_dir`` (``None``: none).
    Checks first that tensorboard is installed (``ModuleNotFoundError`` otherwise)."""
    if log_dir is not None:
        require_tensorboard()
    token = _TENSORBOARD.set(Path(log_dir) if log_dir is not None else None)
    try:
        yield
    finally:
        _TENSORBOARD.reset(token)


def jsonable(value):
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


class Progress:
    """A progress bar on stderr; nothing when not ``enabled``."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last = -1
        self.bar = None
        if enabled and self.tty:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc=label, file=sys.stderr, leave=True)

    def update(self, done: int, info: str = "") -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(info, refresh=False)
            self.bar.refresh()
            if done >= self.total:
                self.bar.close()
            return
        pct = int(100 * done / max(self.total, 1))
        if not self.tty and pct // 10 == self.last // 10 and done != self.total:
            return
        self.last = pct
        bar = "#" * (pct // 5) + "." * (20 - pct // 5)
        el = time.perf_counter() - self.t0
        line = f"{self.label} [{bar}] {done}/{self.total} {el:6.1f}s {info}"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr)
        if self.tty and done == self.total:
            print(file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


STEP_SCALARS = {
    "loss": "train/loss", "lr": "train/lr", "bits_up": "bits/up", "bits_down": "bits/down",
    "t_compute": "time/compute", "t_compress": "time/compress", "t_comm": "time/comm",
}  # fmt: skip
TOTALS = {"cum_bits_up": "bits/total_up", "cum_bits_down": "bits/total_down"}


def require_tensorboard() -> None:
    """ImportError (``ModuleNotFoundError`` named ``tensorboard``) where it is missing."""
    import tensorboard  # noqa: F401


class TensorBoard:
    """Scalars of a run in TensorBoard event files under ``log_dir``; ``None``: nothing.
    ``start`` > 0 (a resumed run) drops what an earlier process logged from that step on."""

    def __init__(self, log_dir: str | Path | None, start: int = 0):
        self.writer = None
        if log_dir is None:
            return
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=start or None)

    def step(self, row: dict, totals: dict) -> None:
        """A step's row of metrics.jsonl and the running totals after it."""
        if self.writer is None:
            return
        t = row["step"]
        for key, tag in STEP_SCALARS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], t)
        for key, tag in TOTALS.items():
            self.writer.add_scalar(tag, totals[key], t + 1)

    def evaluation(self, row: dict) -> None:
        """An evaluation row (step, losses, accuracies, totals)."""
        if self.writer is None:
            return
        for key, v in row.items():
            if key.startswith(("train_", "test_")) and isinstance(v, int | float):
                self.writer.add_scalar(f"eval/{key}", v, row["step"])
        self.writer.flush()

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Reporter:
    """A run's progress bar and, within :func:`tensorboard`, its TensorBoard scalars;
    ``first`` is the step the run starts from (a resumed run's)."""

    def __init__(self, total: int, label: str, enabled: bool = True, first: int = 0):
        self.bar = Progress(total, label, enabled)
        self.tb = TensorBoard(_TENSORBOARD.get(), start=first)
        self.total, self.flushed = total, time.monotonic()

    def step(self, row: dict, totals: dict) -> None:
        self.tb.step(row, totals)

    def evaluation(self, row: dict) -> None:
        self.tb.evaluation(row)

    def update(self, done: int, info: str = "") -> None:
        self.bar.update(done, info)
        if done >= self.total:
            self.tb.close()
        elif time.monotonic() - self.flushed > 5:  # a run killed later keeps the scalars
            self.tb.flush()
            self.flushed = time.monotonic()
