"""The end of a retraining run: the never-worse verdict and the merge, then the output written."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import RunDirectory
from ..corrections import Attachment
from ..model_card import retrain_card
from ..models import ModelAdapter
from ..tensors import keep_only
from .report import plot_losses
from .sharded_state import remove_older_states

log = logging.getLogger(__name__)


def merge_if_not_worse(attachment: Attachment, model: nn.Module, shapes: dict[str, list[int]], before: float,
                       after: float, merge_now: bool = True) -> dict:
    """Merge the correction only if the held-out loss `after` (of the model as it would be written) is
    finite and no worse than the input's `before`, else keep the input's weights; the verdict.
    `merge_now` False: only the verdict (a sharded model is merged block by block as it is written)."""
    merged = math.isfinite(after) and after <= before
    if not merged:
        log.warning("retraining made the held-out loss worse (%.4f -> %.4f): the input's weights are "
                    "written unchanged; try a lower --lr", before, after)
    verdict = {"merged": merged, "heldout_before": before, "heldout_after": after}
    if not merge_now:
        return verdict
    kept_rounded = 0
    if merged:  # pruned entries +0.0, kept ones never rounded to zero (LinearWrapper.merge)
        kept_rounded = attachment.merge()
    else:
        attachment.discard()
    model.requires_grad_(False)
    verdict["kept_weights_rounded_to_zero"] = kept_rounded
    with torch.no_grad():  # a −0.0 of the input is written as +0.0, merged or not
        for name in shapes:
            weight = model.get_submodule(name).weight
            keep_only(weight, weight != 0)
    return verdict


def write_output(adapter: ModelAdapter, run_dir: RunDirectory, report: dict, shards: list[str] | None) -> Path:
    """The blocks' shards and the rest (embeddings, final norm, head) in the input's tensor names
    (unless `shards` were written already, block by block), the plot and the model card, then the
    index, config, tokenizer and report: OUT.partial becomes OUT."""
    shards = shards or write_model(adapter, run_dir)
    plot_losses(report, run_dir.work / "loss.png")
    run_dir.save_text("README.md", retrain_card(report))
    remove_older_states(run_dir, None)  # the sharded training states: the run is done
    return run_dir.finish(adapter.checkpoint.directory, adapter.output_config(), shards, report)


def write_model(adapter: ModelAdapter, run_dir: RunDirectory) -> list[str]:
    """A loaded model's shards: each block's, then the rest's; returns their names."""
    total, shards = adapter.num_blocks + 1, []
    for index in range(adapter.num_blocks):
        shards.append(run_dir.shard_name(index, total))
        run_dir.save_shard(shards[-1], adapter.module_tensors(adapter.block_name(index)))
    shards.append(run_dir.shard_name(adapter.num_blocks, total))
    run_dir.save_shard(shards[-1], adapter.non_block_tensors())
    return shards
