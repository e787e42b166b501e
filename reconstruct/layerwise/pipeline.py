"""One block's steps, as plain functions: observe the dense block, prune its linears, fit the
correction, replay the repaired block. driver.py calls them in that order, once per block; nothing
here knows about the run directory or the report.

With several processes each rank holds a contiguous share of the calibration windows
(`WindowShare`); statistics and fitting errors are summed across ranks, and each linear is pruned
by one rank and sent to the others (`distributed`, no-ops on one process).
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import distributed
from ..capture import call_block, first_output, kwargs_to, map_tensors
from ..corrections import Correction, CorrectionError, CorrectionOptions, make_correction
from ..fit import FitOptions, FitReport, fit_correction
from ..memory import return_freed_memory
from ..models import ModelAdapter
from ..pruning import METHODS, NMPattern, PruningMethod
from ..stats import StatisticsCollector
from ..store import ActivationStore, StoreFactory
from ..tensors import keep_only

if TYPE_CHECKING:
    from .report import LayerErrorMeter

log = logging.getLogger(__name__)

# How much of a correction's target is the dense model's own output; the rest is the dense block's
# output on the pruned model's inputs (--target sparse-inputs). Fitting towards the midpoint of two
# targets is fitting towards both with equal weight: ‖y − a‖² + ‖y − b‖² = 2‖y − (a+b)/2‖² + const.
DENSE_TARGET_SHARE = {"dense": 1.0, "mix": 0.5}


@dataclass(frozen=True)
class Recipe:
    """What is done to every block, made once from the settings: the pruning method and its target,
    and the correction and how it is fitted."""
    method: PruningMethod
    pattern: NMPattern | None
    sparsity: float
    correction: Correction | None
    fit_options: FitOptions
    # The dense model's own activations travel beside the pruned model's for --target none (the
    # statistics and fit read them) and --target dense or mix with a correction (its targets); a run
    # without a correction has no use for dense targets, and spares their two stores.
    carries_dense_model: bool

    @classmethod
    def from_config(cls, config) -> "Recipe":
        correction = make_correction(config.correction)
        return cls(method=METHODS[config.method], pattern=config.nm_pattern, sparsity=config.effective_sparsity,
                   correction=correction,
                   fit_options=FitOptions(steps=config.steps, lr=config.lr, weight_decay=config.weight_decay,
                                          warmup=config.warmup, check_every=config.check_every,
                                          patience=config.patience,
                                          correction=CorrectionOptions(rank=config.rank, alpha=config.lora_alpha)),
                   carries_dense_model=config.fit_target == "none" or (config.fit_target in DENSE_TARGET_SHARE and
                                                                       correction is not None))

    @property
    def activation_streams(self) -> int:
        """How many activation stores a block's step uses: inputs and outputs; a correction's targets;
        the dense model's own activations (in and out)."""
        return 2 + (self.correction is not None) + (2 if self.carries_dense_model else 0)


@dataclass(frozen=True)
class WindowShare:
    """The calibration windows: how many there are, and the contiguous range of them that this rank
    holds (all of them on one process)."""
    total: int
    own: range

    @classmethod
    def of(cls, total: int) -> "WindowShare":
        return cls(total, distributed.shard(total))

    def local_shape(self, shape) -> tuple[int, int, int]:
        """The shape of this rank's activation stores: its share of the windows."""
        return (len(self.own),) + tuple(shape[1:])


# --------------------------------------------------------------------------------------------------
# 1. Observe: run the dense block
def observe(block, inputs: ActivationStore, call, linears, method: PruningMethod, batch_size: int,
            device, dense_out: ActivationStore | None):
    """Run the dense block on `inputs`: return each linear's input statistics, and fill `dense_out`
    (the targets of a correction) unless it is None."""
    with StatisticsCollector(linears, method.needs_hessian, method.needs_input_sums) as collector, \
            torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            window = slice(start, start + batch_size)
            batch = inputs[window].to(device)
            collector.start_batch(batch.shape[0], batch.shape[1])
            outputs = call_block(block, batch, call)
            del batch
            if dense_out is not None:
                dense_out[window] = outputs
            del outputs
    return collector.stats


@dataclass
class DenseOutputs:
    """What the dense block's run leaves for the later steps (None where a run has no use for it)."""
    targets: ActivationStore | None = None     # what the correction fits towards
    next_dense: ActivationStore | None = None  # the dense model's own outputs: the next block's dense inputs
    dense_block: nn.Module | None = None       # a dense copy, for the targets of sublayer and linear units


def observe_block(index: int, block, call, linears, fit_inputs: ActivationStore,
                  dense_inputs: ActivationStore | None, with_targets: bool, *, config, recipe: Recipe,
                  stores: StoreFactory, batch_size: int, device) -> tuple[dict, DenseOutputs]:
    """Step 1: statistics of every linear in `linears` (summed across ranks), and the dense outputs
    the later steps use. `fit_inputs`: the inputs a correction is fitted on (the dense model's own
    for --target none)."""
    method, shape = recipe.method, fit_inputs.shape
    dense = DenseOutputs()
    dense.targets = stores.create(f"targets-{index:05d}", shape, fit_inputs.dtype) if with_targets else None
    stats = observe(block, fit_inputs, call, linears, method, batch_size, device, dense.targets)
    stats = distributed.all_reduce_statistics(stats, linears, method.needs_hessian, device, method.needs_input_sums)
    if dense_inputs is not None:  # the dense model's own activations go on to the next block
        dense.next_dense = stores.create(f"dense-{index + 1:05d}", shape, fit_inputs.dtype)
        if config.fit_target == "none":  # the block ran on dense inputs: its outputs are these
            dense.next_dense[:] = dense.targets[:]
        else:
            replay(block, dense_inputs, call, batch_size, device, dense.next_dense)
            blend_targets(dense.targets, dense.next_dense, DENSE_TARGET_SHARE[config.fit_target], batch_size)
    if config.granularity != "block" and recipe.correction:
        dense.dense_block = copy.deepcopy(block)
    return_freed_memory()  # the forward pass's small freed tensors, before pruning's peak
    return stats, dense


def blend_targets(targets: ActivationStore, dense_out: ActivationStore, dense_share: float, batch_size: int):
    """targets ← (1 − share)·targets + share·dense_out, a few windows at a time (in fp32)."""
    for start in range(0, len(targets), batch_size):
        window = slice(start, start + batch_size)
        if dense_share == 1.0:
            targets[window] = dense_out[window]
        else:
            targets[window] = torch.lerp(targets[window].float(), dense_out[window].float(), dense_share)


# --------------------------------------------------------------------------------------------------
# 2. Prune
def prune_block(block_name: str, linears: dict[str, nn.Linear], stats, recipe: Recipe,
                pruned_source: ModelAdapter | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Step 2: prune every linear of the block (or take it, pruned elsewhere, with --masks-from);
    keep the masks only for a correction."""
    if pruned_source:
        return take_pruned_weights(linears, pruned_source, block_name, keep_masks=recipe.correction is not None)
    return prune_linears(linears, stats, recipe.method, recipe.sparsity, recipe.pattern, block_name,
                         keep_masks=recipe.correction is not None)


def prune_linears(linears: dict[str, nn.Linear], stats, method: PruningMethod, sparsity: float, pattern,
                  block_name: str, keep_masks: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Prune each linear in place; return the keep-masks (only if `keep_masks`: a correction needs
    them, and they are half a bf16 block's size) and a note for any layer handled specially.

    With several ranks, each linear is pruned by one of them (the costliest first, to the least
    loaded rank; SparseGPT's work grows as rows × columns²) and its result sent to the others: the
    bytes any rank would compute, for a share of the work."""
    masks, notes = {}, {}
    owner = distributed.owners([linear.weight.numel() * linear.in_features for linear in linears.values()])
    for (name, linear), pruned_by in zip(linears.items(), owner):
        layer_stats = stats.get(name)
        if method.needs_statistics and (layer_stats is None or layer_stats.tokens == 0):
            # A mixture-of-experts expert that no calibration token was routed to has no statistics.
            layer_method = METHODS["magnitude"]
            notes[name] = "no calibration tokens reached this layer: pruned by magnitude"
        else:
            layer_method = method
        if pruned_by != distributed.rank():
            continue
        result = layer_method.prune(linear.weight.data, layer_stats, sparsity, pattern,
                                    layer=f"{block_name}.{name}", return_mask=keep_masks)
        linear.weight.data = result.weight.to(linear.weight.dtype)
        if keep_masks:
            masks[name] = result.mask
        del result
    for (name, linear), pruned_by in zip(linears.items(), owner):  # no-ops on one process
        distributed.broadcast_(linear.weight.data, pruned_by, f"sending {block_name}.{name}'s pruned weight")
        if keep_masks:
            if name not in masks:
                masks[name] = torch.empty(linear.weight.shape, dtype=torch.bool, device=linear.weight.device)
            distributed.broadcast_(masks[name], pruned_by, f"sending {block_name}.{name}'s mask")
    # In the linears' order on every rank: the correction's parameters, and so the gradient buffer
    # summed across ranks, are laid out in this order.
    return {name: masks[name] for name in linears if name in masks}, notes


def take_pruned_weights(linears: dict[str, nn.Linear], source: ModelAdapter, block_name: str,
                        keep_masks: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`--masks-from`: each linear takes its weight from a checkpoint pruned elsewhere (SparseGPT's
    updated weights included), and its zeros are the mask; a −0.0 there is written as +0.0."""
    masks = {}
    for name, linear in linears.items():
        weight = source.checkpoint.read(source.checkpoint_name(f"{block_name}.{name}.weight"))
        weight = weight.to(linear.weight.device, linear.weight.dtype)
        kept = weight != 0
        linear.weight.data = keep_only(weight, kept)
        if keep_masks:
            masks[name] = kept
    return masks, {}


# --------------------------------------------------------------------------------------------------
# 3. Fit the correction, on each fitting unit: the whole block, each sublayer, or each linear
def fit_block_correction(index: int, block: nn.Module, dense_block: nn.Module | None,
                         masks: dict[str, torch.Tensor], fit_inputs: ActivationStore, targets: ActivationStore,
                         call, *, config, recipe: Recipe, windows: WindowShare,
                         device) -> list[tuple[str, FitReport]]:
    """Step 3: fit the correction on each unit of the block (the block itself by default); merge it,
    or discard it if it is worse. Returns (unit, report) for each unit fitted."""
    heldout_windows = spread_positions(windows.total, config.heldout_windows)
    train_windows = sorted(set(range(windows.total)) - set(heldout_windows))
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
    reports = []
    for unit_name in fitting_units(block, config.granularity, masks):
        root, root_masks = attach_point(block, unit_name, masks)
        if unit_name == "":
            run, target, train_ids, held_ids = _block_batches(block, fit_inputs, targets, call, train_windows,
                                                              heldout_windows, config.fit_batch_size, windows,
                                                              device)
        else:
            caught = catch_unit_calls(block, block.get_submodule(unit_name), fit_inputs, call, device)
            run, target = _unit_windows(block, dense_block, unit_name, caught, device)
            train_ids = [w for w in train_windows if w in caught]
            held_ids = [w for w in heldout_windows if w in caught]
            if not train_ids or not held_ids:
                log.info("block %d %s: no calibration tokens reach it; not corrected", index, unit_name)
                continue
        try:
            report = fit_correction(root, recipe.correction, root_masks, run, target, train_ids, held_ids,
                                    recipe.fit_options, generator, device, block_dtype(block))
        except CorrectionError as error:  # e.g. bias training on a model without biases
            raise CorrectionError(f"--correction {recipe.correction.name}, block {index} unit "
                                  f"{unit_name or 'block'}: {error}") from error
        report.note = f"{unit_name}: {report.note}" if unit_name and report.note else report.note
        reports.append((unit_name or "block", report))
    return reports


def _block_batches(block, fit_inputs: ActivationStore, targets: ActivationStore, call, train_windows,
                   heldout_windows, batch_size: int, windows: WindowShare, device):
    """The whole block's run and target per batch, and the training and held-out batches' numbers.

    Batches are made of global window numbers; each rank runs the windows of a batch that it holds
    and returns None when it holds none (fit_correction sums over ranks)."""
    batches = _spread(train_windows, batch_size)
    all_batches = batches + _spread(heldout_windows, batch_size)

    def mine(i) -> list[int]:  # positions in this rank's stores
        return [w - windows.own.start for w in all_batches[i] if w in windows.own]

    def run(i):
        local = mine(i)
        return call_block(block, fit_inputs.gather(local).to(device), call) if local else None

    def target(i):
        local = mine(i)
        return targets.gather(local).to(device) if local else None

    return run, target, list(range(len(batches))), list(range(len(batches), len(all_batches)))


def _unit_windows(block, dense_block: nn.Module, unit_name: str, caught: dict[int, tuple], device):
    """A sublayer's or linear's run and target per window, from the calls caught in the pruned block."""
    dense_unit = dense_block.get_submodule(unit_name)

    def run(i):
        args, kwargs = kwargs_to(caught[i], device)
        return first_output(block.get_submodule(unit_name)(*args, **kwargs))  # the wrapped unit

    def target(i):
        args, kwargs = kwargs_to(caught[i], device)
        with torch.no_grad():
            return first_output(dense_unit(*args, **kwargs))

    return run, target


def fitting_units(block: nn.Module, granularity: str, masks: dict[str, torch.Tensor]) -> list[str]:
    if granularity == "block":
        return [""]
    if granularity == "linear":
        return list(masks)
    # Sublayers: the block's direct children that hold pruned linears (attention, MLP; for OPT,
    # whose MLP linears sit directly in the block, each of fc1 and fc2).
    return [name for name, _ in block.named_children()
            if any(m == name or m.startswith(name + ".") for m in masks)]


def attach_point(block: nn.Module, unit_name: str, masks: dict[str, torch.Tensor]):
    """Where a unit's correction is attached, and the masks named relative to that module.

    A linear unit is corrected through its parent, which swaps the linear for a wrapper."""
    if not unit_name:
        return block, masks
    if unit_name in masks:
        parent_name, _, child = unit_name.rpartition(".")
        return (block.get_submodule(parent_name) if parent_name else block), {child: masks[unit_name]}
    prefix = unit_name + "."
    return block.get_submodule(unit_name), {n[len(prefix):]: m for n, m in masks.items() if n.startswith(prefix)}


def catch_unit_calls(block, unit: nn.Module, inputs: ActivationStore, call, device) -> dict[int, tuple]:
    """The arguments `unit` receives inside the (pruned) block, per window, kept on the CPU.

    A window is missing when the unit never ran for it (an expert no token was routed to)."""
    caught = {}
    window = 0

    def hook(module, args, kwargs):
        caught[window] = map_tensors((args, kwargs), lambda t: t.detach().to("cpu"))
        raise _UnitCaught  # nothing after the unit is needed

    handle = unit.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for window in range(len(inputs)):
                try:
                    call_block(block, inputs[window:window + 1].to(device), call)
                except _UnitCaught:
                    pass
    finally:
        handle.remove()
    return caught


class _UnitCaught(Exception):
    pass


def block_dtype(block: nn.Module) -> torch.dtype:
    for parameter in block.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def spread_positions(total: int, count: int) -> list[int]:
    """`count` of the window numbers 0..total-1, evenly spaced (the held-out windows).

    Evenly spaced rather than the first ones: each rank holds a contiguous share of the windows, so
    the held-out evaluations and the training windows are then divided evenly between the ranks; the
    first windows would all be rank 0's, which would evaluate alone while the others wait, and would
    have fewer training windows than the others at every step. The choice does not depend on the
    number of ranks, so the result does not either."""
    return [i * total // count for i in range(count)]


def _spread(items: list[int], size: int) -> list[list[int]]:
    """`items` in batches of at most `size`, batch j taking every k-th item from the j-th (k batches).

    With contiguous shares of the windows per rank, every batch then draws on every rank's share,
    so all ranks work at every step; consecutive batches would sit on one rank at a time."""
    count = math.ceil(len(items) / size)
    return [items[j::count] for j in range(count)]


# --------------------------------------------------------------------------------------------------
# 4. Replay: run the repaired block
def replay(block, inputs: ActivationStore, call, batch_size: int, device, outputs: ActivationStore,
           meter: LayerErrorMeter | None = None, first_window: int = 0) -> None:
    """Step 4: the block's outputs on `inputs`, into `outputs`; `meter` measures each linear's error
    meanwhile. `first_window`: the calibration window that `inputs[0]` is (not 0 on ranks after the
    first)."""
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            window = slice(start, start + batch_size)
            if meter is not None:  # in calibration-window numbers: the sample is the first windows
                meter.batch(first_window + start, first_window + min(start + batch_size, len(inputs)))
            outputs[window] = call_block(block, inputs[window].to(device), call)
