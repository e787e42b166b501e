"""The linear a wrapping correction computes, y = x·Eᵀ + b, with E its effective weight (MaskLoRA's
W + s·M⊙(BA), ScaleLoRA's W⊙(BA), LoRA-Prune's W + s·BA, masked full fine-tuning's master⊙M), as one
autograd function that saves only its input and the tensors E is made from, and forms E again in its
backward pass.

Why a function of our own: autograd through the plain expression keeps, for every wrapped linear
until the backward pass, E in the compute dtype (the matrix the linear multiplied by), and it needed
a keep-mask M held by the wrapper (1 byte per weight): together half again a bf16 model. Here M is
the frozen weight's non-zeros, `W != 0`, computed where it is used, and one linear's E exists at a
time. The recomputation costs one low-rank product per linear in the backward pass.

Numerics: forward and backward perform the operations autograd performs for the plain expression
(`ba.float().mul_(M).mul_(s).add_(W)`, cast to the input's dtype, `F.linear` under autocast), in the
same dtypes and order, so the gradients are those of the plain expression (tests/test_effective.py
compares them, and a pruned checkpoint of the testbed is byte for byte the one made before). One
exception, on the CPU in half precision: the input's gradient multiplies by E in the layout the CPU
computes fast (`right_operand`), which can round a rare tie the other way.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def keep_mask(weight: torch.Tensor) -> torch.Tensor:
    """M: True where the frozen weight is kept. A pruned weight is exactly zero (+0.0 or −0.0)."""
    return weight != 0


class EffectiveWeight:
    """How one correction forms E from its tensors, and E's gradient back to them. `tensors` are
    what the function saves (the frozen weight and the trainable ones); `low_rank` is the dtype the
    product B·A is computed in (autocast's, else the factors')."""

    def form(self, tensors: tuple, low_rank: torch.dtype | None) -> torch.Tensor:
        raise NotImplementedError

    def gradients(self, grad: torch.Tensor, tensors: tuple, low_rank: torch.dtype | None,
                  needed: tuple[bool, ...]) -> tuple:
        """The gradients of `tensors` from E's gradient `grad` (in E's dtype, and free to be changed
        in place); None where not `needed`."""
        raise NotImplementedError


def _product(B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """B·A in `dtype`, returned in fp32 at least (float64 stays float64, for gradcheck)."""
    product = B.to(dtype) @ A.to(dtype)
    return product.to(torch.promote_types(product.dtype, torch.float32))


def _low_rank_gradients(grad_product: torch.Tensor, A, B, dtype, needed: tuple[bool, bool]):
    """Gradients of A and B from the fp32 gradient of B·A (computed in `dtype`, as autocast did)."""
    grad_product = grad_product.to(dtype)
    grad_A = B.to(dtype).t().mm(grad_product).to(A.dtype) if needed[0] else None
    grad_B = grad_product.mm(A.to(dtype).t()).to(B.dtype) if needed[1] else None
    return grad_A, grad_B


class MaskedLowRank(EffectiveWeight):
    """MaskLoRA: E = W + s·M⊙(BA), formed in fp32 (under autocast B·A is half precision)."""

    def __init__(self, scale: float):
        self.scale = scale

    def form(self, tensors, low_rank):
        weight, A, B = tensors
        return _product(B, A, low_rank).mul_(keep_mask(weight)).mul_(self.scale).add_(weight)

    def gradients(self, grad, tensors, low_rank, needed):
        weight, A, B = tensors
        grad_product = grad.mul_(self.scale).mul_(keep_mask(weight))
        return (None, *_low_rank_gradients(grad_product, A, B, low_rank, needed[1:]))


class DenseLowRank(EffectiveWeight):
    """LoRA-Prune while training: E = W + s·BA, no mask (it is applied only when merging)."""

    def __init__(self, scale: float):
        self.scale = scale

    def form(self, tensors, low_rank):
        weight, A, B = tensors
        return _product(B, A, low_rank).mul_(self.scale).add_(weight)

    def gradients(self, grad, tensors, low_rank, needed):
        weight, A, B = tensors
        return (None, *_low_rank_gradients(grad.mul_(self.scale), A, B, low_rank, needed[1:]))


class ScaledLowRank(EffectiveWeight):
    """ScaleLoRA: E = W⊙(BA); zero wherever W is, so no mask is needed."""

    def form(self, tensors, low_rank):
        weight, A, B = tensors
        return _product(B, A, low_rank).mul_(weight)

    def gradients(self, grad, tensors, low_rank, needed):
        weight, A, B = tensors
        return (None, *_low_rank_gradients(grad.mul_(weight), A, B, low_rank, needed[1:]))


class MaskedMaster(EffectiveWeight):
    """Masked full fine-tuning: E = the fp32 master with the frozen weight's zeros filled with +0.0.
    The mask is the frozen weight's, which never changes while training (the master does): the
    initial zeros."""

    def form(self, tensors, low_rank):
        master, frozen = tensors
        return master.masked_fill(~keep_mask(frozen), 0.0)

    def gradients(self, grad, tensors, low_rank, needed):
        master, frozen = tensors
        return (grad.masked_fill_(~keep_mask(frozen), 0.0) if needed[0] else None, None)


def right_operand(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """E cast to `dtype`, as the right operand of grad·E. On the CPU a half-precision E is laid out
    column-major (a transposed view of its transpose, the layout `F.linear` hands its weight to the
    kernel in): without bf16 instructions (AVX2) oneDNN multiplies by a row-major bf16 matrix about
    40 times slower (22 s against 0.5 s for [256 × 5632]·[5632 × 2048]). Both accumulate in fp32; the
    results differ from autograd's row-major product only in the rounding of rare ties."""
    if weight.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return weight.to(dtype)
    return torch.empty(weight.shape[::-1], dtype=dtype).t().copy_(weight)


class EffectiveLinear(torch.autograd.Function):
    """y = x·Eᵀ + b. Saves x (as the linear computes with it), the bias and `tensors`; not E, not M."""

    @staticmethod
    def forward(ctx, x, bias, recipe: EffectiveWeight, *tensors):
        device = x.device.type
        # Under autocast B·A and the linear run in its dtype (it casts their inputs); those casts
        # are made here, explicitly, so that the backward pass can repeat them exactly.
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        compute = autocast if autocast is not None and x.is_floating_point() else x.dtype
        ctx.recipe, ctx.low_rank, ctx.input_dtype = recipe, autocast, x.dtype
        with torch.autocast(device, enabled=False):
            weight = recipe.form(tensors, autocast or tensors[-1].dtype)
            ctx.weight_dtype = weight.dtype
            weight = weight.to(x.dtype).to(compute)
            x = x.to(compute)
            out = F.linear(x, weight, None if bias is None else bias.to(x.dtype).to(compute))
        ctx.save_for_backward(x, bias, *tensors)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, bias, *tensors = ctx.saved_tensors
        recipe, low_rank, input_dtype = ctx.recipe, ctx.low_rank or tensors[-1].dtype, ctx.input_dtype
        needs_x, needs_bias, _, *needs = ctx.needs_input_grad
        grad_x = grad_bias = None
        with torch.autocast(grad.device.type, enabled=False):
            flat_grad = grad.reshape(-1, grad.shape[-1])
            if needs_x:  # E in the compute dtype, for this product only
                weight = right_operand(recipe.form(tensors, low_rank).to(input_dtype), x.dtype)
                grad_x = flat_grad.mm(weight).view(*grad.shape[:-1], -1).to(input_dtype)
                del weight
            if needs_bias:
                grad_bias = flat_grad.sum(0).to(bias.dtype)
            grads = (None,) * len(tensors)
            if any(needs):
                # E's gradient in the compute dtype, cast back as autocast's and E's casts are
                grad_weight = flat_grad.t().mm(x.reshape(-1, x.shape[-1])).to(input_dtype).to(ctx.weight_dtype)
                grads = recipe.gradients(grad_weight, tuple(tensors), low_rank, tuple(needs))
        return (grad_x, grad_bias, None, *grads)


def effective_linear(x: torch.Tensor, bias: torch.Tensor | None, recipe: EffectiveWeight,
                     *tensors: torch.Tensor) -> torch.Tensor:
    """y = x·Eᵀ + b, E formed by `recipe` from `tensors` (the frozen weight among them)."""
    return EffectiveLinear.apply(x, bias, recipe, *tensors)
