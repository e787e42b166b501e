"""LoRA-Prune, a baseline: dense LoRA while fitting, the mask applied only when merging.

The merged layer is (W + s·BA) ⊙ M, which differs from the layer that was fitted: the update's
entries at pruned positions are thrown away. This is what MaskLoRA avoids.
"""
import torch

from .effective import DenseLowRank, keep_mask
from .masklora import MaskLoRA, MaskLoRALinear


class LoRAPruneLinear(MaskLoRALinear):
    recipe_class = DenseLowRank  # E = W + s·BA while fitting

    def merged_weight(self):
        with torch.no_grad():
            return super().merged_weight().mul_(keep_mask(self.base.weight))


class LoRAPrune(MaskLoRA):
    """Attached like MaskLoRA (same factors and initialisation); only the wrapper differs."""

    name = "lora-prune"
    wrapper = LoRAPruneLinear
