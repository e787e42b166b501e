"""The sequential driver: prune and repair a model one transformer block at a time.

    windows = calibration token windows
    inputs  = block 0's inputs for every window, and every block's keyword arguments
    for each block:
        load its weights; run it dense, collecting each linear's input statistics and its outputs
        prune every linear (masks); fit the correction towards the dense outputs; merge it
        run the repaired block again: its outputs are the next block's inputs
        write the block's shard and the resume point; free the block
    write the index, config, tokenizer and report

Only one block's weights are ever in memory; activations live in a store (RAM or disk) and go to the
device one batch at a time.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__, distributed
from .api import ConfigError, RunConfig
from .capture import (call_block, catch_block0_inputs, catch_block_kwargs, first_output, kwargs_to,
                      map_tensors)
from .corrections import CorrectionError, CorrectionOptions, make_correction
from .fit import FitOptions, FitReport, fit_correction
from .lock import run_lock
from .memory import default_activation_budget, limit_heap_fragmentation, peak_rss_bytes, return_freed_memory
from .models import ModelAdapter, UnsupportedModelError, open_model, prunable_linears, tokenizer_for_data
from .prefetch import BlockPrefetcher
from .pruning import METHODS, PruningError, PruningMethod
from .pruning.base import keep_only, row_chunks
from .stats import StatisticsCollector
from .store import ActivationStore, StoreFactory
from .timing import BLOCK_PHASES, STARTUP_PHASES, PhaseClock, summary
from .writer import BackgroundWrite, RunDirectory

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    report: dict
    out: Path
    final_activations: ActivationStore | None  # the last block's outputs (for checks and tests)


# --------------------------------------------------------------------------------------------------
# One block's steps
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


class LayerErrorMeter:
    """Forward hooks measuring each linear's relative output error against its dense weights, on the
    first `windows` calibration windows replayed (0: not measured).

    A sample is enough for a report, and measuring costs one more matmul per linear on the sampled
    tokens (as much as replaying them): with all windows it made the replay twice as long.
    `dense_rows(name)` yields (rows, dense weight of those rows) pieces: the dense weights are read
    back from the checkpoint a few MB at a time rather than kept as a copy of the whole block.
    """

    def __init__(self, linears: dict[str, nn.Linear], dense_rows, windows: int):
        self.linears, self.dense_rows = linears, dense_rows
        self.windows = windows
        self.error = dict.fromkeys(linears, 0.0)
        self.reference = dict.fromkeys(linears, 0.0)
        self.batch_windows = 0      # windows in the batch being replayed
        self.measured_windows = 0   # how many of them, from its first, are measured
        self._handles = []

    def __enter__(self):
        if self.windows:
            for name, linear in self.linears.items():
                self._handles.append(linear.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()

    def batch(self, start: int, stop: int) -> None:
        """Tell the meter that windows start:stop are replayed next."""
        self.batch_windows = stop - start
        self.measured_windows = max(0, min(stop, self.windows) - start)

    def _hook(self, name):
        def hook(module, args, output):
            if not self.measured_windows:
                return
            x = args[0]
            if x.dim() >= 3 and x.shape[0] == self.batch_windows:  # [windows, tokens, in]: the sample
                x, output = x[:self.measured_windows], output[:self.measured_windows]
            # (A mixture-of-experts expert sees the tokens routed to it, [tokens, in]: all of them.)
            # One matmul with the weight change gives the output change: X·(W_dense − W)ᵀ.
            for rows, dense_weight in self.dense_rows(name):
                change = nn.functional.linear(x, (dense_weight.to(module.weight.device) - module.weight[rows])
                                              .to(x.dtype)).float()
                self.error[name] += float(change.pow(2).sum())
                self.reference[name] += float((output[..., rows].float() + change).pow(2).sum())
        return hook

    def relative(self, name: str) -> float | None:
        """‖ΔY‖²/‖Y_dense‖² of the sample; None when not measured, NaN for an all-zero output."""
        if not self.windows:
            return None
        return self.error[name] / self.reference[name] if self.reference[name] > 0 else float("nan")

    def sum_across_ranks(self) -> None:
        """The sample windows may lie on several ranks: sum their errors (in the linears' order)."""
        names = list(self.linears)
        sums = distributed.sum_floats([self.error[n] for n in names] + [self.reference[n] for n in names],
                                      "summing per-layer errors")
        self.error, self.reference = dict(zip(names, sums[:len(names)])), dict(zip(names, sums[len(names):]))


# How much of a correction's target is the dense model's own output; the rest is the dense block's
# output on the pruned model's inputs (--target sparse-inputs). Fitting towards the midpoint of two
# targets is fitting towards both with equal weight: ‖y − a‖² + ‖y − b‖² = 2‖y − (a+b)/2‖² + const.
DENSE_TARGET_SHARE = {"dense": 1.0, "mix": 0.5}


def blend_targets(targets: ActivationStore, dense_out: ActivationStore, dense_share: float, batch_size: int):
    """targets ← (1 − share)·targets + share·dense_out, a few windows at a time (in fp32)."""
    for start in range(0, len(targets), batch_size):
        window = slice(start, start + batch_size)
        if dense_share == 1.0:
            targets[window] = dense_out[window]
        else:
            targets[window] = torch.lerp(targets[window].float(), dense_out[window].float(), dense_share)


def replay(block, inputs: ActivationStore, call, batch_size: int, device, outputs: ActivationStore,
           meter: "LayerErrorMeter | None" = None, first_window: int = 0) -> None:
    """`first_window`: the calibration window that `inputs[0]` is (not 0 on ranks after the first)."""
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            window = slice(start, start + batch_size)
            if meter is not None:  # in calibration-window numbers: the sample is the first windows
                meter.batch(first_window + start, first_window + min(start + batch_size, len(inputs)))
            outputs[window] = call_block(block, inputs[window].to(device), call)


# --------------------------------------------------------------------------------------------------
# Fitting units: the whole block, each sublayer, or each linear
def fitting_units(block: nn.Module, granularity: str, masks: dict[str, torch.Tensor]) -> list[str]:
    if granularity == "block":
        return [""]
    if granularity == "linear":
        return list(masks)
    # Sublayers: the block's direct children that hold pruned linears (attention, MLP; for OPT,
    # whose MLP linears sit directly in the block, each of fc1 and fc2).
    return [name for name, _ in block.named_children()
            if any(m == name or m.startswith(name + ".") for m in masks)]


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


# --------------------------------------------------------------------------------------------------
class Driver:
    """Holds one run's settings, model and stores; `run()` is the loop in the module docstring."""

    def __init__(self, config: RunConfig, startup_s: float = 0.0):
        """`startup_s`: seconds the caller spent before this run (a command's interpreter start-up and
        imports), counted in the report's wall time as the phase `imports`."""
        self.config = config
        self.device = torch.device(config.device)
        self.started = time.perf_counter() - startup_s
        self.clock = PhaseClock(self.device)  # the whole run's phases; each block has its own too
        self.clock.add("imports", startup_s)
        self.method = METHODS[config.method]
        self.pattern = config.nm_pattern
        self.sparsity = config.effective_sparsity
        self.correction = make_correction(config.correction)
        # The dense model's own activations travel beside the pruned model's for --target none (the
        # statistics and fit read them) and --target dense or mix with a correction (its targets); a run
        # without a correction has no use for dense targets, and spares their two stores.
        self.carries_dense_model = config.fit_target == "none" or (config.fit_target in DENSE_TARGET_SHARE and
                                                               self.correction is not None)
        self.fit_options = FitOptions(steps=config.steps, lr=config.lr, weight_decay=config.weight_decay,
                                      warmup=config.warmup, check_every=config.check_every,
                                      patience=config.patience,
                                      correction=CorrectionOptions(rank=config.rank, alpha=config.lora_alpha))
        self.batch_size = config.batch_size

    # -- set-up --------------------------------------------------------------------------------------
    def open(self) -> None:
        self.adapter: ModelAdapter = open_model(self.config.model, self.config.torch_dtype)
        self.pruned_source = self.open_pruned_source() if self.config.masks_from else None
        self.check_layers_against_model()
        self.check_correction_against_model()
        return_freed_memory()  # what building the skeleton left free: before the first block's peak

    def open_pruned_source(self) -> ModelAdapter:
        """The checkpoint `--masks-from` names, checked against the dense model before any work: the
        same family, the same blocks, and every linear of the same shape."""
        source = open_model(self.config.masks_from, self.config.torch_dtype)
        if (source.model_type, source.num_blocks) != (self.adapter.model_type, self.adapter.num_blocks):
            raise UnsupportedModelError(
                f"--masks-from {self.config.masks_from} is a {source.model_type} with {source.num_blocks} "
                f"blocks, the dense model a {self.adapter.model_type} with {self.adapter.num_blocks}: pass "
                "the checkpoint that was pruned from this dense model")
        for index, block in enumerate(self.adapter.blocks):
            theirs = prunable_linears(source.blocks[index])
            for name, linear in prunable_linears(block, self.config.layers).items():
                if name not in theirs or theirs[name].weight.shape != linear.weight.shape:
                    raise UnsupportedModelError(
                        f"--masks-from {self.config.masks_from}: block {index} {name} does not match the dense "
                        "model's; pass the checkpoint that was pruned from this dense model")
        return source

    def check_correction_against_model(self) -> None:
        """Fail before any work if the correction cannot attach to a fitting unit (e.g. bias training on
        a model without biases): a trial attachment to a weightless (meta) copy of every block."""
        if self.correction is None:
            return
        for index, block in enumerate(self.adapter.blocks):
            trial = copy.deepcopy(block)
            masks = {name: torch.ones(linear.weight.shape, dtype=torch.bool, device="meta")
                     for name, linear in prunable_linears(trial, self.config.layers).items()}
            for unit_name in fitting_units(trial, self.config.granularity, masks):
                root, root_masks = attach_point(trial, unit_name, masks)
                try:
                    self.correction.attach(root, root_masks, self.fit_options.correction, torch.Generator())
                except CorrectionError as error:
                    raise CorrectionError(f"--correction {self.config.correction}, block {index} unit "
                                          f"{unit_name or 'block'}: {error}") from None

    def check_layers_against_model(self) -> None:
        """Fail before any work if the layer filter matches nothing or N:M does not divide a layer."""
        for index, block in enumerate(self.adapter.blocks):
            linears = prunable_linears(block, self.config.layers)
            if not linears:
                raise PruningError(f"block {index} has no linear layer matching --layers {self.config.layers}")
            if self.pattern:
                for name, linear in linears.items():
                    self.pattern.check_divides(linear.in_features, f"{self.adapter.block_name(index)}.{name}")

    def calibration_windows(self) -> torch.Tensor:
        """The calibration token windows. The tokenizer is loaded for this only, and only when the
        windows are not in the token cache (a resumed run does not need them at all); it is dropped
        afterwards: a large vocabulary's tokenizer is tens of MB and takes seconds to load."""
        import calib

        tokenizer = tokenizer_for_data(self.config.tokenizer or self.adapter.checkpoint.directory)
        return calib.calibration_windows(self.config.calib, tokenizer, self.config.nsamples,
                                         self.config.seqlen, seed=self.config.seed,
                                         text_field=self.config.text_field, cache_dir=self.config.cache_dir)

    def check_world_size(self) -> None:
        """Fail before any work if this run cannot be split over the processes torchrun started."""
        processes = distributed.world_size()
        if processes == 1:
            return
        if self.config.nsamples < processes:
            raise ConfigError(f"--nsamples {self.config.nsamples} is fewer than the {processes} processes: each "
                              "needs at least one calibration window; use more windows or fewer processes")
        if self.correction is not None and self.config.granularity != "block":
            raise ConfigError(f"--granularity {self.config.granularity} runs on one process only (it fits one "
                              "window per step, which cannot be shared); use --granularity block or launch "
                              "without torchrun")

    def rank_activations(self) -> Path:
        """Where this process keeps its windows' activations: its own directory when there are
        several (each rank holds only its share of the windows)."""
        if distributed.world_size() == 1:
            return self.run_dir.activations
        directory = self.run_dir.activations / f"rank-{distributed.rank():05d}"
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def block_prefetcher(self) -> BlockPrefetcher | None:
        """The background reader of the next block (reconstruct/prefetch.py), or None: `--prefetch
        auto` reads ahead on an accelerator only, since it holds one more block in host memory."""
        if self.config.prefetch == "off" or (self.config.prefetch == "auto" and self.device.type == "cpu"):
            return None
        return BlockPrefetcher(lambda index: self.adapter.module_reader(self.adapter.block_name(index)),
                               pin_memory=self.device.type == "cuda")

    def store_factory(self) -> StoreFactory:
        # inputs and outputs; a correction's targets; the dense model's own activations (in and out)
        streams = 2 + (self.correction is not None) + (2 if self.carries_dense_model else 0)
        budget = (int(self.config.activation_budget_gb * 2**30) if self.config.activation_budget_gb
                  else default_activation_budget())
        return StoreFactory(self.config.offload_activations, self.activations, budget, streams)

    def local_shape(self, shape) -> tuple[int, int, int]:
        """The shape of this rank's activation stores: its share of the windows."""
        return (len(self.own_windows),) + tuple(shape[1:])

    def save_state(self, state: dict) -> None:
        """Record the resume point once every rank's files for it are durable; rank 0 writes it."""
        distributed.barrier("waiting for every rank to save its activations")
        distributed.on_main(lambda: self.run_dir.save_state(state), "saving the resume point")

    # -- the run -------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        """The whole run, holding the output directory's lock (rank 0 holds it for all ranks)."""
        limit_heap_fragmentation()
        self.run_dir = RunDirectory(Path(self.config.out))
        with run_lock(self.run_dir.out):  # a second run with the same --out stops before touching anything
            return self._run()

    def _run(self) -> RunResult:
        clock = self.clock
        with clock.phase("open"):
            self.open()
            self.check_world_size()

        def windows_unless_resuming():  # may fail on bad data: before anything is written
            if self.config.resume and self.run_dir.work.joinpath("state.json").exists():
                return None
            return self.calibration_windows()

        with clock.phase("calibration"):
            # Rank 0 reads the calibration data (the token cache is written once); every rank gets it.
            windows = distributed.on_main(windows_unless_resuming, "reading the calibration data")
        with clock.phase("capture"):
            resuming = distributed.on_main(lambda: self.run_dir.prepare(self.config.overwrite, self.config.resume),
                                           "preparing the output directory")
            self.activations = self.rank_activations()
            self.stores = self.store_factory()
            if resuming:
                state = self.resume_state()
            else:
                state = self.start(windows)
            n = self.adapter.num_blocks
            progress = tqdm(range(state["next_block"], n), initial=state["next_block"], total=n,
                            desc="blocks", unit="block", disable=None if distributed.is_main() else True)
            inputs, dense_inputs = self.open_inputs(state)
        self.prefetcher = self.block_prefetcher()
        try:
            for index in progress:
                inputs, dense_inputs = self.process_block(index, inputs, dense_inputs, state)
                progress.set_postfix_str(self.block_summary(state["blocks"][-1]))
        finally:
            if self.prefetcher:
                self.prefetcher.close()
        # The report's wall time ends here; writing the index, config and report takes milliseconds.
        report = self.final_report(state)
        if distributed.world_size() > 1:  # each rank's own activations; rank 0's finish removes the rest
            shutil.rmtree(self.activations, ignore_errors=True)
        distributed.barrier("waiting for every rank to finish its last block")
        # Every rank waits for rank 0's final save, and fails with it if it fails.
        out = distributed.on_main(lambda: self.run_dir.finish(self.adapter.checkpoint.directory,
                                                              self.adapter.output_config(), state["shards"],
                                                              report),
                                  "writing the index, config and report")
        log.info("wrote %s", out)
        return RunResult(report, out, inputs)

    def start(self, windows: torch.Tensor) -> dict:
        """Write the non-block tensors, catch block 0's inputs and every block's keyword arguments."""
        adapter = self.adapter
        total = adapter.num_blocks + 1
        rest_shard = self.run_dir.shard_name(adapter.num_blocks, total)
        distributed.on_main(lambda: self.run_dir.save_shard(rest_shard, {name: adapter.streamed_copy(name)
                                                                         for name in adapter.non_block_names()}),
                            "writing the embeddings and head")
        self.total_windows = len(windows)
        self.own_windows = distributed.shard(len(windows))  # this rank's windows, a contiguous range
        adapter.load_embeddings()
        try:
            calls, first_hidden = catch_block_kwargs(adapter.model, adapter.blocks, windows[0])
            shape = (len(windows), windows.shape[1], first_hidden.shape[-1])
            inputs = self.stores.create("inputs-00000", self.local_shape(shape), adapter.storage_dtype)
            catch_block0_inputs(adapter.model, adapter.blocks, windows[self.own_windows.start:self.own_windows.stop],
                                inputs, self.batch_size, "cpu")
        finally:
            adapter.release_embeddings()
        distributed.on_main(lambda: torch.save(calls, self.run_dir.work / "block_calls.pt"),
                            "saving the blocks' arguments")
        dense_name = None
        if self.carries_dense_model:
            dense = self.stores.create("dense-00000", self.local_shape(shape), adapter.storage_dtype)
            dense[:] = inputs[:]
            dense_name = self._persist(dense, "dense-00000")
        state = {"fingerprint": self.config.fingerprint(), "world_size": distributed.world_size(),
                 "next_block": 0, "shape": list(shape), "dtype": str(adapter.storage_dtype).removeprefix("torch."),
                 "inputs": self._persist(inputs, "inputs-00000"), "dense_inputs": dense_name,
                 "shards": [rest_shard], "layers": [], "blocks": []}
        self.save_state(state)
        self.calls = calls
        return state

    def resume_state(self) -> dict:
        def load():
            state = self.run_dir.load_state()
            if state["fingerprint"] != self.config.fingerprint():
                raise ConfigError(f"the unfinished run in {self.run_dir.work} was started with different settings; "
                                  "rerun without --resume (and with --overwrite if needed) to start over")
            started_with, now = state.get("world_size", 1), distributed.world_size()
            if started_with != now:  # each rank's activations hold its own share of the windows
                raise ConfigError(f"the unfinished run in {self.run_dir.work} was started with {started_with} "
                                  f"process(es), this one has {now}: resume it with the same number (torchrun "
                                  f"--nproc_per_node {started_with}, or no torchrun for 1), or rerun without "
                                  "--resume to start over")
            return state, torch.load(self.run_dir.work / "block_calls.pt", weights_only=False)

        state, self.calls = distributed.on_main(load, "reading the resume point")
        self.total_windows = state["shape"][0]
        self.own_windows = distributed.shard(self.total_windows)
        log.info("resuming at block %d of %d", state["next_block"], self.adapter.num_blocks)
        return state

    def open_inputs(self, state):
        """The next block's saved inputs (and the dense model's, for --target dense/none)."""
        shape, dtype = self.local_shape(state["shape"]), getattr(torch, state["dtype"])
        inputs = self.stores.open(self.activations / state["inputs"], shape, dtype)
        dense = (self.stores.open(self.activations / state["dense_inputs"], shape, dtype)
                 if state["dense_inputs"] else None)
        return inputs, dense

    def _persist(self, store: ActivationStore, name: str) -> str:
        """Make `store` durable under activations/NAME.bin; return the file name."""
        filename = f"{name}.bin"
        if store.on_disk and store.path.name == filename:
            with open(store.path, "rb+") as handle:
                os.fsync(handle.fileno())
        else:
            store.save_to(self.activations / filename)
        return filename

    # -- one block -----------------------------------------------------------------------------------
    def process_block(self, index: int, inputs: ActivationStore, dense_inputs: ActivationStore | None,
                      state: dict):
        while True:
            try:
                return self._process_block(index, inputs, dense_inputs, state)
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1 or distributed.world_size() > 1:  # ranks must stay in step
                    raise
                self.batch_size //= 2
                log.warning("CUDA out of memory in block %d: retrying with --batch-size %d", index,
                            self.batch_size)
                self.adapter.release(self.adapter.blocks[index])
                torch.cuda.empty_cache()
                inputs, dense_inputs = self.open_inputs(state)  # RAM inputs may be half overwritten

    def _process_block(self, index, inputs, dense_inputs, state):
        adapter, config = self.adapter, self.config
        clock = PhaseClock(self.device)  # this block's phases; added to the run's when it is done
        name = adapter.block_name(index)
        with clock.phase("load"):
            prefetched = self.prefetcher.take(index) if self.prefetcher else None
            block = adapter.load_block(index, prefetched).to(self.device, non_blocking=True)
            del prefetched
            if self.prefetcher and index + 1 < adapter.num_blocks:
                self.prefetcher.start(index + 1)  # read while this block computes
            call = kwargs_to(self.calls[index], self.device)
            linears = prunable_linears(block, config.layers)
        shape = inputs.shape

        # 1. Run the dense block: statistics of every linear's inputs, and the dense outputs (targets).
        #    Magnitude pruning without a correction needs neither: no dense pass at all.
        fit_inputs = dense_inputs if config.fit_target == "none" else inputs
        needs_targets = self.correction is not None or dense_inputs is not None
        # --masks-from takes the weights and mask from another checkpoint: no statistics are needed.
        needs_statistics = self.method.needs_statistics and not self.pruned_source
        stats, targets, next_dense, dense_block = {}, None, None, None
        if needs_targets or needs_statistics:
            with clock.phase("observe"):
                targets = (self.stores.create(f"targets-{index:05d}", shape, inputs.dtype) if needs_targets
                           else None)
                observed = linears if needs_statistics else {}  # magnitude: targets only
                stats = observe(block, fit_inputs, call, observed, self.method, self.batch_size, self.device,
                                targets)
                stats = distributed.all_reduce_statistics(stats, observed, self.method.needs_hessian, self.device,
                                                          self.method.needs_input_sums)
                if dense_inputs is not None:  # the dense model's own activations go on to the next block
                    next_dense = self.stores.create(f"dense-{index + 1:05d}", shape, inputs.dtype)
                    if config.fit_target == "none":  # the block ran on dense inputs: its outputs are these
                        next_dense[:] = targets[:]
                    else:
                        replay(block, dense_inputs, call, self.batch_size, self.device, next_dense)
                        blend_targets(targets, next_dense, DENSE_TARGET_SHARE[config.fit_target],
                                      self.batch_size)
                if config.granularity != "block" and self.correction:
                    dense_block = copy.deepcopy(block)
                return_freed_memory()  # the forward pass's small freed tensors, before pruning's peak

        # 2. Prune every linear of the block (or take it, pruned elsewhere, with --masks-from).
        with clock.phase("prune"):
            if self.pruned_source:
                masks, notes = take_pruned_weights(linears, self.pruned_source, name,
                                                   keep_masks=self.correction is not None)
            else:
                masks, notes = prune_linears(linears, stats, self.method, self.sparsity, self.pattern, name,
                                             keep_masks=self.correction is not None)
            del stats
            distributed.check_identical({"masks": list(masks.values()),
                                         "pruned weights": [linear.weight for linear in linears.values()]},
                                        f"block {index} after pruning")
            return_freed_memory()

        # 3. Fit the correction towards the dense outputs; merge it, or discard it if it is worse.
        fit_reports = []
        if self.correction is not None:
            with clock.phase("fit"):
                fit_reports = self.correct(index, block, dense_block, masks, fit_inputs, targets, call)
                distributed.check_identical({"corrected weights": list(block.state_dict().values())},
                                            f"block {index} after the correction")

        # 4. Re-run the repaired block: its outputs feed the next block. Inputs held in RAM are
        #    overwritten window by window, saving a store's memory: their durable copy is the file
        #    written after the previous block. Inputs on disk are that file, the resume point, and
        #    are left untouched. The block's weights are final: rank 0 writes its shard meanwhile.
        shard = self.run_dir.shard_name(index, adapter.num_blocks + 1)

        def write_shard():
            self.run_dir.save_shard(shard, adapter.module_tensors(name))

        with clock.phase("replay"), BackgroundWrite(write_shard, enabled=distributed.is_main()) as shard_written:
            next_inputs = (inputs if not inputs.on_disk
                           else self.stores.create(f"inputs-{index + 1:05d}", shape, inputs.dtype))
            # Dense weights for the error report: small pieces on the CPU (host memory is the limit
            # there), larger ones for an accelerator (fewer host-to-device copies).
            piece = 2**20 if self.device.type == "cpu" else 16 * 2**20
            meter = LayerErrorMeter(linears, lambda linear: adapter.dense_rows(f"{name}.{linear}", chunk_bytes=piece),
                                    config.error_windows)
            with meter:
                replay(block, inputs, call, self.batch_size, self.device, next_inputs, meter,
                       self.own_windows.start)
            meter.sum_across_ranks()

        # 5. Finish writing the block, record the resume point, free everything of this block.
        with clock.phase("write"):
            state["layers"].extend(self.layer_entries(index, linears, meter, notes))
            entry = self.block_entry(index, fit_reports)
            state["blocks"].append(entry)
            distributed.on_main(shard_written.result, f"writing block {index}")
            adapter.release(block)
            state["shards"].insert(index, shard)
            old_inputs, old_dense = state["inputs"], state["dense_inputs"]
            state.update(next_block=index + 1, inputs=self._persist(next_inputs, f"inputs-{index + 1:05d}"),
                         dense_inputs=self._persist(next_dense, f"dense-{index + 1:05d}") if next_dense else None)
            entry.update(self.block_times(clock))  # saved without the rest of this phase, kept whole in memory
            self.save_state(state)
            for filename in (old_inputs, old_dense):
                if filename:
                    (self.activations / filename).unlink(missing_ok=True)
            if targets is not None:
                targets.delete()
            return_freed_memory()
        entry.update(self.block_times(clock))
        for phase, seconds in clock.seconds.items():
            self.clock.add(phase, seconds)
        return next_inputs, next_dense

    def correct(self, index, block, dense_block, masks, fit_inputs, targets, call) -> list[FitReport]:
        """Fit the correction on each unit of the block (the block itself by default)."""
        config = self.config
        heldout_windows = spread_positions(self.total_windows, config.heldout_windows)
        train_windows = sorted(set(range(self.total_windows)) - set(heldout_windows))
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
        reports = []
        for unit_name in fitting_units(block, config.granularity, masks):
            root, root_masks = attach_point(block, unit_name, masks)
            if unit_name == "":
                # Batches are made of global window numbers; each rank runs the windows of a batch that
                # it holds and returns None when it holds none (fit_correction sums over ranks).
                batches = _spread(train_windows, config.fit_batch_size)
                all_batches = batches + _spread(heldout_windows, config.fit_batch_size)

                def mine(i, _all=all_batches) -> list[int]:  # positions in this rank's stores
                    return [w - self.own_windows.start for w in _all[i] if w in self.own_windows]

                def run(i):
                    local = mine(i)
                    return call_block(block, fit_inputs.gather(local).to(self.device), call) if local else None

                def target(i):
                    local = mine(i)
                    return targets.gather(local).to(self.device) if local else None

                train_ids = list(range(len(batches)))
                held_ids = list(range(len(batches), len(all_batches)))
            else:
                caught = catch_unit_calls(block, block.get_submodule(unit_name), fit_inputs, call, self.device)
                dense_unit = dense_block.get_submodule(unit_name)

                def run(i, _name=unit_name, _caught=caught):
                    args, kwargs = kwargs_to(_caught[i], self.device)
                    return first_output(block.get_submodule(_name)(*args, **kwargs))  # the wrapped unit

                def target(i, _dense=dense_unit, _caught=caught):
                    args, kwargs = kwargs_to(_caught[i], self.device)
                    with torch.no_grad():
                        return first_output(_dense(*args, **kwargs))

                train_ids = [w for w in train_windows if w in caught]
                held_ids = [w for w in heldout_windows if w in caught]
                if not train_ids or not held_ids:
                    log.info("block %d %s: no calibration tokens reach it; not corrected", index, unit_name)
                    continue
            try:
                report = fit_correction(root, self.correction, root_masks, run, target, train_ids, held_ids,
                                        self.fit_options, generator, self.device, block_dtype(block))
            except CorrectionError as error:  # e.g. bias training on a model without biases
                raise CorrectionError(f"--correction {self.config.correction}, block {index} unit "
                                      f"{unit_name or 'block'}: {error}") from error
            report.note = f"{unit_name}: {report.note}" if unit_name and report.note else report.note
            reports.append((unit_name or "block", report))
        return reports

    # -- reporting -----------------------------------------------------------------------------------
    def layer_entries(self, index, linears, meter, notes) -> list[dict]:
        entries = []
        for name, linear in linears.items():
            weight = linear.weight.detach()
            entries.append({"block": index, "name": f"{self.adapter.block_name(index)}.{name}",
                            "shape": list(weight.shape),
                            "sparsity": zero_count(weight) / weight.numel(),
                            "rel_error": meter.relative(name), **({"note": notes[name]} if name in notes else {})})
        return entries

    @staticmethod
    def block_times(clock: PhaseClock) -> dict:
        return {"time_s": round(sum(clock.seconds.values()), 3), "phases_s": clock.rounded()}

    def block_entry(self, index, fit_reports) -> dict:
        entry = {"index": index}
        if fit_reports:
            entry["units"] = [{"unit": unit, **report.as_dict()} for unit, report in fit_reports]
            entry["merged"] = all(r.merged for _, r in fit_reports)
            entry["error_before"] = _mean(r.error_before for _, r in fit_reports)
            entry["error_after"] = _mean(r.error_after for _, r in fit_reports)
            entry["heldout_before"] = _mean(r.heldout_before for _, r in fit_reports)
            entry["heldout_after"] = _mean(r.heldout_after for _, r in fit_reports)
            entry["trainable_params"] = sum(r.trainable_params for _, r in fit_reports)
            entry["fit_time_s"] = round(sum(r.fit_time_s for _, r in fit_reports), 3)
        return entry

    @staticmethod
    def block_summary(entry: dict) -> str:
        """The progress bar's postfix: where the block's time went, and what the correction did."""
        times = summary(entry["phases_s"], BLOCK_PHASES)
        if "heldout_before" in entry:
            verdict = "merged" if entry["merged"] else "reverted"
            return (f"{times}; held-out error {entry['heldout_before']:.4f} -> {entry['heldout_after']:.4f} "
                    f"({verdict})")
        return times

    def run_phases(self, wall: float) -> dict[str, float]:
        """The run's seconds per phase: start-up, the blocks' phases summed, and `other`, the time
        between phases, so that they add up to the wall time. A resumed run counts only the blocks
        this process did."""
        seconds = self.clock.seconds
        phases = {name: seconds.get(name, 0.0) for name in STARTUP_PHASES + BLOCK_PHASES}
        phases["other"] = max(0.0, wall - sum(phases.values()))
        return {name: round(value, 3) for name, value in phases.items()}

    def final_report(self, state: dict) -> dict:
        wall = time.perf_counter() - self.started
        layers = state["layers"]
        total = sum(math.prod(e["shape"]) for e in layers)
        zeros = sum(e["sparsity"] * math.prod(e["shape"]) for e in layers)
        peak_device = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0)
        return {
            "model": self.config.model,
            "method": f"masks-from {self.config.masks_from}" if self.config.masks_from else self.config.method,
            "sparsity": None if self.config.masks_from else self.sparsity,
            "world_size": distributed.world_size(),
            "pattern": self.config.pattern, "correction": self.config.correction,
            "config": {k: v for k, v in vars(self.config).items()},
            "command": " ".join(sys.argv),
            "versions": package_versions(),
            "totals": {"wall_time_s": round(wall, 3), "phases_s": self.run_phases(wall),
                       "peak_host_rss_bytes": peak_rss_bytes(), "peak_device_bytes": peak_device,
                       "pruned_sparsity": zeros / total if total else 0.0,
                       "reverted_blocks": [b["index"] for b in state["blocks"] if b.get("merged") is False]},
            "layers": layers,
            "blocks": state["blocks"],
        }


# --------------------------------------------------------------------------------------------------
def run(config: RunConfig, startup_s: float = 0.0) -> RunResult:
    """Run `config`; under torchrun, as one of several processes sharing the calibration windows.
    `startup_s`: seconds spent before the call (interpreter start-up and imports), reported."""
    with distributed.process_group(config.device) as device:
        return Driver(dataclasses.replace(config, device=device), startup_s).run()


def block_dtype(block: nn.Module) -> torch.dtype:
    for parameter in block.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def zero_count(weight: torch.Tensor) -> int:
    """How many entries of a matrix are zero (+0.0 or −0.0), counted on the bits: `count_nonzero`
    of bf16 or fp32 values is several times slower than of integers of the same width. Doubling the
    bit pattern (wrapping) drops the sign bit, so both zeros become the integer 0 and nothing else
    does. A chunk of rows at a time: the doubled bits are a temporary of the chunk's size, not of the
    weight's (host memory is the limit on the CPU)."""
    if not weight.is_floating_point():
        return weight.numel() - int(weight.count_nonzero())
    bits = weight.view(_SAME_WIDTH_INTEGER[weight.element_size()])
    nonzero = sum(int((bits[rows] + bits[rows]).count_nonzero()) for rows in row_chunks(weight))
    return weight.numel() - nonzero


_SAME_WIDTH_INTEGER = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


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


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def package_versions() -> dict:
    import transformers

    return {"reconstruct": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
