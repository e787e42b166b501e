"""SparseGPT (Frantar & Alistarh 2023): prune with the inverse Hessian and update surviving weights.

For H = 2XXᵀ/N, columns are visited left to right in blocks of 128. Within a block, the mask is
chosen by w²/[H⁻¹]_ii² (one threshold over the rows × block, or per group of M for N:M, chosen on the
already-updated weights); each pruned weight's error is spread over the later columns through the
upper Cholesky factor of H⁻¹ (the OBS update), lazily for the columns after the block.
"""
import logging

import torch

from .base import PruneResult, PruningError, PruningMethod

log = logging.getLogger(__name__)

BLOCK_COLUMNS = 128
DAMPING = 0.01          # fraction of mean(diag H) added to the diagonal
DAMPING_RETRIES = 4     # each retry multiplies the damping by 10


def inverse_hessian_factor(hessian: torch.Tensor, layer: str = "") -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹. A failed factorisation retries with more damping, then
    raises: silently replacing H by the identity (as some tools do) would hide a broken layer."""
    diagonal_mean = torch.mean(torch.diag(hessian))
    damping = DAMPING
    identity = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
    for attempt in range(DAMPING_RETRIES + 1):
        try:
            lower = torch.linalg.cholesky(hessian + damping * diagonal_mean * identity)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            log.warning("SparseGPT %s: Cholesky failed with damping %.0e; retrying with %.0e",
                        layer, damping, damping * 10)
            damping *= 10
    raise PruningError(f"SparseGPT {layer}: the Hessian is not positive definite even with damping "
                       f"{damping / 10:.0e}·mean(diag H); check the calibration data for NaN/Inf or "
                       "use more calibration windows")


class SparseGPT(PruningMethod):
    name = "sparsegpt"
    needs_hessian = True

    def prune(self, weight, stats, sparsity, pattern, layer: str = "", return_mask: bool = True):
        W = weight.float().clone()
        H = stats.hessian.to(W.device).clone()
        if not torch.isfinite(H).all():
            raise PruningError(f"SparseGPT {layer}: the Hessian has NaN/Inf; the block's inputs are broken")
        dead = torch.diag(H) == 0          # inputs never active: their weights cannot matter
        H[dead, dead] = 1
        W[:, dead] = 0
        Hinv = inverse_hessian_factor(H, layer)

        rows, columns = W.shape
        mask = torch.ones_like(W, dtype=torch.bool)
        for start in range(0, columns, BLOCK_COLUMNS):
            end = min(start + BLOCK_COLUMNS, columns)
            W1 = W[:, start:end].clone()
            Hinv1 = Hinv[start:end, start:end]
            d = torch.diag(Hinv1)
            errors = torch.zeros_like(W1)
            pruned = torch.zeros_like(W1, dtype=torch.bool)
            if pattern is None:
                scores = W1 ** 2 / d[None, :] ** 2
                count = int(scores.numel() * sparsity)
                if count:
                    pruned.view(-1)[torch.topk(scores.flatten(), count, largest=False).indices] = True
            for i in range(end - start):
                if pattern is not None and i % pattern.m == 0:
                    group = W1[:, i:i + pattern.m] ** 2 / d[i:i + pattern.m][None, :] ** 2
                    lowest = torch.topk(group, pattern.m - pattern.n, dim=1, largest=False).indices
                    pruned[:, i:i + pattern.m].scatter_(1, lowest, True)
                w = W1[:, i]
                q = torch.where(pruned[:, i], torch.zeros_like(w), w)
                err = (w - q) / d[i]
                W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
                W1[:, i] = q
                errors[:, i] = err
            W[:, start:end] = W1
            W[:, end:] -= errors @ Hinv[start:end, end:]
            mask[:, start:end] = ~pruned
        W[~mask] = 0  # exact zeros (the updates above never touch pruned entries again, but be sure)
        return PruneResult(mask if return_mask else None, W.to(weight.dtype))
