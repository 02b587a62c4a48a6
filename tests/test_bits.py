"""gradzip.bits: numba fast path == torch reference == numpy oracle, round trips, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradzip import bits
from gradzip._numba import bits as nb

NS = [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 2**20 + 3]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INTS = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]
UNSIGNED_WIDE = [torch.uint16, torch.uint32, torch.uint64]
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def oracle_signs(x: torch.Tensor) -> np.ndarray:
    return np.packbits(x.reshape(-1).float().numpy() < 0, bitorder="little")


def oracle_uints(values: torch.Tensor, width: int) -> np.ndarray:
    """Independent packing: expand every value to its bits, then np.packbits."""
    v = values.to(torch.int64).numpy().astype(np.uint64)
    stream = (v[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)
    return np.packbits(stream.reshape(-1).astype(np.uint8), bitorder="little")


def as_int_bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, to compare floats exactly (signed zeros and NaNs included)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def randn_with_specials(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(n, generator=gen(seed))
    if n >= 16:
        idx = torch.randperm(n, generator=gen(seed + 1))[:8]
        x[idx] = torch.tensor([0.0, -0.0, float("nan"), -float("nan"), float("inf")] * 2)[:8]
        x[idx[-1]] = -float("inf")
    return x.to(dtype)


# --------------------------------------------------------------------------------------------
# sizes


def test_packed_size():
    assert bits.packed_size(0) == 0
    assert bits.packed_size(1) == 1
    assert bits.packed_size(8) == 1
    assert bits.packed_size(9) == 2
    assert bits.packed_size(3, 24) == 9
    assert bits.packed_size(5, 3) == 2
    assert bits.packed_size(10, 64) == 80
    with pytest.raises(ValueError, match="non-negative"):
        bits.packed_size(-1)
    with pytest.raises(ValueError, match="width must be positive"):
        bits.packed_size(3, 0)
    with pytest.raises(TypeError, match="n must be an int"):
        bits.packed_size(3.0)
    with pytest.raises(TypeError, match="width must be an int"):
        bits.packed_size(3, True)


# --------------------------------------------------------------------------------------------
# signs


@pytest.mark.parametrize("n", NS)
def test_pack_signs_matches_reference_and_numpy(n):
    x = randn_with_specials(n, seed=n)
    fast = bits.pack_signs(x)
    ref = bits.pack_signs_reference(x)
    assert fast.dtype == torch.uint8 and fast.shape == (bits.packed_size(n),)
    assert torch.equal(fast, ref)
    np.testing.assert_array_equal(fast.numpy(), oracle_signs(x))


@pytest.mark.parametrize("dtype", FLOATS[1:])
@pytest.mark.parametrize("n", [0, 5, 64, 1001, 2**18 + 5])
def test_pack_signs_other_float_dtypes(dtype, n):
    x = randn_with_specials(n, seed=n + 7, dtype=dtype)
    fast = bits.pack_signs(x)
    assert torch.equal(fast, bits.pack_signs_reference(x))
    np.testing.assert_array_equal(fast.numpy(), oracle_signs(x))


@pytest.mark.parametrize("dtype", FLOATS)
def test_signs_of_special_values(dtype):
    # documented: bit = (x < 0), so -0.0 and NaN of either sign give 0; -inf and the smallest
    # negative subnormal give 1
    tiny = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # smallest subnormal
    vals = [-0.0, 0.0, float("nan"), -float("nan"), -float("inf"), float("inf"), -tiny, tiny]
    want = [0, 0, 0, 0, 1, 0, 1, 0]
    x = torch.tensor(vals, dtype=dtype)
    assert x[6] < 0  # the subnormal is representable
    for packer in (bits.pack_signs, bits.pack_signs_reference):
        packed = packer(x)
        assert bits.unpack_bits(packed, 8).tolist() == [bool(w) for w in want]
    # a negative NaN payload other than the default one, as raw bits
    if dtype in (torch.float16, torch.bfloat16):
        first = -1023 if dtype == torch.float16 else -127  # -inf is -1024 / -128
        odd_nan = torch.tensor([-1, -2, first], dtype=torch.int16).view(dtype)
        assert odd_nan.isnan().all()
        assert bits.pack_signs(odd_nan).item() == 0 == bits.pack_signs_reference(odd_nan).item()


def test_pack_signs_bool_shapes_and_views():
    x = torch.randn(6, 50, generator=gen(1))
    flat = x.reshape(-1)
    assert torch.equal(bits.pack_signs(x), bits.pack_signs(flat))
    assert torch.equal(bits.pack_signs(x.t()), bits.pack_signs_reference(x.t().reshape(-1)))
    assert torch.equal(bits.pack_signs(flat[::3]), bits.pack_signs_reference(flat[::3]))
    assert torch.equal(bits.pack_signs(x < 0), bits.pack_signs(x))
    assert torch.equal(bits.pack_signs(x.requires_grad_()), bits.pack_signs_reference(x))
    xh = x.detach().to(torch.bfloat16).requires_grad_()
    assert torch.equal(bits.pack_signs(xh), bits.pack_signs_reference(xh))
    assert torch.equal(bits.pack_signs(torch.tensor(-2.0)), torch.tensor([1], dtype=torch.uint8))


def test_pack_signs_float8_goes_through_float32():
    dt = getattr(torch, "float8_e4m3fn", None)
    if dt is None:
        pytest.skip("no float8 in this torch")
    x = torch.randn(100, generator=gen(3)).to(dt)
    assert torch.equal(bits.pack_signs(x), bits.pack_signs(x.float()))


@pytest.mark.parametrize("n", [1, 7, 9, 1001, 2**18 + 3])
def test_trailing_bits_are_zero(n):
    x = -torch.ones(n)
    for packed in (bits.pack_signs(x), bits.pack_signs_reference(x), bits.pack_bits(x < 0)):
        assert (packed[:-1] == 255).all()
        assert packed[-1].item() == (1 << (n % 8 or 8)) - 1


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", NS)
def test_unpack_signs_matches_reference_and_round_trips(dtype, n):
    x = torch.randn(n, generator=gen(n + 11))
    packed = bits.pack_signs(x)
    fast = bits.unpack_signs(packed, n, 0.37, dtype)
    ref = bits.unpack_signs_reference(packed, n, 0.37, dtype)
    assert fast.dtype == dtype and fast.shape == (n,)
    assert torch.equal(as_int_bits(fast), as_int_bits(ref))
    s = torch.tensor(0.37, dtype=dtype)
    assert torch.equal(fast, torch.where(x < 0, -s, s))
    assert torch.equal(bits.pack_signs(fast), packed)


def test_unpack_signs_scale_details():
    packed = bits.pack_signs(torch.tensor([1.0, -1.0, 2.0, -3.0]))
    for fn in (bits.unpack_signs, bits.unpack_signs_reference):
        assert fn(packed, 4).tolist() == [1.0, -1.0, 1.0, -1.0]
        assert fn(packed, 4).dtype == torch.float32
        assert fn(packed, 4, 2).tolist() == [2.0, -2.0, 2.0, -2.0]
        assert fn(packed, 4, -0.5).tolist() == [-0.5, 0.5, -0.5, 0.5]
        assert fn(packed, 4, np.float64(0.25)).tolist() == [0.25, -0.25, 0.25, -0.25]
        assert fn(packed, 4, torch.tensor(3.0)).tolist() == [3.0, -3.0, 3.0, -3.0]
        zero = fn(packed, 4, 0.0)
        assert zero.tolist() == [0.0, 0.0, 0.0, 0.0]
        assert torch.signbit(zero).tolist() == [False, True, False, True]
        # rounding to the output dtype, and overflow to inf, agree between the paths
        assert fn(packed, 4, 1e300)[:2].tolist() == [float("inf"), -float("inf")]
        assert fn(packed, 4, 0.1)[0].item() == torch.tensor(0.1).item()
        assert fn(packed, 4, 1 + 2**-12, torch.bfloat16)[0].item() == 1.0


def test_unpack_signs_into_out():
    x = torch.randn(1000, generator=gen(5))
    packed = bits.pack_signs(x)
    out = torch.full((10, 100), 7.0, dtype=torch.float64)
    res = bits.unpack_signs(packed, 1000, 0.5, out=out)
    assert res is out and res.dtype == torch.float64  # dtype taken from out
    assert torch.equal(out.reshape(-1), torch.where(x < 0, -0.5, 0.5).double())
    half = torch.empty(1000, dtype=torch.bfloat16)
    assert bits.unpack_signs(packed, 1000, 0.5, torch.bfloat16, out=half) is half
    assert torch.equal(half, bits.unpack_signs_reference(packed, 1000, 0.5, torch.bfloat16))
    big = torch.zeros(2**18 + 1)
    xb = torch.randn(2**18 + 1, generator=gen(6))
    bits.unpack_signs(bits.pack_signs(xb), 2**18 + 1, out=big)
    assert torch.equal(big, torch.where(xb < 0, -1.0, 1.0))
    with pytest.raises(TypeError, match="dtype"):
        bits.unpack_signs(packed, 1000, out=torch.empty(1000), dtype=torch.float64)
    with pytest.raises(ValueError, match="1000 elements"):
        bits.unpack_signs(packed, 1000, out=torch.empty(999))
    with pytest.raises(ValueError, match="contiguous"):
        bits.unpack_signs(packed, 1000, out=torch.empty(1000, 2)[:, 0])
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        bits.unpack_signs(packed, 1000, out=np.empty(1000, np.float32))


def test_payload_slices():
    # unpacking from a view into a bigger payload (storage offset, and strided)
    x = torch.randn(77, generator=gen(9))
    packed = bits.pack_signs(x)
    payload = torch.cat([torch.tensor([1, 2, 3], dtype=torch.uint8), packed, packed])
    view = payload[3 : 3 + packed.numel()]
    assert torch.equal(bits.unpack_signs(view, 77), torch.where(x < 0, -1.0, 1.0))
    strided = torch.stack([packed, packed], dim=1)[:, 0]
    assert not strided.is_contiguous()
    assert torch.equal(bits.unpack_bits(strided, 77), x < 0)


# --------------------------------------------------------------------------------------------
# bits


@pytest.mark.parametrize("n", NS)
def test_pack_bits_bool(n):
    b = torch.rand(n, generator=gen(n + 3)) < 0.3
    fast = bits.pack_bits(b)
    assert torch.equal(fast, bits.pack_bits_reference(b))
    np.testing.assert_array_equal(fast.numpy(), np.packbits(b.numpy(), bitorder="little"))
    assert torch.equal(bits.unpack_bits(fast, n), b)
    assert torch.equal(bits.unpack_bits_reference(fast, n), b)
    assert bits.unpack_bits(fast, n).dtype == torch.bool


@pytest.mark.parametrize("dtype", INTS + UNSIGNED_WIDE)
def test_pack_bits_int_dtypes(dtype):
    b = torch.rand(1003, generator=gen(4)) < 0.5
    ints = b.to(torch.int64).to(dtype)
    assert torch.equal(bits.pack_bits(ints), bits.pack_bits(b))
    assert torch.equal(bits.pack_bits_reference(ints), bits.pack_bits(b))


def test_pack_bits_rejects_non_binary():
    for bad in ([0, 1, 2], [0, -1, 1]):
        for fn in (bits.pack_bits, bits.pack_bits_reference):
            with pytest.raises(ValueError, match="only 0 and 1"):
                fn(torch.tensor(bad))
    with pytest.raises(TypeError, match="pack_signs"):
        bits.pack_bits(torch.tensor([0.0, 1.0]))


# --------------------------------------------------------------------------------------------
# uints


def extreme_values(n: int, width: int, seed: int) -> torch.Tensor:
    top = (1 << width) - 1
    v = torch.randint(0, top + 1, (n,), generator=gen(seed))
    if n:
        v[0] = top
        v[n // 2] = 0
        v[-1] = top
    return v


@pytest.mark.parametrize("width", range(1, 33))
def test_uints_all_widths(width):
    for n in [0, 1, 7, 8, 9, 1000]:
        v = extreme_values(n, width, seed=width * 1000 + n)
        fast = bits.pack_uints(v, width)
        assert fast.dtype == torch.uint8 and fast.numel() == bits.packed_size(n, width)
        assert torch.equal(fast, bits.pack_uints_reference(v, width))
        np.testing.assert_array_equal(fast.numpy(), oracle_uints(v, width))
        back = bits.unpack_uints(fast, n, width)
        assert back.dtype == torch.int64 and torch.equal(back, v)
        assert torch.equal(bits.unpack_uints_reference(fast, n, width), v)


@pytest.mark.parametrize("width", [1, 13, 24, 32])
def test_uints_large_parallel_path(width):
    n = 2**20 + 3
    assert n >= nb.PARALLEL_MIN
    v = extreme_values(n, width, seed=width)
    fast = bits.pack_uints(v, width)
    assert torch.equal(fast, bits.pack_uints_reference(v, width))
    assert torch.equal(bits.unpack_uints(fast, n, width), v)
    assert torch.equal(bits.unpack_uints_reference(fast, n, width), v)


@pytest.mark.parametrize("dtype", INTS + UNSIGNED_WIDE)
def test_uints_input_dtypes(dtype):
    width = 7
    v = torch.randint(0, 1 << width, (333,), generator=gen(8))
    want = bits.pack_uints(v, width)
    assert torch.equal(bits.pack_uints(v.to(dtype), width), want)
    assert torch.equal(bits.pack_uints_reference(v.to(dtype), width), want)


def test_width_one_is_the_bit_format():
    b = torch.rand(1001, generator=gen(12)) < 0.5
    assert torch.equal(bits.pack_uints(b.to(torch.uint8), 1), bits.pack_bits(b))


def test_uints_known_bytes():
    # value i occupies stream bits [i*w, (i+1)*w), LSB first
    assert bits.pack_uints(torch.tensor([1, 2, 3]), 3).tolist() == [0b11010001, 0b0]
    assert bits.pack_uints(torch.tensor([0xABCDEF]), 24).tolist() == [0xEF, 0xCD, 0xAB]
    assert bits.pack_uints(torch.tensor([0xF, 0x1]), 4).tolist() == [0x1F]


# --------------------------------------------------------------------------------------------
# hypothesis


@HYP
@given(
    st.lists(
        st.floats(allow_nan=True, allow_infinity=True, width=32),
        max_size=300,
    )
)
def test_signs_hypothesis(values):
    x = torch.tensor(values, dtype=torch.float32)
    fast = bits.pack_signs(x)
    assert torch.equal(fast, bits.pack_signs_reference(x))
    np.testing.assert_array_equal(fast.numpy(), oracle_signs(x))
    n = len(values)
    assert torch.equal(bits.unpack_bits(fast, n), x < 0)


@HYP
@given(
    st.integers(1, 32).flatmap(
        lambda w: st.tuples(st.just(w), st.lists(st.integers(0, 2**w - 1), max_size=200))
    )
)
def test_uints_hypothesis(case):
    width, values = case
    v = torch.tensor(values, dtype=torch.int64)
    fast = bits.pack_uints(v, width)
    assert torch.equal(fast, bits.pack_uints_reference(v, width))
    np.testing.assert_array_equal(fast.numpy(), oracle_uints(v, width))
    assert torch.equal(bits.unpack_uints(fast, len(values), width), v)


@HYP
@given(st.integers(0, 200), st.integers(1, 32), st.binary(min_size=0, max_size=1000))
def test_unpack_uints_of_arbitrary_bytes(n, width, raw):
    # any byte string of the right length decodes identically on both paths (trailing bits
    # are ignored, not checked)
    nbytes = bits.packed_size(n, width)
    raw = (raw * (nbytes // max(len(raw), 1) + 1))[:nbytes] if raw else bytes(nbytes)
    data = (
        torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if nbytes
        else torch.empty(0, dtype=torch.uint8)
    )
    fast = bits.unpack_uints(data, n, width)
    assert torch.equal(fast, bits.unpack_uints_reference(data, n, width))
    assert ((fast >= 0) & (fast < 2**width)).all()


# --------------------------------------------------------------------------------------------
# dispatch and errors


def test_cpu_uses_the_fast_path(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("reference called")

    for name in ["pack_signs", "unpack_signs", "pack_bits", "pack_uints", "unpack_uints"]:
        monkeypatch.setattr(bits, f"{name}_reference", boom)
    monkeypatch.setattr(bits, "_unpack_bool_ref", boom)
    x = torch.randn(100)
    p = bits.pack_signs(x)
    bits.unpack_signs(p, 100)
    bits.unpack_bits(bits.pack_bits(x < 0), 100)
    bits.unpack_uints(bits.pack_uints(torch.arange(100), 7), 100, 7)


def test_concurrent_calls_from_threads():
    # parallel kernels called from several Python threads at once (the lock keeps numba's
    # workqueue threading layer, where that would abort, safe)
    from concurrent.futures import ThreadPoolExecutor

    n = nb.PARALLEL_MIN + 9
    x = torch.randn(n, generator=gen(30))
    want = bits.pack_signs(x)

    def work(_):
        p = bits.pack_signs(x)
        return torch.equal(p, want) and torch.equal(bits.unpack_bits(p, n), x < 0)

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(16)))


def test_non_cpu_dispatch_uses_the_reference(monkeypatch):
    # what a CUDA tensor goes through, exercised on CPU: results equal the fast path's
    x = randn_with_specials(1003, seed=2)
    v = extreme_values(1003, 19, seed=2)
    fast = {
        "signs": bits.pack_signs(x),
        "unsigns": bits.unpack_signs(bits.pack_signs(x), 1003, 0.25),
        "bits": bits.unpack_bits(bits.pack_bits(x < 0), 1003),
        "uints": bits.pack_uints(v, 19),
        "ununints": bits.unpack_uints(bits.pack_uints(v, 19), 1003, 19),
    }
    monkeypatch.setattr(bits, "_fast", lambda t: False)
    monkeypatch.setattr(bits, "_nb", lambda: pytest.fail("numba path used"))
    assert torch.equal(bits.pack_signs(x), fast["signs"])
    assert torch.equal(bits.unpack_signs(fast["signs"], 1003, 0.25), fast["unsigns"])
    out = torch.empty(1003)
    assert bits.unpack_signs(fast["signs"], 1003, 0.25, out=out) is out
    assert torch.equal(out, fast["unsigns"])
    assert torch.equal(bits.unpack_bits(bits.pack_bits(x < 0), 1003), fast["bits"])
    assert torch.equal(bits.pack_uints(v, 19), fast["uints"])
    assert torch.equal(bits.unpack_uints(fast["uints"], 1003, 19), fast["ununints"])


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: bits.pack_signs(torch.arange(3)), TypeError, "floating-point or bool"),
        (lambda: bits.pack_signs(torch.zeros(3, dtype=torch.complex64)), TypeError, "complex64"),
        (lambda: bits.pack_signs([1.0, -1.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: bits.unpack_signs(torch.zeros(2, dtype=torch.uint8), 17), ValueError, "exactly 3"),
        (lambda: bits.unpack_signs(torch.zeros(3, dtype=torch.uint8), 8), ValueError, "3 bytes"),
        (lambda: bits.unpack_signs(torch.zeros(1, dtype=torch.int8), 8), TypeError, "uint8"),
        (lambda: bits.unpack_signs(torch.zeros(1, 1, dtype=torch.uint8), 8), ValueError, "1-D"),
        (lambda: bits.unpack_signs(torch.zeros(1, dtype=torch.uint8), -1), ValueError, "n must"),
        (lambda: bits.unpack_signs(torch.zeros(1, dtype=torch.uint8), 8.0), TypeError, "n must"),
        (lambda: bits.unpack_signs(torch.zeros(1, dtype=torch.uint8), 8, "2"), TypeError, "scale"),
        (
            lambda: bits.unpack_signs(torch.zeros(1, dtype=torch.uint8), 8, float("nan")),
            ValueError,
            "finite",
        ),
        (
            lambda: bits.unpack_signs(torch.zeros(1, dtype=torch.uint8), 8, 1.0, torch.int32),
            TypeError,
            "dtype must be one of",
        ),
        (lambda: bits.unpack_bits(torch.zeros(2, dtype=torch.uint8), 7), ValueError, "exactly 1"),
        (lambda: bits.unpack_bits(b"\x00", 7), TypeError, "data must be a torch.Tensor"),
        (lambda: bits.pack_uints(torch.tensor([8]), 3), ValueError, "[0, 2**3)"),
        (lambda: bits.pack_uints(torch.tensor([1, -1]), 3), ValueError, "-1 at index 1"),
        (lambda: bits.pack_uints(torch.tensor([2**32]), 32), ValueError, "4294967296"),
        (
            lambda: bits.pack_uints(torch.tensor([2**64 - 1], dtype=torch.uint64), 32),
            ValueError,
            str(2**64 - 1),
        ),
        (lambda: bits.pack_uints(torch.tensor([1]), 0), ValueError, "width must be in [1, 32]"),
        (lambda: bits.pack_uints(torch.tensor([1]), 33), ValueError, "width must be in [1, 32]"),
        (lambda: bits.pack_uints(torch.tensor([1]), 2.0), TypeError, "width must be an int"),
        (lambda: bits.pack_uints(torch.tensor([1.0]), 4), TypeError, "integer tensor"),
        (lambda: bits.pack_uints(torch.tensor([True]), 1), TypeError, "integer tensor"),
        (lambda: bits.pack_uints(torch.ones(2, 2, dtype=torch.int64), 4), ValueError, "1-D"),
        (
            lambda: bits.unpack_uints(torch.zeros(3, dtype=torch.uint8), 2, 24),
            ValueError,
            "exactly 6",
        ),
        (lambda: bits.unpack_uints(torch.zeros(0, dtype=torch.uint8), 0, 40), ValueError, "width"),
    ],
)
def test_errors(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    assert words in str(info.value)


def test_references_validate_too():
    with pytest.raises(ValueError, match=r"\[0, 2\*\*3\)"):
        bits.pack_uints_reference(torch.tensor([9]), 3)
    with pytest.raises(ValueError, match="exactly 2"):
        bits.unpack_uints_reference(torch.zeros(1, dtype=torch.uint8), 2, 5)
    with pytest.raises(ValueError, match="exactly 1"):
        bits.unpack_signs_reference(torch.zeros(2, dtype=torch.uint8), 3)
    with pytest.raises(TypeError, match="floating-point or bool"):
        bits.pack_signs_reference(torch.arange(3))


# --------------------------------------------------------------------------------------------
# CUDA (reference path on the GPU must equal the CPU fast path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    dev = torch.device("cuda")
    n = 2**16 + 5
    x = randn_with_specials(n, seed=21)
    packed = bits.pack_signs(x)
    packed_cuda = bits.pack_signs(x.to(dev))
    assert packed_cuda.device.type == "cuda"
    assert torch.equal(packed_cuda.cpu(), packed)
    for dtype in FLOATS:
        got = bits.unpack_signs(packed.to(dev), n, 0.3, dtype)
        assert got.device.type == "cuda"
        assert torch.equal(
            as_int_bits(got.cpu()), as_int_bits(bits.unpack_signs(packed, n, 0.3, dtype))
        )
    b = x < 0
    assert torch.equal(bits.pack_bits(b.to(dev)).cpu(), bits.pack_bits(b))
    assert torch.equal(bits.unpack_bits(packed.to(dev), n).cpu(), b)
    out = torch.empty(n, device=dev)
    assert bits.unpack_signs(packed.to(dev), n, out=out) is out
    for width in (1, 5, 17, 24, 32):
        v = extreme_values(n, width, seed=width)
        p = bits.pack_uints(v, width)
        assert torch.equal(bits.pack_uints(v.to(dev), width).cpu(), p)
        assert torch.equal(bits.unpack_uints(p.to(dev), n, width).cpu(), v)


@pytest.mark.parametrize("width", [1, 7, 24, 31])
def test_unpack_uints_to_int32(width):
    g = torch.Generator().manual_seed(width)
    v = torch.randint(0, 2**width, (5000,), generator=g, dtype=torch.int64)
    data = bits.pack_uints(v, width)
    out = bits.unpack_uints(data, v.numel(), width, torch.int32)
    assert out.dtype == torch.int32 and torch.equal(out.to(torch.int64), v)
    with pytest.raises(ValueError, match="cannot hold"):
        bits.unpack_uints(bits.pack_uints(v[:3], 32), 3, 32, torch.int32)
