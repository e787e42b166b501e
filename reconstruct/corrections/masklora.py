"""MaskLoRA (PERP): W + s·M⊙(BA). The update is masked, so pruned weights stay exactly zero."""
import torch

from .base import Correction, LinearWrapper, kaiming_uniform_, low_rank_factors, wrap_linears


class MaskLoRALinear(LinearWrapper):
    def __init__(self, base, mask, rank, alpha, generator):
        super().__init__(base, mask)
        self.lora_A, self.lora_B = low_rank_factors(base.out_features, base.in_features, rank,
                                                    base.weight.device, generator)
        kaiming_uniform_(self.lora_A, generator)
        torch.nn.init.zeros_(self.lora_B)  # starts as the pruned layer exactly
        self.scale = alpha / rank

    def effective_weight(self):
        # Written so that autograd keeps only the bool mask (already held) for the backward pass,
        # not fp32 copies of scale·M or W, and in place so that one fp32 matrix is made, not four.
        # The sum is formed in fp32 (under autocast BA is half precision), as W.float() + s·M⊙BA.
        return (self.lora_B @ self.lora_A).float().mul_(self.mask).mul_(self.scale).add_(self.base.weight)


class MaskLoRA(Correction):
    name = "masklora"
    wrapper = MaskLoRALinear

    def attach(self, unit, masks, options, generator):
        return wrap_linears(unit, masks, lambda linear, mask: self.wrapper(
            linear, mask, options.rank, options.alpha, generator))
