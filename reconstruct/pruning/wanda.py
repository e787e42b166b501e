"""Wanda (Sun et al. 2023): score |W_ij| · ‖X_j‖₂; remove the lowest scores in each output row.

No weight update. With N:M, the M−N lowest of every M consecutive inputs in a row.
"""
import torch

from ..tensors import keep_only, row_chunks
from .base import PruneResult, PruningMethod, row_mask


class Wanda(PruningMethod):
    name = "wanda"

    def prune(self, weight, stats, sparsity, pattern, layer="", return_mask=True):
        norms = stats.column_norms.to(weight.device)[None, :]
        mask = torch.empty(weight.shape, dtype=torch.bool, device=weight.device) if return_mask else None
        for rows in row_chunks(weight):  # rows are independent: score, select and prune a few at a time
            # One fp32 copy of the rows, made absolute and scaled in place: the same values as
            # |W|·‖X‖ computed in steps, without two more temporaries of the chunk's size.
            scores = weight[rows].to(torch.float32, copy=True).abs_().mul_(norms)
            kept = row_mask(scores, sparsity, pattern)
            keep_only(weight[rows], kept)
            if mask is not None:
                mask[rows] = kept
        return PruneResult(mask, weight)
