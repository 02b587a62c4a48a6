"""A numba cache built from other sources (numba itself only checks the file of the function
it caches, not the modules whose functions it inlined) is never run: the process compiles
its kernels in memory, warns once, deletes and writes nothing; an explicit refresh drops it.
"""

import ast
import json
import os
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numba
import pytest

import gradzip
from gradzip._numba import cache as kc
from gradzip._numba.cache import STAMP, StaleKernelCache, check_cache, drop_stale_cache


def _cached(cache):
    for name in ("quantize._k-1.py311.nbi", "quantize._k-1.py311.1.nbc"):
        (cache / name).write_bytes(b"compiled")


def test_stale_numba_cache_is_dropped(tmp_path):
    (tmp_path / "fwht.py").write_text("def f(): return 1\n")
    (tmp_path / "quantize.py").write_text("from .fwht import f\n")
    extra = tmp_path / "rng.py"
    extra.write_text("MASK32 = 0xFFFFFFFF\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    _cached(cache)
    (cache / "fwht.cpython-311.pyc").write_bytes(b"bytecode")

    assert drop_stale_cache(tmp_path, (extra,), cache)  # no stamp: nothing cached is trusted
    assert not list(cache.glob("*.nb[ic]")) and (cache / "fwht.cpython-311.pyc").exists()
    assert (cache / STAMP).exists()

    _cached(cache)  # numba compiles and caches again
    assert not drop_stale_cache(tmp_path, (extra,), cache)  # same sources: the cache is kept
    assert len(list(cache.glob("*.nb[ic]"))) == 2

    (tmp_path / "fwht.py").write_text("def f(): return 2\n")  # an inlined callee changes
    assert drop_stale_cache(tmp_path, (extra,), cache)
    assert not list(cache.glob("*.nb[ic]"))

    _cached(cache)
    extra.write_text("MASK32 = 0xFFFF\n")  # a constant compiled in from outside
    assert drop_stale_cache(tmp_path, (extra,), cache)
    assert not list(cache.glob("*.nb[ic]"))
    assert not drop_stale_cache(tmp_path, (extra,), cache)


def test_unwritable_cache_is_left_alone(tmp_path):
    (tmp_path / "k.py").write_text("x = 1\n")
    cache = tmp_path / "__pycache__"
    cache.write_text("not a directory")  # mkdir fails
    assert not drop_stale_cache(tmp_path, (), cache)
    assert not check_cache(tmp_path, (), cache)  # no stamp can be recorded: no disk cache
    assert cache.read_text() == "not a directory"


def test_check_turns_a_stale_cache_off_and_deletes_nothing(tmp_path):
    """check_cache (CACHE's value) only reads, but for the stamp it records while nothing
    is cached; a cache of other sources is not used, with a warning, until refreshed."""
    (tmp_path / "simd.py").write_text("def f(): return 1\n")
    (tmp_path / "fwht.py").write_text("from .simd import f\n")
    extra = tmp_path / "rng.py"
    extra.write_text("MASK32 = 0xFFFFFFFF\n")
    cache = tmp_path / "__pycache__"

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_cache(tmp_path, (extra,), cache)  # empty: the sources are recorded
        assert (cache / STAMP).exists()
        _cached(cache)  # numba compiles and caches
        assert check_cache(tmp_path, (extra,), cache)  # built from these sources: used

    for path, text in ((tmp_path / "simd.py", "def f(): return 2\n"), (extra, "MASK32 = 1\n")):
        path.write_text(text)  # an inlined callee, or a constant compiled in, changes
        stamp = (cache / STAMP).read_text()
        with pytest.warns(StaleKernelCache, match="compiled in memory") as record:
            assert not check_cache(tmp_path, (extra,), cache)
        assert kc.command() in str(record[0].message)
        assert len(list(cache.glob("*.nb[ic]"))) == 2  # not used, not deleted
        assert (cache / STAMP).read_text() == stamp  # nor restamped
        assert drop_stale_cache(tmp_path, (extra,), cache)  # the explicit step
        assert check_cache(tmp_path, (extra,), cache)
        _cached(cache)


def test_cache_dir_is_where_numba_caches(tmp_path, monkeypatch):
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    assert kc.cache_dir() == kc.HERE / "__pycache__"
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))  # NUMBA_CACHE_DIR
    assert kc.cache_dir().parent == tmp_path


def test_kernels_take_the_checked_setting():
    from numba.core.caching import NullCache

    from gradzip._numba import fwht

    assert isinstance(kc.CACHE, bool)
    assert isinstance(fwht.transform_serial._cache, NullCache) == (not kc.CACHE)


def _copy_of_gradzip(root):
    """gradzip's sources under ``root``, with a stale numba cache: a wrong stamp and an
    unreadable index for every kernel (numba fails on a call that reads one)."""
    shutil.copytree(
        Path(gradzip.__file__).parent,
        root / "gradzip",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    here = root / "gradzip" / "_numba"
    cache = here / "__pycache__"
    cache.mkdir()
    (cache / STAMP).write_text("0" * 64)
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}{getattr(sys, 'abiflags', '')}"
    for src in here.glob("*.py"):
        for node in ast.parse(src.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.decorator_list:
                line = node.decorator_list[0].lineno  # numba's co_firstlineno
                (cache / f"{src.stem}.{node.name}-{line}.{tag}.nbi").write_bytes(b"stale")
    return here, cache


def _state(cache):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cache.iterdir()}


def _env(**more):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CACHE")}
    return {**env, "PYTHONDONTWRITEBYTECODE": "1", **more}  # numba caches in __pycache__


def _run(root, code):
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env=_env(PYTHONPATH=str(root)),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


_STALE_RUN = """
import json, warnings
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    import torch
    import gradzip
    from gradzip import hadamard
    from gradzip._numba import bits, cache, fwht
    from numba.core.caching import NullCache
    x = torch.arange(-7.0, 25.0).reshape(2, 16)  # integers: the transform is exact
    y = hadamard.fwht_(x.clone())
    ok = torch.equal(y, hadamard.fwht_reference(x))
stale = [str(w.message) for w in seen if issubclass(w.category, cache.StaleKernelCache)]
print(json.dumps(dict(
    where=gradzip.__file__, cache=cache.CACHE, ok=ok, stale=stale,
    off=all(isinstance(k._cache, NullCache) for k in (fwht.transform_serial, bits._pack_range)),
)))
"""


def test_stale_cache_compiles_in_memory_then_refresh_turns_it_on(tmp_path):
    here, cache = _copy_of_gradzip(tmp_path)
    before = _state(cache)

    got = _run(tmp_path, _STALE_RUN)
    assert got["where"].startswith(str(tmp_path))
    assert got["cache"] is False and got["off"]
    assert got["ok"]  # a stale index is never read: reading one would have raised
    assert len(got["stale"]) == 1 and "no stamp" not in got["stale"][0]
    assert _state(cache) == before  # nothing deleted, written or restamped

    command = got["stale"][0].split("Refresh the cache with: ")[1]
    cmd = shlex.split(command)
    assert cmd == [sys.executable, str((here / "cache.py").resolve())]  # the copy's
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True)  # no PYTHONPATH
    assert done.returncode == 0 and "stale kernel cache dropped" in done.stdout, done.stderr
    assert not list(cache.glob("*.nb[ic]"))
    assert (cache / STAMP).read_text() == kc._digest(here, (here.parent / "rng.py",))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what CACHE is in the next process: on, no warning
        assert check_cache(here, (here.parent / "rng.py",), cache)
