"""The run directory's state: a fresh start, a resume, and the resume point after every block.

    OUT.partial/state.json       the resume point: the next block, its input files, the shards written,
                                 the report's entries so far, and the settings' fingerprint
    OUT.partial/block_calls.*    every block's keyword arguments, caught once at the start: the tensors
                                 in .safetensors, the structure in .json (no pickle: resuming runs no code)
    OUT.partial/activations/     the next block's inputs (and the dense model's), one file each; with
                                 several processes, each rank's share under rank-NNNNN/

Rank 0 writes the shared files and every rank its own activations; the resume point is saved only
once every rank's files for it are durable, so a run stopped at any moment resumes at the block
after the last one recorded. The output directory's lock (lock.py) is held around all of this.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .. import distributed
from ..capture import catch_block0_inputs, catch_block_kwargs
from ..checkpoint.errors import OutputError
from ..checkpoint.writer import fsync_directory
from ..checkpoint.tree import UnsavableValueError
from ..config import ConfigError
from ..faults import fault_point
from ..memory import default_activation_budget
from ..models import ModelAdapter, UnsupportedModelError
from ..store import ActivationStore, StoreFactory
from ..checkpoint import RunDirectory
from .pipeline import Recipe, WindowShare

log = logging.getLogger(__name__)

BLOCK_CALLS = "block_calls"  # .safetensors and .json


def has_resume_point(run_dir: RunDirectory, config) -> bool:
    """Whether this run will resume an unfinished one (and so needs no calibration windows)."""
    return config.resume and run_dir.work.joinpath("state.json").exists()


def open_run_state(run_dir: RunDirectory, config, recipe: Recipe, adapter: ModelAdapter,
                   windows: torch.Tensor | None, batch_size: int) -> "RunState":
    """Prepare the output directory, then resume the unfinished run there, or start afresh from the
    calibration `windows`."""
    resuming = distributed.on_main(lambda: run_dir.prepare(config.overwrite, config.resume),
                                   "preparing the output directory")
    state = RunState(run_dir, config, recipe.activation_streams)
    if resuming:
        state.resume(adapter.num_blocks)
    else:
        state.start(adapter, windows, batch_size, recipe.carries_dense_model)
    return state


class RunState:
    """One run's directory and how far it has come: `record` is what state.json holds, `stores`
    makes the activation stores (in RAM or under `activations`), `block_calls` are the blocks'
    keyword arguments and `windows` this rank's share of the calibration windows."""

    def __init__(self, run_dir: RunDirectory, config, activation_streams: int):
        self.run_dir, self.config = run_dir, config
        self.activations = self._rank_activations()
        budget = (int(config.activation_budget_gb * 2**30) if config.activation_budget_gb
                  else default_activation_budget())
        self.stores = StoreFactory(config.offload_activations, self.activations, budget, activation_streams)
        self.record: dict = {}
        self.block_calls: list[tuple] = []
        self.windows: WindowShare | None = None

    def _rank_activations(self) -> Path:
        """Where this process keeps its windows' activations: its own directory when there are
        several (each rank holds only its share of the windows)."""
        if distributed.world_size() == 1:
            return self.run_dir.activations
        directory = self.run_dir.activations / f"rank-{distributed.rank():05d}"
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    # -- what the resume point holds -----------------------------------------------------------------
    @property
    def next_block(self) -> int:
        return self.record["next_block"]

    @property
    def layers(self) -> list[dict]:
        return self.record["layers"]

    @property
    def blocks(self) -> list[dict]:
        return self.record["blocks"]

    # -- starting and resuming -----------------------------------------------------------------------
    def start(self, adapter: ModelAdapter, windows: torch.Tensor, batch_size: int, carries_dense_model: bool) -> None:
        """Write the non-block tensors, catch block 0's inputs and every block's keyword arguments."""
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
            catch_block0_inputs(adapter.model, adapter.blocks, windows[own.start:own.stop], inputs, batch_size, "cpu")
        finally:
            adapter.release_embeddings()
        distributed.on_main(lambda: self.save_block_calls(calls), "saving the blocks' arguments")
        dense_name = None
        if carries_dense_model:
            dense = self.stores.create("dense-00000", self.windows.local_shape(shape), adapter.storage_dtype)
            dense[:] = inputs[:]
            dense_name = self.persist(dense, "dense-00000")
        self.record = {"fingerprint": self.config.fingerprint(), "world_size": distributed.world_size(),
                       "next_block": 0, "shape": list(shape),
                       "dtype": str(adapter.storage_dtype).removeprefix("torch."),
                       "inputs": self.persist(inputs, "inputs-00000"), "dense_inputs": dense_name,
                       "shards": [rest_shard], "layers": [], "blocks": []}
        self.save()
        self.block_calls = calls

    def resume(self, num_blocks: int) -> None:
        """Read the resume point, after checking that this run may continue it."""
        work = self.run_dir.work

        def load():
            record = self.run_dir.load_state()
            if record["fingerprint"] != self.config.fingerprint():
                raise ConfigError(f"the unfinished run in {work} was started with different settings; "
                                  "rerun without --resume (and with --overwrite if needed) to start over")
            started_with, now = record.get("world_size", 1), distributed.world_size()
            if started_with != now:  # each rank's activations hold its own share of the windows
                raise ConfigError(f"the unfinished run in {work} was started with {started_with} "
                                  f"process(es), this one has {now}: resume it with the same number (torchrun "
                                  f"--nproc_per_node {started_with}, or no torchrun for 1), or rerun without "
                                  "--resume to start over")
            if not (work / f"{BLOCK_CALLS}.json").exists():
                # Never unpickled: an older version's block_calls.pt could run any code when read.
                raise OutputError(f"the unfinished run in {work} was saved by an older version of reconstruct "
                                  f"(no {BLOCK_CALLS}.json); rerun without --resume to start over")
            return record, self.run_dir.load_tree(BLOCK_CALLS)

        self.record, self.block_calls = distributed.on_main(load, "reading the resume point")
        self.windows = WindowShare.of(self.record["shape"][0])
        log.info("resuming at block %d of %d", self.next_block, num_blocks)

    def save_block_calls(self, calls: list[tuple]) -> None:
        """Every block's (args, kwargs), without pickle (checkpoint/tree.py)."""
        try:
            self.run_dir.save_tree(BLOCK_CALLS, calls)
        except UnsavableValueError as error:  # block_calls[BLOCK][0]: positional, [1]: keyword arguments
            raise UnsupportedModelError(
                f"this model calls its blocks with an argument that cannot be saved for resuming: {error}; "
                "only tensors, None, bool, int, float, str, lists, tuples and dicts can be. Please report "
                "the model") from error
        fault_point("block-calls-saved")

    def open_inputs(self) -> tuple[ActivationStore, ActivationStore | None]:
        """The next block's saved inputs (and the dense model's, for --target dense/none)."""
        shape, dtype = self.windows.local_shape(self.record["shape"]), getattr(torch, self.record["dtype"])
        inputs = self.stores.open(self.activations / self.record["inputs"], shape, dtype)
        dense = (self.stores.open(self.activations / self.record["dense_inputs"], shape, dtype)
                 if self.record["dense_inputs"] else None)
        return inputs, dense

    # -- after each block ----------------------------------------------------------------------------
    def outputs_for(self, index: int, inputs: ActivationStore) -> ActivationStore:
        """Where block `index` writes its outputs. Inputs held in RAM are overwritten window by
        window, saving a store's memory: their durable copy is the file written after the previous
        block. Inputs on disk are that file, the resume point, and are left untouched."""
        if not inputs.on_disk:
            return inputs
        return self.stores.create(f"inputs-{index + 1:05d}", inputs.shape, inputs.dtype)

    def advance(self, index: int, shard: str, next_inputs: ActivationStore,
                next_dense: ActivationStore | None) -> list[str]:
        """Record block `index` as done: its shard, and the next block's inputs made durable. Returns
        the activation files this supersedes, to delete once the resume point is saved."""
        record = self.record
        record["shards"].insert(index, shard)
        superseded = [record["inputs"], record["dense_inputs"]]
        record.update(next_block=index + 1, inputs=self.persist(next_inputs, f"inputs-{index + 1:05d}"),
                      dense_inputs=self.persist(next_dense, f"dense-{index + 1:05d}") if next_dense else None)
        return superseded

    def save(self) -> None:
        """Record the resume point once every rank's files for it are durable; rank 0 writes it."""
        distributed.barrier("waiting for every rank to save its activations")
        distributed.on_main(lambda: self.run_dir.save_state(self.record), "saving the resume point")

    def delete_activations(self, filenames: list[str | None]) -> None:
        for filename in filenames:
            if filename:
                (self.activations / filename).unlink(missing_ok=True)

    def persist(self, store: ActivationStore, name: str) -> str:
        """Make `store` durable under activations/NAME.bin; return the file name."""
        filename = f"{name}.bin"
        if store.on_disk and store.path.name == filename:
            with open(store.path, "rb+") as handle:
                os.fsync(handle.fileno())
            fsync_directory(self.activations)  # the file was created during the block: its name too
        else:
            store.save_to(self.activations / filename)
        return filename

    # -- the end -------------------------------------------------------------------------------------
    def finish(self, adapter: ModelAdapter, report: dict) -> Path:
        """Write the index, config, tokenizer and report, and make the output directory visible."""
        # The activations stay until OUT is in place (the resume point of a run killed while finishing)
        distributed.barrier("waiting for every rank to finish its last block")
        # Every rank waits for rank 0's final save, and fails with it if it fails.
        return distributed.on_main(lambda: self.run_dir.finish(adapter.checkpoint.directory,
                                                               adapter.output_config(), self.record["shards"],
                                                               report),
                                   "writing the index, config and report")
