"""The ``uniform`` (DQ-GD) quantizer: fast path against the torch reference, allocation of
fractional bits, the quantization error bound, clipping."""

import math

import numpy as np
import pytest
import torch

import gradzip as gz
from gradzip.compressors.uniform import allocation


def _x(d, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=g) * scale


@pytest.mark.parametrize("rate", [0.1, 0.5, 1.0, 2.3, 5.0, 7.75, 24.0])
@pytest.mark.parametrize("d", [1, 3, 64, 1000, 4097])
def test_fast_codes_and_centres_equal_the_reference(rate, d):
    c = gz.compressor(f"uniform:bits={rate},range=1.5,flatten=false")
    x = _x(d, int(rate * 100) + d, scale=1.2)  # some coordinates beyond the range
    ref_lo, ref_hi = c.codes_reference(x)
    lo, hi = c._codes(x)
    assert torch.equal(lo.to(torch.int64), ref_lo) and torch.equal(hi.to(torch.int64), ref_hi)
    y = c.decode(c.encode(x))
    assert torch.equal(y, c.decode_reference(ref_lo, ref_hi, d))


@pytest.mark.parametrize("rate", [0.3, 1.0, 3.7])
def test_bits_allocation_and_error_bound(rate):
    d, r = 5000, 2.0
    c = gz.compressor(f"uniform:bits={rate},range={r},flatten=false")
    x = _x(d, 7).clamp(-r, r)
    p = c.encode(x)
    assert sum(p.header.section_lengths) * 8 >= math.floor(rate * d)
    assert sum(p.header.section_lengths) * 8 < math.floor(rate * d) + 16
    lo, hi, n_hi = allocation(d, rate)
    assert lo * (d - n_hi) + hi * n_hi == math.floor(rate * d)
    y = c.decode(p)
    i = torch.arange(d + 1, dtype=torch.float64)
    w = (torch.floor((i[1:]) * rate) - torch.floor(i[:-1] * rate)).to(torch.int64)
    half_cell = r / (1 << w).double()  # a cell is 2r / 2^b wide; the centre is within half
    err = (y.double() - x.double()).abs()
    sent = w > 0
    assert bool((err[sent] <= half_cell[sent] * (1 + 1e-6)).all())
    assert not bool(y[~sent].any())  # coordinates without bits decode to 0


def test_flattened_round_trip_and_clipping():
    d = 1 << 12
    c = gz.compressor("uniform:bits=8,range=1.0,flatten=true")
    x = _x(d, 3, scale=0.1)  # rotated coordinates stay within the range
    y = c.decode(c.encode(x, seed=5, step=2))
    assert float((y - x).norm() / x.norm()) < 0.05
    big = torch.full((16,), 100.0)
    yb = gz.compressor("uniform:bits=4,range=1.0,flatten=false").decode(
        gz.compressor("uniform:bits=4,range=1.0,flatten=false").encode(big)
    )
    assert float(yb.max()) <= 1.0 and float(yb.min()) > 0.9  # clipped to the top cell


def test_float32_range_is_what_both_sides_use():
    """The payload carries the range as float32; the encoder quantizes with that value."""
    c = gz.compressor("uniform:bits=3,range=0.1,flatten=false")
    x = torch.linspace(-0.1, 0.1, 257)
    y = gz.decode(c.encode(x).to_bytes())
    assert torch.equal(y, c.decode(c.encode(x)))
    assert float((y - x).abs().max()) <= np.float32(0.1) / 8 * (1 + 1e-6)


@pytest.mark.parametrize("b", [1, 2, 3, 5, 7, 8])
@pytest.mark.parametrize("d", [1, 7, 8, 9, 1000, 70001])
def test_fused_packed_path_writes_the_reference_bytes(b, d):
    """Integer R <= 8 quantizes and packs in one pass: the payload's bytes equal
    pack_uints_reference of the reference codes, and decoding equals the reference."""
    from gradzip import bits

    c = gz.compressor(f"uniform:bits={b},range=0.7,flatten=false")
    x = _x(d, 100 * b + d, scale=0.5)  # some beyond the range
    p = c.encode(x)
    ref_lo, ref_hi = c.codes_reference(x)
    assert ref_hi.numel() == 0
    assert torch.equal(p.section(0), bits.pack_uints_reference(ref_lo, b))
    assert torch.equal(c.decode(p), c.decode_reference(ref_lo, ref_hi, d))
