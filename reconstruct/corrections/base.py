"""The interface every correction implements.

A correction is attached to a pruned unit (a block, a sublayer or one linear): it makes a small set of
fp32 parameters trainable, the fitting loop optimises them, and `merge()` folds them back into plain
weights of the storage dtype, leaving ordinary modules behind (as PEFT's tuner layers do). Inside
`merged_view()` the unit computes exactly what it will compute once merged, so the never-worse guard
can judge the merged result before anything is merged; `discard()` removes a correction that failed,
leaving the unit as it was (no copy of the pruned weights is needed to undo it).

A model wrapper that registers its own copies of the parameters tells the corrections how to reach
them through `CorrectionOptions.parameter_access`; the default is plain parameters, swapped with
`setattr`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..tensors import restore_exact_zeros_
from .effective import EffectiveWeight, effective_linear, keep_mask


class CorrectionError(ValueError):
    """A correction that cannot apply to this model (e.g. bias training on a model without biases)."""


def frozen_copy(parameter: nn.Parameter, dtype: torch.dtype) -> nn.Parameter:
    """`parameter`'s values in `dtype` (the storage dtype: what a merge writes), not trainable."""
    return nn.Parameter(parameter.detach().to(dtype), requires_grad=False)


class ParameterAccess:
    """How a correction computes for a while with a trained parameter rounded to its storage dtype
    (`merged_view()`): by default a rounded copy is set in the module in its place, and the
    parameter put back afterwards."""

    @contextmanager
    def rounded(self, module: nn.Module, leaf: str, dtype: torch.dtype):
        """Within the context, `module` computes with its parameter `leaf` rounded to `dtype`."""
        parameter = getattr(module, leaf)
        setattr(module, leaf, frozen_copy(parameter, dtype))
        try:
            yield
        finally:
            setattr(module, leaf, parameter)


@dataclass(frozen=True)
class CorrectionOptions:
    rank: int = 16
    alpha: float = 32.0
    parameter_access: ParameterAccess = ParameterAccess()  # how merged_view() reaches trained parameters
    # The frozen weights are not read yet (retrain under FSDP: each rank reads its shards' rows after
    # sharding): a copy of a weight is made as a placeholder too, and filled from the checkpoint.
    weights_unread: bool = False


class Attachment:
    """What `Correction.attach` returns: the trainable parameters, and how to merge them, discard
    them, or compute as if merged."""

    def __init__(self, trainable: list[nn.Parameter], merge, discard, merged_view):
        self.trainable = trainable
        self._merge, self._discard, self._merged_view = merge, discard, merged_view

    def merge(self) -> int:
        """Fold the correction into the unit's weights, in their storage dtype. Returns how many kept
        weights rounded to exactly zero there (set to the smallest normal number instead)."""
        return self._merge()

    def discard(self) -> None:
        """Remove the correction: the unit is exactly as it was before `attach`."""
        self._discard()

    def merged_view(self):
        """A context in which the unit computes what it will compute after `merge()`."""
        return self._merged_view()


class Correction:
    name: str = ""

    def attach(self, unit: nn.Module, pruned: Iterable[str], options: CorrectionOptions,
               generator: torch.Generator) -> Attachment:
        """Make `unit` trainable this correction's way. `pruned` names the pruned linears inside
        `unit` (relative to it; a dict of their masks may be given, only its keys are read): their
        keep-masks are their weights' non-zeros."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
class LinearWrapper(nn.Module):
    """A pruned linear plus trainable tensors; subclasses say how they form the effective weight.

    No keep-mask is held: the mask is the frozen weight's non-zeros, computed where it is used
    (effective.keep_mask), and training goes through effective.EffectiveLinear, which keeps for the
    backward pass only the input and the tensors the effective weight is made from."""

    recipe: EffectiveWeight

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.as_merged = False  # compute with the weight merge() would write (for the guard)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What the effective weight is made from, as `self.recipe` takes them."""
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        """The weight merge() writes, before rounding to the storage dtype (no gradient)."""
        with torch.no_grad():
            return self.recipe.form(self.tensors(), self.tensors()[-1].dtype)

    def written_weight(self) -> torch.Tensor:
        """The weight `merge()` writes, exactly: in the storage dtype, pruned entries +0.0, a kept
        weight rounded to zero made the smallest subnormal. The never-worse guard judges the model
        through this (`as_merged`), so it judges the weights that are written."""
        return self._written()[0]

    def _written(self) -> tuple[torch.Tensor, int]:
        # Autocast off wherever this is called from: under bf16 autocast B·A would be rounded to bf16
        # before the sum (outputs up to 0.008 apart on a bf16 linear). The keep-mask is the frozen
        # weight's zeros, read before merge() overwrites it.
        weight = self.base.weight
        with torch.no_grad(), torch.autocast(device_type=weight.device.type, enabled=False):
            written = self.merged_weight().to(weight.dtype)
            rounded = restore_exact_zeros_(written, keep_mask(weight))
        return written, rounded

    def forward(self, x):
        bias = self.base.bias
        if self.as_merged:
            weight = self.written_weight().to(x.dtype)
            return nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
        return effective_linear(x, bias, self.recipe, *self.tensors())

    def merge(self) -> tuple[nn.Linear, int]:
        """Write the merged weight into the base linear, in its storage dtype; return it and how many
        kept weights rounded to exactly zero (set to the dtype's smallest subnormal instead, so
        that the zero set stays the mask). Pruned entries are +0.0 whatever the correction computed."""
        with torch.no_grad():
            weight, rounded = self._written()
            self.base.weight.copy_(weight)
        return self.base, rounded


def low_rank_factors(out_features: int, in_features: int, rank: int, device, generator):
    """A (rank × in) and B (out × rank) in fp32; callers set their initial values."""
    A = nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32, device=device))
    B = nn.Parameter(torch.empty(out_features, rank, dtype=torch.float32, device=device))
    return A, B


def kaiming_uniform_(tensor: torch.Tensor, generator: torch.Generator) -> None:
    """LoRA's A initialisation (kaiming_uniform with a=√5), drawn from our own seeded generator."""
    fan_in = tensor.shape[1]
    bound = 1.0 / math.sqrt(fan_in)  # gain·√(3/fan_in) with a=√5 simplifies to 1/√fan_in
    with torch.no_grad():
        values = torch.rand(tensor.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound
        tensor.copy_(values.to(tensor.device))


def wrap_linears(unit: nn.Module, pruned: Iterable[str], make_wrapper) -> Attachment:
    """Replace each pruned linear of `unit` (by name) by `make_wrapper(linear)`; merging swaps back."""
    wrappers = {}
    for name in pruned:
        parent_name, _, child = name.rpartition(".")
        parent = unit.get_submodule(parent_name) if parent_name else unit
        wrapper = make_wrapper(getattr(parent, child))
        setattr(parent, child, wrapper)
        wrappers[name] = (parent, child, wrapper)

    def merge():
        rounded = 0
        for parent, child, wrapper in wrappers.values():
            linear, count = wrapper.merge()
            setattr(parent, child, linear)
            rounded += count
        return rounded

    def discard():
        for parent, child, wrapper in wrappers.values():
            setattr(parent, child, wrapper.base)  # untouched until a merge

    @contextmanager
    def merged_view():
        for _, _, wrapper in wrappers.values():
            wrapper.as_merged = True
        try:
            yield
        finally:
            for _, _, wrapper in wrappers.values():
                wrapper.as_merged = False

    trainable = [p for _, _, w in wrappers.values() for n, p in w.named_parameters() if not n.startswith("base.")]
    return Attachment(trainable, merge, discard, merged_view)


def train_in_fp32(parameters: list[tuple[nn.Module, str]], access: ParameterAccess) -> Attachment:
    """Make existing parameters trainable through fp32 master copies; merging casts them back."""
    originals = []
    trainable = []
    for module, leaf in parameters:
        original = getattr(module, leaf)
        master = nn.Parameter(original.detach().float().clone(), requires_grad=True)
        setattr(module, leaf, master)
        originals.append((module, leaf, original))
        trainable.append(master)

    # The master is read from the module, not kept from here: a model wrapper may register its own
    # copy in its place (see ParameterAccess), and put a plain one back before the merge.
    def merge():
        for module, leaf, original in originals:
            setattr(module, leaf, frozen_copy(getattr(module, leaf), original.dtype))
        return 0

    def discard():
        for module, leaf, original in originals:
            setattr(module, leaf, original)

    @contextmanager
    def merged_view():
        with ExitStack() as stack:
            for module, leaf, original in originals:
                stack.enter_context(access.rounded(module, leaf, original.dtype))
            yield

    return Attachment(trainable, merge, discard, merged_view)


def combine(attachments: list[Attachment]) -> Attachment:
    def merge():
        return sum(attachment.merge() for attachment in attachments)

    def discard():
        for attachment in reversed(attachments):
            attachment.discard()

    @contextmanager
    def merged_view():
        with ExitStack() as stack:
            for attachment in attachments:
                stack.enter_context(attachment.merged_view())
            yield

    return Attachment([p for a in attachments for p in a.trainable], merge, discard, merged_view)
