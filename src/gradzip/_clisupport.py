"""What every ``gradzip`` command shares around its work: the optional packages it needs
(a missing one is a one-line ``pip install 'gradzip[...]'``, before anything runs), and
the output folders it creates (a command that fails leaves none of them behind empty),
and its argument parser (:class:`Parser`: a usage error is one line, like every other bad
input).

The core install (``pip install gradzip``) holds what the codecs and the DDP hook need:
torch, numpy, numba, zlib-ng. Plotting, the data sets' readers and the reference solvers
are the ``experiments`` extra (matplotlib, scipy, scikit-learn, tqdm); TensorBoard is the
``tensorboard`` extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
from pathlib import Path

#: importable name -> (package on PyPI, gradzip's extra that installs it)
EXTRAS = {
    "matplotlib": ("matplotlib", "experiments"),
    "scipy": ("scipy", "experiments"),
    "sklearn": ("scikit-learn", "experiments"),
    "tqdm": ("tqdm", "experiments"),
    "tensorboard": ("tensorboard", "tensorboard"),
}

#: what each command imports sooner or later (checked before it starts; ``train`` and
#: ``compare`` load scikit-learn only for the problems that read through it)
NEEDS = {
    "compare": ("matplotlib",),
    "demo": ("matplotlib", "sklearn"),
    "reproduce": ("matplotlib", "scipy", "sklearn"),
    "classes": ("sklearn",),
    "scales": ("matplotlib", "sklearn"),
}


def require(*modules: str) -> None:
    """``ModuleNotFoundError`` (with ``name``) for the first of ``modules`` not installed."""
    for m in modules:
        try:
            found = importlib.util.find_spec(m) is not None
        except (ImportError, ValueError):  # a parent missing, or a module without a spec
            found = False
        if not found:
            raise ModuleNotFoundError(f"No module named {m!r}", name=m)


def missing_extra(e: ModuleNotFoundError) -> str | None:
    """The one-line message for a missing optional package, or None for any other module."""
    top = (e.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    package, extra = EXTRAS[top]
    return f"this needs {package}, which is not installed: pip install 'gradzip[{extra}]'"


class CreatedFolders:
    """The outermost folders a command is about to create; :meth:`remove_empty` deletes
    those that hold no file (call it when the command failed)."""

    def __init__(self):
        self.tops: list[Path] = []

    def watch(self, path: str | Path) -> None:
        p = Path(path).absolute()
        if p.exists():
            return
        while not p.parent.exists():
            p = p.parent
        self.tops.append(p)

    def remove_empty(self) -> None:
        for top in self.tops:
            if top.is_dir() and not any(x.is_symlink() or not x.is_dir() for x in top.rglob("*")):
                shutil.rmtree(top, ignore_errors=True)
        self.tops.clear()


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors (an unknown flag, a value of the wrong type, a missing
    argument) are one line on stderr, ``PROG: error: MESSAGE (PROG --help: the options)``,
    exit status 2, instead of the usage block and the message. Sub-commands' parsers made
    through ``add_subparsers`` are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help: the options)\n")
