"""The interface every pruning method implements, and the mask-selection helpers they share.

Masks are boolean with True = weight kept (the convention of MaskLoRA's M). Methods prune the weight
they are given in place where they can: the engine never holds a second copy of a block's weights.
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..stats import InputStatistics
from ..tensors import keep_only, row_chunks


class PruningError(ValueError):
    """Bad pruning settings, or a layer whose statistics cannot be used."""


@dataclass(frozen=True)
class NMPattern:
    """Semi-structured sparsity: at most `n` non-zeros in every `m` consecutive inputs of a row."""

    n: int
    m: int

    @classmethod
    def parse(cls, text: str) -> "NMPattern":
        try:
            n, m = (int(part) for part in text.split(":"))
        except ValueError:
            raise PruningError(f"pattern {text!r} is not of the form N:M (e.g. 2:4 or 4:8)") from None
        if not 0 < n < m:
            raise PruningError(f"pattern {text!r} needs 0 < N < M (N weights kept of every M), e.g. 2:4")
        return cls(n, m)

    @property
    def sparsity(self) -> float:
        return (self.m - self.n) / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    def check_divides(self, in_features: int, layer: str) -> None:
        if in_features % self.m:
            raise PruningError(f"pattern {self}: layer {layer} has {in_features} inputs, not a multiple "
                               f"of {self.m}; choose an M that divides it or prune without --pattern")


@dataclass
class PruneResult:
    mask: torch.Tensor | None  # bool [out, in], True = kept; None when the caller asked for none
    weight: torch.Tensor       # the pruned weight (zero exactly where mask is False; SparseGPT updates it)


class PruningMethod:
    """One way of choosing (and possibly updating) the weights of a linear layer that survive."""

    name: str = ""
    needs_statistics: bool = True  # input statistics of the dense block; magnitude needs none
    needs_hessian: bool = False    # SparseGPT needs H = 2XXᵀ/N; Wanda only column norms
    needs_input_sums: bool = False  # DSnoT needs each input feature's mean (Σx / N) too

    def prune(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: float,
              pattern: NMPattern | None, layer: str = "", return_mask: bool = True) -> PruneResult:
        """Choose the surviving weights of `weight` [out, in]; `layer` names it in messages. The
        returned weight may be `weight` itself, pruned in place. Without a correction the engine
        needs no mask (`return_mask=False`), and a method may then avoid building a whole one."""
        raise NotImplementedError


def lowest_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing exactly int(in_features · sparsity) lowest scores in every row."""
    return keep_all_but_lowest(scores, int(scores.shape[1] * sparsity))


def lowest_per_matrix(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing exactly int(numel · sparsity) lowest scores of the whole matrix.

    Magnitude's one threshold per matrix: with half-precision weights many |W| are equal at the
    threshold, so the tie rule of `keep_all_but_lowest` would hand the whole matrix to top-k anyway,
    after a wasted selection; top-k is used directly."""
    count = int(scores.numel() * sparsity)
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if count:
        mask[torch.topk(scores.flatten(), count, largest=False).indices] = False
    return mask.view_as(scores)


def lowest_per_group(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Keep-mask removing the M−N lowest scores of every M consecutive inputs in each row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows * (cols // pattern.m), pattern.m)
    return keep_all_but_lowest(groups, pattern.m - pattern.n).reshape(rows, cols)


def keep_all_but_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask of a 2-D `scores`: False at the `count` lowest scores of every row.

    The count-th lowest score of each row (a selection without sorting and without int64 indices)
    is a threshold: a row loses exactly the scores at or below it. That choice is the only one
    unless scores tie at the threshold (more than `count` at or below it, or NaN); those rows, rare
    with real weights, are decided by `topk`, the rule every mask was chosen by before: masks are
    identical to top-k's, ties included."""
    if count == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    keep, kept = keep_above_kth_lowest(scores, count)
    tied_rows = (kept != scores.shape[1] - count).nonzero().flatten()
    if tied_rows.numel():
        keep[tied_rows] = _keep_all_but_lowest_by_topk(scores[tied_rows], count)
    return keep


def keep_above_kth_lowest(scores: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores > t` for t the count-th lowest score of each row, and how many that keeps per row.

    On the CPU numpy's introselect (`np.partition`) is about twice as fast as `torch.kthvalue`,
    which also tracks indices; both put NaN last. numpy runs on one core and releases the GIL, so
    the rows are split across threads, each selecting, comparing and counting its rows."""
    if scores.device.type == "cpu":
        def select(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            keep = rows > np.partition(rows, count - 1, axis=1)[:, count - 1:count]
            return keep, keep.view(np.uint8).sum(axis=1, dtype=np.int64)

        values, threads = scores.numpy(), torch.get_num_threads()
        if threads > 1 and values.shape[0] >= 2 * threads:  # rows are independent: split them
            parts = list(_selection_pool(threads).map(select, np.array_split(values, threads)))
            keep, kept = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        else:
            keep, kept = select(values)
        return torch.from_numpy(keep), torch.from_numpy(kept)
    keep = scores > torch.kthvalue(scores, count, dim=1, keepdim=True).values
    return keep, keep.sum(dim=1)


@functools.lru_cache(maxsize=None)
def _selection_pool(threads: int) -> ThreadPoolExecutor:
    """Threads for numpy's selection, which runs on one core (and releases the GIL): torch's own
    operations use all of torch's threads, and this lets the selection do the same. One pool per
    thread count, kept for the process like torch's intra-op pool, not made per call (thousands of
    calls per model)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="row-selection")


def _keep_all_but_lowest_by_topk(scores: torch.Tensor, count: int) -> torch.Tensor:
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, torch.topk(scores, count, dim=1, largest=False).indices, False)
    return keep


def row_mask(scores: torch.Tensor, sparsity: float, pattern: NMPattern | None) -> torch.Tensor:
    return lowest_per_group(scores, pattern) if pattern else lowest_per_row(scores, sparsity)


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero `weight` where `mask` is False, in place and a chunk of rows at a time (multiplying by
    the whole mask would first convert it to the weight's dtype: a temporary the weight's size)."""
    for rows in row_chunks(weight):
        keep_only(weight[rows], mask[rows])
    return weight
