"""A numba cache built before any kernel source changed is refused on import and dropped
explicitly (numba itself only checks the file of the function it caches, not the modules
whose functions it inlined)."""

import pytest

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

    assert drop_stale_cache(tmp_path, (extra,))  # no stamp: nothing cached can be trusted
    assert not list(cache.glob("*.nb[ic]")) and (cache / "fwht.cpython-311.pyc").exists()
    assert (cache / STAMP).exists()

    _cached(cache)  # numba compiles and caches again
    assert not drop_stale_cache(tmp_path, (extra,))  # same sources: the cache is kept
    assert len(list(cache.glob("*.nb[ic]"))) == 2

    (tmp_path / "fwht.py").write_text("def f(): return 2\n")  # an inlined callee changes
    assert drop_stale_cache(tmp_path, (extra,))
    assert not list(cache.glob("*.nb[ic]"))

    _cached(cache)
    extra.write_text("MASK32 = 0xFFFF\n")  # a constant compiled in from outside
    assert drop_stale_cache(tmp_path, (extra,))
    assert not list(cache.glob("*.nb[ic]"))
    assert not drop_stale_cache(tmp_path, (extra,))


def test_unwritable_cache_is_left_alone(tmp_path):
    (tmp_path / "k.py").write_text("x = 1\n")
    (tmp_path / "__pycache__").write_text("not a directory")  # mkdir fails
    assert not drop_stale_cache(tmp_path)


def test_import_check_refuses_a_stale_cache_and_deletes_nothing(tmp_path):
    """What runs on import (check_cache) only reads, but for the stamp it records while
    nothing is cached; a cache of other sources is refused until dropped explicitly."""
    (tmp_path / "simd.py").write_text("def f(): return 1\n")
    (tmp_path / "fwht.py").write_text("from .simd import f\n")
    extra = tmp_path / "rng.py"
    extra.write_text("MASK32 = 0xFFFFFFFF\n")
    cache = tmp_path / "__pycache__"

    check_cache(tmp_path, (extra,))  # nothing cached: the present sources are recorded
    assert (cache / STAMP).exists()
    _cached(cache)  # numba compiles and caches
    check_cache(tmp_path, (extra,))  # built from these sources: accepted

    for path, text in ((tmp_path / "simd.py", "def f(): return 2\n"), (extra, "MASK32 = 1\n")):
        path.write_text(text)  # an inlined callee, or a constant compiled in, changes
        with pytest.raises(StaleKernelCache, match="cache.py"):
            check_cache(tmp_path, (extra,))
        assert len(list(cache.glob("*.nb[ic]"))) == 2  # refused, not deleted
        assert drop_stale_cache(tmp_path, (extra,))  # the explicit step
        check_cache(tmp_path, (extra,))
        _cached(cache)
