"""Wanda (Sun et al. 2023): score |W_ij| · ‖X_j‖₂; remove the lowest scores in each output row.

No weight update. With N:M, the M−N lowest of every M consecutive inputs in a row.
"""
from . import register
from .base import PruneResult, PruningMethod, row_mask


@register
class Wanda(PruningMethod):
    name = "wanda"

    def prune(self, weight, stats, sparsity, pattern, layer=""):
        scores = weight.abs().float() * stats.column_norms.to(weight.device)[None, :]
        mask = row_mask(scores, sparsity, pattern)
        return PruneResult(mask, weight * mask)
