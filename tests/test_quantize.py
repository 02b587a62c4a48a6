"""Quantizers (QSGD, TernGrad, natural compression and dithering, biased rounding) and the
``scaled`` wrapper: fast path == reference, unbiasedness, variance and contraction bounds,
payload sizes, and malformed payloads."""

import math
import struct

import numpy as np
import pytest
import torch

import gradzip as gz
from gradzip.compressors import quantize as qz
from gradzip.compressors import rounding
from gradzip.wire import Payload

F32_MAX = float(np.finfo(np.float32).max)
UNBIASED = ["qsgd", "qsgd:levels=1", "qsgd:levels=255", "terngrad", "natural",
            "natural_dithering", "natural_dithering:levels=3"]  # fmt: skip
ALL = UNBIASED + ["biased_rounding", "biased_rounding:base=1.5", "biased_rounding:base=10"]
SCALED = ["scaled(qsgd(levels=4))", "scaled(natural)", "scaled(terngrad)"]


def restamp(raw: bytearray) -> bytearray:
    import zlib

    struct.pack_into("<I", raw, 32, zlib.crc32(bytes(raw[36:]), zlib.crc32(bytes(raw[:32]))))
    return raw


def randn(n, seed, scale=1.0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def mixed(n, seed):
    """Values over many magnitudes, some zeros and negative zeros, a few exact powers of 2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(3 * torch.randn(n, generator=g))
    x[::7] = 0.0
    x[3::11] = -0.0
    x[5::13] = 2.0 ** torch.randint(-20, 20, x[5::13].shape, generator=g).float()
    return x


def samples(c, x, n_seeds):
    return torch.stack([c.decode(c.encode(x, seed=s)).double() for s in range(n_seeds)])


# --- fast path == pure-torch reference -----------------------------------------------------------


@pytest.mark.parametrize("spec", ALL + ["qsgd:levels=32767", "natural_dithering:levels=126"])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 100, 4095, 4096, 4097, 70001])
def test_fast_path_matches_reference(spec, n):
    c = gz.compressor(spec)
    for seed, x in ((n, randn(n, n)), (n + 1, mixed(n, n))):
        p = c.encode(x, seed=seed, step=3, worker=1)
        ref = c.encode_reference(x, seed=seed, step=3, worker=1)
        assert torch.equal(p.data, ref.data), spec
        y = c.decode(p)
        assert torch.equal(y, c.decode_reference(p))
        assert torch.equal(y.view(torch.int32), c.decode_reference(p).view(torch.int32))


@pytest.mark.parametrize("spec", ALL)
def test_fast_decode_matches_reference_on_random_codes(spec):
    """Arbitrary code bytes: both paths give the same values, or both reject them."""
    c = gz.compressor(spec)
    g = np.random.default_rng(7)
    for n in (5, 64, 1000, 9001):
        raw = bytearray(c.encode(randn(n, n), seed=1).to_bytes())
        p = Payload.from_bytes(raw)
        off = p.header.size + sum(p.header.section_lengths[:-1])
        raw[off:] = g.integers(0, 256, len(raw) - off, dtype=np.uint8).tobytes()
        p = Payload.from_bytes(restamp(raw))
        outcomes = []
        for dec in (c.decode, c.decode_reference):
            try:
                outcomes.append(dec(p))
            except gz.PayloadError as e:
                outcomes.append(str(e))
        a, b = outcomes
        assert type(a) is type(b)
        if isinstance(a, str):
            assert a == b and "magnitude index" in a
        else:
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))
            assert torch.isfinite(a).all()


def test_extreme_inputs_fast_equals_reference():
    tiny = torch.tensor([1e-45, -3e-44, 2e-39, 0.0, -1e-40])  # subnormal norms
    big = torch.tensor([3e38, -1e38, 2.0**127 * 1.5, 1.0])
    for spec in ALL:
        c = gz.compressor(spec)
        for x in (tiny, big, torch.zeros(33)):
            try:
                p = c.encode(x, seed=2)
            except ValueError as e:  # a norm beyond float32: refused, not inf
                assert "float32 range" in str(e) and x is big
                continue
            assert torch.equal(p.data, c.encode_reference(x, seed=2).data)
            y = c.decode(p)
            assert torch.isfinite(y).all()
            if not x.any():
                assert not y.any()


def test_values_beyond_float32_are_refused():
    for spec in ALL:
        with pytest.raises(ValueError, match="float32 range"):
            gz.compressor(spec).encode(torch.tensor([1e39, 1.0], dtype=torch.float64))


# --- unbiasedness and variance -------------------------------------------------------------------


@pytest.mark.parametrize("spec", UNBIASED)
def test_unbiased_by_monte_carlo(spec):
    """Per coordinate, the mean of S decodes is x up to its standard error, and the squared
    error of the mean stays within what the declared omega allows (omega ||x||^2 / S)."""
    c = gz.compressor(spec)
    assert c.unbiased
    x = randn(100, 11) * torch.linspace(0.01, 3, 100)
    S = 3000
    ys = samples(c, x, S)
    x64 = x.double()
    err = ys.mean(0) - x64
    bound = c.omega(x.numel()) * float(x64.square().sum()) / S
    assert float(err.square().sum()) < 3 * bound
    se = ys.std(0) / math.sqrt(S)
    # Coordinates decoded to the same value all S times: either x sits on a level, or it
    # rounds away with a probability p below ~10/S (then |err| = p * gap, and no codec here
    # has a gap between levels wider than ||x||).
    exact = se == 0
    assert float(err[exact].abs().sum()) < 10 * float(x64.norm()) / S
    z = err[~exact] / se[~exact]
    # max |z| over <= 100 normals exceeds 4.5 with probability ~7e-4
    assert float(z.abs().max()) < 4.5
    assert abs(float(z.square().mean()) - 1) < 5 * math.sqrt(2 / z.numel())


def test_the_unbiasedness_check_catches_bias():
    x = randn(100, 12)
    c = gz.compressor("biased_rounding")
    ys = samples(c, x, 2)
    assert float((ys.mean(0) - x.double()).abs().max()) > 0.05  # deterministic, biased


def _vnmse(c, x, seeds):
    x64 = x.double()
    errs = [float((c.decode(c.encode(x, seed=s)).double() - x64).square().sum()) for s in seeds]
    return sum(errs) / len(errs) / float(x64.square().sum()), np.std(errs) / math.sqrt(
        len(errs)
    ) / float(x64.square().sum())


def _worst_terngrad(d):
    a = 1 / (math.sqrt(d) + 1)
    x = torch.full((d,), a)
    x[0] = 1.0
    return x


def test_measured_vnmse_within_declared_omega():
    """Measured vNMSE <= omega (+ Monte Carlo error); where the bound is tight, close to it."""
    d = 4096
    cases = [
        ("qsgd", randn(d, 1)),
        ("qsgd:levels=1", randn(d, 1)),
        ("qsgd:levels=255", randn(d, 1)),
        ("terngrad", randn(d, 1)),
        ("terngrad", _worst_terngrad(d)),  # the bound's extremal vector
        ("natural", randn(d, 1)),
        ("natural", torch.full((d,), 4 / 3)),  # the bound's extremal value
        ("natural_dithering", randn(d, 1)),
        ("natural_dithering:levels=3", randn(d, 1)),
        ("scaled(natural)", randn(d, 1)),
    ]
    rows = []
    for spec, x in cases:
        c = gz.compressor(spec)
        v, se = _vnmse(c, x, range(40))
        if c.unbiased:
            declared, what = c.omega(d), "omega"
        else:
            declared, what = 1 - 1 / c.delta(d), "1-1/delta"
        rows.append((spec, "extremal" if spec == "terngrad" and x[0] == 1 or x[0] == 4 / 3
                     else "gaussian", v, declared, what, se))  # fmt: skip
        assert v <= declared + 4 * se + 1e-6, (spec, v, declared)
    print(f"\nvNMSE at d = {d}, 40 seeds: measured vs declared")
    for spec, kind, v, declared, what, se in rows:
        print(f"  {spec:28s} {kind:9s} measured {v:9.5f} +- {se:.5f}   "
              f"declared {what} {declared:9.5f}")  # fmt: skip
    tight = {(r[0], r[1]): (r[2], r[3], r[5]) for r in rows}
    for key in (("terngrad", "extremal"), ("natural", "extremal")):
        v, w, se = tight[key]
        assert abs(v - w) < 4 * se + 1e-9, (key, v, w, se)  # the bound is attained


# --- what the outputs are ------------------------------------------------------------------------


def test_natural_outputs_are_signed_powers_of_two_or_zero():
    x = mixed(20000, 3)
    c = gz.compressor("natural")
    y = c.decode(c.encode(x, seed=4))
    nz = y != 0
    m, e = np.frexp(y[nz].abs().numpy())
    assert np.all(m == 0.5)  # a power of two
    assert torch.equal(torch.sign(y[nz]), torch.sign(x[nz]))
    lo = 2.0 ** torch.floor(torch.log2(x[nz].abs().double()))
    ok = (y[nz].abs().double() == lo) | (y[nz].abs().double() == 2 * lo)
    assert bool(ok.all())  # one of the two nearest powers of two
    assert not bool(y[x == 0].any())
    exact = x[nz].abs() == lo.float()  # powers of two are sent as they are
    assert torch.equal(y[nz][exact], x[nz][exact])
    # subnormals round to 0 or 2^-126; values >= 2^127 round down (2^128 is no float32)
    y = c.decode(c.encode(torch.tensor([1e-40, -1e-42, 2.0**127 * 1.9]), seed=1))
    assert set(y.abs().tolist()) <= {0.0, 2.0**-126, 2.0**127}
    assert y[2] == 2.0**127


def test_natural_dithering_levels():
    s = 5
    x = randn(5000, 5)
    c = gz.compressor(f"natural_dithering:levels={s}")
    p = c.encode(x, seed=1)
    norm = struct.unpack("<f", p.section(0).numpy().tobytes())[0]
    y = c.decode(p).double() / norm
    levels = {0.0} | {2.0 ** (j - s) for j in range(1, s + 1)}
    assert set(y.abs().tolist()) <= levels
    t = (x.double() / norm).abs()
    lo = torch.where(t < 2.0 ** (1 - s), 0.0, 2.0 ** torch.floor(torch.log2(t)))
    hi = torch.where(t < 2.0 ** (1 - s), 2.0 ** (1 - s), 2 * lo)
    assert bool(((y.abs() - lo).abs() < 1e-6).logical_or((y.abs() - hi).abs() < 1e-6).all())


def test_qsgd_outputs_are_neighbouring_levels():
    s = 7
    x = randn(3000, 6)
    c = gz.compressor(f"qsgd:levels={s}")
    y = c.decode(c.encode(x, seed=1)).double()
    norm = float(x.double().norm())
    lev = y.abs() * s / norm
    assert torch.allclose(lev, lev.round(), atol=1e-4)
    t = x.double().abs() * s / norm
    assert bool(((lev.round() - torch.floor(t)).abs() <= 1).all())
    assert bool((lev.round() - t).abs().lt(1).all())


def test_terngrad_outputs_are_ternary():
    x = randn(3000, 8)
    y = gz.decode(gz.compressor("terngrad").encode(x, seed=1).data)
    assert set(y.abs().unique().tolist()) == {0.0, float(x.abs().max())}


# --- biased rounding: the contraction ------------------------------------------------------------


@pytest.mark.parametrize("base", [2.0, 1.1, 1.5, 3.0, 10.0])
def test_biased_rounding_contraction(base):
    c = gz.compressor(f"biased_rounding:base={base}")
    assert not c.unbiased
    delta = c.delta(1000)
    assert delta == pytest.approx((base + 1) ** 2 / (4 * base), rel=1e-6)
    g = torch.Generator().manual_seed(int(base * 10))
    x = torch.randn(100000, generator=g) * torch.exp(5 * torch.randn(100000, generator=g))
    y = c.decode(c.encode(x)).double()
    x64 = x.double()
    cst = (base - 1) / (base + 1)
    assert bool(((y - x64).abs() <= cst * x64.abs() * (1 + 1e-6)).all())
    err = float((y - x64).square().sum())
    assert err <= (1 - 1 / delta) * float(x64.square().sum())
    # the bound is tight: just above a midpoint the error is cst |x|
    levels = rounding.rounding_tables(base).levels
    i = levels.size // 2 - 5  # ten levels around 1
    mid64 = (levels[i : i + 10] + levels[i + 1 : i + 11]) / 2
    mid = torch.tensor(mid64, dtype=torch.float32)
    over = mid.double() > torch.tensor(mid64)  # float32 rounded up past the midpoint
    mid[over] = torch.nextafter(mid[over], torch.tensor(0.0))
    above = torch.nextafter(mid, torch.tensor(float("inf")))
    ya = c.decode(c.encode(above)).double()
    assert float(((ya - above.double()).abs() / above.double()).max()) == pytest.approx(
        cst, rel=1e-5
    )
    # nearest in absolute distance (not in log_b): the midpoint itself rounds down
    ym = c.decode(c.encode(mid)).double()
    assert np.allclose(ym.numpy(), levels[i : i + 10], rtol=0)


def test_biased_rounding_examples():
    y = gz.decode(gz.compressor("biased_rounding").encode(
        torch.tensor([1.4, 1.6, -3.0, -3.1, 0.74, 0.76, 0.0, -0.0, 1e-40])).data)  # fmt: skip
    assert y.tolist() == [1.0, 2.0, -2.0, -4.0, 0.5, 1.0, 0.0, 0.0, 0.0]


# --- payload sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 7, 8, 1000, 12345])
def test_payload_sizes_follow_the_formulas(d):
    x = randn(d, d)

    def body(spec):
        p = gz.compressor(spec).encode(x, seed=1)
        return p.nbytes - p.header.size

    for s in (1, 3, 15, 16, 255, 1000):
        w = 1 + math.ceil(math.log2(s + 1))
        assert body(f"qsgd:levels={s}") == 4 + math.ceil(d * w / 8)
    assert body("terngrad") == 4 + math.ceil(2 * d / 8)
    assert body("natural") == math.ceil(9 * d / 8)
    for s in (1, 2, 7, 8, 126):
        w = 1 + math.ceil(math.log2(s + 1))
        assert body(f"natural_dithering:levels={s}") == 4 + math.ceil(d * w / 8)
    assert body("biased_rounding") == math.ceil(9 * d / 8)  # 254 levels + 0: 8 bits + sign
    n = rounding.rounding_tables(1.5).levels.size
    assert body("biased_rounding:base=1.5") == math.ceil(d * (1 + n.bit_length()) / 8)
    inner = gz.compressor("natural").encode(x, seed=1)
    assert body("scaled(natural)") == inner.nbytes


def test_bits_per_coordinate_at_one_million():
    d = 1 << 20
    expect = {"qsgd": 5, "terngrad": 2, "natural": 9, "natural_dithering": 4,
              "biased_rounding": 9, "qsgd:levels=255": 9}  # fmt: skip
    for spec, b in expect.items():
        assert gz.compressor(spec).bits_per_coordinate(d) == pytest.approx(b, abs=1e-3), spec


# --- parameters ----------------------------------------------------------------------------------


def test_parameter_validation():
    for bad in ("qsgd:levels=0", "qsgd:levels=32768", "natural_dithering:levels=0",
                "natural_dithering:levels=127", "biased_rounding:base=1.0",
                "biased_rounding:base=1.05", "biased_rounding:base=2e6"):  # fmt: skip
        with pytest.raises(ValueError):
            gz.compressor(bad)
    with pytest.raises(ValueError, match="integer"):
        qz.QSGD(levels=2.5)
    with pytest.raises(ValueError, match="integer"):
        qz.QSGD(levels=True)
    for spec in ALL + SCALED + ["scaled"]:
        c = gz.compressor(spec)
        assert gz.compressor(c.spec) == c
        assert type(c).from_params(c.to_params()) == c


def test_declared_constants():
    d = 10000
    assert gz.compressor("qsgd:levels=4").omega(d) == min(d / 16, 100 / 4)
    assert gz.compressor("qsgd:levels=200").omega(d) == min(d / 200**2, 100 / 200)
    assert gz.compressor("terngrad").omega(d) == pytest.approx((100 - 1) / 2)
    assert gz.compressor("natural").omega(d) == 0.125
    assert gz.compressor("natural_dithering:levels=8").omega(d) == 0.125 + min(100 / 128, d / 4**7)
    assert gz.compressor("biased_rounding").delta(d) == 9 / 8


# --- scaled(C) -----------------------------------------------------------------------------------


def test_scaled_is_the_inner_decode_times_the_factor():
    inner = gz.compressor("qsgd:levels=4")
    c = gz.compressor("scaled(qsgd(levels=4))")
    assert c.spec == "scaled(qsgd(levels=4))" and c.inner == inner
    d = 3000
    x = randn(d, 9)
    p = c.encode(x, seed=5, step=2, worker=3)
    q = inner.encode(x, seed=5, step=2, worker=3)
    assert torch.equal(p.section(0), q.data)  # the nested payload is the inner one
    w = inner.omega(d)
    assert c.factor(d) == pytest.approx(1 / (w + 1), rel=1e-7)
    assert torch.equal(c.decode(p), inner.decode(q) * np.float32(c.factor(d)))
    assert torch.equal(gz.decode(p.data), c.decode(p))
    assert not c.unbiased and c.delta(d) == w + 1


def test_scaled_contraction_by_monte_carlo():
    x = randn(2000, 10)
    for spec in SCALED:
        c = gz.compressor(spec)
        v, se = _vnmse(c, x, range(30))
        assert v <= 1 - 1 / c.delta(x.numel()) + 4 * se, spec


def test_scaled_rejects_biased_or_unbounded_inner():
    for spec in ("scaled(topk)", "scaled(sign)", "scaled(biased_rounding)", "scaled(fosgd)",
                 "scaled(scaled(natural))"):  # fmt: skip
        with pytest.raises(ValueError, match="biased|omega"):
            gz.compressor(spec)
    with pytest.raises(TypeError):
        qz_scaled = __import__("gradzip.compressors.scaled", fromlist=["Scaled"]).Scaled
        qz_scaled(3)


def test_scaled_nested_payload_is_validated():
    c = gz.compressor("scaled(qsgd(levels=4))")
    x = randn(50, 1)
    p = c.encode(x, seed=1, step=2, worker=3)
    off = p.header.size

    def nested_variant(**kw):
        inner = gz.compressor(kw.pop("inner", "qsgd:levels=4"))
        y = kw.pop("x", x)
        args = {"seed": 1, "step": 2, "worker": 3} | kw
        q = inner.encode(y, **args).to_bytes()
        return q

    bad = {
        "seed": nested_variant(seed=9),
        "worker": nested_variant(worker=0),
        "codec": nested_variant(inner="natural_dithering:levels=4"),
        "params": nested_variant(inner="qsgd:levels=5"),
        "shape": nested_variant(x=x.reshape(5, 10)),
        "dtype": nested_variant(x=x.double()),
    }
    for what, q in bad.items():
        raw = bytearray(p.to_bytes())
        if len(q) != len(raw) - off:
            continue  # different length: covered by the section length check
        raw[off:] = q
        with pytest.raises(gz.PayloadError, match="nested"):
            gz.decode(bytes(restamp(raw)))
        assert what
    # a truncated or corrupted nested payload
    raw = bytearray(p.to_bytes())
    raw[off + 40] ^= 0xFF
    with pytest.raises(gz.PayloadError):
        gz.decode(bytes(restamp(raw)))


def test_scaled_params_are_validated():
    from gradzip.compressors.scaled import Scaled

    good = gz.compressor("scaled(natural)").to_params()
    for raw in (b"", good[:2], good + b"x", bytes([35, 3, 0, 32, 0, 0]),  # scaled in scaled
                bytes([11, 0, 0]),  # sign: biased
                bytes([250, 0, 0]),  # unknown codec
                bytes([30, 4, 0]) + struct.pack("<I", 0)):  # qsgd levels 0  # fmt: skip
        with pytest.raises(gz.PayloadError):
            Scaled.from_params(raw)


# --- malformed payloads --------------------------------------------------------------------------


def _mutated(spec, edit, n=40):
    c = gz.compressor(spec)
    raw = bytearray(c.encode(randn(n, 2), seed=3).to_bytes())
    p = Payload.from_bytes(raw)
    edit(raw, p)
    return bytes(restamp(raw))


def _params_at(p):
    return 36 + 8 * len(p.header.shape)


def _section_at(p, i):
    return p.header.size + sum(p.header.section_lengths[:i])


@pytest.mark.parametrize(
    "spec,edit,match",
    [
        # a scale that is NaN, infinite or negative
        ("qsgd", lambda r, p: struct.pack_into("<f", r, _section_at(p, 0), float("nan")),
         "scale"),
        ("terngrad", lambda r, p: struct.pack_into("<f", r, _section_at(p, 0), -1.0), "scale"),
        ("natural_dithering",
         lambda r, p: struct.pack_into("<f", r, _section_at(p, 0), float("inf")), "scale"),
        # a scale whose largest level overflows float32 (f32(max / 25) * 25 rounds to inf)
        ("qsgd:levels=25", lambda r, p: struct.pack_into("<f", r, _section_at(p, 0), F32_MAX),
         "overflow"),
        # magnitude index beyond the levels: qsgd level 4..7 of s=4 (3 level bits)
        ("qsgd:levels=4", lambda r, p: r.__setitem__(_section_at(p, 1), 0b1110), "magnitude"),
        ("natural_dithering:levels=5",
         lambda r, p: r.__setitem__(_section_at(p, 1), 0b1110), "magnitude"),
        # natural: exponent 255 (inf / NaN) is no code
        ("natural", lambda r, p: (r.__setitem__(_section_at(p, 0), 0xFE),
                                  r.__setitem__(_section_at(p, 0) + 1, 0x01)), "magnitude"),
        ("biased_rounding", lambda r, p: (r.__setitem__(_section_at(p, 0), 0xFE),
                                          r.__setitem__(_section_at(p, 0) + 1, 0x01)),
         "magnitude"),
        # parameters out of range
        ("qsgd", lambda r, p: struct.pack_into("<I", r, _params_at(p), 0), "levels"),
        ("qsgd", lambda r, p: struct.pack_into("<I", r, _params_at(p), 1 << 31), "levels"),
        ("natural_dithering", lambda r, p: struct.pack_into("<I", r, _params_at(p), 200),
         "levels"),
        ("biased_rounding", lambda r, p: struct.pack_into("<d", r, _params_at(p), float("nan")),
         "base"),
        ("biased_rounding", lambda r, p: struct.pack_into("<d", r, _params_at(p), 0.5), "base"),
        ("biased_rounding", lambda r, p: struct.pack_into("<d", r, _params_at(p), 1.5),
         "sections"),  # valid base, but its codes are 10 bits wide, not 9
    ],
)  # fmt: skip
def test_malformed_payloads_raise_payload_error(spec, edit, match):
    data = _mutated(spec, edit)
    with pytest.raises(gz.PayloadError, match=match):
        gz.decode(data)
    with pytest.raises(gz.PayloadError, match=match):
        gz.compressor(spec).decode(data)


def test_malformed_fuzz_only_payload_errors():
    """Random byte edits (checksum re-stamped): PayloadError or finite values, nothing else."""
    g = np.random.default_rng(5)
    for spec in ALL + SCALED:
        c = gz.compressor(spec)
        base = c.encode(randn(77, 3), seed=1).to_bytes()
        for _ in range(150):
            raw = bytearray(base)
            for _ in range(g.integers(1, 4)):
                raw[g.integers(36, len(raw))] = g.integers(256)
            try:
                y = gz.decode(bytes(restamp(raw)), max_numel=1 << 12)
            except gz.PayloadError:
                continue
            assert torch.isfinite(y).all()
