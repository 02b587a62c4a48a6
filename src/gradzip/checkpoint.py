"""Atomic files: a checkpoint (or any file) is either the previous version or the new one.

``save(obj, path)`` writes ``torch.save(obj)`` to ``<path>.tmp`` in the same folder,
flushes and fsyncs it, renames it over ``path`` (``os.replace``, atomic on POSIX and
Windows) and fsyncs the folder, so a process killed at any instant (SIGKILL, power loss
after the rename reached the disk) leaves the previous checkpoint intact until the new one
is complete. ``write_text`` does the same for text (``config.json``, ``summary.json``).
``load(path)`` reads a checkpoint with ``weights_only=True`` and turns a missing, empty,
truncated or foreign file into a one-line :class:`CheckpointError` (a ``ValueError``)
naming the file.

The run folders of ``gradzip train`` and the DDP example's ``--save`` use them; in your
own loop::

    import gradzip.checkpoint
    gradzip.checkpoint.save({"model": model.state_dict(), "gradzip": state.state_dict()},
                            "ckpt.pt")
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["CheckpointError", "fsync_dir", "load", "save", "tmp_path", "write_text"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file."""


def tmp_path(path: str | Path) -> Path:
    """Where :func:`save` writes before the rename (one fixed name: a writer killed
    mid-write leaves it behind, and the next save overwrites it)."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(folder, flags)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic(path: str | Path, write) -> Path:
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent if str(path.parent) else ".")
    return path


def save(obj, path: str | Path) -> Path:
    """``torch.save(obj, path)``, atomically (see the module docstring)."""
    return _atomic(path, lambda f: torch.save(obj, f))


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (utf-8) to ``path``, atomically."""
    return _atomic(path, lambda f: f.write(text.encode()))


def load(path: str | Path, map_location="cpu", keys=()) -> dict:
    """``torch.load(path, weights_only=True)``; a file that is not a complete checkpoint
    (or a dict lacking one of ``keys``) raises a one-line :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        sd = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated zip, a foreign pickle, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({size} bytes; truncated or damaged: {first[:160]})"
        ) from None
    missing = [k for k in keys if not isinstance(sd, dict) or k not in sd]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of this kind (no {missing[0]!r})")
    return sd
