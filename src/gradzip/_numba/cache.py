"""Whether numba's on-disk cache of these kernels was compiled from the present sources.

numba's cache checks each compiled function against its own source file only. Most
kernels inline code of another file (the intrinsics of :mod:`.simd`, the transform's sweeps
in :mod:`.fused_onebit`, ``rng.hash32`` nearly everywhere), and ``_numba/rng.py`` compiles
in the constants of ``gradzip/rng.py``: after an edit of one of those, the cache would hand
back the old inlined code, and it would run silently. So the cache directory holds a stamp,
the digest of the sources the cache was built from.

- Every kernel is ``numba.njit(cache=CACHE, ...)``, ``CACHE`` from this module. It is
  computed once per process, by :func:`check_cache`, when the first kernel module is
  imported (not when this module is: running it as a script or with ``-m`` checks nothing
  first). The check deletes nothing; it writes only the stamp, while nothing is cached yet.

  - fresh (the stamp is the present sources' digest), or empty (no ``*.nbi``/``*.nbc``;
    the stamp is recorded): ``CACHE`` is true and numba caches as usual;
  - stale (cached kernels, and no stamp or another one): ``CACHE`` is false, the kernels of
    this process compile in memory (numba neither reads nor writes its cache: a stale
    kernel never runs) and one :class:`StaleKernelCache` warning gives the command that
    refreshes the cache.

- :func:`refresh` (``python -m gradzip._numba.cache``, or this file run as a script, the
  command the warning prints) removes a stale cache's ``*.nbi``/``*.nbc`` and records the
  present stamp; the next process caches again.

- A cold compile is not silent: the first time in a process that numba compiles one of
  these kernels (a cache miss; each codec's first call takes seconds then) one line says
  so on stderr (:func:`gradzip._log.notice`, logger ``gradzip.kernels``), and
  :func:`compiled` counts the kernels compiled so far (``gradzip kernels`` compiles them
  all ahead of time, :mod:`gradzip._warmup`).

The cache directory is the one numba picks for these files (``__pycache__`` next to them,
``NUMBA_CACHE_DIR``, or numba's user-wide directory where ``__pycache__`` is not writable).
An installed package changes its sources only when upgraded (pip leaves numba's files).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
import threading
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Sources outside this folder that the kernels compile in (``_numba.rng`` imports
#: ``GAMMA``, ``MASK32`` and the mixing constants of :mod:`gradzip.rng`).
ALSO = (HERE.parent / "rng.py",)
STAMP = "gradzip-kernel-sources.sha256"


class StaleKernelCache(UserWarning):
    """numba's cache holds kernels compiled from other sources than the present ones: this
    process compiles its kernels in memory instead."""


def _digest(here: Path, also: tuple[Path, ...]) -> str:
    digest = hashlib.sha256()
    for path in sorted(here.glob("*.py")) + sorted(also):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def cache_dir(here: Path = HERE) -> Path | None:
    """The directory numba caches the kernels of ``here/*.py`` in (its locators depend on
    the folder only), or None where numba has nowhere to cache them."""

    def probe():
        pass

    try:
        from numba.core.caching import CompileResultCacheImpl

        probe.__code__ = probe.__code__.replace(co_filename=str(min(here.glob("*.py"))))
        return Path(CompileResultCacheImpl(probe).locator.get_cache_path())
    except RuntimeError:  # "no locator available": numba cannot cache these files
        return None
    except (ImportError, AttributeError, TypeError, ValueError):  # another numba's internals
        return here / "__pycache__"


def _stamp(cache: Path) -> str | None:
    try:
        return (cache / STAMP).read_text()
    except OSError:
        return None  # no stamp yet: whatever is cached may be stale


def _write_stamp(cache: Path, digest: str) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f"{STAMP}.{os.getpid()}"
    tmp.write_text(digest)
    tmp.replace(cache / STAMP)  # atomic: processes starting at once each write a whole stamp


def _cached(cache: Path) -> list[Path]:
    return list(cache.glob("*.nb[ic]"))


def command() -> str:
    """The shell command that refreshes the cache (this file run by this interpreter: it
    needs neither an installed package nor the working tree's ``sys.path``)."""
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))}"


def drop_stale_cache(
    here: Path = HERE, also: tuple[Path, ...] = ALSO, cache: Path | None = None
) -> bool:
    """Remove numba's cache files (``*.nbi``, ``*.nbc``) in ``cache`` (default: where numba
    caches ``here``'s kernels) unless it was built from the present ``here/*.py`` and
    ``also`` (by digest), and record the present digest; returns whether it removed them.
    Best effort: an unwritable cache directory is left as it is."""
    cache = cache_dir(here) if cache is None else cache
    if cache is None:
        return False
    digest = _digest(here, also)
    if _stamp(cache) == digest:
        return False
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for f in _cached(cache):
            f.unlink(missing_ok=True)
        _write_stamp(cache, digest)
    except OSError:
        return False
    return True


def check_cache(
    here: Path = HERE, also: tuple[Path, ...] = ALSO, cache: Path | None = None
) -> bool:
    """Whether ``here``'s kernels may use numba's on-disk cache (``cache``, default where
    numba caches them): true when it was built from the present sources, or holds nothing
    (then the present digest is recorded first). False, with a :class:`StaleKernelCache`
    warning, when it holds kernels built from other sources; false, silently, where numba
    cannot cache. Deletes nothing."""
    cache = cache_dir(here) if cache is None else cache
    if cache is None:
        return False
    digest = _digest(here, also)
    stamp = _stamp(cache)
    if stamp == digest:
        return True
    if not _cached(cache):
        try:
            _write_stamp(cache, digest)
        except OSError:
            return False  # unknown what numba would cache here next: don't
        return True
    warnings.warn(
        StaleKernelCache(
            f"numba's kernel cache in {cache} was compiled from other sources than the "
            f"present ones ({'no stamp' if stamp is None else 'a kernel source changed'}; "
            "numba does not see changes to code inlined from other files). This process "
            "does not use it: kernels are compiled in memory, so their first calls are "
            f"slower. Refresh the cache with: {command()}"
        ),
        stacklevel=2,
    )
    return False


_lock = threading.Lock()
_compiled: list[str] = []  # kernels numba compiled in this process (cache misses)


def compiled() -> list[str]:
    """The kernels numba compiled in this process so far, ``module.function(argument
    types)``, one entry a signature: cache misses only (a kernel loaded from the on-disk
    cache is not counted)."""
    return list(_compiled)


def _compile_message(usable: bool, cache: Path | None) -> str:
    if cache is None:
        how = "numba cannot cache them here: every process compiles"
    elif usable:
        how = f"once per machine, cached in {cache}; `gradzip kernels` compiles them all ahead"
    else:
        how = "in memory: the kernel cache is stale, `gradzip kernels --refresh` renews it"
    return f"gradzip: compiling kernels ({how})..."


def _watch_compiles(usable: bool) -> None:
    """Record every compilation of a kernel of this folder and announce the first one."""
    from numba.core import event

    from .._log import get, notice

    class Watch(event.Listener):
        said = False

        def on_start(self, ev):
            disp = (ev.data or {}).get("dispatcher")
            func = getattr(disp, "py_func", None)
            module = getattr(func, "__module__", "") or ""
            if not module.startswith(__name__.rpartition(".")[0] + "."):
                return
            args = ", ".join(map(str, (ev.data or {}).get("args") or ()))
            _compiled.append(f"{module}.{func.__name__}({args})")
            if not Watch.said:
                Watch.said = True
                notice(get("kernels"), _compile_message(usable, cache_dir()))

        def on_end(self, ev):
            pass

    event.register("numba:compile", Watch())


def __getattr__(name: str):
    """``CACHE``: :func:`check_cache` of the present sources, computed on first use, once
    (with the watch on compilations that announces a cold one)."""
    if name != "CACHE":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _lock:
        if "CACHE" not in globals():
            usable = check_cache()
            try:
                _watch_compiles(usable)
            except (ImportError, AttributeError):  # another numba's internals: stay silent
                pass
            globals()["CACHE"] = usable
    return globals()["CACHE"]


def refresh(here: Path = HERE, also: tuple[Path, ...] = ALSO) -> int:
    """Drop a stale cache and record the present sources (the explicit step after an edit or
    an upgrade); prints what it did, returns 0 when the cache is fresh afterwards."""
    cache = cache_dir(here)
    if cache is None:
        print(f"numba has nowhere to cache the kernels of {here}: nothing to refresh")
        return 0
    had = cache.is_dir() and bool(_cached(cache))
    dropped = drop_stale_cache(here, also, cache) and had  # an empty one is only stamped
    if _stamp(cache) != _digest(here, also):
        print(f"{cache}: could not refresh the kernel cache (not writable?)", file=sys.stderr)
        return 1
    print(f"{cache}: " + ("stale kernel cache dropped" if dropped else "kernel cache is fresh"))
    return 0


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == HERE:
        del sys.path[0]  # run as a file: keep the kernel modules' names off the import path
    sys.exit(refresh())
