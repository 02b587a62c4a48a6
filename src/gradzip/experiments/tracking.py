"""What a run reports while it runs: a progress bar, TensorBoard scalars, and JSON rows that
stay JSON (a diverged run's NaN becomes ``null``).

- :class:`Progress`: tqdm on a terminal where tqdm is installed (``gradzip[experiments]``),
  else a one-line bar; plain lines every 10 % when stderr is not a terminal (logs). A
  resumed run's bar starts at its checkpoint's step (``initial``).
- :func:`bar`: a bar for the long loops of ``classes``, ``scales`` and ``reproduce``, on a
  terminal only (their lines already say what was done, in logs too); messages printed
  through :meth:`Progress.outside` do not tear it.
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
    """A progress bar on stderr; nothing when not ``enabled``. ``initial``: the count it
    starts from (a resumed run's step: tqdm's rate and time left count from there);
    ``leave=False``: the bar is erased when it closes (a run inside a longer job)."""

    def __init__(
        self, total: int, label: str, enabled: bool = True, initial: int = 0, leave: bool = True
    ):
        self.total, self.label, self.enabled, self.leave = total, label, enabled, leave
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last, self.drawn = -1, 0.0
        self.line = ""  # the one-line bar as last drawn ("": not on the terminal now)
        self.bar = None
        if enabled and self.tty:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(
                    total=total, desc=label, file=sys.stderr, leave=leave, initial=initial
                )

    def update(self, done: int, info: str = "") -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            if info:
                self.bar.set_postfix_str(info, refresh=False)
            self.bar.update(done - self.bar.n)  # redrawn at most every 0.1 s
            if done >= self.total:
                self.close()
            return
        pct = int(100 * done / max(self.total, 1))
        now = time.perf_counter()
        if done < self.total and (
            (not self.tty and pct // 10 == self.last // 10) or (self.tty and now < self.drawn + 0.1)
        ):
            return
        self.last, self.drawn = pct, now
        bar = "#" * (pct // 5) + "." * (20 - pct // 5)
        line = f"{self.label} [{bar}] {done}/{self.total} {now - self.t0:6.1f}s {info}"
        if not self.tty:
            print(line, file=sys.stderr)
            return
        print("\r" + line, end="", file=sys.stderr, flush=True)
        self.line = line
        if done >= self.total:
            self.close()

    @contextlib.contextmanager
    def outside(self):
        """Within the block, lines printed (stdout or stderr) go above the bar, which is
        drawn again afterwards."""
        if self.bar is not None:
            from tqdm import tqdm

            with tqdm.external_write_mode(file=sys.stdout):
                yield
        elif self.line:  # the one-line bar: erase it, draw it again below the lines
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.write("\r" + self.line)
                sys.stderr.flush()
        else:
            yield

    def close(self) -> None:
        """Ends the bar (kept on its line, or erased where ``leave`` is false); idempotent."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.enabled = False
        elif self.line:
            sys.stderr.write("\n" if self.leave else "\r\033[K")
            sys.stderr.flush()
            self.line = ""
            self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(total: int, label: str, leave: bool = True) -> Progress:
    """A bar over ``total`` units of a long loop, on a terminal only (``classes``,
    ``scales``, the runs of ``reproduce``); ``update(done, info)``, ``outside()`` around
    lines printed meanwhile, ``close()`` (also as a context manager)."""
    return Progress(total, label, enabled=sys.stderr.isatty(), leave=leave)


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
        self.bar = Progress(total, label, enabled, initial=first)
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
