"""Whether numba's on-disk cache of these kernels was compiled from the present sources.

numba's cache (``cache=True``) checks each compiled function against its own source file
only. Most kernels inline code of another file (the intrinsics of :mod:`.simd`, the
transform's sweeps in :mod:`.fused_onebit`, ``rng.hash32`` nearly everywhere), and
``_numba/rng.py`` compiles in the constants of ``gradzip/rng.py``: after an edit of one of
those, the cache would hand back the old inlined code, and it would run silently. So the
cache directory holds a stamp, the digest of the sources the cache was built from.

- :func:`check_cache` runs when :mod:`gradzip._numba` is imported. It only reads, except
  that it records the stamp while nothing is cached yet (so that what numba caches next is
  known to come from these sources). It raises :class:`StaleKernelCache` when cached
  kernels exist that were not built from the present sources: they are never run.
- :func:`drop_stale_cache` removes such a cache (``*.nbi``, ``*.nbc``) and records the new
  stamp. It is called explicitly, never on import: run this file,
  ``python src/gradzip/_numba/cache.py`` (the error message gives the full command). It
  is a file, not ``python -m``, because importing the package would run the check first.

An installed package never changes its sources; this is for a working tree under edit.
Where ``__pycache__`` is not writable numba caches elsewhere and nothing here applies.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Sources outside this folder that the kernels compile in (``_numba.rng`` imports
#: ``GAMMA``, ``MASK32`` and the mixing constants of :mod:`gradzip.rng`).
ALSO = (HERE.parent / "rng.py",)
STAMP = "gradzip-kernel-sources.sha256"


class StaleKernelCache(RuntimeError):
    """numba's cache holds kernels compiled from other sources than the present ones."""


def _digest(here: Path, also: tuple[Path, ...]) -> str:
    digest = hashlib.sha256()
    for path in sorted(here.glob("*.py")) + sorted(also):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _stamp(cache: Path) -> str | None:
    try:
        return (cache / STAMP).read_text()
    except OSError:
        return None  # no stamp yet: whatever is cached may be stale


def _write_stamp(cache: Path, digest: str) -> None:
    cache.mkdir(exist_ok=True)
    tmp = cache / f"{STAMP}.{os.getpid()}"
    tmp.write_text(digest)
    tmp.replace(cache / STAMP)  # atomic: processes starting at once each write a whole stamp


def _cached(cache: Path) -> list[Path]:
    return list(cache.glob("*.nb[ic]"))


def drop_stale_cache(here: Path = HERE, also: tuple[Path, ...] = ()) -> bool:
    """Remove numba's cache files (``*.nbi``, ``*.nbc``) in ``here/__pycache__`` unless it
    was built from the present ``here/*.py`` and ``also`` (by digest); returns whether it
    removed them. Best effort: an unwritable cache directory is left as it is."""
    digest = _digest(here, also)
    cache = here / "__pycache__"
    if _stamp(cache) == digest:
        return False
    try:
        cache.mkdir(exist_ok=True)
        for f in _cached(cache):
            f.unlink(missing_ok=True)
        _write_stamp(cache, digest)
    except OSError:
        return False
    return True


def check_cache(here: Path = HERE, also: tuple[Path, ...] = ALSO) -> None:
    """Raise :class:`StaleKernelCache` if ``here/__pycache__`` holds numba cache files not
    built from the present sources (see the module docstring); deletes nothing. With no
    cache files, records the present digest (best effort) and returns."""
    digest = _digest(here, also)
    cache = here / "__pycache__"
    stamp = _stamp(cache)
    if stamp == digest:
        return
    if not _cached(cache):
        try:
            _write_stamp(cache, digest)
        except OSError:
            pass  # numba cannot cache here either
        return
    command = f"{sys.executable} {Path(__file__).resolve()}"
    raise StaleKernelCache(
        f"numba's cache in {cache} holds kernels compiled from other sources than the "
        f"present ones ({'no stamp' if stamp is None else 'a kernel source changed'}); numba "
        f"does not see changes to inlined code of other files. Drop it with: {command}"
    )


if __name__ == "__main__":
    dropped = drop_stale_cache(also=ALSO)
    print(f"{HERE / '__pycache__'}: " + ("stale cache dropped" if dropped else "cache is fresh"))
