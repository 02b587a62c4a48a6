"""The one-bit quantizers and FO-SGD: unbiasedness, variance, flattening, bits (DESIGN 3.2-3.3)."""

import math

import numpy as np
import pytest
import torch

import gradzip as gz
from gradzip import bits as bits_mod
from gradzip import hadamard, rng
from gradzip.compressors import onebit as ob
from gradzip.compressors.base import NonFiniteError, read_f32
from gradzip.experiments.bench import vnmse
from gradzip.experiments.variance import sparse_vector
from gradzip.wire import PayloadError


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
    flat = vnmse(gz.compressor(ob.PAPER_FOSGD), x, range(8))
    print(f"\nvNMSE at d=2^14, 1-sparse: onebit {plain:.1f} (d-1 = {d - 1}), fosgd {flat:.2f}")
    assert plain == pytest.approx(d - 1, rel=0.05)
    # norm rule: lambda^2 d / ||x||^2 - 1 = 2 ln(2d) - 1 ~ 19.8 for d = 2^14
    assert flat == pytest.approx(2 * math.log(2 * d) - 1, rel=0.05)
    assert flat < 3 * math.log(d)


def test_fosgd_bits_at_one_million():
    d = 1 << 20
    p = gz.compressor("fosgd").encode(torch.randn(d), seed=1)
    assert p.nbits / d <= 1.001
    p = gz.compressor("fosgd:scale=fixed,lam=0.01,rescale=none").encode(torch.randn(d) * 1e-3)
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
    c = gz.compressor("fosgd:scale=norm,c=1.5,rescale=none")
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


@pytest.mark.parametrize(
    "spec",
    ["fosgd:scale=rms,c=0.5,rescale=unbiased", "fosgd:scale=rms,c=0,rescale=mse",
     "fosgd:scale=norm,c=1,rescale=mse", "fosgd:scale=rms,c=1", "fosgd:rescale=capped"],
)  # fmt: skip
@pytest.mark.parametrize("d", [1 << 16, 1 << 18, 1 << 20])
def test_fused_rescaled_encoder_matches_reference(spec, d, monkeypatch):
    """The fused encoder takes <b, y> in pass 2: its bits are the reference quantizer's at
    lambda, its scale is the fit of the reference's <b, y> and ||y||^2, and the unfused path
    gives the same payload up to the float32 rounding of the scale."""
    c = gz.compressor(spec)
    g = torch.Generator().manual_seed(d + 1)
    spike = torch.zeros(d)
    spike[int(torch.randint(d, (1,), generator=g))] = 2.0
    for trial, x in enumerate((torch.randn(d, generator=g) * torch.rand(d, generator=g), spike)):
        p = c.encode(x, seed=trial, step=1, worker=3)
        h = p.header
        key = rng.derive_key(h.seed, h.step, h.worker, rng.STREAM_ROTATION)
        y = hadamard.rotate_reference(x, key)
        lam = ob._f32_up(c.norm_scale(float(x.double().norm()), d))
        dkey = rng.derive_key(h.seed, h.step, h.worker, rng.STREAM_DITHER)
        want_bits = ob.quantize_reference(y, lam, dkey if lam > 0 else None)
        assert torch.equal(p.section(1), want_bits)
        (s,) = read_f32(p.section(0), 1, "scale")
        if c.rescale == "none":
            assert s == lam
        else:
            want = c._fitted(
                ob.signed_sum_reference(y, want_bits), float(x.double() @ x.double()), d
            )
            assert s == pytest.approx(want, rel=2**-20)
        with monkeypatch.context() as mp:
            mp.setattr(hadamard, "can_rotate_quantize", lambda v: False)
            q = c.encode(x, seed=trial, step=1, worker=3)
        assert torch.equal(q.section(1), p.section(1))
        assert read_f32(q.section(0), 1, "scale")[0] == pytest.approx(s, rel=2**-20)


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
        (ob.PAPER_FOSGD, torch.randn(d + 8, generator=g)),
        (ob.PAPER_FOSGD, torch.randn(d, generator=g).double()),
        ("fosgd:scale=max,rescale=none", torch.randn(d, generator=g)),
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


# --- the scale rules of issue 13: rms / l1 dither scales, decode-scale fitting ---------------


@pytest.mark.parametrize("n", [1, 7, 8, 31, 32, 33, 1000, 4097, (1 << 17) + 3])
@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_quantize_sum_kernel_matches_reference(n, lam):
    """The quantizer that also returns <b, y>: the same bits as quantize_, and the sum of
    the reference, on fresh random inputs (lambda = 0: undithered signs)."""
    g = torch.Generator().manual_seed(n)
    y = torch.randn(n, generator=g)
    key = int(torch.randint(1 << 62, (1,), generator=g))
    out = torch.zeros(bits_mod.packed_size(n), dtype=torch.uint8)
    ip = ob.quantize_sum_(y, lam, key, out)
    assert torch.equal(out, ob.quantize_reference(y, lam, key if lam else None))
    assert ip == pytest.approx(ob.signed_sum_reference(y, out), rel=1e-6, abs=1e-9)
    assert ob.signed_sum_reference(y, bits_mod.pack_bits(y < 0)) == pytest.approx(
        float(y.double().abs().sum()), rel=1e-12
    )


@pytest.mark.parametrize(
    "spec",
    ["fosgd:scale=rms,c=0,rescale=mse", "fosgd:scale=rms,c=1,rescale=mse",
     "fosgd:scale=l1,c=1,rescale=mse", "onebit:scale=max,rescale=mse",
     "fosgd:scale=norm,c=1,rescale=mse"],
)  # fmt: skip
@pytest.mark.parametrize("d", [1, 3, 1000, 1 << 16])
def test_mse_rescale_is_the_least_squares_fit(spec, d):
    """rescale=mse decodes s b with s = <b, y> / d: then <C(x), x> = ||C(x)||^2 and
    ||C(x) - x||^2 = ||x||^2 - ||C(x)||^2 < ||x||^2 (a projection), draw by draw."""
    c = gz.compressor(spec)
    x = torch.randn(d, generator=torch.Generator().manual_seed(d)) * torch.linspace(0.1, 3, d)
    for seed in range(5):
        y = c.decode(c.encode(x, seed=seed)).double()
        x64 = x.double()
        out2, ip, n2 = float(y @ y), float(y @ x64), float(x64 @ x64)
        assert ip == pytest.approx(out2, rel=1e-5)
        assert float((y - x64).square().sum()) == pytest.approx(n2 - out2, rel=1e-4, abs=1e-6)
        # zero only when the dither left the bits uncorrelated with y (then nothing is sent)
        assert out2 > 0 or (ip == 0 and "c=0," not in spec)
    assert not c.unbiased and c.delta(d) is not None


def test_unbiased_rescale_makes_the_inner_product_exact():
    """rescale=unbiased: <C(x), x> = ||x||^2 for every draw; with c = 0 it is DRIVE."""
    x = torch.randn(5000, generator=torch.Generator().manual_seed(3))
    n2 = float(x.double().square().sum())
    for spec in ("fosgd:scale=rms,c=0.5,rescale=unbiased", "fosgd:scale=rms,c=0,rescale=unbiased"):
        c = gz.compressor(spec)
        for seed in range(4):
            y = c.decode(c.encode(x, seed=seed)).double()
            assert float(y @ x.double()) == pytest.approx(n2, rel=1e-5)
    drive = gz.compressor("drive")
    c = gz.compressor("fosgd:scale=rms,c=0,rescale=unbiased")
    a = drive.decode(drive.encode(x, seed=9, step=2, worker=1))
    b = c.decode(c.encode(x, seed=9, step=2, worker=1))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_capped_rescale_is_unbiased_on_flat_vectors_and_contracts_on_any():
    """rescale=capped sends the unbiased scale where it is at most CAP times the least-squares
    one: on a dense vector (flat once rotated) the payload is the unbiased one byte for
    byte; on a vector that rotates to one spike, the unbiased scale's error is about
    (d - 1) ||x||^2 while the capped one stays below ||x||^2 - (2 CAP - CAP^2)
    <b, y>^2 / d, draw by draw, and is declared a contraction (EF without a warning)."""
    capped, unbiased = gz.compressor("fosgd:rescale=capped"), gz.compressor("fosgd")
    for d in (1000, 1 << 16):
        x = torch.randn(d, generator=torch.Generator().manual_seed(d))
        for seed in range(3):
            a, b = capped.encode(x, seed=seed), unbiased.encode(x, seed=seed)
            assert torch.equal(a.section(0), b.section(0))  # the scale
            assert torch.equal(a.section(1), b.section(1))  # the bits
            assert torch.equal(capped.decode(a), unbiased.decode(b))
    d = 1 << 12
    worse = 0
    for seed in range(8):  # x whose rotation is one spike: the bits of the other d - 1 are noise
        y0 = torch.zeros(d)
        y0[7] = 1.0
        x = hadamard.unrotate_reference(y0, rng.derive_key(seed, 0, 0, rng.STREAM_ROTATION))
        n2 = float(x.double().square().sum())
        yc = capped.decode(capped.encode(x, seed=seed)).double()
        yu = unbiased.decode(unbiased.encode(x, seed=seed)).double()
        ec, eu = float((yc - x.double()).square().sum()), float((yu - x.double()).square().sum())
        ip = float(yc @ x.double())  # s <b, y>; ip^2 / ||C(x)||^2 = <b, y>^2 / d
        assert ec < n2, (seed, ec, n2)
        assert ec <= n2 - (2 * ob.CAP - ob.CAP**2) * ip * ip / float(yc @ yc) + 1e-6 * n2
        worse += eu > 100 * n2
    assert worse == 8  # the unbiased scale's error is about (d - 1) ||x||^2 here
    assert capped.delta(d) is not None and unbiased.delta(d) is None
    assert capped.delta(d) == pytest.approx(d / (2 * ob.CAP - ob.CAP**2))


def test_rms_and_l1_rules_send_their_lambda():
    """rms: lambda = c ||x|| / sqrt(d); l1: lambda = c ||Phi x||_1 / d; both sent as float32
    rounded up, and the bits are the dithered quantizer's at that lambda."""
    d = 4099
    x = torch.randn(d, generator=torch.Generator().manual_seed(4))
    c = gz.compressor("fosgd:scale=rms,c=0.7,rescale=none")
    p = c.encode(x, seed=1)
    (lam,) = read_f32(p.section(0), 1, "scale")
    want = 0.7 * float(x.double().norm()) / math.sqrt(d)
    assert lam == ob._f32_up(want)
    y = hadamard.rotate(x, rng.derive_key(1, 0, 0, rng.STREAM_ROTATION))
    key = rng.derive_key(1, 0, 0, rng.STREAM_DITHER)
    assert torch.equal(p.section(1), ob.quantize_reference(y, lam, key))
    c = gz.compressor("fosgd:scale=l1,c=1.5,rescale=none")
    (lam,) = read_f32(c.encode(x, seed=1).section(0), 1, "scale")
    assert lam == pytest.approx(1.5 * float(y.double().abs().sum()) / d, rel=1e-6)


def test_zero_dither_is_the_sign_of_the_rotated_vector():
    x = torch.randn(3000, generator=torch.Generator().manual_seed(5))
    p = gz.compressor("fosgd:scale=rms,c=0,rescale=mse").encode(x, seed=2)
    y = hadamard.rotate(x, rng.derive_key(2, 0, 0, rng.STREAM_ROTATION))
    assert torch.equal(p.section(1), bits_mod.pack_bits(y < 0))
    (s,) = read_f32(p.section(0), 1, "scale")
    assert s == pytest.approx(float(y.double().abs().sum()) / 3000, rel=1e-6)


def test_rescale_parameters_are_validated_and_travel_in_the_header():
    for bad, msg in [
        ("fosgd:rescale=median", "rescale must be one of"),
        ("onebit:scale=fixed,lam=1,rescale=mse", "scale=fixed sends none"),
        ("fosgd:dither=subtractive,rescale=mse", "dither=standard only"),
        ("fosgd:scale=rms,c=0,rescale=none", "positive number, got 0"),
        ("fosgd:scale=fixed,lam=1", "add rescale=none"),
        ("fosgd:scale=norm,c=0,rescale=mse", "positive number, got 0"),
        ("fosgd:scale=rms,c=-1,rescale=mse", "positive number or 0"),
    ]:
        with pytest.raises(ValueError, match=msg):
            gz.compressor(bad)
    c = gz.compressor("fosgd:scale=l1,c=0.25,rescale=unbiased")
    assert ob.OneBit.from_params(c.to_params()) == c
    raw = bytearray(c.to_params())
    raw[3] = 7  # no such rescale
    with pytest.raises(gz.PayloadError, match="rescale=7"):
        ob.OneBit.from_params(bytes(raw))
    # the byte was padding before rescale existed: 0 reads as rescale=none
    assert ob.OneBit.from_params(gz.compressor(ob.PAPER_FOSGD).to_params()).rescale == "none"


def test_mse_rescale_declares_the_worst_case_delta_and_rotation_reaches_far_better():
    """The declared worst case is d (a vector with one large coordinate); on a rotated
    Gaussian-like vector the undithered sign's error is (1 - 2/pi)||x||^2 (delta ~ 1.57)."""
    c = gz.compressor("fosgd:scale=rms,c=0,rescale=mse")
    assert c.delta(1 << 20) == float(1 << 20)
    assert gz.compressor("fosgd:scale=rms,c=2000,rescale=mse").delta(1 << 20) == 2000.0**2
    x = torch.randn(1 << 14, generator=torch.Generator().manual_seed(6))
    assert vnmse(c, x, range(8)) == pytest.approx(1 - 2 / math.pi, abs=0.01)


# --- a shared rotation: the server adds and re-quantizes in the rotated domain ------------


@pytest.mark.parametrize("d", [1, 7, 64, 4097, 100_003])
def test_mean_signs_kernel_matches_reference(d):
    g = torch.Generator().manual_seed(d)
    m = 1 + d % 4
    datas = [
        torch.randint(0, 256, ((d + 7) // 8,), dtype=torch.uint8, generator=g) for _ in range(m)
    ]
    lams = [float(np.float32(v)) for v in torch.rand(m, generator=g) * 3]
    fast = ob.mean_signs_(datas, lams, torch.full((d,), float("nan")))
    ref = ob.mean_signs_reference(datas, lams, torch.empty(d))
    assert torch.equal(fast, ref)
    signs = [bits_mod.unpack_signs(x, d) for x in datas]  # and it is the mean of the scaled signs
    assert torch.allclose(
        ref, sum(s * lam for s, lam in zip(signs, lams, strict=True)) / m, atol=1e-6
    )


@pytest.mark.parametrize("d", [1000, 1 << 16, 100_003])
def test_shared_rotation_sums_in_the_rotated_domain(d):
    c = gz.compressor("fosgd:rotation=shared")
    assert c.adds_rotated and c.rotation_key(3, 5, 0) == c.rotation_key(3, 5, 9)
    assert gz.compressor("fosgd").rotation_key(3, 5, 0) != gz.compressor("fosgd").rotation_key(
        3, 5, 9
    )
    g = torch.Generator().manual_seed(d)
    x = torch.randn(d, generator=g)
    ps = [c.encode(x + torch.randn(d, generator=g), seed=3, step=5, worker=i) for i in range(4)]
    mean = sum(c.decode(p) for p in ps) / 4
    y = c.mean_rotated(ps, torch.empty(d))
    back = hadamard.unrotate(y.clone(), c.rotation_key(3, 5, 0))
    assert torch.allclose(back, mean, atol=1e-5 * float(mean.abs().max()))
    # the downlink straight from Phi x: the payload encode(x) makes, up to Phi Phi^T's rounding
    sent, made = (
        c.encode_rotated(hadamard.rotate(x, c.rotation_key(3, 5, 0)), 3, 5, 7),
        c.encode(x, 3, 5, 7),
    )
    flips = int(
        (
            bits_mod.unpack_signs(sent.section(1), d) != bits_mod.unpack_signs(made.section(1), d)
        ).sum()
    )
    assert flips <= max(2, d // 10_000), flips
    assert torch.allclose(
        c.decode(sent), c.decode(made), rtol=1e-3, atol=1e-3 * float(x.abs().max())
    )


def test_shared_rotation_travels_in_the_header_and_refuses_what_it_cannot_add():
    c = gz.compressor("fosgd:rotation=shared")
    p = c.encode(torch.randn(300), seed=1, step=2, worker=0)
    assert gz.decode(p.to_bytes()).shape == (300,)  # the header alone names the rotation
    assert (
        type(c).from_params(c.to_params()) == c
        and c.to_params() != gz.compressor("fosgd").to_params()
    )
    with pytest.raises(ValueError, match="needs flatten=true"):
        gz.compressor("onebit:rotation=shared")
    with pytest.raises(ValueError, match="rotation must be one of"):
        gz.compressor("fosgd:rotation=mine")
    other = gz.compressor("fosgd").encode(torch.randn(300), seed=1, step=2, worker=1)
    with pytest.raises(PayloadError, match="other parameters"):
        c.mean_rotated([p, other], torch.empty(300))
    with pytest.raises(PayloadError, match="300 coordinates, expected 299"):
        c.mean_rotated([p], torch.empty(299))
    with pytest.raises(ValueError, match="rotation=shared"):
        gz.compressor("fosgd").encode_rotated(torch.randn(300))
    with pytest.raises(NonFiniteError):
        c.encode_rotated(torch.full((300,), float("nan")))


def test_the_server_of_a_shared_rotation_quantizes_the_rotated_mean():
    from gradzip.engines.core import SERVER, Algorithm, ServerState, WorkerState
    from gradzip.feedback import FeedbackState
    from gradzip.methods import Method

    spec, d, n, t = "fosgd:rotation=shared", 5000, 3, 4
    algo = Algorithm(Method(spec, "none", spec, "none"), d, seed=11)
    assert algo.rotated_server(t)
    assert not Algorithm(
        Method(spec, "none", spec, "none"), d, seed=11, momentum=0.9
    ).rotated_server(t)
    capped = spec + ",rescale=capped"  # a contraction: the server's memory may take it
    assert not Algorithm(Method(spec, "none", capped, "ef"), d, seed=11).rotated_server(t)
    sender = "fosgd:rotation=sender"
    assert not Algorithm(Method(sender, "none", sender, "none"), d, seed=11).rotated_server(t)
    g = torch.Generator().manual_seed(0)
    fresh = WorkerState(FeedbackState(None))
    ups = [algo.encode_uplink(t, i, torch.randn(d, generator=g), 1.0, fresh)[0] for i in range(n)]
    down, _ = algo.aggregate(t, ups, 1.0, ServerState(FeedbackState(None)))
    # the plain server: decode each payload, average, encode (rotating back and forth)
    mean = sum(algo.decode_uplink(u, "worker", t, i) for i, u in enumerate(ups)) / n
    assert torch.allclose(algo.mean_uplink(t, ups), mean, atol=1e-5 * float(mean.abs().max()))
    plain = algo.down.decode(algo.down.encode(mean, seed=11, step=t, worker=SERVER))
    got = algo.decode_downlink(down, "server", t)
    assert float((got - plain).norm() / plain.norm()) < 0.02  # a few sign flips at most
    with pytest.raises(gz.PayloadError, match="worker 1 sent a payload of step 3"):
        algo.aggregate(t, [ups[0], algo.encode_uplink(3, 1, mean, 1.0, fresh)[0]], 1.0, None)


def test_warmups_compile_the_shared_rotations_server_path():
    import subprocess
    import sys

    code = (
        "import gradzip.ddp\n"
        "from gradzip import _warmup\n"
        "from gradzip._numba import onebit as k\n"
        "assert not k._mean_signs.signatures\n"
        "gradzip.ddp.GradzipState(spec='fosgd').warmup()\n"
        "assert not k._mean_signs.signatures, 'per-sender rotation: no server path'\n"
        "gradzip.ddp.GradzipState(spec='fosgd:rotation=shared').warmup()\n"
        "assert k._mean_signs.signatures\n"
        "assert 'fosgd:rotation=shared' in _warmup.specs()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
