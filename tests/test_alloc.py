"""The caching allocator of large CPU buffers (gradzip._alloc)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradzip as gz
from gradzip import _alloc

N = 1 << 19  # float32 elements: 2 MiB, above the pool's threshold


def test_a_block_in_use_is_never_handed_out_again():
    a = _alloc.empty(N)
    a.fill_(1.0)
    b = _alloc.empty(N)
    b.fill_(2.0)
    assert a.data_ptr() != b.data_ptr()
    assert bool((a == 1.0).all())


def test_a_freed_block_is_reused_and_aligned():
    a = _alloc.empty(N)
    ptr = a.data_ptr()
    assert ptr % _alloc.ALIGN == 0
    del a
    assert _alloc.empty(N).data_ptr() == ptr


@pytest.mark.parametrize(
    "keep",
    [
        lambda t: t[10:20],  # a tensor view
        lambda t: t.view(torch.int32),  # a reinterpreting view
        lambda t: t.numpy(),  # a numpy array sharing the memory
        lambda t: t.numpy()[5:],  # a numpy view of that
        lambda t: t.untyped_storage(),  # the storage itself
    ],
)
def test_anything_that_still_refers_to_a_block_keeps_it(keep):
    a = _alloc.empty(N)
    ptr = a.data_ptr()
    held = keep(a)
    del a
    fresh = [_alloc.empty(N) for _ in range(3)]
    assert all(t.data_ptr() != ptr for t in fresh)
    del held, fresh
    # once everything is gone the block is free again: some request gets it
    got = [_alloc.empty(N) for _ in range(_alloc.MAX_PER_SIZE)]
    assert ptr in {t.data_ptr() for t in got}


def test_other_dtypes_and_sizes():
    for dtype in (torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8):
        t = _alloc.empty(N, dtype)
        assert t.dtype == dtype and t.shape == (N,) and t.data_ptr() % _alloc.ALIGN == 0
    small = _alloc.empty(10)
    assert small.shape == (10,)


def test_the_pool_stays_within_its_limit_and_empties(monkeypatch):
    monkeypatch.setattr(_alloc, "_limit", 3 * (4 * N + _alloc.ALIGN))
    _alloc.empty_cache()
    held = [_alloc.empty(N) for _ in range(6)]  # more than the limit allows to pool
    assert _alloc.cached_bytes() <= _alloc._limit
    assert len({t.data_ptr() for t in held}) == 6
    del held
    assert _alloc.empty_cache() > 0
    assert _alloc.cached_bytes() == 0


def test_a_bad_limit_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("GRADZIP_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="GRADZIP_CACHE_MB"):
        _alloc._cache_limit()
    monkeypatch.setenv("GRADZIP_CACHE_MB", "0")
    assert _alloc._cache_limit() == 0


@pytest.mark.parametrize("name", ["fosgd", "identity", "sign", "uniform", "topk:k=0.01"])
def test_decoded_tensors_that_are_held_are_not_overwritten(name):
    c = gz.compressor(name)
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(N, generator=g), torch.randn(N, generator=g)
    p1, p2 = c.encode(x1, seed=1), c.encode(x2, seed=2)
    z1 = c.decode(p1)
    keep = z1.clone()
    bytes1 = p1.data.clone()
    for _ in range(3):  # blocks freed in between are recycled, held ones are not
        z2 = c.decode(p2)
        p3 = c.encode(x2, seed=3)
        del z2, p3
    assert torch.equal(z1, keep)
    assert torch.equal(p1.data, bytes1)
    np.testing.assert_array_equal(c.decode(p1).numpy(), keep.numpy())


def _pooled(t: torch.Tensor) -> bool:
    """Whether ``t``'s memory lies in one of the pool's blocks."""
    blocks = [o for held in _alloc._pool.values() for o in held]
    return any(o.ctypes.data <= t.data_ptr() < o.ctypes.data + o.size for o in blocks)


@pytest.mark.parametrize("name", gz.compressors.registry.names())
def test_every_decoder_recycles_its_output(name):
    """Each decoder's output comes from the pool, and a decode whose previous output has
    been dropped gets the same block back: fresh memory on every call costs its page
    faults, measured up to 20x a copy_ at 2^24 (the sparse decoders, before)."""
    c = gz.compressor(name)
    p = c.encode(torch.randn(N, generator=torch.Generator().manual_seed(5)))
    first = c.decode(p)
    assert _pooled(first), name
    ptr, want = first.data_ptr(), first.clone()
    del first
    again = c.decode(p)
    assert again.data_ptr() == ptr, name
    assert torch.equal(again, want)
