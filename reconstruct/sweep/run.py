"""Running a sweep: every cell in turn (finished ones skipped) under DIR/.lock, the tables rewritten
after each cell and the plots at the end; or, with --dry-run, the plan.
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..config import ConfigError
from ..eval import LM_EVAL_INSTALL_COMMAND
from .cells import CellDirectory, reset_peak_memory, run_cell
from .grid import Cell, Grid
from .plots import write_plots
from .report import write_tables

# One logger for the whole command: its messages read "reconstruct.sweep: ..." from every module.
log = logging.getLogger(__package__)

EXIT_SOME_CELLS_FAILED = 1


def run_sweep(grid: Grid, out: Path, dry_run: bool = False, grid_file: Path | None = None) -> int:
    """Run every unfinished cell of `grid` into `out`; write the summaries; return the exit code.

    `grid_file`, the YAML the grid came from, is copied to DIR/grid.yaml as a record."""
    cells = grid.cells()
    directories = [CellDirectory(out, cell) for cell in cells]
    _refuse_changed_cells(directories, out)
    if dry_run:
        print_plan(directories)
        return 0
    _check_optional_packages(grid)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        if grid_file is not None:
            shutil.copyfile(grid_file, out / "grid.yaml")
        failed = []
        peak_memory_resettable = reset_peak_memory()
        if not peak_memory_resettable:
            log.warning("cannot reset the process's peak memory between cells (no /proc/self/clear_refs): "
                        "each cell's peak_host_gib is the peak of the whole sweep so far")
        try:
            for number, directory in enumerate(directories, start=1):
                print(f"[{number}/{len(directories)}] {directory.cell.id}", flush=True)
                # A prune cell's checkpoint stays until its chained retrain cells have used it.
                keep = grid.keep_checkpoints or bool(grid.retrain_params and not directory.cell.pruned_by)
                status, detail = run_cell(directory, keep)
                following = directories[number] if number < len(directories) else None
                if (directory.cell.pruned_by and not grid.keep_checkpoints
                        and (following is None or following.cell.pruned_by != directory.cell.pruned_by)):
                    CellDirectory(out, _cell_by_id(cells, directory.cell.pruned_by)).remove_checkpoint()
                print(f"[{number}/{len(directories)}] {directory.cell.id}: {status} {detail}", flush=True)
                if status == "failed":
                    failed.append(directory.cell.id)
                write_tables(directories, grid, out)  # after every cell: progress is visible
        except KeyboardInterrupt:
            write_tables(directories, grid, out)
            raise
        write_plots(directories, grid, out)
    print(f"sweep: {len(cells) - len(failed)} of {len(cells)} cells finished; results in "
          f"{out / 'results.md'}, {out / 'results.csv'} and {out / 'plots'}")
    if failed:
        print(f"sweep: {len(failed)} cells failed (errors in results.csv and cells/<id>/failed.json): "
              f"{', '.join(failed)}; rerun the same command to retry them")
        return EXIT_SOME_CELLS_FAILED
    return 0


def _cell_by_id(cells: list[Cell], cell_id: str) -> Cell:
    return next(cell for cell in cells if cell.id == cell_id)


def _refuse_changed_cells(directories: list[CellDirectory], out: Path) -> None:
    changed = [d for d in directories if d.state() == "changed"]
    if changed:
        raise ConfigError(f"{len(changed)} finished cells in {out} were run with other settings "
                          f"(e.g. {changed[0].cell.id}: {changed[0].settings_difference()}); their results "
                          "would be mixed with the new ones. Use another --out, or delete those cells' "
                          f"directories under {out / 'cells'} to redo them")


def print_plan(directories: list[CellDirectory]) -> None:
    for directory in directories:
        print(f"{directory.state():9s} {directory.cell.id}")
    todo = sum(d.state() != "finished" for d in directories)
    print(f"{len(directories)} cells, {todo} to run")


@contextmanager
def _exclusive(out: Path):
    """Hold DIR/.lock: two sweeps writing the same cells would corrupt each other's checkpoints."""
    import fcntl  # POSIX only: imported here so that `reconstruct --help` works without it

    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another sweep is running in {out}; wait for it or use another --out") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_optional_packages(grid: Grid) -> None:
    """Fail before the first cell rather than after every cell's prune."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("the sweep's plots need matplotlib; install it with: pip install reconstruct[plots]")
    if grid.eval.get("tasks") and importlib.util.find_spec("lm_eval") is None:
        raise ImportError(f"the grid's zero-shot tasks need lm-evaluation-harness; install it with: "
                          f"{LM_EVAL_INSTALL_COMMAND}")
