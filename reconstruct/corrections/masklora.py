"""MaskLoRA (PERP): W + s·M⊙(BA). The update is masked, so pruned weights stay exactly zero."""
import torch

from .base import Correction, LinearWrapper, kaiming_uniform_, low_rank_factors, wrap_linears
from .effective import MaskedLowRank


class MaskLoRALinear(LinearWrapper):
    # E = W + s·M⊙(BA) with M = (W != 0), formed in fp32 (effective.MaskedLowRank)
    recipe_class = MaskedLowRank

    def __init__(self, base, rank, alpha, generator):
        super().__init__(base)
        self.lora_A, self.lora_B = low_rank_factors(base.out_features, base.in_features, rank,
                                                    base.weight.device, generator)
        kaiming_uniform_(self.lora_A, generator)
        torch.nn.init.zeros_(self.lora_B)  # starts as the pruned layer exactly
        self.scale = alpha / rank
        self.recipe = self.recipe_class(self.scale)

    def tensors(self):
        return self.base.weight, self.lora_A, self.lora_B


class MaskLoRA(Correction):
    name = "masklora"
    wrapper = MaskLoRALinear

    def attach(self, unit, pruned, options, generator):
        return wrap_linears(unit, pruned, lambda linear: self.wrapper(linear, options.rank, options.alpha, generator))
