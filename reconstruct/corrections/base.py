"""The interface every correction implements.

A correction is attached to a pruned unit (a block, a sublayer or one linear): it makes a small set of
fp32 parameters trainable, the fitting loop optimises them, and `merge()` folds them back into plain
weights of the storage dtype, leaving ordinary modules behind (as PEFT's tuner layers do).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


class CorrectionError(ValueError):
    """A correction that cannot apply to this model (e.g. bias training on a model without biases)."""


@dataclass(frozen=True)
class CorrectionOptions:
    rank: int = 16
    alpha: float = 32.0


class Attachment:
    """What `Correction.attach` returns: the trainable parameters and how to merge them."""

    def __init__(self, trainable: list[nn.Parameter], merge):
        self.trainable = trainable
        self._merge = merge

    def merge(self) -> None:
        self._merge()


class Correction:
    name: str = ""

    def attach(self, unit: nn.Module, masks: dict[str, torch.Tensor], options: CorrectionOptions,
               generator: torch.Generator) -> Attachment:
        """Make `unit` trainable this correction's way. `masks` maps names of pruned linears inside
        `unit` (relative to it) to their keep-masks."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
class LinearWrapper(nn.Module):
    """A pruned linear plus fp32 low-rank factors; subclasses say how they combine and merge."""

    def __init__(self, base: nn.Linear, mask: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("mask", mask.to(base.weight.device), persistent=False)

    def effective_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        return self.effective_weight()

    def forward(self, x):
        return nn.functional.linear(x, self.effective_weight().to(x.dtype),
                                    None if self.base.bias is None else self.base.bias.to(x.dtype))

    def merge(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight.copy_(self.merged_weight().to(self.base.weight.dtype))
        return self.base


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


def wrap_linears(unit: nn.Module, masks: dict[str, torch.Tensor], make_wrapper) -> Attachment:
    """Replace each masked linear of `unit` by `make_wrapper(linear, mask)`; merging swaps back."""
    wrappers = {}
    for name, mask in masks.items():
        parent_name, _, child = name.rpartition(".")
        parent = unit.get_submodule(parent_name) if parent_name else unit
        wrapper = make_wrapper(getattr(parent, child), mask)
        setattr(parent, child, wrapper)
        wrappers[name] = (parent, child, wrapper)

    def merge():
        for parent, child, wrapper in wrappers.values():
            setattr(parent, child, wrapper.merge())

    trainable = [p for _, _, w in wrappers.values() for n, p in w.named_parameters() if not n.startswith("base.")]
    return Attachment(trainable, merge)


def train_in_fp32(parameters: list[tuple[nn.Module, str]]) -> Attachment:
    """Make existing parameters trainable through fp32 master copies; merging casts them back."""
    originals = []
    trainable = []
    for module, leaf in parameters:
        original = getattr(module, leaf)
        master = nn.Parameter(original.detach().float().clone(), requires_grad=True)
        setattr(module, leaf, master)
        originals.append((module, leaf, original.dtype))
        trainable.append(master)

    def merge():
        for module, leaf, dtype in originals:
            setattr(module, leaf, nn.Parameter(getattr(module, leaf).detach().to(dtype), requires_grad=False))

    return Attachment(trainable, merge)


def combine(attachments: list[Attachment]) -> Attachment:
    def merge():
        for attachment in attachments:
            attachment.merge()
    return Attachment([p for a in attachments for p in a.trainable], merge)
