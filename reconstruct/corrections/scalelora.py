"""ScaleLoRA (PERP): W ⊙ (BA), with A = B = 1/√r so that BA starts as all ones.

A multiplicative update: wherever W is zero the product stays zero, so sparsity is kept.
"""
import math

import torch

from .base import Correction, LinearWrapper, low_rank_factors, wrap_linears
from .effective import ScaledLowRank


class ScaleLoRALinear(LinearWrapper):
    recipe = ScaledLowRank()  # E = W ⊙ BA, formed in fp32 (the same values as W.float() ⊙ BA)

    def __init__(self, base, rank, generator):
        super().__init__(base)
        self.lora_A, self.lora_B = low_rank_factors(base.out_features, base.in_features, rank,
                                                    base.weight.device, generator)
        torch.nn.init.constant_(self.lora_A, 1 / math.sqrt(rank))
        torch.nn.init.constant_(self.lora_B, 1 / math.sqrt(rank))

    def tensors(self):
        return self.base.weight, self.lora_A, self.lora_B


class ScaleLoRA(Correction):
    name = "scalelora"

    def attach(self, unit, pruned, options, generator):
        return wrap_linears(unit, pruned, lambda linear: ScaleLoRALinear(linear, options.rank, generator))
