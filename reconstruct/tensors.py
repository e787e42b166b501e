"""The zero and mask helpers both commands use: zeroing a weight outside its mask, counting its zeros,
and making a weight's zeros its mask again after a correction was merged.

Masks are boolean with True = weight kept (the convention of MaskLoRA's M). Floating-point weights
are zeroed and counted through their bits, seen as integers of the same width: faster than the
float operations, and exact about +0.0 and −0.0.
"""
from __future__ import annotations

import torch

ROW_CHUNK_ELEMENTS = 2**18              # scores are computed for about this many weights at a time
ACCELERATOR_ROW_CHUNK_ELEMENTS = 2**24  # on an accelerator (device memory is not the host's limit)

# Integer types of each element size, to zero and count floating-point weights through their bits.
_SAME_WIDTH_INTEGER = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def row_chunks(weight: torch.Tensor) -> list[slice]:
    """Slices of whole rows of about ROW_CHUNK_ELEMENTS weights each (more on an accelerator).
    Per-row selections (Wanda, N:M) are made a chunk at a time, so their fp32 scores and selection
    scratch, several times the weight's own size if made at once, stay a few MB on the CPU (rows are
    independent, so the chunking never changes a mask)."""
    chunk = ROW_CHUNK_ELEMENTS if weight.device.type == "cpu" else ACCELERATOR_ROW_CHUNK_ELEMENTS
    step = max(1, chunk // max(1, weight.shape[1]))
    return [slice(start, start + step) for start in range(0, weight.shape[0], step)]


def keep_only(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero `weight` where `keep` is False, in place: the same bytes as `masked_fill_(~keep, 0)`.

    The weight's bits, seen as integers, are multiplied by the bool mask: 0 is +0.0, and a kept
    weight is untouched bit for bit (NaN included). On the CPU this was about 40 times faster than
    `masked_fill_` on bf16 weights (0.024 against 0.9 ms per 262 k weights, one thread), which has
    no fast path for that dtype."""
    integer = _SAME_WIDTH_INTEGER.get(weight.element_size()) if weight.is_floating_point() else None
    if integer is None:
        return weight.masked_fill_(~keep, 0)
    weight.view(integer).mul_(keep)
    return weight


def zero_count(weight: torch.Tensor) -> int:
    """How many entries of a matrix are zero (+0.0 or −0.0), counted on the bits: `count_nonzero`
    of bf16 or fp32 values is several times slower than of integers of the same width. Doubling the
    bit pattern (wrapping) drops the sign bit, so both zeros become the integer 0 and nothing else
    does. A chunk of rows at a time: the doubled bits are a temporary of the chunk's size, not of the
    weight's (host memory is the limit on the CPU)."""
    if not weight.is_floating_point():
        return weight.numel() - int(weight.count_nonzero())
    bits = weight.view(_SAME_WIDTH_INTEGER[weight.element_size()])
    nonzero = sum(int((bits[rows] + bits[rows]).count_nonzero()) for rows in row_chunks(weight))
    return weight.numel() - nonzero


def smallest_subnormal(dtype: torch.dtype) -> float:
    """The dtype's smallest positive number: the subnormal whose bits are the integer 1 (5.96e-8 in
    fp16, 9.2e-41 in bf16, 1.4e-45 in fp32). `torch.finfo` gives the smallest normal only."""
    return float(torch.ones((), dtype=_SAME_WIDTH_INTEGER[torch.finfo(dtype).bits // 8]).view(dtype))


def restore_exact_zeros_(weight: torch.Tensor, keep: torch.Tensor) -> int:
    """Make `weight`'s zero set exactly `keep`'s complement, in place, with +0.0 (never −0.0) at
    pruned entries: what a merged correction is written as.

    A kept weight that a correction moved to exactly zero (its storage dtype rounds the sum to 0) is
    set to the dtype's smallest subnormal, of the sign the sum had, so that the zero set stays the
    mask while the weight moves as little as the dtype allows (the smallest normal, 6.1e-5 in fp16,
    is a thousand times further). Rounding to nearest keeps the sign (a small negative sum becomes
    −0.0), so the zero's own sign bit is the sign of the value before rounding. Returns how many."""
    with torch.no_grad():
        keep_only(weight, keep)
        lost = keep & (weight == 0)
        count = int(lost.sum())
        if count:  # rare; the where() below is not run for nothing
            smallest = smallest_subnormal(weight.dtype)
            signed = torch.where(torch.signbit(weight), -smallest, smallest).to(weight.dtype)
            weight.copy_(torch.where(lost, signed, weight))
    return count
