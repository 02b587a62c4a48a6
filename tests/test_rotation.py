"""The randomized Hadamard rotation Phi (DESIGN 3.1) and the fast transform."""

import math

import pytest
import scipy.linalg
import torch

from gradzip import hadamard, rng

SIZES = [1, 2, 3, 5, 7, 8, 9, 12, 17, 33, 1000, 1024, 1025, 4097]


def dense_phi(d: int, key: int) -> torch.Tensor:
    """Phi as a dense matrix, built from scipy's Hadamard matrix and the sign stream."""
    B = hadamard.rotation_block(d)
    s = rng.rademacher(key, 2 * B, dtype=torch.float64)
    H = torch.from_numpy(scipy.linalg.hadamard(B)).double() / math.sqrt(B)
    P1 = torch.eye(d, dtype=torch.float64)
    P1[:B, :B] = H @ torch.diag(s[:B])
    if d == B:
        return P1
    P2 = torch.eye(d, dtype=torch.float64)
    P2[d - B :, d - B :] = H @ torch.diag(s[B:])
    return P2 @ P1


def test_fwht_reference_is_the_hadamard_matrix():
    for n in [1, 2, 4, 8, 64, 256]:
        x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
        H = torch.from_numpy(scipy.linalg.hadamard(n)).double()
        assert torch.allclose(hadamard.fwht_reference(x), x @ H, atol=1e-10)


@pytest.mark.parametrize("m", list(range(0, 17)) + [20])
def test_fast_fwht_matches_reference(m):
    n = 1 << m
    g = torch.Generator().manual_seed(100 + m)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, n, generator=g).to(dtype)
        ref = hadamard.fwht_reference(x)
        out = hadamard.fwht_(x.clone())
        tol = 1e-4 * math.sqrt(n) if dtype == torch.float32 else 1e-9 * math.sqrt(n)
        assert torch.allclose(out, ref, atol=tol)


@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 9, 12, 17, 33])
def test_phi_is_the_dense_matrix(d):
    key = rng.derive_key(d, 1, 2, rng.STREAM_ROTATION)
    x = torch.randn(4, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    P = dense_phi(d, key)
    assert torch.allclose(hadamard.rotate(x, key), x @ P.T, atol=1e-10)
    assert torch.allclose(hadamard.unrotate(x, key), x @ P, atol=1e-10)
    assert torch.allclose(P.T @ P, torch.eye(d, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("d", SIZES + [1 << 20, 123457])
def test_round_trip_norm_and_fast_equals_reference(d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(d, generator=g)
    key = rng.derive_key(7, d)
    y = hadamard.rotate(x, key)
    assert torch.allclose(hadamard.unrotate(y, key), x, atol=1e-5)
    assert float(y.norm()) == pytest.approx(float(x.norm()), rel=1e-5)
    assert torch.allclose(y, hadamard.rotate_reference(x, key), atol=1e-5)
    assert torch.allclose(hadamard.unrotate(y, key), hadamard.unrotate_reference(y, key), atol=1e-5)


def test_out_argument_in_place_and_non_contiguous():
    x = torch.randn(64, 30, generator=torch.Generator().manual_seed(0))
    key = rng.derive_key(1)
    expected = hadamard.rotate(x.t().contiguous(), key)
    assert torch.allclose(hadamard.rotate(x.t(), key), expected)
    buf = x.t().contiguous()
    assert hadamard.rotate(buf, key, out=buf) is buf and torch.allclose(buf, expected)
    assert torch.allclose(hadamard.unrotate(buf, key, out=buf), x.t(), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    x = torch.randn(100).to(dtype)
    y = hadamard.rotate(x, rng.derive_key(2))
    assert y.dtype == torch.float32
    assert torch.allclose(hadamard.unrotate(y, rng.derive_key(2)), x.float(), atol=1e-5)


@pytest.mark.parametrize("d", [1000, 1 << 14, (1 << 14) + 3])
def test_flattening_bound(d):
    """||Phi x||_inf <= ||x||_2 sqrt(2 ln(2d/delta)/B) with probability >= 1 - delta."""
    delta = 1e-3
    B = hadamard.rotation_block(d)
    bound = math.sqrt(2 * math.log(2 * d / delta) / B)
    g = torch.Generator().manual_seed(d)
    one_sparse = torch.zeros(d)
    one_sparse[int(torch.randint(d, (1,), generator=g))] = 1.0
    gaussian = torch.randn(d, generator=g)
    for x in (one_sparse, gaussian):
        ratios = torch.tensor(
            [float(hadamard.rotate(x, rng.derive_key(k)).abs().max()) for k in range(200)]
        ) / float(x.norm())
        assert int((ratios > bound).sum()) <= 1  # expected failures: 200 * delta = 0.2
    # without the rotation a 1-sparse vector is as peaked as it gets
    assert float(one_sparse.abs().max() / one_sparse.norm()) == 1.0 > bound


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.randn(3000)
    k = rng.derive_key(9)
    assert torch.allclose(hadamard.rotate(x.cuda(), k).cpu(), hadamard.rotate(x, k), atol=1e-5)
