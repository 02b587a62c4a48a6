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


def _reference_sections(c, x, rate):
    from gradzip import bits

    d = x.numel()
    lo, hi, _ = allocation(d, rate)
    ref_lo, ref_hi = c.codes_reference(x)
    sec_lo = bits.pack_uints_reference(ref_lo, lo) if lo and ref_lo.numel() else None
    sec_hi = bits.pack_uints_reference(ref_hi, hi) if ref_hi.numel() else None
    return ref_lo, ref_hi, sec_lo, sec_hi


@pytest.mark.parametrize("rate", [0.3, 1.5, 2.3, 2.5, 7.75, 9.0, 12.9, 23.6, 24.0])
@pytest.mark.parametrize("d", [1, 9, 1000, 70001, 300001])
def test_streamed_path_writes_the_reference_bytes(rate, d):
    """Fractional R (and integer R > 8) quantizes straight into the two bit streams: the
    payload's sections equal pack_uints_reference of the reference codes."""
    c = gz.compressor(f"uniform:bits={rate},range=0.7,flatten=false")
    x = _x(d, int(10 * rate) + d, scale=0.5)
    p = c.encode(x)
    ref_lo, ref_hi, sec_lo, sec_hi = _reference_sections(c, x, rate)
    for k, ref in ((0, sec_lo), (1, sec_hi)):
        if ref is None:
            assert p.section(k).numel() == 0
        else:
            assert torch.equal(p.section(k), ref)
    assert torch.equal(c.decode(p), c.decode_reference(ref_lo, ref_hi, d))


@pytest.mark.parametrize("rate", [0.37, 2.5, 5.001, 12.9])
def test_pieces_that_share_bytes_are_merged_exactly(rate):
    """Any split of the work into pieces gives the same bytes: pieces that start or end
    inside a byte hand it back and it is assembled from both (every byte is written)."""
    from gradzip._numba import uniform as nb

    d = 5003
    c = gz.compressor(f"uniform:bits={rate},range=0.7,flatten=false")
    g = np.random.default_rng(int(rate * 1000))
    x = _x(d, 11, scale=0.5)
    ref_lo, ref_hi, sec_lo, sec_hi = _reference_sections(c, x, rate)
    lo, _, _ = allocation(d, rate)
    for _ in range(10):
        cuts = np.unique(np.concatenate([[0, d], g.integers(0, d, int(g.integers(1, 40)))]))
        cuts = np.unique(np.concatenate([cuts, cuts[1:-1] + 1]).clip(0, d))  # 1-element pieces
        pieces = list(zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True))
        out_lo = np.full(len(sec_lo) if sec_lo is not None else 0, 0xA5, np.uint8)
        out_hi = np.full(len(sec_hi) if sec_hi is not None else 0, 0xA5, np.uint8)
        nb.encode_streams(x.numpy(), rate, lo, np.float32(0.7), out_lo, out_hi, pieces=pieces)
        if sec_lo is not None:
            np.testing.assert_array_equal(out_lo, sec_lo.numpy())
        np.testing.assert_array_equal(out_hi, sec_hi.numpy())
        z = np.empty(d, np.float32)
        nb.decode_streams(out_lo, out_hi, rate, lo, np.float32(0.7), z, pieces=pieces)
        np.testing.assert_array_equal(z, c.decode_reference(ref_lo, ref_hi, d).numpy())


@pytest.mark.parametrize("rate", [0.4, 2.7, 9.0])
def test_reference_is_generic_over_dtype(rate):
    """The reference of steps 3 and 4 runs in its input's dtype: in float64 (DQ-GD's
    reproduction) its cells and centres are the float64 formula's, bit for bit; in float32
    they are the compressor's."""
    from gradzip.compressors.uniform import cell_centre, cell_index, widths

    d, r = 257, 0.3
    w = widths(d, rate)
    y = torch.randn(d, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.4
    y[:3] = torch.tensor([-r, r, 1e-17])  # the edges, and a value float32 would move
    idx = cell_index(y, w, r)
    assert idx.dtype == torch.float64
    levels = 2.0 ** w.double()
    cell = 2 * r / levels
    want = torch.minimum(torch.floor((y.clamp(-r, r) + r) / cell), levels - 1)
    assert torch.equal(idx, want)
    z = cell_centre(idx, w, r)
    assert z.dtype == torch.float64
    assert torch.equal(z, torch.where(w > 0, -r + (want + 0.5) * cell, 0.0))
    c = gz.compressor(f"uniform:bits={rate},range={r},flatten=false")
    y32 = y.float()
    i32 = cell_index(y32, w, c.r32)
    lo, hi = c.codes_reference(y32)
    assert torch.equal(i32[w == allocation(d, rate)[0]].long(), lo)
    assert torch.equal(i32[w == allocation(d, rate)[1]].long(), hi)
    assert torch.equal(c.decode(c.encode(y32)), cell_centre(i32, w, c.r32))
