"""reconstruct.tensors: zeroing a weight outside its mask, counting its zeros, and a mask's zero set
made exact again after a merge."""
from __future__ import annotations

import pytest
import torch

from reconstruct import tensors
from reconstruct.tensors import keep_only, restore_exact_zeros_, smallest_subnormal, zero_count


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_keep_only_writes_the_bytes_of_masked_fill(dtype):
    """Zeroing through the weights' integer bits gives masked_fill_'s bytes: +0.0 where pruned (also
    for negative weights, NaN and inf), every kept value untouched, NaN included."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 32, generator=g).to(dtype)
    weight[0, :4] = torch.tensor([float("nan"), float("-inf"), -0.0, float("inf")]).to(dtype)
    weight[1, :4] = weight[0, :4]
    keep = torch.rand(16, 32, generator=g) > 0.5
    keep[0, :4], keep[1, :4] = False, True
    integer = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[weight.element_size()]
    expected = weight.clone().masked_fill_(~keep, 0)
    result = keep_only(weight.clone(), keep)
    assert torch.equal(result.view(integer), expected.view(integer))
    assert (result[~keep].view(integer) == 0).all()  # +0.0, never -0.0


def test_zero_count_counts_both_zeros_in_row_chunks(monkeypatch):
    """The report's zero count: +0.0 and −0.0, on the bits, a chunk of rows at a time."""
    monkeypatch.setattr(tensors, "ROW_CHUNK_ELEMENTS", 3 * 40)  # chunks of 3 rows, the last one short
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        weight = torch.randn(10, 40, generator=torch.Generator().manual_seed(0)).to(dtype)
        weight[weight.abs() < 0.6] = 0
        weight[0, :5] = -0.0
        assert zero_count(weight) == int((weight == 0).sum()), dtype


@pytest.mark.parametrize("dtype, subnormal", [(torch.float16, 2.0**-24), (torch.bfloat16, 2.0**-133),
                                             (torch.float32, 2.0**-149)])
def test_restore_exact_zeros_makes_the_zero_set_the_mask(dtype, subnormal):
    """After a merge: pruned entries are +0.0 again (a −0.0 or a moved value included), and a kept
    weight that rounded to zero becomes the dtype's smallest subnormal with the sign of the value
    before rounding (which rounding to nearest leaves on the zero), counted."""
    weight = torch.ones(4, 8, dtype=dtype)
    weight[:, :4] = 0
    keep = weight != 0
    assert keep.sum() == 16
    tiny_positive, tiny_negative = torch.tensor([subnormal / 4, -subnormal / 4]).to(dtype)  # round to ±0
    assert torch.signbit(tiny_negative) and tiny_negative == 0 == tiny_positive
    weight[0, 0] = -0.0            # pruned, as −0.0
    weight[1, 1] = 0.5             # pruned, moved by a correction
    weight[2, 5] = tiny_positive   # kept, rounded to +0.0
    weight[3, 6] = tiny_negative   # kept, rounded to −0.0
    assert smallest_subnormal(dtype) == subnormal
    assert restore_exact_zeros_(weight, keep) == 2
    integer = {2: torch.int16, 4: torch.int32}[weight.element_size()]
    assert (weight[~keep].view(integer) == 0).all()
    assert weight[2, 5].item() == subnormal and weight[3, 6].item() == -subnormal
    assert zero_count(weight) == 16
