"""Before any work: the model (and the checkpoint --masks-from names) opened and checked against the
settings, so that a run that cannot finish fails before it reads data or writes anything; and the
calibration windows.
"""
from __future__ import annotations

import copy

import torch

from .. import distributed
from ..config import ConfigError
from ..corrections import CorrectionError
from ..memory import return_freed_memory
from ..models import ModelAdapter, UnsupportedModelError, open_model, prunable_linears, tokenizer_for_data
from ..pruning import PruningError
from .pipeline import Recipe, attach_point, fitting_units


def open_checked_model(config, recipe: Recipe) -> tuple[ModelAdapter, ModelAdapter | None]:
    """The model, and the checkpoint --masks-from names (None without it), checked against the
    settings."""
    adapter = open_model(config.model, config.torch_dtype)
    pruned_source = open_pruned_source(config, adapter) if config.masks_from else None
    check_layers_against_model(config, recipe, adapter)
    check_correction_against_model(config, recipe, adapter)
    return_freed_memory()  # what building the skeleton left free: before the first block's peak
    return adapter, pruned_source


def open_pruned_source(config, adapter: ModelAdapter) -> ModelAdapter:
    """The checkpoint `--masks-from` names, checked against the dense model before any work: the
    same family, the same blocks, and every linear of the same shape."""
    source = open_model(config.masks_from, config.torch_dtype)
    if (source.model_type, source.num_blocks) != (adapter.model_type, adapter.num_blocks):
        raise UnsupportedModelError(
            f"--masks-from {config.masks_from} is a {source.model_type} with {source.num_blocks} "
            f"blocks, the dense model a {adapter.model_type} with {adapter.num_blocks}: pass "
            "the checkpoint that was pruned from this dense model")
    for index, block in enumerate(adapter.blocks):
        theirs = prunable_linears(source.blocks[index])
        for name, linear in prunable_linears(block, config.layers).items():
            if name not in theirs or theirs[name].weight.shape != linear.weight.shape:
                raise UnsupportedModelError(
                    f"--masks-from {config.masks_from}: block {index} {name} does not match the dense "
                    "model's; pass the checkpoint that was pruned from this dense model")
    return source


def check_layers_against_model(config, recipe: Recipe, adapter: ModelAdapter) -> None:
    """Fail before any work if the layer filter matches nothing or N:M does not divide a layer."""
    for index, block in enumerate(adapter.blocks):
        linears = prunable_linears(block, config.layers)
        if not linears:
            raise PruningError(f"block {index} has no linear layer matching --layers {config.layers}")
        if recipe.pattern:
            for name, linear in linears.items():
                recipe.pattern.check_divides(linear.in_features, f"{adapter.block_name(index)}.{name}")


def check_correction_against_model(config, recipe: Recipe, adapter: ModelAdapter) -> None:
    """Fail before any work if the correction cannot attach to a fitting unit (e.g. bias training on
    a model without biases): a trial attachment to a weightless (meta) copy of every block."""
    if recipe.correction is None:
        return
    for index, block in enumerate(adapter.blocks):
        trial = copy.deepcopy(block)
        masks = {name: torch.ones(linear.weight.shape, dtype=torch.bool, device="meta")
                 for name, linear in prunable_linears(trial, config.layers).items()}
        for unit_name in fitting_units(trial, config.granularity, masks):
            root, root_masks = attach_point(trial, unit_name, masks)
            try:
                recipe.correction.attach(root, root_masks, recipe.fit_options.correction, torch.Generator())
            except CorrectionError as error:
                raise CorrectionError(f"--correction {config.correction}, block {index} unit "
                                      f"{unit_name or 'block'}: {error}") from None


def check_world_size(config, recipe: Recipe) -> None:
    """Fail before any work if this run cannot be split over the processes torchrun started."""
    processes = distributed.world_size()
    if processes == 1:
        return
    if config.nsamples < processes:
        raise ConfigError(f"--nsamples {config.nsamples} is fewer than the {processes} processes: each "
                          "needs at least one calibration window; use more windows or fewer processes")
    if recipe.correction is not None and config.granularity != "block":
        raise ConfigError(f"--granularity {config.granularity} runs on one process only (it fits one "
                          "window per step, which cannot be shared); use --granularity block or launch "
                          "without torchrun")


def calibration_windows(config, adapter: ModelAdapter) -> torch.Tensor:
    """The calibration token windows. The tokenizer is loaded for this only, and only when the
    windows are not in the token cache (a resumed run does not need them at all); it is dropped
    afterwards: a large vocabulary's tokenizer is tens of MB and takes seconds to load."""
    import calib

    tokenizer = tokenizer_for_data(config.tokenizer or adapter.checkpoint.directory)
    return calib.calibration_windows(config.calib, tokenizer, config.nsamples,
                                     config.seqlen, seed=config.seed, text_field=config.text_field,
                                     cache_dir=config.cache_dir)
