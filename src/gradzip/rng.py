"""Counter-based randomness shared by sender and receiver.

Every random quantity in gradzip (rotation signs, dither, rand-k indices) is a pure
function of integers that travel in the payload header: ``(seed, step, worker, stream)``.
Nothing here touches ``torch``'s or numpy's global generators, and the streams are
bit-for-bit identical on CPU and CUDA, in the pure-torch path and in the numba kernels.

The generator (documented so other implementations can match it):

1. ``key = derive_key(seed, step, worker, stream)``: a 64-bit key, built by chaining the
   SplitMix64 finalizer over the four integers.
2. ``hash32(i, key)`` for a counter ``0 <= i < 2**32``: with ``k0, k1`` the low and high
   32-bit halves of the key, ``lowbias32(lowbias32((i + k0) mod 2**32) ^ k1)``, where
   ``lowbias32`` is C. Wellons' 32-bit integer hash (two multiply-xorshift rounds).
3. ``rademacher(key, n)[i]`` is ``-1`` if bit ``i % 32`` of ``hash32(i // 32, key)`` is set,
   else ``+1``: one hash gives 32 signs.
4. ``symmetric_uniform(key, n)[i] = (2 * (hash32(i, key) >> 9) + 1) * 2**-23 - 1``: a
   float32 on an exact grid in (-1, 1), symmetric about 0, so its mean is exactly 0.
   ``uniform = (symmetric_uniform + 1) / 2`` lies in (0, 1) with mean exactly 1/2.
5. ``dither16(key, n)``: the cheaper dither of the one-bit quantizers, four values per
   64-bit word. The words are SplitMix64's: ``z_j = mix64((key + j * GAMMA) mod 2**64)``
   with ``GAMMA = 0x9E3779B97F4A7C15`` and ``mix64`` its output function (two
   multiply-xorshift rounds, the finalizer of step 1). Elements go in groups of 32; group
   ``g`` takes ``z_{8g} .. z_{8g+7}`` as 16 32-bit halves ``w_0 .. w_15`` (low half, then
   high half, of each word in order): element ``32 g + j`` (``j < 16``) gets the low 16
   bits of ``w_j``, element ``32 g + 16 + j`` its high 16 bits, and a 16-bit ``t`` becomes
   ``(2 t + 1) * 2**-16 - 1``: a float32 on an exact grid of spacing ``2**-15`` in
   (-1, 1), symmetric about 0, so its mean is exactly 0. (This layout puts both halves of
   a vector of words on contiguous elements, so the kernels need no shuffles; with 64-bit
   vector multiplies it costs half the hashing of two ``hash32`` values per 32 bits.)
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
MAX_COUNTER = 1 << 32
# SplitMix64: the state's step and the two multipliers of its output function (mix64)
GAMMA = 0x9E3779B97F4A7C15
MIX_M1 = 0xBF58476D1CE4E5B9
MIX_M2 = 0x94D049BB133111EB

# Stream identifiers: one per kind of shared randomness, so that streams never collide.
STREAM_ROTATION = 1
STREAM_DITHER = 2
STREAM_INDICES = 3
STREAM_ROUNDING = 4
#: a rotation shared by every sender of a step (``fosgd:rotation=shared``), keyed by seed and
#: step only (worker 0), so that a server can add the payloads without rotating them back
STREAM_SHARED_ROTATION = 5

# Sub-seeds (fold): a seed per shard of a vector, and per gradient bucket of the DDP hook
SHARD_MIX = GAMMA
BUCKET_MIX = 0xD1B54A32D192ED03

_LB1 = 0x7FEB352D
_LB2 = 0x846CA68B


def _splitmix64(z: int) -> int:
    z = (z + GAMMA) & MASK64
    z = ((z ^ (z >> 30)) * MIX_M1) & MASK64
    z = ((z ^ (z >> 27)) * MIX_M2) & MASK64
    return z ^ (z >> 31)


def fold(seed: int, index: int, mix: int = SHARD_MIX) -> int:
    """The sub-seed ``index`` of ``seed``: ``(seed + index * mix) mod 2**64``. The one
    place seeds are split: the shards of a vector (``SHARD_MIX``; sub-seed 0 is the seed
    itself) and the DDP hook's buckets (``BUCKET_MIX``, indexed by the bucket's first
    parameter + 1). Payload headers carry the folded seed, so a receiver needs none of
    this."""
    return (seed + index * mix) & MASK64


def derive_key(seed: int, step: int = 0, worker: int = 0, stream: int = 0) -> int:
    """A 64-bit key for the stream ``(seed, step, worker, stream)``.

    All four must be integers in ``[0, 2**64)``; anything else is a ``ValueError`` (a
    negative seed would silently alias another one otherwise).
    """
    k = 0
    for name, v in (("seed", seed), ("step", step), ("worker", worker), ("stream", stream)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if not 0 <= v <= MASK64:
            raise ValueError(f"{name} must be in [0, 2**64), got {v}")
        k = _splitmix64(k ^ v)
    return k


def _check(key: int, n: int, per_counter: int = 1) -> None:
    if not 0 <= key <= MASK64:
        raise ValueError(f"key must be a 64-bit unsigned int, got {key}")
    if n < 0 or -(-n // per_counter) > MAX_COUNTER:
        raise ValueError(f"cannot draw {n} values from one stream (at most 2**32 counters)")


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    # int64 holds the uint32 values; products of two 32-bit values wrap modulo 2**64 and
    # the mask keeps the low 32 bits, which is exactly uint32 arithmetic.
    x = x ^ (x >> 16)
    x = (x * _LB1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _LB2) & MASK32
    return x ^ (x >> 16)


def hash32(counters: torch.Tensor, key: int) -> torch.Tensor:
    """``hash32(i, key)`` for an int64 tensor of counters in ``[0, 2**32)`` (reference path)."""
    k0, k1 = key & MASK32, key >> 32
    x = _lowbias32((counters + k0) & MASK32)
    return _lowbias32(x ^ k1)


def _counters(n: int, device) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64, device=device)


def rademacher(key: int, n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``n`` signs in ``{-1, +1}`` (as ``dtype``) from the stream ``key``."""
    _check(key, n, 32)
    h = hash32(_counters(-(-n // 32), device), key)
    bits = (h.unsqueeze(1) >> torch.arange(32, device=h.device)) & 1
    return (1 - 2 * bits.reshape(-1)[:n]).to(dtype)


def symmetric_uniform(key: int, n: int, device=None) -> torch.Tensor:
    """``n`` float32 values on an exact grid in (-1, 1), mean exactly 0 (see module doc)."""
    _check(key, n)
    h = hash32(_counters(n, device), key)
    return ((h >> 9) * 2 + 1).to(torch.float32) * 2.0**-23 - 1.0


def signed64(v: int) -> int:
    """A 64-bit word as the int64 that holds it."""
    return v - (1 << 64) if v >> 63 else v


_M1 = signed64(MIX_M1)
_M2 = signed64(MIX_M2)


def _lshr64(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64-held 64-bit words (``>>`` on int64 is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on an int64 tensor of 64-bit words (products wrap
    modulo 2**64, which is exactly uint64 arithmetic)."""
    z = (z ^ _lshr64(z, 30)) * _M1
    z = (z ^ _lshr64(z, 27)) * _M2
    return z ^ _lshr64(z, 31)


def dither16(key: int, n: int, device=None) -> torch.Tensor:
    """``n`` float32 values on the grid ``(2 t + 1) 2**-16 - 1``, ``t < 2**16`` (module doc, 5).

    Resolution ``2**-15``: a one-bit quantizer dithered with ``lam * dither16`` has its
    probabilities rounded to multiples of ``2**-16``, i.e. a bias of at most ``2**-15 lam``
    per coordinate, far below its standard deviation (of the order of ``lam``).
    """
    _check(key, n, 4)
    groups = -(-n // 32)
    z = mix64(signed64(key) + _counters(8 * groups, device) * signed64(GAMMA))
    w = torch.stack((z & MASK32, _lshr64(z, 32)), dim=1).reshape(groups, 1, 16)
    t = torch.cat((w & 0xFFFF, w >> 16), dim=1).reshape(-1)[:n]
    return (t * 2 + 1).to(torch.float32) * 2.0**-16 - 1.0


def uniform(key: int, n: int, device=None) -> torch.Tensor:
    """``n`` float32 values in (0, 1), mean exactly 1/2."""
    return (symmetric_uniform(key, n, device) + 1.0) * 0.5
