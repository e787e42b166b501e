"""Magnitude pruning: remove the smallest |W|, one threshold per matrix (per group for N:M)."""
from .base import PruneResult, PruningMethod, apply_mask, lowest_per_group, lowest_per_matrix


class Magnitude(PruningMethod):
    name = "magnitude"
    needs_statistics = False

    def prune(self, weight, stats, sparsity, pattern, layer="", return_mask=True):
        scores = weight.abs().float()
        mask = lowest_per_group(scores, pattern) if pattern else lowest_per_matrix(scores, sparsity)
        return PruneResult(mask if return_mask else None, apply_mask(weight, mask))
