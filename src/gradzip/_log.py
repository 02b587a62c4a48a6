"""Diagnostics through :mod:`logging`, under the logger ``gradzip`` (``gradzip.kernels``,
``gradzip.train``, ...): a library configures no handler, an application decides. The
command line (:func:`to_stderr`) sends INFO and above to stderr as bare lines. The tables
and reports users read stay on stdout, printed.

:func:`notice` is for what a user must see even where nobody configured logging (a process
that stalls for seconds compiling kernels): through the logger where a handler is
configured anywhere up its chain, else one line on stderr.
"""

from __future__ import annotations

import logging
import sys

ROOT = "gradzip"


def get(name: str) -> logging.Logger:
    """The logger ``gradzip.<name>``."""
    return logging.getLogger(f"{ROOT}.{name}")


class StderrHandler(logging.Handler):
    """Writes each record as a line to the present ``sys.stderr`` (looked up at every
    record, not kept: tests and tools swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging's contract: never raise from emit
            self.handleError(record)


def to_stderr(level: int = logging.INFO) -> None:
    """The command line's configuration: ``gradzip.*`` records of ``level`` and above as
    bare lines on stderr (idempotent)."""
    log = logging.getLogger(ROOT)
    if not any(isinstance(h, StderrHandler) for h in log.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(level)


def notice(log: logging.Logger, message: str) -> None:
    """``message`` at INFO where logging is configured, else as a line on stderr."""
    if log.hasHandlers():
        log.info(message)
    else:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
