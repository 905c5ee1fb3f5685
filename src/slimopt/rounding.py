"""Counter-based stochastic rounding of float32 values to bf16 (spec: ``docs/algorithms.md``,
"Lean modes", "Where the random bits come from").

The random integer ``r`` in [0, 2^16) that rounds element ``i`` of a parameter at its rounded write
number ``step`` is a pure function of ``(seed, step, i)``, with ``i`` the element's index in the
whole, unsharded tensor in row-major order: Philox4x32-10 (Salmon et al. 2011, the generator of
Triton's ``tl.philox`` and of CUDA's torch RNG) with key ``(seed mod 2^32, seed div 2^32)`` and
counter ``(j mod 2^32, j div 2^32, step mod 2^32, 0)``, ``j = i div 8``. One call gives 128 bits
for eight consecutive elements; element ``i`` takes the 16-bit half ``i mod 2`` (low half first) of
output word ``(i mod 8) div 2``. So the bits do not depend on how a tensor is split (shards, row
blocks), on the order in which tensors are rounded, on the device or on the tier:

* :func:`philox4x32_10` and :func:`rounding_bits` here are the readable torch reference;
* the native CPU loop (``slimopt/kernels/native/slimopt_cpu.c``, ``sr_round_bf16``) and the
  Triton kernel (``slimopt.kernels.triton_ops.sr_round_bf16``, built on ``tl.philox``) compute the
  same bits, tested against each other and against Random123's known-answer vectors.

The rounding itself: add ``r`` to the float32 bit pattern of a finite ``x`` and clear the low 16
bits, so ``E[round(x)] = x``. Infinities stay infinite; a NaN stays a (quiet) NaN.

>>> import torch
>>> x = torch.full((8,), 1.0 + 2**-9)  # a quarter of the way from 1.0 to the next bf16 value
>>> y = round_to_bf16(x, seed=7, step=1)
>>> sorted(set(y.float().tolist())) <= [1.0, 1.0 + 2**-7]
True
>>> torch.equal(y, round_to_bf16(x, seed=7, step=1))  # a pure function of (seed, step, index)
True
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "SCHEME",
    "SHARD_OFFSET_KEY",
    "Rounding",
    "kernel_rounding",
    "next_rounding",
    "philox4x32_10",
    "round_to_bf16",
    "rounding_bits",
    "stochastic_round_",
]

# The version of the rounding bits kept in each bf16 parameter's state as ``sr_scheme``: 1 is
# Philox4x32-10 keyed as above. A state saved without it used an earlier generator.
SCHEME = 1


class Rounding(NamedTuple):
    """How a kernel writes a bf16 parameter: with the counter-based bits of ``(seed, step)`` for
    element indices ``offset + k`` of the whole tensor, or to nearest when ``stochastic`` is
    False."""

    seed: int
    step: int
    stochastic: bool = True
    offset: int = 0

    def args(self, start: int) -> tuple[int, int, int, int]:
        """A native loop's trailing arguments (seed, step, first index, stochastic) for a block
        starting at element ``start`` of the tensor the kernel was handed."""
        mask = 2**64 - 1
        return (self.seed & mask, self.step & mask, self.offset + start, int(self.stochastic))


def next_rounding(state: dict[str, Any], stochastic: bool = True, offset: int = 0) -> Rounding:
    """Count one rounded write in a bf16 parameter's ``state`` (``sr_step``) and return how that
    write rounds (its ``sr_seed``, the new count).

    >>> state = {"sr_seed": 3, "sr_step": 0}
    >>> next_rounding(state), state["sr_step"]
    (Rounding(seed=3, step=1, stochastic=True, offset=0), 1)
    """
    state["sr_step"] = int(state["sr_step"]) + 1
    return Rounding(int(state["sr_seed"]), state["sr_step"], stochastic, offset)


# a local shard's first element index in the whole tensor, kept in its local state for one step
SHARD_OFFSET_KEY = "sr_offset"


def kernel_rounding(p: Tensor, state: dict[str, Any], stochastic: bool) -> Rounding | None:
    """How a kernel writes ``p``: for a pure-bf16 parameter, the next rounded write of its
    state (:func:`next_rounding`), at the global offset a local shard's state carries under
    :data:`SHARD_OFFSET_KEY` (0 for a whole tensor); None for any other dtype.

    >>> kernel_rounding(torch.zeros(2, dtype=torch.bfloat16), {"sr_seed": 5, "sr_step": 2}, True)
    Rounding(seed=5, step=3, stochastic=True, offset=0)
    """
    if p.dtype != torch.bfloat16:
        return None
    return next_rounding(state, stochastic, int(state.get(SHARD_OFFSET_KEY, 0)))


_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_MASK32 = 0xFFFFFFFF
# elements whose bits the torch reference draws at once (int64 working set ~ 10 x this x 8 bytes / 8)
_REFERENCE_CHUNK = 1 << 20


def _mulhilo(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit halves of ``a * m`` for ``a`` in [0, 2^32) held in int64, without an
    int64 overflow: ``m`` is split into 16-bit halves so that every partial product is < 2^49."""
    m_hi, m_lo = m >> 16, m & 0xFFFF
    mid = a * m_hi  # < 2^48
    low_part = a * m_lo  # < 2^48
    lo_sum = ((mid & 0xFFFF) << 16) + low_part  # < 2^49
    hi = ((mid >> 16) + (lo_sum >> 32)) & _MASK32
    return hi, lo_sum & _MASK32


def philox4x32_10(
    c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32 with 10 rounds on int64 tensors holding uint32 values (the torch reference).

    >>> z = torch.zeros(1, dtype=torch.int64)
    >>> [hex(int(w)) for w in philox4x32_10(z, z, z, z, 0, 0)]  # Random123's first vector
    ['0x6627e8d5', '0xe169c58d', '0xbc57ac4c', '0x9b00dbd8']
    """
    k0, k1 = k0 & _MASK32, k1 & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def rounding_bits(
    seed: int, step: int, offset: int, n: int, device: torch.device | str = "cpu"
) -> Tensor:
    """The 16-bit rounding integers (int32, in [0, 2^16)) of elements ``offset .. offset+n-1`` of a
    tensor with this ``seed`` at rounded write ``step`` (torch reference).

    >>> bits = rounding_bits(seed=5, step=2, offset=0, n=16)
    >>> torch.equal(bits[3:], rounding_bits(seed=5, step=2, offset=3, n=13))  # any split
    True
    """
    seed, step, offset, n = int(seed), int(step), int(offset), int(n)
    if seed < 0 or offset < 0 or n < 0:
        raise ValueError(f"seed, offset and n must be >= 0, got {seed}, {offset}, {n}")
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    out = torch.empty(n, dtype=torch.int32, device=device)
    for start in range(offset, offset + n, _REFERENCE_CHUNK):
        stop = min(start + _REFERENCE_CHUNK, offset + n)
        j0, j1 = start >> 3, (stop - 1) >> 3
        j = torch.arange(j0, j1 + 1, dtype=torch.int64, device=device)
        zero = torch.zeros_like(j)
        words = philox4x32_10(j & _MASK32, j >> 32, zero + (step & _MASK32), zero, k0, k1)
        # element 8j + 2w + h takes the half h of word w
        halves = torch.stack(
            [torch.stack([w & 0xFFFF, w >> 16], dim=1) for w in words], dim=1
        ).reshape(-1)
        first = start - 8 * j0
        out[start - offset : stop - offset] = halves[first : first + stop - start].to(torch.int32)
    return out


def _round_reference(dst: Tensor, src: Tensor, seed: int, step: int, offset: int) -> None:
    flat = src.reshape(-1)
    x = flat.view(torch.int32).to(torch.int64) & _MASK32
    finite = torch.isfinite(flat)
    r = rounding_bits(seed, step, offset, flat.numel(), flat.device).to(torch.int64)
    high = ((x + r * finite) >> 16) & 0xFFFF
    high = torch.where(torch.isnan(flat), high | 0x40, high)  # a NaN stays a quiet NaN
    bits16 = torch.where(high >= 0x8000, high - 0x10000, high).to(torch.int16)
    dst.copy_(bits16.view(torch.bfloat16).view(dst.shape))


def stochastic_round_(dst: Tensor, src: Tensor, seed: int, step: int, offset: int = 0) -> Tensor:
    """Write ``src`` (float32) into ``dst`` (bf16), rounded stochastically with the bits of
    ``(seed, step)`` for the elements ``offset, offset+1, ...`` of a tensor (``offset`` is the
    global index of ``src``'s first element: a row block's or a shard's start).

    A value between two bf16 neighbours goes to the upper one (in magnitude) with probability
    equal to its distance from the lower one, so ``E[dst] = src``. Uses the native CPU loop where
    it runs (contiguous CPU tensors), else the torch reference: the same bits either way.

    >>> x = torch.full((100000,), 1.0 + 2**-9)
    >>> y = torch.empty_like(x, dtype=torch.bfloat16)
    >>> _ = stochastic_round_(y, x, seed=0, step=1)
    >>> abs(y.double().mean().item() - (1.0 + 2**-9)) < 1e-4
    True
    """
    if not isinstance(src, Tensor) or not isinstance(dst, Tensor):
        raise TypeError("stochastic_round_ takes tensors")
    if src.dtype != torch.float32 or dst.dtype != torch.bfloat16:
        raise TypeError(
            f"stochastic_round_ writes float32 into bfloat16, got {src.dtype} into {dst.dtype}"
        )
    if src.shape != dst.shape:
        raise ValueError(f"shape mismatch: {tuple(src.shape)} into {tuple(dst.shape)}")
    if isinstance(seed, Tensor) or isinstance(step, Tensor):
        raise TypeError("stochastic_round_ takes seed and step as Python ints")
    if src.numel() == 0:
        return dst
    if src.device.type == "cpu" and src.is_contiguous() and dst.is_contiguous():
        from slimopt.kernels import cpu

        if cpu.sr_round_bf16(dst, src, int(seed), int(step), int(offset)):
            return dst
    if src.device.type == "cuda" and src.is_contiguous() and dst.is_contiguous():
        from slimopt.kernels import triton_available

        if triton_available():
            from slimopt.kernels import triton_ops

            triton_ops.sr_round_bf16(dst, src, int(seed), int(step), int(offset))
            return dst
    _round_reference(dst, src, int(seed), int(step), int(offset))
    return dst


def round_to_bf16(x: Tensor, seed: int, step: int = 0, offset: int = 0) -> Tensor:
    """``x`` (float32) rounded stochastically to a new bf16 tensor with the bits of
    ``(seed, step)`` (those the optimizer uses for a parameter with that ``sr_seed`` at its
    rounded write ``step``).

    >>> round_to_bf16(torch.tensor([1.0, 1.0 + 2**-9, -3.0]), seed=1).dtype
    torch.bfloat16
    """
    out = torch.empty_like(x, dtype=torch.bfloat16)
    return stochastic_round_(out, x.detach().float().contiguous(), seed, step, offset)
