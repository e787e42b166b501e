"""Parameter-efficient subsets (PERP): retrain only the biases, or only the normalisation layers."""
from torch import nn

from .base import Correction, CorrectionError, train_in_fp32


def is_norm(module: nn.Module) -> bool:
    # LayerNorm and the many RMSNorm classes (LlamaRMSNorm, Gemma3RMSNorm, …) share the name.
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


class BiasOnly(Correction):
    name = "bias"

    def attach(self, unit, pruned, options, generator):
        biases = [(m, "bias") for m in unit.modules() if isinstance(m, nn.Linear) and m.bias is not None]
        if not biases:
            # No flag named here: prune calls it --correction, retrain --params; each adds its own.
            raise CorrectionError("this model's linear layers have no biases (e.g. the LLaMA family); "
                                  "choose norm or masklora instead")
        return train_in_fp32(biases, options.parameter_access)


class NormOnly(Correction):
    name = "norm"

    def attach(self, unit, pruned, options, generator):
        params = [(m, leaf) for m in unit.modules() if is_norm(m)
                  for leaf, p in m.named_parameters(recurse=False)]
        if not params:
            raise CorrectionError("this unit has no normalisation layers with weights (with --granularity "
                                  "sublayer/linear the norms may lie outside the unit)")
        return train_in_fp32(params, options.parameter_access)
