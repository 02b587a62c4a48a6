"""Walsh-Hadamard transform and the randomized rotation Phi (gradzip.hadamard, DESIGN 3.1)."""

from __future__ import annotations

import math
import threading

import numba
import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradzip import hadamard, rng

KEY = rng.derive_key(7, 3, 1, rng.STREAM_ROTATION)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _dense_phi(d: int, key: int) -> np.ndarray:
    """Phi as a dense float64 matrix, built from scipy's Hadamard matrix and the signs."""
    B = hadamard.rotation_block(d)
    s = rng.rademacher(key, 2 * B, dtype=torch.float64).numpy()
    H = scipy.linalg.hadamard(B).astype(np.float64) / math.sqrt(B)
    step1 = np.eye(d)
    step1[:B, :B] = H @ np.diag(s[:B])
    step2 = np.eye(d)
    step2[d - B :, d - B :] = H @ np.diag(s[B:])
    return step2 @ step1 if d > B else step1


# ---------------------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1 << k for k in range(9)])
def test_fwht_reference_is_sylvester_hadamard(n):
    x = _randn(2, 3, n, seed=n, dtype=torch.float64)
    expected = x.numpy() @ scipy.linalg.hadamard(n)
    np.testing.assert_allclose(hadamard.fwht_reference(x).numpy(), expected, rtol=1e-12, atol=1e-12)
    assert hadamard.fwht_reference(x).shape == x.shape


def test_fwht_reference_is_out_of_place_and_rejects_bad_lengths():
    x = _randn(4, 8, seed=0)
    x0 = x.clone()
    hadamard.fwht_reference(x)
    assert torch.equal(x, x0)
    assert torch.equal(hadamard.fwht_reference(x[:, :1]), x[:, :1])
    with pytest.raises(ValueError, match="power of two"):
        hadamard.fwht_reference(torch.zeros(3, 12))
    with pytest.raises(ValueError, match="power of two"):
        hadamard.fwht_(torch.zeros(3, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [*range(17), 20])
def test_fwht_fast_path_matches_reference(k, dtype):
    n = 1 << k
    rows = 3 if k <= 16 else 1
    x = _randn(rows, n, seed=100 * k + 7, dtype=dtype)
    y = x.clone()
    assert hadamard.fwht_(y) is y
    ref = hadamard.fwht_reference(x)
    # Both paths do the same additions in the same order: bit-for-bit equal.
    assert torch.equal(y, ref)
    # And both are within float rounding of the exact transform (float64 for float32 input).
    if dtype == torch.float32:
        exact = hadamard.fwht_reference(x.double())
        bound = 2 * max(k, 1) * 2.0**-24 * math.sqrt(n) * x.double().norm(dim=1, keepdim=True)
        assert ((y.double() - exact).abs() <= bound).all()


def test_fwht_fast_path_in_place_on_batched_views():
    x = _randn(2, 3, 4, 256, seed=1)
    y = x.clone()
    hadamard.fwht_(y)
    assert torch.equal(y, hadamard.fwht_reference(x))
    # Non-contiguous and low-precision tensors fall back to the reference, still in place.
    z = _randn(256, 6, seed=2).t()
    z0 = z.clone()
    assert hadamard.fwht_(z) is z
    assert torch.equal(z, hadamard.fwht_reference(z0))
    h = _randn(5, 64, seed=3).half()
    h0 = h.clone()
    hadamard.fwht_(h)
    assert torch.equal(h, hadamard.fwht_reference(h0))
    e = torch.zeros(0, 16)
    assert hadamard.fwht_(e) is e


# ---------------------------------------------------------------------------------------
# The rotation
# ---------------------------------------------------------------------------------------


def test_rotation_block():
    assert [hadamard.rotation_block(d) for d in (1, 2, 3, 4, 5, 7, 8, 9, 1000, 1024, 1025)] == [
        1,
        2,
        2,
        4,
        4,
        4,
        8,
        8,
        512,
        1024,
        1024,
    ]
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError):
            hadamard.rotation_block(bad)


@pytest.mark.parametrize("d", [1, 2, 3, 5, 7, 8, 9, 12, 17, 33, 64, 65, 100])
def test_rotate_is_the_documented_matrix(d):
    phi = _dense_phi(d, KEY)
    eye = torch.eye(d, dtype=torch.float64)
    # Row i of rotate(I) is Phi e_i, i.e. column i of Phi.
    for fn in (hadamard.rotate, hadamard.rotate_reference):
        np.testing.assert_allclose(fn(eye, KEY).numpy().T, phi, atol=1e-12)
    for fn in (hadamard.unrotate, hadamard.unrotate_reference):
        np.testing.assert_allclose(fn(eye, KEY).numpy().T, phi.T, atol=1e-12)
    np.testing.assert_allclose(phi @ phi.T, np.eye(d), atol=1e-12)


DS = [1, 2, 3, 5, 63, 64, 65, 255, 256, 257, 1000, 4095, 4096, 4097, 65535, 65537, 100_003]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", DS)
def test_rotate_fast_path_matches_reference(d, dtype):
    rows = 3 if d < 70_000 else 1
    x = _randn(rows, d, seed=d, dtype=dtype)
    y = hadamard.rotate(x, KEY)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, hadamard.rotate_reference(x, KEY))
    z = hadamard.unrotate(y, KEY)
    assert torch.equal(z, hadamard.unrotate_reference(y, KEY))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(z, x, rtol=0, atol=tol * x.abs().max().item() * math.log2(2 * d))
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=tol * 10, atol=0)


@pytest.mark.parametrize("d", [1 << 20, (1 << 20) + 12345])
def test_rotate_large_fast_path_matches_reference(d):
    x = _randn(d, seed=d)
    y = hadamard.rotate(x, KEY)
    assert torch.equal(y, hadamard.rotate_reference(x, KEY))
    assert torch.equal(hadamard.unrotate(y, KEY), hadamard.unrotate_reference(y, KEY))


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 5000),
    rows=st.integers(1, 4),
    key=st.integers(0, 2**64 - 1),
    seed=st.integers(0, 2**31),
    double=st.booleans(),
)
def test_rotate_random_shapes(d, rows, key, seed, double):
    dtype = torch.float64 if double else torch.float32
    x = _randn(rows, d, seed=seed, dtype=dtype)
    y = hadamard.rotate(x, key)
    assert torch.equal(y, hadamard.rotate_reference(x, key))
    z = hadamard.unrotate(y, key)
    assert torch.equal(z, hadamard.unrotate_reference(y, key))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(z, x, rtol=0, atol=tol * (1 + x.abs().max().item()) * 20)


def test_rotate_batches_share_signs_and_keys_differ():
    x = _randn(1000, seed=5)
    batch = torch.stack([x, 2 * x, -x]).reshape(3, 1, 1000)
    y = hadamard.rotate(batch, KEY)
    assert y.shape == batch.shape
    r = hadamard.rotate(x, KEY)
    assert torch.equal(y[0, 0], r)
    torch.testing.assert_close(y[1, 0], 2 * r)
    torch.testing.assert_close(y[2, 0], -r)
    assert torch.equal(hadamard.rotate(x, KEY), r)  # deterministic
    assert not torch.allclose(hadamard.rotate(x, KEY + 1), r)


def test_rotate_out_argument():
    x = _randn(4, 300, seed=6)
    expected = hadamard.rotate_reference(x, KEY)
    out = torch.empty_like(x)
    assert hadamard.rotate(x, KEY, out=out) is out
    assert torch.equal(out, expected)
    back = torch.empty_like(x)
    assert hadamard.unrotate(out, KEY, out=back) is back
    assert torch.equal(back, hadamard.unrotate_reference(expected, KEY))
    # In place (out is x) for both power-of-two and other lengths.
    for d in (256, 300):
        x = _randn(4, d, seed=d)
        y = x.clone()
        assert hadamard.rotate(y, KEY, out=y) is y
        assert torch.equal(y, hadamard.rotate_reference(x, KEY))
        assert hadamard.unrotate(y, KEY, out=y) is y
        assert torch.equal(y, hadamard.unrotate_reference(hadamard.rotate_reference(x, KEY), KEY))
    for bad in (torch.empty(4, 301), torch.empty(4, 300, dtype=torch.float64)):
        with pytest.raises(ValueError, match="out must"):
            hadamard.rotate(x[:, :300].contiguous(), KEY, out=bad)
    with pytest.raises(ValueError, match="contiguous"):
        hadamard.rotate(x, KEY, out=torch.empty(300, 4).t())


def test_rotate_non_contiguous_and_other_dtypes():
    base = _randn(300, 8, seed=8)
    x = base.t()  # (8, 300), not contiguous
    assert not x.is_contiguous()
    assert torch.equal(hadamard.rotate(x, KEY), hadamard.rotate_reference(x.contiguous(), KEY))
    assert torch.equal(hadamard.unrotate(x, KEY), hadamard.unrotate_reference(x.contiguous(), KEY))
    for dtype in (torch.float16, torch.bfloat16):
        h = x.to(dtype)
        y = hadamard.rotate(h, KEY)
        assert y.dtype == torch.float32  # computed in, and returned as, float32
        assert torch.equal(y, hadamard.rotate(h.float(), KEY))
        assert torch.equal(y, hadamard.rotate_reference(h, KEY))
        assert hadamard.unrotate(h, KEY).dtype == torch.float32
    with pytest.raises(TypeError):
        hadamard.rotate(torch.arange(8), KEY)
    with pytest.raises(ValueError):
        hadamard.rotate(torch.zeros(3, 0), KEY)
    with pytest.raises(ValueError):
        hadamard.rotate(torch.tensor(1.0), KEY)
    assert hadamard.rotate(torch.zeros(0, 5), KEY).shape == (0, 5)


@pytest.mark.parametrize("key", [-1, 2**64])
def test_rotate_rejects_bad_keys(key):
    with pytest.raises(ValueError):
        hadamard.rotate(torch.ones(8), key)


def test_rotate_with_other_thread_counts():
    x = _randn(2, 1 << 17, seed=9)
    expected = hadamard.rotate_reference(x, KEY)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        assert torch.equal(hadamard.rotate(x, KEY), expected)
    finally:
        numba.set_num_threads(old)
    assert torch.equal(hadamard.rotate(x, KEY), expected)


# ---------------------------------------------------------------------------------------
# Flattening (DESIGN 3.1)
# ---------------------------------------------------------------------------------------

DELTA = 1e-3
N_KEYS = 200


def _bound(d: int) -> float:
    """||Phi x||_inf <= ||x||_2 * bound, with probability >= 1 - DELTA over the signs."""
    return math.sqrt(2 * math.log(2 * d / DELTA) / hadamard.rotation_block(d))


@pytest.mark.parametrize("d", [1 << 14, (1 << 14) + 3, 1000])
def test_rotation_flattens_sparse_and_gaussian_vectors(d):
    B = hadamard.rotation_block(d)
    bound = _bound(d)
    sparse = torch.zeros(4, d)
    # Spikes in the head only, the overlap of the two blocks, and the tail only.
    for row, j in enumerate((0, d - B, min(B, d - 1), d - 1)):
        sparse[row, j] = 3.0
    # Without the rotation a spike is as far from flat as can be: ||x||_inf = ||x||_2.
    assert torch.equal(sparse.abs().amax(dim=1), sparse.norm(dim=1))
    assert (sparse.abs().amax(dim=1) > bound * sparse.norm(dim=1)).all()

    gauss = _randn(2, d, seed=d)
    x = torch.cat([sparse, gauss])
    norms = x.double().norm(dim=1)
    failures = 0
    worst = 0.0
    for i in range(N_KEYS):
        key = rng.derive_key(11, i, 0, rng.STREAM_ROTATION)
        y = hadamard.rotate(x, key).double()
        ratio = (y.abs().amax(dim=1) / norms).max().item()
        worst = max(worst, ratio)
        failures += int((y.abs().amax(dim=1) > bound * norms).sum())
    # Each (row, key) pair fails with probability at most DELTA, so about DELTA * 6 * N_KEYS
    # = 1.2 failures at worst; the Hoeffding + union bound is loose and in practice none does.
    assert failures <= 1, (failures, worst, bound)


def test_flattening_of_a_tail_spike_comes_from_the_second_block():
    """A spike beyond the first block is spread by the second step alone (signs s2)."""
    d = (1 << 12) + 100
    B = hadamard.rotation_block(d)
    x = torch.zeros(d, dtype=torch.float64)
    x[-1] = 1.0
    y = hadamard.rotate(x, KEY)
    # The head [0, d - B) keeps x's zeros; the last block is a +-1/sqrt(B) vector.
    assert torch.equal(y[: d - B], torch.zeros(d - B, dtype=torch.float64))
    torch.testing.assert_close(y[d - B :].abs(), torch.full((B,), B**-0.5, dtype=torch.float64))


# ---------------------------------------------------------------------------------------
# CUDA (the reference path) against the CPU fast path
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("d", [1, 1000, 4096, 70_001])
def test_cuda_matches_cpu(d):
    x = _randn(3, d, seed=d)
    y = hadamard.rotate(x.cuda(), KEY)
    assert y.device.type == "cuda"
    torch.testing.assert_close(y.cpu(), hadamard.rotate(x, KEY), rtol=1e-6, atol=1e-6)
    out = torch.empty_like(y)
    assert hadamard.unrotate(y, KEY, out=out) is out
    torch.testing.assert_close(out.cpu(), x, rtol=1e-5, atol=1e-5)
    z = x.cuda()
    hadamard.fwht_(z[:, :512])
    torch.testing.assert_close(z[:, :512].cpu(), hadamard.fwht_reference(x[:, :512]))


# ---------------------------------------------------------------------------------------
# Small calls stay on the calling thread; the serial kernel equals the threaded one
# ---------------------------------------------------------------------------------------


def test_small_calls_never_enter_the_threaded_kernel(monkeypatch):
    from gradzip._numba import fwht as kernel

    def threaded(*args):
        raise AssertionError("a small call entered the threaded kernel")

    monkeypatch.setattr(kernel, "transform", threaded)
    monkeypatch.setattr(hadamard, "_transform_threaded", threaded)
    for rows, d in ((1, 1), (3, 5), (1, 1000), (2, 4097), (1, hadamard.SERIAL_BELOW - 1)):
        x = _randn(rows, d, seed=d)
        y = hadamard.rotate(x, KEY)
        assert torch.equal(y, hadamard.rotate_reference(x, KEY))
        assert torch.equal(hadamard.unrotate(y, KEY), hadamard.unrotate_reference(y, KEY))
    z = _randn(4, 1024, seed=4)
    assert torch.equal(hadamard.fwht_(z.clone()), hadamard.fwht_reference(z))
    with pytest.raises(AssertionError, match="threaded"):
        hadamard.rotate(_randn(hadamard.SERIAL_BELOW, seed=1), KEY)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,nseg", [(0, 3), (3, 2), (6, 5), (12, 1), (13, 2), (16, 1), (17, 1)])
def test_serial_kernel_equals_threaded_kernel(m, nseg, dtype):
    from gradzip._numba import fwht as kernel

    n = 1 << m
    x = _randn(nseg * n, seed=m, dtype=torch.float64).numpy().astype(dtype)
    tab = kernel.sign_table(dtype)
    scale = dtype(1 / math.sqrt(n))
    for mode in (kernel.PLAIN, kernel.ROTATE, kernel.UNROTATE):
        a, b = np.empty_like(x), np.empty_like(x)
        kernel.transform(x, 0, n, a, 0, n, nseg, m, mode, 5, 6, 7, scale, tab)
        kernel.transform_serial(x, 0, n, b, 0, n, nseg, m, mode, 5, 6, 7, scale, tab)
        assert np.array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m", [6, 12, 13, 16, 17, 20])
def test_pooled_two_pass_route_equals_serial_kernel(m, dtype, monkeypatch):
    """One large segment runs by rows then columns on gradzip's pool (streaming rows out
    when out of place and aligned): same bits as the serial kernel, in place or not,
    aligned or not, at an offset or not."""
    from gradzip import _alloc
    from gradzip._numba import fwht as kernel

    monkeypatch.setattr(hadamard, "POOLED_FROM", 0)  # the pool at every size tested here

    n = 1 << m
    x = _randn(n + 3, seed=m + 100, dtype=torch.float64).numpy().astype(dtype)
    tab = kernel.sign_table(dtype)
    scale = dtype(1 / math.sqrt(n))
    for mode in (kernel.PLAIN, kernel.ROTATE, kernel.UNROTATE):
        ref = np.empty(n, dtype)
        kernel.transform_serial(x, 3, n, ref, 0, n, 1, m, mode, 5, 6, 7, scale, tab)
        for skip in (0, 1):  # dst aligned (streamed) or not (written in place)
            dst = _alloc.aligned_numpy(n + 8, dtype)
            dst[:] = 0
            hadamard._transform_threaded(x, 3, n, dst, skip, n, 1, m, mode, 5, 6, 7, scale, tab)
            assert np.array_equal(dst[skip : skip + n], ref)
        inplace = x[3:].copy()
        hadamard._transform_threaded(inplace, 0, n, inplace, 0, n, 1, m, mode, 5, 6, 7, scale, tab)
        assert np.array_equal(inplace, ref)


# ---------------------------------------------------------------------------------------
# The fused encoder: rotation + norm + dithered one-bit quantization
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 21])
def test_rotate_quantize_matches_reference(d):
    from gradzip.compressors.onebit import quantize_reference

    g = _gen(d)
    for _ in range(2):
        x = torch.randn(d, generator=g) * (10.0 ** int(torch.randint(-3, 4, (1,), generator=g)))
        key, dkey = (int(v) for v in torch.randint(0, 2**62, (2,), generator=g))
        lam = float(np.float32(float(torch.rand(1, generator=g)) * 3 * x.abs().max().item()))
        out = torch.empty(d // 8, dtype=torch.uint8)
        seen = []

        def scale_of(sq, finite, seen=seen, lam=lam):
            seen.append((sq, finite))
            return lam

        got = hadamard.rotate_quantize_(x, key, scale_of, dkey, out)
        assert got == lam
        ((sq, finite),) = seen
        assert finite and sq == pytest.approx(float(x.double().square().sum()), rel=1e-12)
        ref = quantize_reference(hadamard.rotate_reference(x, key), lam, dkey)
        assert torch.equal(out, ref)
    # lam = 0: the plain signs of Phi x
    hadamard.rotate_quantize_(x, key, lambda sq, finite: 0.0, dkey, out)
    assert torch.equal(out, quantize_reference(hadamard.rotate_reference(x, key), 0.0, None))
    # a scratch buffer of the caller's, aligned or not, long enough or not (pass 1 streams
    # rows into an aligned one of fused_scratch_numel elements)
    ref = quantize_reference(hadamard.rotate_reference(x, key), lam, dkey)
    size = hadamard.fused_scratch_numel(d)
    assert d < size <= d * 1.02  # a cache line per row and column block
    for skip, n in ((0, size), (1, size), (8, size), (0, d)):
        scratch = torch.empty(size + 8)[skip : skip + n]
        hadamard.rotate_quantize_(x, key, lambda sq, finite: lam, dkey, out, scratch)
        assert torch.equal(out, ref)


def test_fused_passes_with_several_chunks_per_column_block(monkeypatch):
    """From 2**22 a column block of the fused passes' intermediate holds several of pass 2's
    column chunks (at 2**24, eight): the encoder and both routes of the decoder still equal
    the reference bit for bit there."""
    from gradzip import bits
    from gradzip._numba import fused_onebit, fwht
    from gradzip.compressors.onebit import quantize_reference

    d = 1 << 22
    L, R, C = fwht.grid(22, 4)
    S, P = fused_onebit.layout(22)
    assert S > C and S % C == 0 and P > 0
    g = _gen(d)
    x = torch.randn(d, generator=g)
    out = torch.empty(d // 8, dtype=torch.uint8)
    lam = float(np.float32(0.7 * x.abs().max().item()))
    hadamard.rotate_quantize_(x, 5, lambda sq, finite: lam, 6, out)
    assert torch.equal(out, quantize_reference(hadamard.rotate_reference(x, 5), lam, 6))
    ref = hadamard.unrotate_reference(bits.unpack_signs_reference(out, d, lam), 7)
    for chunked_from in (16, 40):  # through scratch, in place
        monkeypatch.setattr(fused_onebit, "CHUNKED_DECODE_FROM", chunked_from)
        assert torch.equal(hadamard.unrotate_signs(out, d, lam, 7), ref)


@pytest.mark.parametrize(
    "lam",
    [
        1e-45,  # the smallest subnormal: lam 2**-16 underflows to 0 (two multiplies)
        2.0**-140,  # lam 2**-16 underflows too
        3 * 2.0**-130,  # lam 2**-16 = 3 2**-146 is a subnormal, exactly (one multiply)
        1.2345e-36,  # lam 2**-16 would need more bits than a subnormal has (two multiplies)
        2.0**-110,  # lam 2**-16 is the smallest normal float32
        0.3,
        3e38,  # y + lam u can overflow
    ],
)
def test_rotate_quantize_is_the_reference_at_every_scale(lam):
    """The quantizer compares ``y < fl(lam (-u))`` instead of ``fl(y + fl(lam u)) < 0``, and
    multiplies ``-u 2**16`` by ``lam 2**-16`` when that is exact: the same bits as the
    reference for any lam, including where the products are subnormal or overflow."""
    from gradzip.compressors.onebit import quantize_reference

    d = 1 << 16
    g = _gen(d + int(lam.hex().__hash__() % 1000))
    lam = float(np.float32(lam))
    for spread in (0.1, 1e-3):  # |Phi x| up to about lam / 2, or well inside lam
        x = (torch.randn(d, generator=g).double() * lam * spread).float()
        x[:4] = torch.tensor([0.0, -0.0, lam, -lam])
        key, dkey = (int(v) for v in torch.randint(0, 2**62, (2,), generator=g))
        out = torch.empty(d // 8, dtype=torch.uint8)
        assert hadamard.rotate_quantize_(x, key, lambda sq, finite: lam, dkey, out) == lam
        ref = quantize_reference(hadamard.rotate_reference(x, key), lam, dkey)
        assert torch.equal(out, ref)
        ones = int(np.unpackbits(out.numpy()).sum())
        assert 0 < ones < d  # a real mix of both signs, not a degenerate case


@pytest.mark.parametrize("d", [1 << 16, 1 << 18])
def test_rotate_quantize_statistics_see_every_element(d):
    """Pass 1 takes the norm and the finiteness from the registers of its first stages: a
    single NaN or infinity anywhere (any lane, any row, the last element) is seen, and the
    sum of squares of heavy-tailed input is a float64 sum of float64 squares."""
    g = _gen(d + 1)
    x = torch.randn(d, generator=g) * torch.exp(4 * torch.randn(d, generator=g))
    seen = []

    def scale_of(sq, finite):
        seen.append((sq, finite))
        return 0.5

    out = torch.empty(d // 8, dtype=torch.uint8)
    hadamard.rotate_quantize_(x, 3, scale_of, 4, out)
    sq, finite = seen.pop()
    assert finite and sq == pytest.approx(float(x.double().square().sum()), rel=1e-12)
    positions = [0, 1, 7, 8, 63, 64, 4095, d // 2 + 5, d - 1]
    positions += torch.randint(0, d, (4,), generator=g).tolist()
    for pos in positions:
        for bad in (float("nan"), float("inf"), -float("inf")):
            y = x.clone()
            y[pos] = bad
            hadamard.rotate_quantize_(y, 3, scale_of, 4, out)
            assert seen.pop()[1] is False, (pos, bad)
    # the largest finite float32 is finite (its square, in float64, is too)
    y = x.clone()
    y[d - 1] = float(np.finfo(np.float32).max)
    hadamard.rotate_quantize_(y, 3, scale_of, 4, out)
    assert seen.pop()[1] is True


def test_rotate_quantize_takes_only_what_it_can_fuse():
    assert hadamard.can_rotate_quantize(torch.zeros(1 << 16))
    for x in (
        torch.zeros(1 << 15),
        torch.zeros((1 << 17) + 1),
        torch.zeros(1 << 17, dtype=torch.float64),
        torch.zeros(2, 1 << 17),
        torch.zeros(2 << 17)[::2],
    ):
        assert not hadamard.can_rotate_quantize(x)
    with pytest.raises(ValueError, match="out must"):
        hadamard.rotate_quantize_(
            torch.zeros(1 << 17), 1, lambda s, f: 1.0, 2, torch.empty(3, dtype=torch.uint8)
        )


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("n", [1 << 16, 1 << 17, 1 << 18, 1 << 20])
def test_unrotate_signs_matches_reference(n, chunked, monkeypatch):
    """Both routes of the fused decoder (in place below ``CHUNKED_DECODE_FROM``, through scratch
    from there) equal the reference bit for bit."""
    from gradzip import bits
    from gradzip._numba import fused_onebit

    monkeypatch.setattr(fused_onebit, "CHUNKED_DECODE_FROM", 16 if chunked else 40)

    g = _gen(n)
    data = torch.randint(0, 256, (n // 8,), dtype=torch.uint8, generator=g)
    for lam in (0.75, 0.0, 3.3e-20, 1.7e30):
        lam = float(np.float32(lam))
        key = int(torch.randint(0, 2**62, (1,), generator=g))
        ref = hadamard.unrotate_reference(bits.unpack_signs_reference(data, n, lam), key)
        out = torch.empty(n)
        assert hadamard.unrotate_signs(data, n, lam, key, out=out) is out
        assert torch.equal(out, ref)
        assert torch.equal(hadamard.unrotate_signs(data, n, lam, key), ref)
        # an out not 32-byte aligned (pass 2 then writes it with plain stores)
        spare = torch.zeros(n + 2)
        out = spare[1 : n + 1]
        assert out.data_ptr() % 32 and hadamard.unrotate_signs(data, n, lam, key, out=out) is out
        assert torch.equal(out, ref) and spare[0] == 0 and spare[-1] == 0
    assert hadamard.can_unrotate_signs(n) and not hadamard.can_unrotate_signs(n + 8)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard.unrotate_signs(data, n // 2 + 8, 1.0, 1)
    with pytest.raises(ValueError, match="data must"):
        hadamard.unrotate_signs(data[1:], n, 1.0, 1)


def test_run_pieces_covers_everything_once_and_raises():
    from gradzip._numba import parallel
    from gradzip._numba.parallel import threads

    for n, unit in ((1000, 64), (1 << 24, 1 << 15), (1 << 24, 1 << 16), (64, 64), (5, 8)):
        seen = []
        parallel.run_pieces(n, unit, lambda w, i, j, seen=seen: seen.append((i, j, w)))
        seen.sort()
        assert [(i, j) for i, j, _ in seen] == list(
            zip([0] + [j for _, j, _ in seen[:-1]], [j for _, j, _ in seen], strict=True)
        )
        assert seen[0][0] == 0 and seen[-1][1] == n  # contiguous, exactly [0, n)
        assert all(i % unit == 0 and (j % unit == 0 or j == n) for i, j, _ in seen)
        assert {w for *_, w in seen} <= set(range(threads()))
        sizes = [j - i for i, j, _ in seen]
        # guided: sizes never grow, and the first takes a fixed share of the whole
        assert sizes == sorted(sizes, reverse=True) or sizes[-1] < unit
        if threads() > 1 and n // unit >= 64:
            assert len(seen) <= 64 * threads()
            assert sizes[0] == unit * -(-(n // unit) // (parallel.SHARE * threads()))

    # below POOLED_PIECES_FROM: one call, on the calling thread
    seen = []
    n = parallel.POOLED_PIECES_FROM - 64
    parallel.run_pieces(n, 64, lambda w, i, j: seen.append((w, i, j, threading.get_ident())))
    assert seen == [(0, 0, n, threading.get_ident())]

    def boom(w, i, j):
        if i <= 128 < j:
            raise RuntimeError("piece failed")

    for n in (1000, 1 << 24):  # alone and pooled
        with pytest.raises(RuntimeError, match="piece failed"):
            parallel.run_pieces(n, 64, boom)
