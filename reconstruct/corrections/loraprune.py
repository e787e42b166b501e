"""LoRA-Prune, a baseline: dense LoRA while fitting, the mask applied only when merging.

The merged layer is (W + s·BA) ⊙ M, which differs from the layer that was fitted: the update's
entries at pruned positions are thrown away. This is what MaskLoRA avoids.
"""
from .masklora import MaskLoRA, MaskLoRALinear


class LoRAPruneLinear(MaskLoRALinear):
    def effective_weight(self):
        return (self.lora_B @ self.lora_A).float().mul_(self.scale).add_(self.base.weight)

    def merged_weight(self):
        return self.effective_weight() * self.mask


class LoRAPrune(MaskLoRA):
    """Attached like MaskLoRA (same factors and initialisation); only the wrapper differs."""

    name = "lora-prune"
    wrapper = LoRAPruneLinear
