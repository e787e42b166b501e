"""Magnitude pruning: remove the smallest |W|, one threshold per matrix (per group for N:M)."""
from . import register
from .base import PruneResult, PruningMethod, lowest_per_group, lowest_per_matrix


@register
class Magnitude(PruningMethod):
    name = "magnitude"

    def prune(self, weight, stats, sparsity, pattern, layer=""):
        scores = weight.abs().float()
        mask = lowest_per_group(scores, pattern) if pattern else lowest_per_matrix(scores, sparsity)
        return PruneResult(mask, weight * mask)
