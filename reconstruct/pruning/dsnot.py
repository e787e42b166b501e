"""DSnoT (Zhang et al. 2024, "Dynamic Sparse No Training"): Wanda's mask, then refined without training.

Each output row's pruned weights shift its expected output by ε = Σ_{j pruned} W_ij · E[x_j] (dense
minus pruned). DSnoT swaps weights in and out of the mask, one pair per row and cycle, to shrink |ε|
while keeping the row's count of zeros:
- grow the pruned weight whose restoration moves ε most towards zero, ranked by W_ij·E[x_j] / Var[x_j]
  (inputs with a small variance give a contribution close to its mean, so the expectation is reliable);
- prune the kept weight with the lowest Wanda score among those whose removal also moves ε towards zero.
A row stops at the first swap that would flip the sign of ε (overshoot), when it has no candidates left,
or after its cycles. No weight changes value: only which weights are kept.

Unstructured sparsity only. Differences from the reference code: the means are per token (not per
calibration window), and there is no absolute error threshold (its scale depended on the window
length); the sign rule alone decides when a row is done. The number of cycles scales with the row's
width: the paper's 50 cycles were for rows of 4096 or more inputs, where they swap at most ~4% of a
70%-sparse row's kept weights; 50 cycles on a row of 256 inputs could swap most of them, and on our
small testbed models they did, doubling the perplexity.
"""
import torch

from ..tensors import keep_only, row_chunks
from .base import PruneResult, PruningError, PruningMethod, row_mask

CYCLES_PER_INPUT = 50 / 4096  # the paper's 50 swap cycles, for rows of LLaMA-7B's 4096 inputs
VARIANCE_POWER = 1.0     # growing score: contribution / variance^power (the paper's default 1)


class DSnoT(PruningMethod):
    name = "dsnot"
    needs_input_sums = True

    def prune(self, weight, stats, sparsity, pattern, layer="", return_mask=True):
        if pattern is not None:
            raise PruningError(f"dsnot refines unstructured masks only; for --pattern {pattern} use wanda or "
                               "sparsegpt")
        norms = stats.column_norms.to(weight.device)[None, :]
        means = stats.means.to(weight.device)[None, :]
        variances = stats.variances.to(weight.device)[None, :]
        mask = torch.empty(weight.shape, dtype=torch.bool, device=weight.device) if return_mask else None
        for rows in row_chunks(weight):  # rows are independent
            values = weight[rows].to(torch.float32)
            wanda_scores = values.abs() * norms
            kept = row_mask(wanda_scores, sparsity, None)  # Wanda's mask to start from
            kept = refine_rows(values, kept, wanda_scores, values * means, variances)
            keep_only(weight[rows], kept)
            if mask is not None:
                mask[rows] = kept
        return PruneResult(mask, weight)


def refine_rows(values: torch.Tensor, kept: torch.Tensor, wanda_scores: torch.Tensor,
                contributions: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """Swap weights in and out of `kept` (bool [rows, in]) to shrink each row's expected output error.

    `contributions` is W_ij·E[x_j]. Each row's error is made positive by flipping the signs of its
    contributions when it is negative, so that one rule serves every row: grow a pruned weight with a
    positive (flipped) contribution, prune a kept one with a negative one; both lower the error."""
    kept = kept.clone()
    error = (contributions * ~kept).sum(dim=1)
    direction = torch.where(error < 0, -1.0, 1.0)[:, None]
    signed = contributions * direction
    error = error.abs()

    # Candidates in order, computed once: the best first, non-candidates (+inf keys) last.
    inf = torch.tensor(float("inf"), device=values.device)
    grow_key = torch.where(~kept & (signed > 0), -signed / variances.clamp(min=1e-12) ** VARIANCE_POWER, inf)
    prune_key = torch.where(kept & (signed < 0), wanda_scores, inf)
    grow_order = grow_key.argsort(dim=1, stable=True)
    prune_order = prune_key.argsort(dim=1, stable=True)
    grow_count = torch.isfinite(grow_key).sum(dim=1)
    prune_count = torch.isfinite(prune_key).sum(dim=1)

    rows = torch.arange(values.shape[0], device=values.device)
    active = error > 0
    for cycle in range(max(1, round(values.shape[1] * CYCLES_PER_INPUT))):
        active &= (cycle < grow_count) & (cycle < prune_count)
        if not active.any():
            break
        grow = grow_order[:, min(cycle, grow_order.shape[1] - 1)]
        prune = prune_order[:, min(cycle, prune_order.shape[1] - 1)]
        after = error - signed[rows, grow] + signed[rows, prune]
        active &= after > 0  # a swap that overshoots ends the row, as in the paper
        chosen = rows[active]
        kept[chosen, grow[active]] = True
        kept[chosen, prune[active]] = False
        error = torch.where(active, after, error)
    return kept
