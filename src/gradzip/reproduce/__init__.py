"""``gradzip reproduce``: the seed papers' claims, checked with gradzip's own code.

Each module reproduces one paper and returns a :class:`report.Section` (figures, the exact
configuration, the runtime and a verdict per claim computed from the measured numbers by
a stated rule). :func:`reproduce` writes ``OUT/NAME/report.md`` (and the figures beside
it); ``all`` runs the four and writes one combined ``OUT/report.md``. The data sets are read
from :func:`gradzip.problems.datasets.data_dir` (``data``: another folder, as
``GRADZIP_DATA``); every file a run needs is checked before it starts (:data:`NEEDS`).
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from ..problems import datasets
from .report import Section, write_combined, write_section

PAPERS = ("memsgd", "biased", "dqgd", "fosgd")
CHOICES = (*PAPERS, "all")
#: paper -> (LIBSVM files under data_dir()/libsvm, whether it trains on Fashion-MNIST)
NEEDS = {
    "memsgd": (("a9a", "w8a"), False),
    "biased": (("a9a",), True),
    "dqgd": ((), False),  # synthetic and scikit-learn's bundled diabetes
    "fosgd": (("w8a",), True),
}


def check_data(names) -> None:
    """One :class:`~gradzip.problems.DataError` naming every file the papers ``names`` need
    and do not find (and where to get them); nothing when all are there."""
    libsvm = tuple(dict.fromkeys(f for n in names for f in NEEDS[n][0]))
    datasets.check_available(libsvm, fashion=any(NEEDS[n][1] for n in names))


def run_paper(name: str, out: Path, quick: bool = False, progress=print) -> Section:
    if name not in PAPERS:
        raise ValueError(f"unknown reproduction {name!r}; valid: {', '.join(CHOICES)}")
    mod = importlib.import_module(f".{name}", __name__)
    t0 = time.perf_counter()
    sec = mod.reproduce(Path(out), quick=quick, progress=progress)
    sec.runtime_s = time.perf_counter() - t0
    write_section(sec, Path(out))
    return sec


def combine(out: str | Path = "results/reproduce") -> Path:
    """(Re)write the combined ``OUT/report.md`` from the four papers' folders in ``OUT``."""
    return write_combined(Path(out), PAPERS)


def reproduce(
    name: str,
    out: str | Path = "results/reproduce",
    quick: bool = False,
    progress=print,
    data: str | Path | None = None,
) -> tuple[Path, list[Section]]:
    """Run one reproduction (or ``all``); returns (report path, sections). ``data``: the
    folder holding ``libsvm/`` (and ``fashion-mnist/``), default ``GRADZIP_DATA``."""
    if name not in CHOICES:
        raise ValueError(f"unknown reproduction {name!r}; valid: {', '.join(CHOICES)}")
    out = Path(out)
    with datasets.using_data_dir(data):
        check_data(PAPERS if name == "all" else (name,))
        if name == "all":
            with datasets.reuse():  # a9a, w8a and Fashion-MNIST are read once for the four
                secs = [run_paper(p, out / p, quick, progress) for p in PAPERS]
            return combine(out), secs
        sec = run_paper(name, out / name, quick, progress)
    return out / name / "report.md", [sec]


__all__ = [
    "CHOICES",
    "NEEDS",
    "PAPERS",
    "Section",
    "check_data",
    "combine",
    "reproduce",
    "run_paper",
]
