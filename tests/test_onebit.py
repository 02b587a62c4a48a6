"""The one-bit quantizers and FO-SGD: unbiasedness, variance, flattening, bits (DESIGN 3.2-3.3)."""

import math

import numpy as np
import pytest
import torch

import gradzip as gz
from gradzip import bits as bits_mod
from gradzip import hadamard, rng
from gradzip.compressors import onebit as ob
from gradzip.compressors.base import read_f32
from gradzip.experiments.bench import vnmse
from gradzip.experiments.variance import sparse_vector


def samples(c, x, n_seeds):
    return torch.stack([c.decode(c.encode(x, seed=s)).double() for s in range(n_seeds)])


@pytest.mark.parametrize("dither", ["standard", "subtractive"])
@pytest.mark.parametrize("flatten", [False, True])
def test_max_rule_is_unbiased(dither, flatten):
    """Monte Carlo: the mean of S decodes is x up to its standard error, coordinate-wise."""
    x = torch.randn(100, generator=torch.Generator().manual_seed(1))
    c = gz.compressor(f"onebit:scale=max,dither={dither},flatten={flatten}")
    assert c.unbiased
    S = 4000
    ys = samples(c, x, S)
    se = ys.std(0) / math.sqrt(S)
    err = ys.mean(0) - x.double()
    # a coordinate with |x_i| = lambda is always decoded exactly (zero variance)
    exact = se == 0
    assert float(err[exact].abs().sum()) < 1e-6
    z = err[~exact] / se[~exact]
    # 100 coordinates: max |z| over 100 normals exceeds 4.5 with probability ~7e-4
    assert float(z.abs().max()) < 4.5
    # and the z-scores have unit variance (chi-square with 100 dof, 5 sigma band)
    assert abs(float(z.square().mean()) - 1) < 5 * math.sqrt(2 / z.numel())


def test_the_unbiasedness_check_can_fail():
    """A biased rule (norm scale without flattening clips) is caught by the same check."""
    x = sparse_vector(100, 3, seed=0)
    c = gz.compressor("onebit:scale=norm")
    ys = samples(c, x, 2000)
    z = (ys.mean(0) - x.double()) / (ys.std(0) / math.sqrt(2000)).clamp_min(1e-12)
    assert float(z.abs().max()) > 10


def test_variance_standard_dither():
    """Var(lambda b_i) = lambda^2 - x_i^2 with lambda = ||x||_inf (no flattening)."""
    x = torch.randn(64, generator=torch.Generator().manual_seed(2))
    lam = float(ob._f32_up(float(x.abs().max())))
    S = 4000
    ys = samples(gz.compressor("onebit:scale=max"), x, S)
    var = ys.var(0)
    theory = lam**2 - x.double() ** 2
    # per coordinate the sample variance has relative sd sqrt(2/S) for Gaussian-ish data;
    # +-1 Bernoulli samples have a lighter tail, so 6 sd of the pooled total is generous
    assert float(var.sum()) == pytest.approx(float(theory.sum()), rel=6 * math.sqrt(2 / S))
    assert float((var - theory).abs().max()) < 0.2 * lam**2


def test_variance_subtractive_dither_is_lambda2_over_3():
    x = torch.randn(64, generator=torch.Generator().manual_seed(3))
    lam = ob._f32_up(float(x.abs().max()))
    S = 4000
    ys = samples(gz.compressor("onebit:scale=max,dither=subtractive"), x, S)
    assert float(ys.var(0).mean()) == pytest.approx(lam**2 / 3, rel=6 * math.sqrt(2 / S / 64))


def test_central_contrast_of_the_paper():
    """1-sparse x at d = 2^14: vNMSE ~ d - 1 without flattening, O(log d) with it."""
    d = 1 << 14
    x = sparse_vector(d, 1, seed=4)
    plain = vnmse(gz.compressor("onebit:scale=max"), x, range(8))
    flat = vnmse(gz.compressor("fosgd"), x, range(8))
    print(f"\nvNMSE at d=2^14, 1-sparse: onebit {plain:.1f} (d-1 = {d - 1}), fosgd {flat:.2f}")
    assert plain == pytest.approx(d - 1, rel=0.05)
    # norm rule: lambda^2 d / ||x||^2 - 1 = 2 ln(2d) - 1 ~ 19.8 for d = 2^14
    assert flat == pytest.approx(2 * math.log(2 * d) - 1, rel=0.05)
    assert flat < 3 * math.log(d)


def test_fosgd_bits_at_one_million():
    d = 1 << 20
    p = gz.compressor("fosgd").encode(torch.randn(d), seed=1)
    assert p.nbits / d <= 1.001
    p = gz.compressor("fosgd:scale=fixed,lam=0.01").encode(torch.randn(d) * 1e-3, seed=1)
    assert p.nbits == 8 * (d // 8 + p.header.size)  # nothing but the bits


def test_drive_vnmse_is_pi_over_2_minus_1():
    d = 1 << 20
    x = torch.randn(d, generator=torch.Generator().manual_seed(5))
    v = vnmse(gz.compressor("drive"), x, range(3))
    assert v == pytest.approx(math.pi / 2 - 1, abs=0.01)


def test_scaled_sign_and_sign_values():
    x = torch.tensor([3.0, -1.0, 0.0, -2.0])
    assert torch.equal(
        gz.decode(gz.compressor("sign").encode(x).data), torch.tensor([1.0, -1, 1, -1])
    )
    y = gz.decode(gz.compressor("scaled_sign").encode(x).data)
    assert torch.allclose(y, torch.tensor([1.5, -1.5, 1.5, -1.5]))


def test_zero_vector_decodes_to_zero():
    for spec in ("onebit", "fosgd", "fosgd:scale=max", "scaled_sign", "drive"):
        c = gz.compressor(spec)
        assert torch.equal(c.decode(c.encode(torch.zeros(100))), torch.zeros(100))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 31, 32, 33, 1000, 4097, 65537, (1 << 17) + 3])
def test_quantize_kernel_matches_reference(n):
    g = torch.Generator().manual_seed(n)
    y = torch.randn(n, generator=g)
    for lam, key in ((1.7, rng.derive_key(n, 1)), (0.0, rng.derive_key(2)), (0.3, None)):
        out = torch.empty((n + 7) // 8, dtype=torch.uint8)
        ob.quantize_(y, lam, key, out)
        assert torch.equal(out, ob.quantize_reference(y, lam, key))
    # tiny lam (lam 2**-16 inexact, or subnormal but exact) with y on its scale, and huge lam
    for lam in (1e-45, 3 * 2.0**-130, 1.2345e-36, 3e38):
        lam = float(np.float32(lam))
        ys = (y.double() * lam * 0.1).float()
        out = torch.empty((n + 7) // 8, dtype=torch.uint8)
        ob.quantize_(ys, lam, rng.derive_key(n, 3), out)
        assert torch.equal(out, ob.quantize_reference(ys, lam, rng.derive_key(n, 3)))


@pytest.mark.parametrize("n", [1, 9, 33, 4097, (1 << 17) + 5])
def test_subtractive_dequantize_matches_reference(n):
    data = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8)
    key = rng.derive_key(n)
    fast = ob.dequantize(data, n, 0.75, key)
    ref = ob.dequantize_reference(data, n, 0.75, key)
    assert torch.equal(fast, ref)


def test_fixed_scale_clips_and_says_biased():
    c = gz.compressor("onebit:scale=fixed,lam=0.5")
    assert not c.unbiased
    y = c.decode(c.encode(torch.tensor([10.0, -10.0])))
    assert set(np.abs(y.numpy()).tolist()) == {0.5}


# --- the fused encoder (rotation + norm + quantization in two passes, CPU float32) ----------


def _reference_bits(x, p):
    """The payload's bits recomputed by the pure-torch path, with the payload's lambda."""
    h = p.header
    lam = read_f32(p.section(0), 1, "scale")[0]
    y = hadamard.rotate_reference(x, rng.derive_key(h.seed, h.step, h.worker, rng.STREAM_ROTATION))
    key = rng.derive_key(h.seed, h.step, h.worker, rng.STREAM_DITHER)
    return lam, ob.quantize_reference(y, lam, key)


@pytest.mark.parametrize("d", [1 << 16, 1 << 17, 1 << 18, 1 << 20])
def test_fused_fosgd_encoder_matches_reference(d, monkeypatch):
    g = torch.Generator().manual_seed(d)
    spike = torch.zeros(d)
    spike[int(torch.randint(d, (1,), generator=g))] = -3.0
    c = gz.compressor("fosgd:c=1.5")
    for trial, x in enumerate((torch.randn(d, generator=g), spike, 1e-30 * torch.randn(d))):
        assert hadamard.can_rotate_quantize(x)
        p = c.encode(x, seed=trial, step=d, worker=2)
        lam, bits = _reference_bits(x, p)
        assert torch.equal(p.section(1), bits)
        assert lam == pytest.approx(c.norm_scale(float(x.double().norm()), d), rel=1e-6)
        assert lam >= c.norm_scale(float(x.double().norm()), d) * (1 - 1e-12)
        # the unfused path (stats, rotate, quantize) gives the same payload
        with monkeypatch.context() as mp:
            mp.setattr(hadamard, "can_rotate_quantize", lambda v: False)
            q = c.encode(x, seed=trial, step=d, worker=2)
        assert read_f32(q.section(0), 1, "scale")[0] == pytest.approx(lam, rel=2**-22)
        if read_f32(q.section(0), 1, "scale")[0] == lam:
            assert bytes(q.to_bytes()) == bytes(p.to_bytes())
        # the fused decoder (unpacking inside the inverse rotation) equals the plain one
        y = c.decode(p)
        with monkeypatch.context() as mp:
            mp.setattr(hadamard, "can_unrotate_signs", lambda n: False)
            assert torch.equal(c.decode(p), y)
        h = p.header
        z = bits_mod.unpack_signs_reference(p.section(1), d, lam)
        key = rng.derive_key(h.seed, h.step, h.worker, rng.STREAM_ROTATION)
        assert torch.equal(y, hadamard.unrotate_reference(z, key))


def test_fused_fosgd_rejects_non_finite_input_and_other_inputs_use_the_plain_path():
    d = 1 << 17
    for bad in (float("nan"), float("inf")):
        x = torch.randn(d)
        x[12345] = bad
        with pytest.raises(ValueError, match="non-finite"):
            gz.compressor("fosgd").encode(x)
    # not fused: other lengths, dtypes, rules, or no flattening; all still match the reference
    g = torch.Generator().manual_seed(0)
    for spec, x in (
        ("fosgd", torch.randn(d + 8, generator=g)),
        ("fosgd", torch.randn(d, generator=g).double()),
        ("fosgd:scale=max", torch.randn(d, generator=g)),
        ("onebit:scale=norm", torch.randn(d, generator=g)),
    ):
        c = gz.compressor(spec)
        p = c.encode(x, seed=3)
        lam = read_f32(p.section(0), 1, "scale")[0]
        h = p.header
        y = x.float()
        if c.flatten:
            y = hadamard.rotate_reference(y, rng.derive_key(3, 0, 0, rng.STREAM_ROTATION))
        key = rng.derive_key(h.seed, h.step, h.worker, rng.STREAM_DITHER)
        assert torch.equal(p.section(1), ob.quantize_reference(y, lam, key)), spec


def test_fused_encoder_leaves_out_untouched_when_refused():
    d = 1 << 17
    x = torch.randn(d)
    out = torch.full((d // 8,), 7, dtype=torch.uint8)

    def refuse(sq, finite):
        assert finite and sq == pytest.approx(float(x.double().square().sum()), rel=1e-12)
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        hadamard.rotate_quantize_(x, 1, refuse, 2, out)
    assert bool((out == 7).all())
    x[5] = float("nan")
    seen = []
    with pytest.raises(ZeroDivisionError):
        hadamard.rotate_quantize_(x, 1, lambda sq, f: seen.append(f) or 1 / 0, 2, out)
    assert seen == [False] and bool((out == 7).all())
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard.rotate_quantize_(torch.randn(d + 1), 1, lambda sq, f: 1.0, 2, out)


def test_non_finite_input_is_a_non_finite_error_on_every_path():
    """The fused encoder (power-of-two d >= 2^16) and the plain one raise the same error
    type, which training uses to tell divergence from a configuration mistake."""
    from gradzip.compressors.base import NonFiniteError

    for d in (1 << 16, 1000):
        x = torch.randn(d)
        x[d // 3] = float("nan")
        with pytest.raises(NonFiniteError, match="non-finite"):
            gz.compressor("fosgd").encode(x)
