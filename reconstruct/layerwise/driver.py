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
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..api import ConfigError
from ..capture import catch_block0_inputs, catch_block_kwargs, kwargs_to
from ..corrections import CorrectionError
from ..lock import run_lock
from ..memory import default_activation_budget, limit_heap_fragmentation, return_freed_memory
from ..models import ModelAdapter, UnsupportedModelError, open_model, prunable_linears, tokenizer_for_data
from ..prefetch import BlockPrefetcher
from ..pruning import PruningError
from ..store import ActivationStore, StoreFactory
from ..timing import PhaseClock
from ..writer import BackgroundWrite, RunDirectory
from .pipeline import (DenseOutputs, Recipe, WindowShare, attach_point, fit_block_correction, fitting_units,
                       observe_block, prune_block, replay)
from .report import LayerErrorMeter, block_entry, block_summary, block_times, final_report, layer_entries

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    report: dict
    out: Path
    final_activations: ActivationStore | None  # the last block's outputs (for checks and tests)


def run(config, startup_s: float = 0.0) -> RunResult:
    """Run `config`; under torchrun, as one of several processes sharing the calibration windows.
    `startup_s`: seconds spent before the call (interpreter start-up and imports), reported."""
    with distributed.process_group(config.device) as device:
        return Driver(dataclasses.replace(config, device=device), startup_s).run()


class Driver:
    """Holds one run's settings, model and stores; `run()` is the loop in the module docstring."""

    def __init__(self, config, startup_s: float = 0.0):
        """`startup_s`: seconds the caller spent before this run (a command's interpreter start-up and
        imports), counted in the report's wall time as the phase `imports`."""
        self.config = config
        self.device = torch.device(config.device)
        self.started = time.perf_counter() - startup_s
        self.clock = PhaseClock(self.device)  # the whole run's phases; each block has its own too
        self.clock.add("imports", startup_s)
        self.recipe = Recipe.from_config(config)
        self.batch_size = config.batch_size  # halved on CUDA out-of-memory


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
        if self.recipe.correction is None:
            return
        for index, block in enumerate(self.adapter.blocks):
            trial = copy.deepcopy(block)
            masks = {name: torch.ones(linear.weight.shape, dtype=torch.bool, device="meta")
                     for name, linear in prunable_linears(trial, self.config.layers).items()}
            for unit_name in fitting_units(trial, self.config.granularity, masks):
                root, root_masks = attach_point(trial, unit_name, masks)
                try:
                    self.recipe.correction.attach(root, root_masks, self.recipe.fit_options.correction,
                                                  torch.Generator())
                except CorrectionError as error:
                    raise CorrectionError(f"block {index} unit {unit_name or 'block'}: {error}") from None

    def check_layers_against_model(self) -> None:
        """Fail before any work if the layer filter matches nothing or N:M does not divide a layer."""
        for index, block in enumerate(self.adapter.blocks):
            linears = prunable_linears(block, self.config.layers)
            if not linears:
                raise PruningError(f"block {index} has no linear layer matching --layers {self.config.layers}")
            if self.recipe.pattern:
                for name, linear in linears.items():
                    self.recipe.pattern.check_divides(linear.in_features, f"{self.adapter.block_name(index)}.{name}")

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
        if self.recipe.correction is not None and self.config.granularity != "block":
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
        budget = (int(self.config.activation_budget_gb * 2**30) if self.config.activation_budget_gb
                  else default_activation_budget())
        return StoreFactory(self.config.offload_activations, self.activations, budget,
                            self.recipe.activation_streams)

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
                progress.set_postfix_str(block_summary(state["blocks"][-1]))
        finally:
            if self.prefetcher:
                self.prefetcher.close()
        # The report's wall time ends here; writing the index, config and report takes milliseconds.
        report = final_report(self.config, state["layers"], state["blocks"], clock,
                              time.perf_counter() - self.started)
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
        self.windows = WindowShare.of(len(windows))  # this rank's windows, a contiguous range
        own = self.windows.own
        adapter.load_embeddings()
        try:
            calls, first_hidden = catch_block_kwargs(adapter.model, adapter.blocks, windows[0])
            shape = (len(windows), windows.shape[1], first_hidden.shape[-1])
            inputs = self.stores.create("inputs-00000", self.windows.local_shape(shape), adapter.storage_dtype)
            catch_block0_inputs(adapter.model, adapter.blocks, windows[own.start:own.stop],
                                inputs, self.batch_size, "cpu")
        finally:
            adapter.release_embeddings()
        distributed.on_main(lambda: torch.save(calls, self.run_dir.work / "block_calls.pt"),
                            "saving the blocks' arguments")
        dense_name = None
        if self.recipe.carries_dense_model:
            dense = self.stores.create("dense-00000", self.windows.local_shape(shape), adapter.storage_dtype)
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
                raise ValueError(f"the unfinished run in {self.run_dir.work} was started with different settings; "
                                 "rerun without --resume (and with --overwrite if needed) to start over")
            started_with, now = state.get("world_size", 1), distributed.world_size()
            if started_with != now:  # each rank's activations hold its own share of the windows
                raise ValueError(f"the unfinished run in {self.run_dir.work} was started with {started_with} "
                                 f"process(es), this one has {now}: resume it with the same number (torchrun "
                                 f"--nproc_per_node {started_with}, or no torchrun for 1), or rerun without "
                                 "--resume to start over")
            return state, torch.load(self.run_dir.work / "block_calls.pt", weights_only=False)

        state, self.calls = distributed.on_main(load, "reading the resume point")
        self.windows = WindowShare.of(state["shape"][0])
        log.info("resuming at block %d of %d", state["next_block"], self.adapter.num_blocks)
        return state

    def open_inputs(self, state):
        """The next block's saved inputs (and the dense model's, for --target dense/none)."""
        shape, dtype = self.windows.local_shape(state["shape"]), getattr(torch, state["dtype"])
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

    def _process_block(self, index: int, inputs: ActivationStore, dense_inputs: ActivationStore | None,
                       state: dict):
        config, recipe, adapter = self.config, self.recipe, self.adapter
        device, batch_size, name = self.device, self.batch_size, adapter.block_name(index)
        clock = PhaseClock(device)  # this block's phases; added to the run's when it is done
        with clock.phase("load"):
            block, call = self.load_block(index)
            linears = prunable_linears(block, config.layers)

        # 1. Run the dense block: statistics of every linear's inputs, and the dense outputs (targets).
        #    Magnitude pruning without a correction needs neither: no dense pass at all; nor does
        #    --masks-from, which takes the weights and mask from another checkpoint, need statistics.
        fit_inputs = dense_inputs if config.fit_target == "none" else inputs
        with_targets = recipe.correction is not None or dense_inputs is not None
        with_statistics = recipe.method.needs_statistics and not self.pruned_source
        stats, dense = {}, DenseOutputs()
        if with_targets or with_statistics:
            with clock.phase("observe"):
                stats, dense = observe_block(index, block, call, linears if with_statistics else {}, fit_inputs,
                                             dense_inputs, with_targets, config=config, recipe=recipe,
                                             stores=self.stores, batch_size=batch_size, device=device)

        # 2. Prune every linear of the block (or take it, pruned elsewhere, with --masks-from).
        with clock.phase("prune"):
            masks, notes = prune_block(name, linears, stats, recipe, self.pruned_source)
            del stats
            distributed.check_identical({"masks": list(masks.values()),
                                         "pruned weights": [linear.weight for linear in linears.values()]},
                                        f"block {index} after pruning")
            return_freed_memory()

        # 3. Fit the correction towards the dense outputs; merge it, or discard it if it is worse.
        fit_reports = []
        if recipe.correction is not None:
            with clock.phase("fit"):
                fit_reports = fit_block_correction(index, block, dense.dense_block, masks, fit_inputs, dense.targets,
                                                   call, config=config, recipe=recipe, windows=self.windows,
                                                   device=device)
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
                           else self.stores.create(f"inputs-{index + 1:05d}", inputs.shape, inputs.dtype))
            meter = LayerErrorMeter.for_block(adapter, name, linears, config.error_windows, device)
            with meter:
                replay(block, inputs, call, batch_size, device, next_inputs, meter, self.windows.own.start)
            meter.sum_across_ranks()

        # 5. Finish writing the block, record the resume point, free everything of this block.
        with clock.phase("write"):
            state["layers"].extend(layer_entries(index, name, linears, meter, notes))
            entry = block_entry(index, fit_reports)
            state["blocks"].append(entry)
            distributed.on_main(shard_written.result, f"writing block {index}")
            adapter.release(block)
            state["shards"].insert(index, shard)
            old_inputs, old_dense = state["inputs"], state["dense_inputs"]
            state.update(next_block=index + 1, inputs=self._persist(next_inputs, f"inputs-{index + 1:05d}"),
                         dense_inputs=(self._persist(dense.next_dense, f"dense-{index + 1:05d}") if dense.next_dense
                                       else None))
            entry.update(block_times(clock))  # saved without the rest of this phase, kept whole in memory
            self.save_state(state)
            for filename in (old_inputs, old_dense):
                if filename:
                    (self.activations / filename).unlink(missing_ok=True)
            if dense.targets is not None:
                dense.targets.delete()
            return_freed_memory()
        entry.update(block_times(clock))
        for phase, seconds in clock.seconds.items():
            self.clock.add(phase, seconds)
        return next_inputs, dense.next_dense

    def load_block(self, index: int):
        """Block `index` on the device (read in the background when prefetching; the next block's
        read starts meanwhile), and its keyword arguments there."""
        prefetched = self.prefetcher.take(index) if self.prefetcher else None
        block = self.adapter.load_block(index, prefetched).to(self.device, non_blocking=True)
        del prefetched
        if self.prefetcher and index + 1 < self.adapter.num_blocks:
            self.prefetcher.start(index + 1)  # read while this block computes
        return block, kwargs_to(self.calls[index], self.device)
