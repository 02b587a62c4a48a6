"""Conformance: every registered compressor, whatever it is, keeps these promises.

A compressor added to the registry is covered here without new tests.
"""

import pytest
import torch

import gradzip as gz
from gradzip.compressors import names

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SHAPES = [(0,), (1,), (2,), (3,), (1000,), (1024,), (1025,), (2, 3, 4, 5)]
ALL = names()


def _x(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def expected_bytes(c, p):
    h = p.header
    return h.size + sum(c.expected_sections(h))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_shape_dtype_and_size(name, dtype):
    c = gz.compressor(name)
    for shape in SHAPES:
        x = _x(shape, dtype)
        p = c.encode(x, seed=3, step=1, worker=2)
        y = c.decode(p)
        assert y.shape == x.shape and y.dtype == x.dtype, (name, shape, dtype)
        assert torch.isfinite(y).all()
        # the payload is exactly header + declared sections, bits counted from its bytes
        assert p.nbytes == expected_bytes(c, p) and p.nbits == 8 * p.data.numel()
        # payload bits beyond the header follow the declared per-coordinate formula
        d = x.numel()
        if dtype == torch.float32 and d:
            assert (p.nbytes - p.header.size) * 8 == pytest.approx(c.bits_per_coordinate(d) * d)
        # self-describing: decoding from the bytes alone gives the same tensor
        z = gz.decode(p.to_bytes())
        assert torch.equal(z, y)


@pytest.mark.parametrize("name", ALL)
def test_deterministic_given_the_integers(name):
    c = gz.compressor(name)
    x = _x((3000,), torch.float32)
    a = c.encode(x, seed=5, step=2, worker=1).to_bytes()
    b = c.encode(x, seed=5, step=2, worker=1).to_bytes()
    assert a == b


@pytest.mark.parametrize("name", ALL)
def test_non_contiguous_input(name):
    c = gz.compressor(name)
    x = _x((40, 30), torch.float32)
    assert not x.t().is_contiguous()
    y1 = c.decode(c.encode(x.t(), seed=1))
    y2 = c.decode(c.encode(x.t().contiguous(), seed=1))
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_a_clear_error(name, bad):
    x = _x((100,), torch.float32)
    x[17] = bad
    with pytest.raises(ValueError, match="non-finite"):
        gz.compressor(name).encode(x)


@pytest.mark.parametrize("name", ALL)
def test_wrong_input_types(name):
    c = gz.compressor(name)
    with pytest.raises(TypeError):
        c.encode(torch.arange(10))
    with pytest.raises(TypeError):
        c.encode([1.0, 2.0])


@pytest.mark.parametrize("name", ALL)
def test_payload_of_another_codec_is_rejected(name):
    other = "identity" if name != "identity" else "sign"
    p = gz.compressor(other).encode(_x((64,), torch.float32))
    with pytest.raises(gz.PayloadError, match="codec"):
        gz.compressor(name).decode(p)


@pytest.mark.parametrize("name", ALL)
def test_declares_properties(name):
    c = gz.compressor(name)
    assert isinstance(c.unbiased, bool)
    assert 0 < c.bits_per_coordinate(1 << 20) <= 64
    assert gz.compressor(c.spec) == c  # the spec string round-trips


def test_registry_errors_list_valid_choices():
    with pytest.raises(ValueError, match="available: .*fosgd"):
        gz.compressor("nope")
    with pytest.raises(ValueError, match="valid: .*scale"):
        gz.compressor("onebit:bogus=1")
    with pytest.raises(ValueError, match="not a valid float"):
        gz.compressor("fosgd:c=abc")
    with pytest.raises(ValueError, match="scale must be one of"):
        gz.compressor("onebit:scale=median")
    with pytest.raises(ValueError, match="key=value"):
        gz.compressor("onebit:scale")
    for bad in ("onebit:", "onebit(scale=max", "onebit)", "1bit", "onebit:scale=max,,"):
        with pytest.raises(ValueError, match="malformed"):
            gz.compressor(bad)
    assert gz.compressor("onebit(scale=norm, flatten=true)") == gz.compressor(
        "onebit:scale=norm,flatten=1"
    )


def test_available_compressors_lists_everything():
    infos = {i["name"]: i for i in gz.available_compressors()}
    assert set(infos) == set(ALL)
    assert infos["fosgd"]["unbiased"] is False and infos["onebit"]["unbiased"] is True
    assert infos["identity"]["bits_per_coordinate"] == 32


def test_fp16_overflow_is_an_error_not_inf():
    with pytest.raises(ValueError, match="float16"):
        gz.compressor("fp16").encode(torch.tensor([1e6, 1.0]))
    y = gz.decode(gz.compressor("bf16").encode(torch.tensor([1e6, 1.0])).data)
    assert torch.isfinite(y).all()


def test_identity_is_lossless_in_every_dtype():
    for dtype in DTYPES:
        x = _x((333,), dtype)
        assert torch.equal(gz.decode(gz.compressor("identity").encode(x).data), x)


@pytest.mark.parametrize("spec", ["identity", "fp16", "bf16"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_casts_decode_misaligned_payloads(spec, dtype):
    """A payload sitting at an odd offset of a larger buffer decodes the same (copied to an
    aligned buffer first); casts write and read their section in one pass when aligned."""
    x = _x((129,), dtype)
    c = gz.compressor(spec)
    data = c.encode(x).data
    buf = torch.zeros(data.numel() + 3, dtype=torch.uint8)
    buf[3:] = data
    y = gz.decode(buf[3:])
    assert y.dtype == dtype and torch.equal(y, c.decode(data))
    if spec == "identity":
        assert torch.equal(y, x)
    else:
        assert torch.equal(y, x.to(c.target).to(dtype))


# --- declared properties, verified by Monte Carlo over the whole registry -------------------

VARIANTS = [
    "randk:unbiased=true",
    "onebit:dither=subtractive",
    "onebit:rescale=mse",
    "fosgd:scale=rms,c=0,rescale=mse",
    "fosgd:scale=rms,c=1,rescale=mse",
    "fosgd:scale=l1,c=1,rescale=mse",
    "fosgd:scale=norm,c=1,rescale=mse",
    "fosgd:scale=rms,c=0.5,rescale=unbiased",
    "fosgd:rescale=capped",
    "onebit:rescale=capped",
    "fosgd:scale=norm,c=1,rescale=none",
    "scaled(qsgd(levels=4))",
    "compose:topk(k=0.1)+natural_dithering(levels=8)",
]
S = 300  # draws per compressor (fresh seeds)


def _draws(c, x):
    return torch.stack([c.decode(c.encode(x, seed=s, step=3)).double() for s in range(S)])


@pytest.mark.parametrize("spec", ALL + VARIANTS)
def test_declared_unbiasedness_and_omega_hold(spec):
    """Where a compressor claims to be unbiased with variance omega, the mean of S draws
    is within omega ||x||^2 / S of x (in squared norm, with a factor 4 of room: a sum of
    d = 256 coordinates' errors hardly strays that far), and the measured vNMSE <= omega."""
    c = gz.compressor(spec)
    d = 256
    x = _x((d,), torch.float32, seed=5) * torch.linspace(0.1, 2, d)
    if not c.unbiased:
        return  # nothing claimed (biased compressors are checked by their delta below)
    omega = c.omega(d)
    assert omega is not None, f"{spec} is unbiased but declares no omega"
    ys = _draws(c, x)
    x64, n2 = x.double(), float(x.double().square().sum())
    bias2 = float((ys.mean(0) - x64).square().sum())
    assert bias2 <= 4 * omega * n2 / S + 1e-12, (spec, bias2 / n2, omega / S)
    errs = (ys - x64).square().sum(1) / n2
    assert float(errs.mean()) <= omega + 4 * float(errs.std()) / S**0.5 + 1e-12


@pytest.mark.parametrize("spec", ALL + VARIANTS)
def test_declared_contraction_holds(spec):
    """Where delta is declared: E||C(x) - x||^2 <= (1 - 1/delta) ||x||^2 (Monte Carlo
    mean minus four standard errors), on a Gaussian and on a sparse heavy-tailed vector."""
    c = gz.compressor(spec)
    d = 256
    delta = c.delta(d)
    if delta is None:
        return
    g = torch.Generator().manual_seed(9)
    sparse = torch.zeros(d)
    sparse[torch.randperm(d, generator=g)[:8]] = torch.randn(8, generator=g) * 10
    for x in (_x((d,), torch.float32, seed=6), sparse):
        ys = _draws(c, x)
        x64, n2 = x.double(), float(x.double().square().sum())
        errs = (ys - x64).square().sum(1) / n2
        bound = 1 - 1 / delta
        assert float(errs.mean()) - 4 * float(errs.std()) / S**0.5 <= bound + 1e-9, (
            spec,
            float(errs.mean()),
            bound,
        )


@pytest.mark.parametrize("spec", ALL + VARIANTS)
def test_declared_exact_inner_product_holds(spec):
    """Where declared: <C(x), x> = ||x||^2 draw by draw (float32 rounding aside), on a
    Gaussian and on a sparse heavy-tailed vector."""
    c = gz.compressor(spec)
    if not c.exact_inner_product:
        return
    d = 256
    g = torch.Generator().manual_seed(11)
    sparse = torch.zeros(d)
    sparse[torch.randperm(d, generator=g)[:8]] = torch.randn(8, generator=g) * 10
    for x in (_x((d,), torch.float32, seed=7), sparse):
        x64 = x.double()
        n2 = float(x64 @ x64)
        for seed in range(20):
            y = c.decode(c.encode(x, seed=seed, step=1)).double()
            assert float(y @ x64) == pytest.approx(n2, rel=1e-5), (spec, seed)


def test_the_property_checks_can_fail():
    """A compressor that lies about omega or delta is caught by the checks above."""
    x = _x((256,), torch.float32, seed=5)
    c = gz.compressor("randk:k=0.1,unbiased=true")
    ys = _draws(c, x)
    errs = (ys - x.double()).square().sum(1) / float(x.double().square().sum())
    assert float(errs.mean()) > 0.5 * c.omega(256)  # a claimed omega of half would fail
    t = gz.compressor("topk:k=0.1")
    y = t.decode(t.encode(x)).double()
    err = float((y - x.double()).square().sum() / x.double().square().sum())
    assert err > 1 - 1 / 1.05  # a claimed delta of 1.05 would fail
    # the paper's fosgd (decode scale lambda) keeps the inner product only on average
    f = gz.compressor("fosgd:scale=norm,rescale=none")
    y = f.decode(f.encode(x, seed=1)).double()
    n2 = float(x.double().square().sum())
    assert abs(float(y @ x.double()) / n2 - 1) > 1e-3  # a claimed exact inner product fails
