"""The wrapping corrections' linear (corrections/effective.py): the gradients of the plain expression,
nothing saved but the input and the tensors the effective weight is made from, no mask held, and
exact +0.0 zeros after the merge."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import OneLinearUnit
from reconstruct.corrections import CorrectionOptions, make_correction
from reconstruct.corrections.effective import (DenseLowRank, MaskedLowRank, MaskedMaster, ScaledLowRank,
                                               effective_linear)

RECIPES = {"masklora": lambda: MaskedLowRank(2.0), "lora-prune": lambda: DenseLowRank(2.0),
           "scalelora": ScaledLowRank, "full": MaskedMaster}


def plain_expression(kind, x, weight, A, B, master, bias):
    """The effective weight as autograd would see it written out (the code before issue 18; fp32 at
    least, float64 kept for gradcheck)."""
    product = B @ A
    product = product if product.dtype == torch.float64 else product.float()
    if kind == "masklora":
        effective = product.mul_(weight != 0).mul_(2.0).add_(weight)
    elif kind == "lora-prune":
        effective = product.mul_(2.0).add_(weight)
    elif kind == "scalelora":
        effective = product.mul_(weight)
    else:
        effective = master.masked_fill(weight == 0, 0.0)
    return F.linear(x, effective.to(x.dtype), None if bias is None else bias.to(x.dtype))


def pruned_weight(dtype, generator, out_features=24, in_features=20):
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    return weight.mul_(torch.rand(out_features, in_features, generator=generator) > 0.5).to(dtype)


@pytest.mark.parametrize("kind", list(RECIPES))
def test_gradients_pass_gradcheck_in_float64(kind):
    g = torch.Generator().manual_seed(0)
    weight = pruned_weight(torch.float64, g)
    A = torch.randn(3, 20, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(24, 3, generator=g, dtype=torch.float64, requires_grad=True)
    master = (weight + 0.1).requires_grad_(True)
    bias = torch.randn(24, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 20, generator=g, dtype=torch.float64, requires_grad=True)
    recipe = RECIPES[kind]()
    if kind == "full":
        assert torch.autograd.gradcheck(lambda x, m, b: effective_linear(x, b, recipe, m, weight), (x, master, bias))
    else:
        assert torch.autograd.gradcheck(lambda x, A, B, b: effective_linear(x, b, recipe, weight, A, B),
                                        (x, A, B, bias))
    # and the same values and gradients as autograd through the plain expression
    tensors = (master, weight) if kind == "full" else (weight, A, B)
    grads = []
    for run in (lambda: effective_linear(x, bias, recipe, *tensors),
                lambda: plain_expression(kind, x, weight, A, B, master, bias)):
        out = run()
        grads.append([out, *torch.autograd.grad(out.square().sum(), (x, A, B, master, bias), allow_unused=True)])
    for ours, theirs in zip(*grads):
        assert (ours is None) == (theirs is None)
        if ours is not None:
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", list(RECIPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bits_as_the_plain_expression_under_autocast(kind, dtype):
    """Forward and backward repeat autograd's operations, dtypes and order: on the CPU the results are
    bit for bit those of the plain expression (so repaired checkpoints are unchanged)."""
    g = torch.Generator().manual_seed(1)
    weight = pruned_weight(dtype, g, 48, 40)
    bias = torch.randn(48, generator=g).to(dtype)
    results = []
    for which in ("ours", "plain"):
        A = torch.randn(4, 40, generator=torch.Generator().manual_seed(2), requires_grad=True)
        B = torch.randn(48, 4, generator=torch.Generator().manual_seed(3), requires_grad=True)
        master = weight.float().add(0.1).requires_grad_(True)
        x = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(4)).to(dtype).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if which == "ours":
                tensors = (master, weight) if kind == "full" else (weight, A, B)
                out = effective_linear(x, bias, RECIPES[kind](), *tensors)
            else:
                out = plain_expression(kind, x, weight, A, B, master, bias)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype))
        results.append([out.detach(), x.grad, A.grad, B.grad, master.grad])
    for which, ours, theirs in zip(["out", "x", "A", "B", "master"], *results):
        assert (ours is None) == (theirs is None)
        if ours is None:
            continue
        assert ours.dtype == theirs.dtype
        if which == "x" and dtype == torch.bfloat16:  # right_operand's layout: a rare tie rounded the other way
            torch.testing.assert_close(ours, theirs, rtol=2**-7, atol=0)
        else:
            assert torch.equal(ours, theirs), which


@pytest.mark.parametrize("name", ["masklora", "scalelora", "lora-prune", "full"])
def test_only_the_input_and_the_factors_are_saved_for_backward(name):
    """Neither the effective weight nor a mask is kept for the backward pass: what autograd holds is
    the linear's input and the tensors the weight is made from (the frozen weight, held anyway)."""
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(40, 48, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(pruned_weight(torch.bfloat16, g, 48, 40))
    unit = OneLinearUnit(linear)
    attachment = make_correction(name).attach(unit, ["proj"], CorrectionOptions(rank=4), g)
    for parameter in attachment.trainable:
        parameter.requires_grad_(True)
    x = torch.randn(2, 16, 40, dtype=torch.bfloat16)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        unit(x).float().sum().backward()
    allowed = {linear.weight.data_ptr(), *(p.data_ptr() for p in attachment.trainable), x.data_ptr()}
    weight_sized = [t for t in saved if t.numel() == linear.weight.numel()]
    assert all(t.data_ptr() in allowed for t in weight_sized), [(t.dtype, t.shape) for t in weight_sized]
    assert not any(t.dtype == torch.bool for t in saved)
    assert all(p.grad is not None for p in attachment.trainable)


@pytest.mark.parametrize("name", ["masklora", "scalelora", "lora-prune", "full", "masklora+norm"])
def test_no_mask_is_held_after_attach(name):
    linear = nn.Linear(40, 48)
    unit = nn.Sequential(nn.LayerNorm(40), OneLinearUnit(linear))
    make_correction(name).attach(unit, ["1.proj"], CorrectionOptions(rank=4), torch.Generator())
    tensors = list(unit.buffers()) + [value for module in unit.modules() for value in vars(module).values()
                                      if isinstance(value, torch.Tensor)]
    assert not any(t.dtype == torch.bool for t in tensors)


@pytest.mark.parametrize("name", ["masklora", "scalelora", "lora-prune", "full", "masklora+norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pruned_weights_are_exactly_positive_zero_after_merge(name, dtype):
    """Pruned entries are +0.0 after the merge, a −0.0 of the input included, and every kept weight
    stays non-zero, whatever the trained tensors became."""
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(40, 48).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(pruned_weight(dtype, g, 48, 40))
        linear.weight[linear.weight == 0] = -0.0
    keep = linear.weight != 0
    unit = nn.Sequential(nn.LayerNorm(40), OneLinearUnit(linear)).to(dtype)
    attachment = make_correction(name).attach(unit, ["1.proj"], CorrectionOptions(rank=4), g)
    with torch.no_grad():
        for parameter in attachment.trainable:
            parameter.add_(torch.randn(parameter.shape, generator=g))
    attachment.merge()
    weight = unit[1].proj.weight.detach()
    assert type(unit[1].proj) is nn.Linear
    assert torch.equal(weight != 0, keep)
    assert not torch.signbit(weight[~keep]).any()


def test_a_kept_weight_that_is_exactly_zero_counts_as_pruned():
    """The keep-mask is the weight's non-zeros: a weight that pruning kept but that is exactly 0
    (only possible if the dense model had one) is not trained, and stays 0."""
    linear = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        linear.weight.fill_(1.0)
        linear.weight[0, 0] = 0.0
    unit = OneLinearUnit(linear)
    attachment = make_correction("masklora").attach(unit, {"proj": torch.ones(3, 4, dtype=torch.bool)},
                                                    CorrectionOptions(rank=2, alpha=2.0), torch.Generator())
    with torch.no_grad():
        for parameter in attachment.trainable:
            parameter.fill_(1.0)
    attachment.merge()
    assert unit.proj.weight[0, 0] == 0 and (unit.proj.weight.flatten()[1:] == 3.0).all()  # 1 + s·(B·A) = 1 + 1·2
