"""Sparsifiers (topk, randk, adaptive_sparse) and the compose wrapper.

Fast paths against their references on fresh random inputs (heavy ties included), the
statistics each one promises (uniform rand-k, unbiasedness, contraction), exact payload
sizes, and hostile payloads.
"""

import math
import struct
import zlib

import numpy as np
import pytest
import torch
from scipy import stats

import gradzip as gz
from gradzip import bits, rng
from gradzip._numba import sparse as nbs
from gradzip.compressors import names
from gradzip.compressors.compose import MAX_DEPTH, Compose, compose
from gradzip.compressors.sparse import (
    adaptive_select,
    adaptive_select_reference,
    adaptive_sparse,
    index_width,
    kept_count,
    randk,
    randk_indices,
    randk_indices_reference,
    topk,
    topk_indices,
    topk_indices_reference,
)
from gradzip.wire import PayloadWriter

SEED = int(np.random.default_rng().integers(2**32))  # fresh inputs every run, shown on failure


def gen(tag: int = 0) -> np.random.Generator:
    return np.random.default_rng([SEED, tag])


def inputs(g: np.random.Generator, d: int) -> dict[str, torch.Tensor]:
    x = g.standard_normal(d).astype(np.float32)
    ints = g.integers(-3, 4, d).astype(np.float32)  # heavy ties, zeros, -0.0 below
    ints[ints == 0] = np.where(g.random(int((ints == 0).sum())) < 0.5, 0.0, -0.0)
    sparse = np.zeros(d, np.float32)
    sparse[g.integers(0, d, max(1, d // 50))] = g.standard_normal(max(1, d // 50))
    heavy = (g.standard_cauchy(d) * 10.0 ** g.integers(-6, 6, d)).astype(np.float32)
    return {
        "normal": torch.from_numpy(x),
        "ints": torch.from_numpy(ints),
        "sparse": torch.from_numpy(sparse),
        "heavy": torch.from_numpy(heavy),
        "const": torch.full((d,), -2.5),
    }


def ks_for(d: int) -> list[int]:
    return sorted({min(d, v) for v in (1, 2, max(1, round(0.01 * d)), d // 2, d // 2 + 1, d - 1, d)
                   if v >= 1})  # fmt: skip


def restamp(raw: bytearray) -> bytes:
    struct.pack_into("<I", raw, 32, zlib.crc32(bytes(raw[36:]), zlib.crc32(bytes(raw[:32]))))
    return bytes(raw)


def with_section(p: gz.Payload, i: int, new: bytes) -> bytes:
    """p's bytes with section i overwritten (same length) and the checksum re-stamped."""
    raw = bytearray(p.to_bytes())
    h = p.header
    start = h.size + sum(h.section_lengths[:i])
    assert len(new) == h.section_lengths[i]
    raw[start : start + len(new)] = new
    return restamp(raw)


def forge(codec, shape, params, sections, seed=0, step=0, worker=0, dtype=torch.float32):
    w = PayloadWriter(codec, dtype, shape, [len(s) for s in sections],
                      seed=seed, step=step, worker=worker, params=params)  # fmt: skip
    for view, s in zip(w.sections, sections, strict=True):
        if s:
            view.copy_(torch.frombuffer(bytearray(s), dtype=torch.uint8))
    return w.finish().to_bytes()


# --- k -------------------------------------------------------------------------------------


def test_k_is_a_count_or_a_fraction():
    assert [kept_count(0.01, d) for d in (0, 1, 49, 50, 150, 1000)] == [0, 1, 1, 1, 2, 10]
    assert kept_count(5, 3) == 3 and kept_count(5.0, 100) == 5 and kept_count(0.5, 3) == 2
    assert topk(k=7).kept(100) == 7 and topk(k=0.25).kept(100) == 25
    for bad in (0, -1, 2.5, float("nan"), float("inf"), True, "3"):
        with pytest.raises(ValueError, match="k must"):
            topk(k=bad)
    assert [index_width(d) for d in (0, 1, 2, 3, 4, 5, 1024, 1025)] == [1, 1, 1, 2, 2, 3, 10, 11]


# --- top-k -----------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 3, 7, 100, 1000, 5000, 70_000])
def test_topk_fast_path_equals_reference(d):
    g = gen(d)
    for kind, x in inputs(g, d).items():
        order = torch.sort(x.abs(), descending=True, stable=True).indices  # the reference's
        assert torch.equal(topk_indices_reference(x, 2), order[:2].sort().values)
        for k in ks_for(d):
            fast = topk_indices(x, k)
            assert torch.equal(fast, order[:k].sort().values), (SEED, kind, d, k)


def test_topk_fallback_when_the_sample_misleads(monkeypatch):
    """A sample that places the threshold too high still gives the exact result."""

    def liar(xb, fm, k0, k1, out):
        out[:] = np.uint32(0x7F7FFFFF)

    def low(xb, fm, k0, k1, out):  # too low: the candidate buffers overflow and are redone
        out[:] = 0

    x = inputs(gen(1), 70_000)["normal"]
    for sampler in (liar, low):
        monkeypatch.setattr(nbs, "_sample_abs", sampler)
        for k in (1, 700, 35_000, 40_000):
            assert torch.equal(topk_indices(x, k), topk_indices_reference(x, k))


def test_topk_round_trip_and_value_formats():
    g = gen(2)
    x = torch.from_numpy(g.standard_normal((30, 40)).astype(np.float32))
    for values, tol in (("fp32", 0), ("fp16", 1e-3), ("bf16", 8e-3)):
        c = topk(k=0.1, values=values)
        p = c.encode(x, seed=1)
        y = c.decode(p)
        assert torch.equal(gz.decode(p.data), y)
        idx = topk_indices_reference(x.reshape(-1), 120)
        flat = y.reshape(-1)
        assert int((flat != 0).sum()) == 120 and bool((flat[idx] != 0).all())
        torch.testing.assert_close(flat[idx], x.reshape(-1)[idx], rtol=tol, atol=0)
    with pytest.raises(ValueError, match="overflows"):
        topk(k=1, values="fp16").encode(torch.tensor([1e6, 1.0]))


def test_topk_is_a_contraction_with_delta_d_over_k():
    g = gen(3)
    for d, k in ((1000, 10), (1000, 0.3), (77, 76)):
        c = topk(k=k)
        for x in inputs(g, d).values():
            y = c.decode(c.encode(x))
            err = float((y - x).square().sum())
            assert err <= (1 - 1 / c.delta(d)) * float(x.square().sum()) * (1 + 1e-6) + 1e-30


# --- rand-k ----------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 5, 1000, 140_000])
def test_randk_indices_fast_equals_reference(d):
    g = gen(d)
    for key in (int(g.integers(0, 2**63)), int(g.integers(0, 2**63))):
        order = torch.argsort(rng.hash32(torch.arange(d), key))  # the reference's
        assert torch.equal(randk_indices_reference(d, 1, key), order[:1])
        for k in ks_for(d):
            fast = randk_indices(d, k, key)
            assert torch.equal(fast, order[:k].sort().values), (SEED, d, k)
        assert fast.numel() == k and bool((fast[1:] > fast[:-1]).all())


def test_randk_marginals_are_uniform():
    d, k, n = 50, 5, 4000
    base = int(gen(4).integers(0, 2**40))
    counts = np.zeros(d)
    for s in range(n):
        idx = randk_indices(d, k, rng.derive_key(base + s, 0, 0, rng.STREAM_INDICES)).numpy()
        assert np.unique(idx).size == k
        counts[idx] += 1
    assert stats.chisquare(counts).pvalue > 1e-5, SEED
    # pairs are uniform too: how often 0 and 1 are kept together, C(d-2,k-2)/C(d,k)
    pair = k * (k - 1) / (d * (d - 1))
    together = sum(
        bool(np.isin([0, 1], randk_indices(d, k, rng.derive_key(base + s, 1, 0, 3)).numpy()).all())
        for s in range(n)
    )
    assert abs(together - n * pair) < 5 * math.sqrt(n * pair)


def test_randk_receiver_regenerates_the_indices():
    x = torch.from_numpy(gen(5).standard_normal(1000).astype(np.float32))
    c = randk(k=0.05)
    p = c.encode(x, seed=9, step=4, worker=2)
    assert p.nbytes - p.header.size == 50 * 4  # values only: 32 k/d bits per coordinate
    y = gz.decode(p.to_bytes())
    idx = c.indices(1000, 9, 4, 2)
    assert torch.equal(y[idx], x[idx]) and int((y != 0).sum()) == 50
    other = gz.decode(c.encode(x, seed=9, step=5, worker=2).data)
    assert not torch.equal(y, other)


def test_randk_unbiased_and_contraction_by_monte_carlo():
    g = gen(6)
    d, k, n = 40, 8, 2000
    x = torch.from_numpy((g.standard_normal(d) * 10.0 ** g.integers(-2, 2, d)).astype(np.float32))
    xd = x.double()
    ub, b = randk(k=k, unbiased=True), randk(k=k)
    mean = torch.zeros(d, dtype=torch.float64)
    err_u = err_b = 0.0
    for s in range(n):
        yu = ub.decode(ub.encode(x, seed=s)).double()
        yb = b.decode(b.encode(x, seed=s)).double()
        mean += yu / n
        err_u += float((yu - xd).square().sum()) / n
        err_b += float((yb - xd).square().sum()) / n
    sd = xd.abs() * math.sqrt(d / k - 1) / math.sqrt(n)
    assert float(((mean - xd).abs() / sd).max()) < 5, SEED
    sq = float(xd.square().sum())
    assert err_u == pytest.approx(ub.omega(d) * sq, rel=0.15)
    assert err_b == pytest.approx((1 - 1 / b.delta(d)) * sq, rel=0.05)
    assert err_b <= (1 - 1 / b.delta(d)) * sq * 1.05


# --- adaptive sparsification ---------------------------------------------------------------


def water_fill(a: np.ndarray, k: int) -> np.ndarray:
    """p_i = min(1, c a_i) with sum p = k, by the textbook iteration (float64)."""
    p = np.zeros_like(a)
    sat = np.zeros(a.size, bool)
    while True:
        c = (k - sat.sum()) / a[~sat].sum()
        new = sat | (c * a >= 1)
        if (new == sat).all():
            break
        sat = new
    p[sat] = 1
    p[~sat] = c * a[~sat]
    return p


def adaptive_cases(g, d):
    cases = inputs(g, d)
    sat = g.standard_normal(d).astype(np.float32)
    sat[g.integers(0, d, 3)] = [1e4, -3e3, 5e2]  # these saturate
    cases["saturating"] = torch.from_numpy(sat)
    cases["zeros"] = torch.zeros(d)
    return cases


@pytest.mark.parametrize("d", [1, 2, 10, 1000, 140_000])
def test_adaptive_fast_equals_reference(d):
    g = gen(d)
    ks = ks_for(d) if d < 100_000 else [1, 1400, 70_001]
    for kind, x in adaptive_cases(g, d).items():
        if d > 1000 and kind not in ("ints", "heavy", "saturating"):
            continue  # the reference is a Python loop
        for k in ks:
            key = int(g.integers(0, 2**63))
            i1, v1 = adaptive_select(x, k, key)
            i2, v2 = adaptive_select_reference(x, k, key)
            assert torch.equal(i1, i2) and torch.equal(v1, v2), (SEED, kind, d, k)
            assert i1.numel() == k and bool((i1[1:] > i1[:-1]).all())
            assert bool((x[i1] != 0).all()) or int((x != 0).sum()) < k


def test_adaptive_inclusion_probabilities_and_unbiasedness():
    g = gen(7)
    d, k, n = 30, 6, 4000
    a = g.standard_normal(d) * 10.0 ** g.integers(-2, 1, d)
    a[3] = 40.0  # saturates
    x = torch.from_numpy(a.astype(np.float32))
    p = water_fill(np.abs(x.double().numpy()), k)
    assert p[3] == 1 and p.sum() == pytest.approx(k)
    c = adaptive_sparse(k=k)
    kept = np.zeros(d)
    mean = np.zeros(d)
    err = 0.0
    for s in range(n):
        y = c.decode(c.encode(x, seed=s, worker=1)).double().numpy()
        assert (y != 0).sum() == k
        kept += y != 0
        mean += y / n
        err += float(((y - x.double().numpy()) ** 2).sum()) / n
    sd_kept = np.sqrt(n * p * (1 - p)) + 1e-9
    assert np.abs(kept - n * p).max() / sd_kept.max() < 5, SEED
    xd = x.double().numpy()
    var = (1 / p - 1) * xd**2
    z = np.abs(mean - xd) / (np.sqrt(var / n) + 1e-9 * np.abs(xd))  # p = 1: exact
    assert z.max() < 5, SEED
    assert err == pytest.approx(var.sum(), rel=0.15)
    assert err <= c.omega(d) * (xd**2).sum()


def test_adaptive_omega_is_attained_by_a_flat_vector():
    """With all |x_i| equal adaptive sparsification is rand-k scaled by d/k: omega exactly."""
    d, k = 20, 4
    x = torch.full((d,), 0.5) * torch.tensor([1.0, -1.0]).repeat(d // 2)
    c = adaptive_sparse(k=k)
    errs = [float((c.decode(c.encode(x, seed=s)) - x).square().sum()) for s in range(50)]
    assert errs == pytest.approx([(d / k - 1) * float(x.square().sum())] * 50, rel=1e-6)
    assert c.omega(d) == pytest.approx(d / k - 1, rel=1e-6)


# --- payload sizes and hostile payloads ----------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["topk:k=0.03", "topk:k=5,values=bf16", "randk:k=0.2", "adaptive_sparse:k=17",
             "compose:topk(k=0.05)+fp16", "compose:randk(k=9,unbiased=true)+onebit"],
)  # fmt: skip
def test_payload_size_is_the_declared_formula(spec):
    c = gz.compressor(spec)
    for d in (1, 2, 3, 100, 1000, 4097):
        x = torch.from_numpy(gen(d).standard_normal(d).astype(np.float32))
        p = c.encode(x, seed=d)
        assert list(p.header.section_lengths) == c.section_lengths(d)
        assert (p.nbytes - p.header.size) * 8 == pytest.approx(c.bits_per_coordinate(d) * d)
    if spec.startswith(("topk", "adaptive")):
        m = c.kept(1000)
        vbits = 16 if "bf16" in spec else 32
        assert c.bits_per_coordinate(1000) * 1000 == 8 * (math.ceil(m * 10 / 8) + m * vbits / 8)


def test_malformed_sparse_payloads():
    x = torch.from_numpy(gen(8).standard_normal(1000).astype(np.float32))
    p = topk(k=4).encode(x)
    idx = topk_indices(x, 4)
    for bad, msg in (([3, 3, 9, 20], "not above"), ([9, 3, 20, 30], "not above"),
                     ([1, 2, 3, 1000], "not below"), ([1, 2, 3, 1023], "not below")):  # fmt: skip
        packed = bits.pack_uints(torch.tensor(bad), 10).numpy().tobytes()
        with pytest.raises(gz.PayloadError, match=msg):
            gz.decode(with_section(p, 0, packed))
    nan = struct.pack("<4f", 1.0, float("nan"), 2.0, 3.0)
    with pytest.raises(gz.PayloadError, match="non-finite"):
        gz.decode(with_section(p, 1, nan))
    assert torch.equal(gz.decode(p.data)[idx], x[idx])
    # parameters: k invalid, option byte invalid, wrong length
    sections = [bytes(p.section(0).numpy()), bytes(p.section(1).numpy())]
    for params, msg in ((struct.pack("<dB", 0.0, 0), "k must"),
                        (struct.pack("<dB", float("nan"), 0), "k must"),
                        (struct.pack("<dB", 2.5, 0), "integer"),
                        (struct.pack("<dB", 4.0, 7), "option"),
                        (b"\x00" * 3, "parameter bytes")):  # fmt: skip
        with pytest.raises(gz.PayloadError, match=msg):
            gz.decode(forge(20, (1000,), params, sections))
    # k = 5 declares other section lengths than the 4 indices sent
    with pytest.raises(gz.PayloadError, match="sections"):
        gz.decode(forge(20, (1000,), struct.pack("<dB", 5.0, 0), sections))
    # a count k keeps the payload small whatever d is: the receiver's element cap is what
    # bounds the output it allocates
    r = randk(k=3).encode(x)
    huge = forge(21, (1 << 30,), r.header.params, [bytes(r.section(0).numpy())])
    with pytest.raises(gz.PayloadError, match="cap"):
        gz.decode(huge, max_numel=1 << 20)
    with pytest.raises(gz.PayloadError, match="sections"):
        gz.decode(forge(21, (1 << 10,), randk(k=0.5).to_params(), [bytes(r.section(0).numpy())]))


def test_malformed_compose_payloads():
    x = torch.from_numpy(gen(9).standard_normal(500).astype(np.float32))
    c = compose(topk(k=0.02), gz.compressor("fp16"))
    p = c.encode(x, seed=5, step=6, worker=7)
    nested = gz.Payload.from_bytes(p.section(1).clone())
    assert gz.decode(p.data).shape == (500,)
    idx_sec = bytes(p.section(0).numpy())
    vals = bytes(nested.section(0).numpy())
    n = nested.header

    def outer(nested_bytes, params=p.header.params):
        return forge(23, (500,), params, [idx_sec, nested_bytes], seed=5, step=6, worker=7)

    assert n.shape == (10,)
    corrupt = bytearray(nested.to_bytes())
    corrupt[-1] ^= 1
    cases = [
        (forge(2, (10,), b"", [vals], 5, 6, 8), "seed, step or worker"),
        (forge(3, (10,), b"", [vals], 5, 6, 7), "codec 3"),
        (forge(2, (10,), b"", [vals], 5, 6, 7, dtype=torch.float64), "float32 of shape"),
        (bytes(corrupt), "checksum"),
        (b"\x00" * len(corrupt), "magic"),
    ]
    for nb, msg in cases:
        assert len(nb) == len(corrupt)
        with pytest.raises(gz.PayloadError, match=msg):
            gz.decode(outer(nb))
    assert torch.equal(gz.decode(outer(bytes(nested.to_bytes()))), c.decode(p))
    # parameters: a non-sparsifier first, an unknown codec, trailing bytes, nesting depth
    fp16p = struct.pack("<BH", 2, 0)
    for params, msg in ((fp16p + fp16p, "no sparsifier"),
                        (struct.pack("<BH", 99, 0) + fp16p, "unknown"),
                        (p.header.params + b"\x00", "trailing")):  # fmt: skip
        with pytest.raises(gz.PayloadError, match=msg):
            gz.decode(outer(bytes(nested.to_bytes()), params))
    deep = fp16p
    top = struct.pack("<BH", 20, 9) + topk(k=0.02).to_params()
    for _ in range(MAX_DEPTH + 2):
        deep = top + struct.pack("<BH", 23, len(deep)) + deep
    with pytest.raises(gz.PayloadError, match="deeper"):
        gz.decode(outer(bytes(nested.to_bytes()), deep))


# --- compose ---------------------------------------------------------------------------------


def test_compose_builds_from_specs_and_round_trips_them():
    c = gz.compressor("compose:topk(k=0.01)+fp16")
    assert c == compose(topk(k=0.01), gz.compressor("fp16")) == Compose(topk(k=0.01), "fp16")
    specs = [
        "compose",
        "compose(randk(k=3,unbiased=true),onebit(scale=max))",
        "compose:adaptive_sparse(k=0.1)+fosgd",
        "compose(topk(k=0.1),scaled_sign)",
    ]
    for spec in specs:
        c = gz.compressor(spec)
        assert gz.compressor(c.spec) == c and isinstance(c, Compose)
    with pytest.raises(ValueError, match="first argument must be a sparsifier .*topk"):
        gz.compressor("compose:fp16+fp16")
    with pytest.raises(ValueError, match="first argument must be a sparsifier"):
        compose(gz.compressor("onebit"), gz.compressor("fp16"))
    with pytest.raises(TypeError, match="compressor"):
        compose(topk(), 3)


@pytest.mark.parametrize("name", [n for n in names() if n != "compose"])
def test_compose_with_every_registered_compressor(name):
    """Any registered compressor serves as the quantizer; decoding agrees from the bytes."""
    x = torch.from_numpy(gen(10).standard_normal((20, 30)).astype(np.float32))
    for s in (topk(k=0.1), randk(k=0.1, unbiased=True), adaptive_sparse(k=0.1)):
        c = compose(s, gz.compressor(name))
        p = c.encode(x, seed=3, step=2, worker=1)
        y = c.decode(p)
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert torch.equal(gz.decode(p.to_bytes()), y)
        assert int((y != 0).sum()) <= s.kept(600)
        assert p.nbytes - p.header.size == sum(c.section_lengths(600))


def test_compose_with_exact_quantizers_equals_the_sparsifier():
    x = torch.from_numpy(gen(11).standard_normal(3000).astype(np.float32))
    ident, fp16 = gz.compressor("identity"), gz.compressor("fp16")
    for s in (topk(k=0.02), randk(k=0.02, unbiased=True), adaptive_sparse(k=0.02)):
        want = s.decode(s.encode(x, seed=4))
        assert torch.equal(compose(s, ident).decode(compose(s, ident).encode(x, seed=4)), want)
        half = compose(s, fp16).decode(compose(s, fp16).encode(x, seed=4))
        torch.testing.assert_close(half, want.half().float(), rtol=0, atol=0)
    assert torch.equal(
        compose(topk(k=0.02), fp16).decode(compose(topk(k=0.02), fp16).encode(x)),
        topk(k=0.02, values="fp16").decode(topk(k=0.02, values="fp16").encode(x)),
    )


def test_compose_properties_and_unbiasedness():
    d = 64
    q = gz.compressor("onebit")  # unbiased, omega = m - 1 at length m
    c = compose(randk(k=8, unbiased=True), q)
    assert c.unbiased and c.omega(d) == pytest.approx((1 + 7) * (1 + 7) - 1)
    assert not compose(topk(k=8), q).unbiased
    assert compose(topk(k=8), gz.compressor("identity")).delta(d) == pytest.approx(8)
    assert compose(topk(k=8), gz.compressor("bf16")).delta(d) == pytest.approx(
        8 * gz.compressor("bf16").delta(8)
    )
    assert compose(topk(k=8), q).delta(d) is None  # onebit's omega >= 1: no contraction
    x = torch.from_numpy(gen(12).standard_normal(d).astype(np.float32))
    n = 3000
    mean = sum(c.decode(c.encode(x, seed=s)).double() for s in range(n)) / n
    sd = math.sqrt((c.omega(d) + 1) * float(x.double().square().sum()) / n)  # loose per coord
    assert float((mean - x.double()).abs().max()) < 5 * sd, SEED
