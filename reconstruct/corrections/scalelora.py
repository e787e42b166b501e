"""ScaleLoRA (PERP): W ⊙ (BA), with A = B = 1/√r so that BA starts as all ones.

A multiplicative update: wherever W is zero the product stays zero, so sparsity is kept.
"""
import math

import torch

from .base import Correction, LinearWrapper, low_rank_factors, wrap_linears


class ScaleLoRALinear(LinearWrapper):
    def __init__(self, base, mask, rank, generator):
        super().__init__(base, mask)
        self.lora_A, self.lora_B = low_rank_factors(base.out_features, base.in_features, rank,
                                                    base.weight.device, generator)
        torch.nn.init.constant_(self.lora_A, 1 / math.sqrt(rank))
        torch.nn.init.constant_(self.lora_B, 1 / math.sqrt(rank))

    def effective_weight(self):
        # In fp32, in place: autograd keeps the weight itself for the backward pass, not an fp32
        # copy of it, and one fp32 matrix is made. Same values as W.float() ⊙ BA.
        return (self.lora_B @ self.lora_A).float().mul_(self.base.weight)


class ScaleLoRA(Correction):
    name = "scalelora"

    def attach(self, unit, masks, options, generator):
        return wrap_linears(unit, masks, lambda linear, mask: ScaleLoRALinear(
            linear, mask, options.rank, generator))
