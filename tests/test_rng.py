"""rng: the counter-based streams are deterministic, well spread, and identical in both paths."""

import numpy as np
import pytest
import torch

from gradzip import rng
from gradzip._numba import rng as nrng


def test_key_depends_on_every_integer():
    keys = {
        rng.derive_key(s, t, w, st)
        for s in range(3)
        for t in range(3)
        for w in range(3)
        for st in range(3)
    }
    assert len(keys) == 81
    assert rng.derive_key(5, 1, 2, 3) == rng.derive_key(5, 1, 2, 3)


@pytest.mark.parametrize("bad", [-1, 1 << 64, 1.5, True])
def test_key_rejects_bad_integers(bad):
    with pytest.raises((ValueError, TypeError)):
        rng.derive_key(bad)


@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 1000, 65537])
def test_numba_matches_torch(n):
    for seed in (0, 7, (1 << 64) - 1):
        k = rng.derive_key(seed, 2, 1, rng.STREAM_DITHER)
        assert np.array_equal(rng.symmetric_uniform(k, n).numpy(), nrng.symmetric_uniform(k, n))
        assert np.array_equal(rng.rademacher(k, n).numpy(), nrng.rademacher(k, n))
        assert np.array_equal(rng.dither16(k, n).numpy(), nrng.dither16(k, n))


def _mix64(z: int) -> int:
    """SplitMix64's output function, in Python integers."""
    m = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_mix64_is_splitmix64():
    # the published SplitMix64 stream of seed 1234567 (its state advances by GAMMA first)
    m = (1 << 64) - 1
    seq = [_mix64((1234567 + j * rng.GAMMA) & m) for j in (1, 2, 3)]
    assert seq == [6457827717110365317, 3203168211198807973, 9817491932198370423]
    z = [(rng.derive_key(9) + j * rng.GAMMA) & m for j in range(64)]
    got = rng.mix64(torch.tensor([v - (1 << 64) if v >> 63 else v for v in z]))
    assert [v & m for v in got.tolist()] == [_mix64(v) for v in z]


def test_dither16_layout_and_grid():
    """Group g of 32 values: the low then the high 16 bits of the 16 32-bit halves of
    SplitMix64's words 8 g .. 8 g + 7 (recomputed here in Python integers)."""
    k = rng.derive_key(3, 1, 4, rng.STREAM_DITHER)
    n = 32 * 5 + 7
    u = rng.dither16(k, n)
    t = []
    for g in range(6):
        w = []
        for j in range(8):
            z = _mix64((k + (8 * g + j) * rng.GAMMA) & ((1 << 64) - 1))
            w += [z & 0xFFFFFFFF, z >> 32]
        t += [v & 0xFFFF for v in w] + [v >> 16 for v in w]
    t = torch.tensor(t[:n])
    assert torch.equal(u, (2 * t + 1).float() / 65536 - 1)
    # exact grid of spacing 2**-15, symmetric about 0, inside (-1, 1)
    grid = (u.double() + 1) * 2**15
    assert torch.equal(grid, grid.floor() + 0.5)
    assert -1 < float(u.min()) and float(u.max()) < 1
    assert rng.dither16(k, 1000)[:n].equal(u) and rng.dither16(k, 0).numel() == 0


def test_dither16_moments_and_independence():
    n = 1 << 20
    u = rng.dither16(rng.derive_key(42), n).double()
    assert abs(float(u.mean())) < 6 * (1 / 3 / n) ** 0.5
    assert abs(float(u.var()) - 1 / 3) < 6 * (1 / 45 / n) ** 0.5 * 2
    counts = torch.histc(u, bins=16, min=-1, max=1)
    assert float(((counts - n / 16) ** 2 / (n / 16)).sum()) < 37.7
    # the two halves of one 32-bit half-word (elements j and j + 16 of a group), and the
    # two halves of one word (elements 2i and 2i + 1), are uncorrelated
    g = u.reshape(-1, 2, 16)
    assert abs(float((g[:, 0] * g[:, 1]).mean())) < 6 / 3 / (n / 2) ** 0.5
    p = u.reshape(-1, 2)
    assert abs(float((p[:, 0] * p[:, 1]).mean())) < 6 / 3 / (n / 2) ** 0.5
    assert abs(float((u[1:] * u[:-1]).mean())) < 6 / 3 / n**0.5


def test_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    rng.symmetric_uniform(rng.derive_key(1), 1000)
    rng.rademacher(rng.derive_key(1), 1000)
    assert torch.equal(before, torch.get_rng_state())


def test_uniform_moments_and_range():
    n = 1 << 20
    u = rng.symmetric_uniform(rng.derive_key(42), n).double()
    assert -1 < float(u.min()) and float(u.max()) < 1
    # mean 0, variance 1/3; tolerances are 6 standard errors
    assert abs(float(u.mean())) < 6 * (1 / 3 / n) ** 0.5
    assert abs(float(u.var()) - 1 / 3) < 6 * (1 / 45 / n) ** 0.5 * 2
    # the 16 bins of a histogram are flat (chi-square, 15 dof, 0.1% quantile about 37.7)
    counts = torch.histc(u, bins=16, min=-1, max=1)
    chi2 = float(((counts - n / 16) ** 2 / (n / 16)).sum())
    assert chi2 < 37.7


def test_rademacher_balanced_and_independent_across_streams():
    n = 1 << 18
    a = rng.rademacher(rng.derive_key(1, 0, 0, 1), n)
    b = rng.rademacher(rng.derive_key(1, 0, 0, 2), n)
    c = rng.rademacher(rng.derive_key(1, 1, 0, 1), n)
    for s in (a, b, c):
        assert set(s.unique().tolist()) == {-1.0, 1.0}
        assert abs(float(s.mean())) < 6 / n**0.5
    # correlations between streams are at the 1/sqrt(n) level
    for u, v in ((a, b), (a, c), (b, c)):
        assert abs(float((u * v).mean())) < 6 / n**0.5
    # consecutive signs are uncorrelated (the 32 signs of one hash word included)
    assert abs(float((a[1:] * a[:-1]).mean())) < 6 / n**0.5


def test_stream_too_long_is_an_error():
    with pytest.raises(ValueError, match="2\\*\\*32"):
        rng.symmetric_uniform(rng.derive_key(0), (1 << 32) + 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    k = rng.derive_key(3, 4, 5, 6)
    assert torch.equal(rng.symmetric_uniform(k, 4097, "cuda").cpu(), rng.symmetric_uniform(k, 4097))
    assert torch.equal(rng.rademacher(k, 4097, "cuda").cpu(), rng.rademacher(k, 4097))
    assert torch.equal(rng.dither16(k, 4097, "cuda").cpu(), rng.dither16(k, 4097))
