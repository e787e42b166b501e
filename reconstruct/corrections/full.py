"""Masked full fine-tuning (`full`): every kept weight trains, every pruned weight stays exactly zero.

The upper baseline of PERP: an fp32 master copy of each pruned linear's weight is trained, and the
weight the layer computes with is the master with its pruned entries filled with +0.0. The gradient
of a pruned entry is therefore zero, and AdamW leaves an entry whose value, gradient and moments are
all zero at zero; the fill makes that exact (and +0.0, never −0.0) whatever the optimiser does.
It costs an fp32 copy of the weights plus AdamW's two moments: 12 bytes per weight while fitting.
"""
from torch import nn

from .base import Correction, LinearWrapper, wrap_linears


class MaskedFullLinear(LinearWrapper):
    def __init__(self, base, mask):
        super().__init__(base, mask)
        self.weight = nn.Parameter(base.weight.detach().float().masked_fill(~self.mask, 0.0))

    def effective_weight(self):
        return self.weight.masked_fill(~self.mask, 0.0)


class MaskedFull(Correction):
    name = "full"

    def attach(self, unit, masks, options, generator):
        return wrap_linears(unit, masks, lambda linear, mask: MaskedFullLinear(linear, mask))
