"""Masked full fine-tuning (`full`): every kept weight trains, every pruned weight stays exactly zero.

The upper baseline of PERP: an fp32 master copy of each pruned linear's weight is trained, and the
weight the layer computes with is the master with its pruned entries filled with +0.0. The pruned
entries are the frozen weight's zeros: the frozen weight stays in the wrapper, unchanged until the
merge, so its zeros are the initial ones while the master moves. The gradient of a pruned entry is
therefore zero, and AdamW leaves an entry whose value, gradient and moments are all zero at zero; the
fill makes that exact (and +0.0, never −0.0) whatever the optimiser does. It costs an fp32 copy of
the weights plus AdamW's two moments: 12 bytes per weight while fitting (under FSDP each rank's
share: the copies are made as placeholders and each rank reads its rows into them).
"""
import torch
from torch import nn

from .base import Correction, LinearWrapper, wrap_linears
from .effective import MaskedMaster


class MaskedFullLinear(LinearWrapper):
    recipe = MaskedMaster()  # E = the master, +0.0 where the frozen weight is zero

    def __init__(self, base, weights_unread: bool = False):
        super().__init__(base)
        if weights_unread:  # uninitialised, never resident: each rank fills its shard's rows (under FSDP)
            self.weight = nn.Parameter(torch.empty(base.weight.shape, dtype=torch.float32, device=base.weight.device))
        else:  # a copy even of an fp32 weight: the frozen weight's zeros must stay the initial ones
            self.weight = nn.Parameter(base.weight.detach().to(torch.float32, copy=True))

    def tensors(self):
        return self.weight, self.base.weight


class MaskedFull(Correction):
    name = "full"

    def attach(self, unit, pruned, options, generator):
        return wrap_linears(unit, pruned, lambda linear: MaskedFullLinear(linear, options.weights_unread))
