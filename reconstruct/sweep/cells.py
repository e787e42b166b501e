"""One cell of a sweep: its directory DIR/cells/<id>/, what the files there say about its state, and
running it (prune, or retrain a prune cell's checkpoint; evaluate; write result.json last).
"""
from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
import traceback
from pathlib import Path

import torch

from ..api import prune, retrain
from ..eval import evaluate
from .grid import Cell

# One logger for the whole command: its messages read "reconstruct.sweep: ..." from every module.
log = logging.getLogger(__package__)


class CellDirectory:
    """DIR/cells/<id>/: the files of one cell, and what they say about its state."""

    def __init__(self, root: Path, cell: Cell):
        self.cell = cell
        self.path = root / "cells" / cell.id
        self.settings_file = self.path / "cell.json"
        self.checkpoint = self.path / "checkpoint"
        self.report = self.path / "report.json"
        self.eval_json = self.path / "eval.json"
        self.result = self.path / "result.json"
        self.failure = self.path / "failed.json"

    def is_finished(self) -> bool:
        return self.result.exists()

    def state(self) -> str:
        """finished | changed (finished with other settings) | failed | partial | pending."""
        if self.is_finished():
            recorded = read_json(self.result)["settings"]
            return "finished" if recorded == self.cell.recorded_settings() else "changed"
        if self.failure.exists():
            return "failed"
        return "partial" if self.path.exists() else "pending"

    def settings_difference(self) -> str:
        recorded = read_json(self.result)["settings"]
        return "; ".join(_differences(recorded, self.cell.recorded_settings())) or "none"

    def start(self) -> None:
        """Keep what an earlier attempt with the same settings left (to resume from); else start empty."""
        settings = self.cell.recorded_settings()
        if self.settings_file.exists() and read_json(self.settings_file) != settings:
            log.info("%s: settings changed since the last attempt; starting it again", self.cell.id)
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.failure.unlink(missing_ok=True)
        _write_json_atomically(self.settings_file, settings)

    def prune_is_complete(self) -> bool:
        # The driver renames checkpoint.partial to checkpoint only when every file is written.
        return (self.checkpoint / "report.json").exists()

    def record_failure(self, error: BaseException) -> None:
        _write_json_atomically(self.failure, {"cell": self.cell.id, "error": f"{type(error).__name__}: {error}",
                                              "traceback": traceback.format_exc()})

    def finish(self, result: dict) -> None:
        _write_json_atomically(self.result, result)

    def remove_checkpoint(self) -> None:
        for directory in (self.checkpoint, self.checkpoint.with_name("checkpoint.partial")):
            if directory.exists():
                shutil.rmtree(directory)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    differences = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            differences += _differences(before, after, f"{prefix}{key}.")
        elif before != after:
            differences.append(f"{prefix}{key}: {before!r} -> {after!r}")
    return differences


def read_json(path: Path):
    return json.loads(path.read_text())


def _write_json_atomically(path: Path, data) -> None:
    """Write to a temporary name, flush to disk, rename: a reader (or a rerun after a crash) sees the
    old file or the complete new one, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        handle.write(json.dumps(data, indent=2, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def run_cell(directory: CellDirectory, keep_checkpoints: bool) -> tuple[str, str]:
    """Bring one cell to finished (or record why not); return (skipped | finished | failed, details)."""
    if directory.is_finished():
        if not keep_checkpoints:
            directory.remove_checkpoint()  # left over if a run stopped between result and clean-up
        return "skipped", "(finished earlier)"
    directory.start()
    try:
        result = prune_and_evaluate(directory)
    except Exception as error:  # noqa: BLE001  one cell's failure must not stop the others
        log.debug("cell %s failed", directory.cell.id, exc_info=True)
        directory.record_failure(error)
        return "failed", f"{type(error).__name__}: {error}"
    finally:
        _free_memory()  # the cell's model and activations, before the next cell allocates its own
    directory.finish(result)
    if not keep_checkpoints:
        directory.remove_checkpoint()
    return "finished", ", ".join(f"{name} ppl {value:.4g}" for name, value in result["perplexity"].items())


def prune_and_evaluate(directory: CellDirectory) -> dict:
    """Prune (unless dense, or already complete), evaluate; return the cell's result record."""
    cell = directory.cell
    model_location = cell.model.location
    if cell.retrain_settings:
        model_location = str(retrain_chained(directory))
    elif not cell.is_dense:
        if not directory.prune_is_complete():
            reset_peak_memory()
            # resume=True continues from checkpoint.partial when an earlier attempt left one (its
            # settings are those of cell.json, checked in start()); otherwise it starts afresh.
            prune(model_location, str(directory.checkpoint), **cell.prune_settings, overwrite=True, resume=True)
        shutil.copyfile(directory.checkpoint / "report.json", directory.report)
        model_location = str(directory.checkpoint)
    started = time.perf_counter()
    evaluation = evaluate(model_location, data=[source.location for source in cell.data],
                          output_json=directory.eval_json, **cell.eval_settings)
    return {"cell": cell.id, "settings": cell.recorded_settings(),
            "perplexity": {source.name: evaluation["perplexity"][source.location] for source in cell.data},
            "zero_shot": evaluation.get("zero_shot"),
            "eval_time_s": round(time.perf_counter() - started, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def retrain_chained(directory: CellDirectory) -> Path:
    """A chained cell: retrain its prune cell's checkpoint (or, when that is gone, its own prune of the
    same settings in pruned/) into checkpoint/; return the checkpoint."""
    cell = directory.cell
    source = directory.path.parent / cell.pruned_by / "checkpoint"
    if not (source / "report.json").exists():
        source = directory.path / "pruned"
        if not (source / "report.json").exists():
            prune(cell.model.location, str(source), **cell.prune_settings, overwrite=True, resume=True)
    if not directory.prune_is_complete():
        reset_peak_memory()
        retrain(str(source), str(directory.checkpoint), **cell.retrain_settings, overwrite=True, resume=True)
    shutil.copyfile(directory.checkpoint / "report.json", directory.report)
    shutil.rmtree(directory.path / "pruned", ignore_errors=True)
    return directory.checkpoint


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory() -> bool:
    """Restart the peak-memory counters, so that a prune report's peak is that cell's own.

    All cells run in one process, whose peak resident memory (what the prune report records) only
    grows; Linux restarts it when "5" is written to /proc/self/clear_refs. Returns False where that
    is impossible."""
    for device in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False
