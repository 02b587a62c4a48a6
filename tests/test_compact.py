"""The Elias-Fano index code and ``topk_compact`` (top-k with that code and fp8/fp16 values):
vectorized code against the per-index reference on fresh random inputs, hostile codes,
the selection against ``topk``'s, the declared contraction draw by draw, and payload checks.
(The registry's conformance suite covers ``topk_compact`` as well.)"""

import math
import struct

import numpy as np
import pytest
import torch

import gradzip as gz
from gradzip import eliasfano
from gradzip.compressors.compact import (
    E2M1,
    FORMATS,
    e2m1_codes,
    e2m1_codes_reference,
    topk_compact,
)
from gradzip.wire import PayloadWriter


def _code(idx, d):
    out = torch.empty(eliasfano.size(len(idx), d), dtype=torch.uint8)
    eliasfano.encode(torch.tensor(idx, dtype=torch.int64), d, out)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_elias_fano_equals_the_reference(seed):
    g = np.random.default_rng(seed)
    for _ in range(40):
        d = int(g.choice([1, 2, 3, 9, 100, 4097, 808_451]))
        k = int(g.integers(0, min(d, 5000) + 1))
        idx = sorted(g.choice(d, size=k, replace=False).tolist())
        code = _code(idx, d)
        assert code.numpy().tobytes() == eliasfano.encode_reference(idx, d)
        assert eliasfano.decode(code, k, d, "t").tolist() == idx
        assert eliasfano.decode_reference(code.numpy().tobytes(), k, d) == idx


def test_elias_fano_size():
    assert eliasfano.size(0, 10) == 0
    assert eliasfano.low_bits(1200, 1200) == 0 and eliasfano.size(1200, 1200) == 300  # 2k bits
    for k, d in ((3600, 808_451), (100, 1 << 20), (7, 1000)):
        bits = 8 * eliasfano.size(k, d)
        assert bits <= k * (2 + math.log2(d / k)) + 8 + 16  # + rounding to bytes
        assert k < 100 or bits < k * math.ceil(math.log2(d))  # below fixed-width indices


def test_elias_fano_rejects_invalid_codes():
    d, k = 1000, 5
    ok = _code([3, 70, 71, 500, 999], d)
    with pytest.raises(gz.PayloadError, match="bytes"):
        eliasfano.decode(ok[:-1], k, d, "t")
    # equal high parts, decreasing low parts: not increasing
    lo_n, _ = eliasfano.sizes(k, d)
    bad = ok.clone()
    low = torch.tensor([3, 70, 71, 500, 999]) & ((1 << eliasfano.low_bits(k, d)) - 1)
    low[1], low[2] = low[2], low[1]  # 70 and 71 share their high part (l = 7)
    bad[:lo_n] = gz.bits.pack_uints(low, eliasfano.low_bits(k, d))
    with pytest.raises(gz.PayloadError, match="strictly increasing"):
        eliasfano.decode(bad, k, d, "t")
    # a last index at or above d
    big = _code([3, 70, 71, 500, 1023], 1024)  # the same l and sizes as for d = 1000
    assert eliasfano.sizes(k, 1024) == eliasfano.sizes(k, d)
    with pytest.raises(gz.PayloadError, match="not below d=1000"):
        eliasfano.decode(big, k, d, "t")


def _marks(code, k, d):
    """Clear one flag of the bitmap: the code then marks k - 1 indices."""
    lo_n, _ = eliasfano.sizes(k, d)
    c = code.clone()
    flags = gz.bits.unpack_bits(c[lo_n:], eliasfano.bitmap_bits(k, d))
    flags[int(torch.nonzero(flags)[0])] = False
    c[lo_n:] = gz.bits.pack_bits(flags)
    return eliasfano.decode(c, k, d, "t")


def test_elias_fano_rejects_a_missing_flag():
    with pytest.raises(gz.PayloadError, match="marks 4 indices, expected 5"):
        _marks(_code([3, 70, 71, 500, 999], 1000), 5, 1000)


@pytest.mark.parametrize("values", ["fp8", "fp16"])
@pytest.mark.parametrize("seed", range(3))
def test_selection_is_topks_and_values_within_rounding(values, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(50_000, generator=g) * torch.rand(50_000, generator=g) ** 3
    c = topk_compact(k=0.004, values=values)
    y = c.decode(c.encode(x))
    t = gz.compressor("topk:k=0.004")
    ref = t.decode(t.encode(x))
    assert torch.equal(y != 0, ref != 0)
    u = FORMATS[values][2]
    kept = ref != 0
    assert float(((y[kept] - ref[kept]) / ref[kept]).abs().max()) <= u * (1 + 1e-6)


def test_e2m1_codes_equal_the_reference():
    g = torch.Generator().manual_seed(9)
    mids = (E2M1[1:] + E2M1[:-1]) / 2  # ties go to the lower magnitude
    a = torch.cat([torch.rand(3000, generator=g) * 12 - 6, mids, -mids, E2M1, -E2M1])
    assert torch.equal(e2m1_codes(a), e2m1_codes_reference(a))


@pytest.mark.parametrize("seed", range(3))
def test_fp4_values_are_the_nearest_level(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20_000, generator=g) * torch.rand(20_000, generator=g) ** 3
    c = topk_compact(k=300, values="fp4")
    p = c.encode(x)
    y = c.decode(p)
    t = gz.compressor("topk:k=300")
    ref = t.decode(t.encode(x))
    kept = ref != 0
    assert torch.equal(y != 0, kept & (y != 0)) and int(kept.sum()) == 300
    (s,) = struct.unpack("<f", p.section(1).numpy().tobytes())
    v = ref[kept].double() / s
    levels = torch.cat([E2M1, -E2M1]).double()
    nearest = (v[:, None] - levels[None, :]).abs().min(1).values
    assert float(((y[kept].double() / s) - v).abs().sub(nearest).abs().max()) < 1e-5
    assert float(ref[kept].abs().max()) / s == pytest.approx(6.0, rel=1e-6)


@pytest.mark.parametrize("values", ["fp8", "fp16", "fp4"])
def test_contraction_holds_draw_by_draw(values):
    g = torch.Generator().manual_seed(4)
    d = 4096
    spike = torch.zeros(d)
    spike[17] = 1e30
    tiny = torch.randn(d, generator=g) * 1e-30
    wide = torch.randn(d, generator=g) * torch.logspace(-20, 20, d)
    for k in (1, 0.01, 0.5, d):
        c = topk_compact(k=k, values=values)
        for x in (torch.randn(d, generator=g), torch.ones(d), spike, tiny, wide):
            y = c.decode(c.encode(x))
            x64 = x.double()
            err = float((y.double() - x64).square().sum() / x64.square().sum())
            assert err <= 1 - 1 / c.delta(d) + 1e-12, (k, values)


def test_bits_at_the_examples_shard_sizes():
    c = gz.compressor("topk_compact:k=3600")
    big = c.bits_per_coordinate(808_451)
    assert big == pytest.approx(8 * (eliasfano.size(3600, 808_451) + 4 + 3600) / 808_451)
    assert big < 0.08
    assert c.bits_per_coordinate(1200) == pytest.approx(8 * (300 + 4 + 1200) / 1200)  # whole


def _forge(c, d, sections):
    w = PayloadWriter(24, torch.float32, (d,), [len(s) for s in sections], params=c.to_params())
    for i, s in enumerate(sections):
        w.arrays[i][:] = np.frombuffer(s, np.uint8)
    return w.finish().to_bytes()


def test_hostile_payloads_are_payload_errors():
    c = topk_compact(k=2, values="fp8")
    d = 64
    idx = _code([5, 9], d).numpy().tobytes()
    one = torch.tensor([1.0, -2.0]).to(torch.float8_e4m3fn).view(torch.uint8).numpy().tobytes()
    ok = [idx, struct.pack("<f", 0.5), one]
    y = gz.decode(_forge(c, d, ok))
    assert y[5] == 0.5 and y[9] == -1.0 and int((y != 0).sum()) == 2
    for i, bad in ((1, struct.pack("<f", -1.0)), (1, struct.pack("<f", float("inf"))),
                   (2, bytes([0x7F, 0x38])), (2, bytes([0x38, 0xFF]))):  # fmt: skip
        secs = list(ok)
        secs[i] = bad
        with pytest.raises(gz.PayloadError):
            gz.decode(_forge(c, d, secs))
    with pytest.raises(gz.PayloadError, match="overflows"):  # 448 * 3.4e38
        gz.decode(_forge(c, d, [idx, struct.pack("<f", 3.4e38), bytes([0x7E, 0x7E])]))
    with pytest.raises(ValueError):
        topk_compact(values="bf16")
    c4 = topk_compact(k=3, values="fp4")
    codes = bytes([0x9F, 0x00])  # low nibble first: code 15 = -6, code 9 = -0.5, code 0 = 0
    y = gz.decode(
        _forge(c4, d, [_code([1, 2, 60], d).numpy().tobytes(), struct.pack("<f", 2.0), codes])
    )
    assert y[[1, 2, 60]].tolist() == [-12.0, -1.0, 0.0] and int((y != 0).sum()) == 2


@pytest.mark.parametrize("spec", ["topk_compact:values=fp4", "topk_compact:k=5,values=fp16"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_variants_keep_the_conformance_promises(spec, dtype):
    """The registry's conformance checks (its suite runs the default, fp8) on the others:
    shape and dtype, size = header + declared sections = the bits formula, and gz.decode
    of the bytes equals the compressor's decode."""
    c = gz.compressor(spec)
    for shape in [(0,), (1,), (2,), (3,), (1000,), (1025,), (2, 3, 4, 5)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        p = c.encode(x, seed=3, step=1, worker=2)
        y = c.decode(p)
        assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
        assert p.nbytes == p.header.size + sum(c.expected_sections(p.header))
        if dtype == torch.float32 and x.numel():
            bits = (p.nbytes - p.header.size) * 8
            assert bits == pytest.approx(c.bits_per_coordinate(x.numel()) * x.numel())
        assert torch.equal(gz.decode(p.to_bytes()), y)
