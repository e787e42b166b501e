"""The layer-wise driver: prune and repair a model one transformer block at a time.

    windows = calibration token windows
    inputs  = block 0's inputs for every window, and every block's keyword arguments
    for each block:
        load its weights; run it dense, collecting each linear's input statistics and its outputs
        prune every linear (masks); fit the correction towards the dense outputs; merge it
        run the repaired block again: its outputs are the next block's inputs
        write the block's shard and the resume point; free the block
    write the model card, the index, config, tokenizer and report

Only one block's weights are ever in memory; activations live in a store (RAM or disk) and go to the
device one batch at a time. This module is that loop; the rooms it calls on: preflight.py opens the
model and checks the settings against it, state.py keeps the run directory (start, resume, the
resume point), pipeline.py holds the block's steps and report.py what the run reports.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import distributed
from ..capture import kwargs_to
from ..checkpoint import BackgroundWrite, RunDirectory
from ..faults import fault_point
from ..lock import run_lock
from ..memory import DeviceMemoryError, limit_heap_fragmentation, return_freed_memory
from ..model_card import changed_settings, prune_card, python_call
from ..models import prunable_linears
from ..prefetch import BlockPrefetcher
from ..progress import Progress
from ..store import ActivationStore
from ..timing import PhaseClock
from .pipeline import DenseOutputs, Recipe, fit_block_correction, observe_block, prune_block, replay
from .preflight import calibration_windows, check_world_size, open_checked_model
from .report import LayerErrorMeter, block_entry, block_summary, block_times, final_report, layer_entries
from .state import has_resume_point, open_run_state

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    report: dict
    out: Path
    final_activations: ActivationStore | None  # the last block's outputs (for checks and tests)


def run(config, startup_s: float = 0.0, invocation: str | None = None) -> RunResult:
    """Run `config`; under torchrun, as one of several processes sharing the calibration windows.
    `startup_s`: seconds spent before the call (interpreter start-up and imports), reported;
    `invocation`: how the run was started (the command line, or the Python call), for the report."""
    with distributed.process_group(config.device) as device:
        return Driver(dataclasses.replace(config, device=device), startup_s, invocation).run()


class Driver:
    """One run: its settings, model and run directory; `run()` is the loop in the module docstring."""

    def __init__(self, config, startup_s: float = 0.0, invocation: str | None = None):
        """`startup_s`: seconds the caller spent before this run (a command's interpreter start-up and
        imports), counted in the report's wall time as the phase `imports`."""
        self.config = config
        self.invocation = invocation or python_call("prune", config.model, config.out, changed_settings(config))
        self.device = torch.device(config.device)
        self.started = time.perf_counter() - startup_s
        self.clock = PhaseClock(self.device)  # the whole run's phases; each block has its own too
        self.clock.add("imports", startup_s)
        self.recipe = Recipe.from_config(config)
        self.batch_size = config.batch_size  # halved on CUDA out-of-memory in a forward pass
        self.fit_batch_size = config.fit_batch_size  # halved on CUDA out-of-memory while fitting
        self.fitting = False  # whether the block is being fitted now (where an out-of-memory came from)

    def run(self) -> RunResult:
        """The whole run, holding the output directory's lock (rank 0 holds it for all ranks)."""
        limit_heap_fragmentation()
        run_dir = RunDirectory(Path(self.config.out))
        with run_lock(run_dir.out):  # a second run with the same --out stops before touching anything
            return self._run(run_dir)

    def _run(self, run_dir: RunDirectory) -> RunResult:
        config, clock = self.config, self.clock
        distributed.on_main(lambda: run_dir.check_output(config.overwrite), "checking the output directory")
        with clock.phase("open"):
            self.adapter, self.pruned_source = open_checked_model(config, self.recipe)
            check_world_size(config, self.recipe)
        with clock.phase("calibration"):
            # Rank 0 reads the calibration data (the token cache is written once); every rank gets it.
            # It may fail on bad data: before anything is written.
            windows = distributed.on_main(
                lambda: None if has_resume_point(run_dir, config) else calibration_windows(config, self.adapter),
                "reading the calibration data")
        with clock.phase("capture"):
            self.state = open_run_state(run_dir, config, self.recipe, self.adapter, windows, self.batch_size)
            done, n = self.state.next_block, self.adapter.num_blocks
            # A bar on a terminal; in a log, one line per block (a block takes seconds to minutes)
            progress = Progress(n, "prune", "block", initial=done, enabled=distributed.is_main(), every=1)
            inputs, dense_inputs = self.state.open_inputs()
        self.prefetcher = self.block_prefetcher()
        try:
            for index in range(done, n):
                inputs, dense_inputs = self.process_block(index, inputs, dense_inputs)
                progress.update(summary=block_summary(self.state.blocks[-1],
                                                      [e for e in self.state.layers if e["block"] == index]))
        finally:
            progress.close()
            if self.prefetcher:
                self.prefetcher.close()
        # The report's wall time ends here; writing the index, config and report takes milliseconds.
        report = final_report(config, self.state.layers, self.state.blocks, clock, time.perf_counter() - self.started,
                              self.invocation)
        distributed.on_main(lambda: self.state.run_dir.save_text("README.md", prune_card(report)),
                            "writing the model card")
        out = self.state.finish(self.adapter, report)
        log.info("wrote %s", out)
        return RunResult(report, out, inputs)

    def block_prefetcher(self) -> BlockPrefetcher | None:
        """The background reader of the next block (reconstruct/prefetch.py), or None: `--prefetch
        auto` reads ahead on an accelerator only, since it holds one more block in host memory."""
        if self.config.prefetch == "off" or (self.config.prefetch == "auto" and self.device.type == "cpu"):
            return None
        return BlockPrefetcher(lambda index: self.adapter.module_reader(self.adapter.block_name(index)),
                               pin_memory=self.device.type == "cuda")

    # -- one block -----------------------------------------------------------------------------------
    def process_block(self, index: int, inputs: ActivationStore, dense_inputs: ActivationStore | None):
        """The block's steps; on CUDA out-of-memory, the block again from its start with half the
        batch of the step that ran out (the forward passes' or the fitting's): the fit leaves the
        block without its correction's wrappers, so it reloads from the checkpoint like any block."""
        while True:
            try:
                return self._process_block(index, inputs, dense_inputs)
            except torch.cuda.OutOfMemoryError as error:
                self.halve_batch_after(error, index)
                self.adapter.release(self.adapter.blocks[index])
                torch.cuda.empty_cache()
                inputs, dense_inputs = self.state.open_inputs()  # RAM inputs may be half overwritten

    def halve_batch_after(self, error: torch.cuda.OutOfMemoryError, index: int) -> None:
        """Halve the batch of the step that ran out of memory, or raise DeviceMemoryError naming the
        settings to change when it is one window already (or several ranks would fall out of step)."""
        config, fitting = self.config, self.fitting
        flag, size = ("--fit-batch-size", self.fit_batch_size) if fitting else ("--batch-size", self.batch_size)
        where = f"fitting block {index}'s correction" if fitting else f"block {index}"
        if size > 1 and distributed.world_size() == 1:
            if fitting:
                self.fit_batch_size //= 2
            else:
                self.batch_size //= 2
            log.warning("CUDA out of memory %s: retrying the block with %s %d", f"while {where}" if fitting
                        else f"in {where}", flag, size // 2)
            return
        if distributed.world_size() > 1:
            advice = (f"the ranks cannot lower it alone, in step: rerun the same command with a smaller {flag} "
                      "and --resume")
        elif fitting:
            advice = (f"lower --seqlen (now {config.seqlen}) or --rank (now {config.rank}), fit smaller units "
                      "(--granularity sublayer or linear), use --dtype bf16, or a device with more free memory")
        else:
            advice = (f"lower --seqlen (now {config.seqlen}), use --dtype bf16, or a device with more free "
                      "memory: one block's weights and one window's activations must fit")
        raise DeviceMemoryError(f"the device ran out of memory {'while ' if fitting else 'in '}{where} with "
                                f"{flag} {size} (rank {distributed.rank()} of {distributed.world_size()}); "
                                f"{advice}. The blocks already finished are kept: add --resume") from error

    def _process_block(self, index: int, inputs: ActivationStore, dense_inputs: ActivationStore | None):
        config, recipe, state, adapter = self.config, self.recipe, self.state, self.adapter
        device, batch_size, name = self.device, self.batch_size, adapter.block_name(index)
        clock = PhaseClock(device)  # this block's phases; added to the run's when it is done
        self.fitting = False
        with clock.phase("load"):
            block, call = self.load_block(index)
            linears = prunable_linears(block, config.layers)
        fault_point("block-load")  # tests/test_faults.py kills the run after each phase, one by one

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
                                             stores=state.stores, batch_size=batch_size, device=device)
            fault_point("block-observe")

        # 2. Prune every linear of the block (or take it, pruned elsewhere, with --masks-from).
        with clock.phase("prune"):
            masks, notes = prune_block(name, linears, stats, recipe, self.pruned_source)
            del stats
            distributed.check_identical({"masks": list(masks.values()),
                                         "pruned weights": [linear.weight for linear in linears.values()]},
                                        f"block {index} after pruning")
            return_freed_memory()
        fault_point("block-prune")

        # 3. Fit the correction towards the dense outputs; merge it, or discard it if it is worse.
        fit_reports = []
        if recipe.correction is not None:
            with clock.phase("fit"):
                self.fitting = True
                fit_config = dataclasses.replace(config, fit_batch_size=self.fit_batch_size)
                fit_reports = fit_block_correction(index, block, dense.dense_block, masks, fit_inputs, dense.targets,
                                                   call, config=fit_config, recipe=recipe, windows=state.windows,
                                                   device=device)
                self.fitting = False
                distributed.check_identical({"corrected weights": list(block.state_dict().values())},
                                            f"block {index} after the correction")
            fault_point("block-fit")

        # 4. Re-run the repaired block: its outputs feed the next block. The block's weights are
        #    final: rank 0 writes its shard meanwhile.
        shard = state.run_dir.shard_name(index, adapter.num_blocks + 1)

        def write_shard():
            state.run_dir.save_shard(shard, adapter.module_tensors(name))

        with clock.phase("replay"), BackgroundWrite(write_shard, enabled=distributed.is_main()) as shard_written:
            next_inputs = state.outputs_for(index, inputs)
            meter = LayerErrorMeter.for_block(adapter, name, linears, config.error_windows, device)
            with meter:
                replay(block, inputs, call, batch_size, device, next_inputs, meter, state.windows.own.start)
            meter.sum_across_ranks()
        fault_point("block-replay")

        # 5. Finish writing the block, record the resume point, free everything of this block.
        with clock.phase("write"):
            state.layers.extend(layer_entries(index, name, linears, meter, notes))
            entry = block_entry(index, fit_reports)
            state.blocks.append(entry)
            distributed.on_main(shard_written.result, f"writing block {index}")
            adapter.release(block)
            superseded = state.advance(index, shard, next_inputs, dense.next_dense)
            entry.update(block_times(clock))  # saved without the rest of this phase, kept whole in memory
            state.save()
            state.delete_activations(superseded)
            if dense.targets is not None:
                dense.targets.delete()
            return_freed_memory()
        fault_point("block-write")
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
        return block, kwargs_to(self.state.block_calls[index], self.device)
