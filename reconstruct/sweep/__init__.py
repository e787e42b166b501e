"""`reconstruct sweep GRID.yaml`: a grid of prune + eval cells, run resumably, summarised in tables and plots.

    grid  = load_grid(GRID.yaml)        # every setting checked before anything runs
    cells = each model's dense baseline, then models x methods x sparsities x corrections x seeds,
            each prune cell followed by its chained retrain cells (one per `retrain: params`)
    for each cell:
        finished (result.json there)  -> skipped
        otherwise                     -> prune into cells/<id>/checkpoint, evaluate, write result.json last
        an error                      -> recorded in cells/<id>/failed.json; the sweep goes on
    write results.csv, results.md and plots/*.png from the cells' files

The output directory:

    DIR/grid.yaml                  the grid this directory was last run with (a copy)
    DIR/cells/<id>/cell.json       the settings the cell was started with
    DIR/cells/<id>/checkpoint/     the pruned model (deleted after evaluation unless keep_checkpoints)
    DIR/cells/<id>-retrain_<p>/    a chained cell: the prune cell's checkpoint retrained with --params p
                                   (its own prune in pruned/ when that checkpoint is gone)
    DIR/cells/<id>/report.json     the prune report (a copy of checkpoint/report.json)
    DIR/cells/<id>/eval.json       what `reconstruct eval` returned
    DIR/cells/<id>/result.json     written atomically, last: its presence marks the cell finished
    DIR/cells/<id>/failed.json     the error of the cell's last attempt (removed when it is retried)
    DIR/results.csv, results.md    one row per cell; perplexity tables
    DIR/plots/*.png                perplexity against sparsity; per-block held-out error

Resuming: rerunning the same command skips finished cells. An unfinished cell is continued as far as
its files allow: a complete checkpoint is evaluated without pruning again, and an interrupted prune
continues from its last finished block (the driver's `resume`); anything else is redone. A finished
cell whose recorded settings differ from the grid's is an error rather than a silent mix of settings.
docs/sweeps.md has the YAML format and an example.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from ..api import ConfigError
from ..eval import LM_EVAL_INSTALL_COMMAND
from .cells import CellDirectory, prune_and_evaluate, read_json, reset_peak_memory, retrain_chained, run_cell
from .grid import DENSE, Cell, Grid, Named, Sparsity, chained_label, readable_id
from .grid_file import load_grid
from .plots import plot_heldout_error, plot_perplexity, write_plots
from .report import markdown_report, result_row, result_rows, write_csv, write_tables

log = logging.getLogger(__name__)

EXIT_SOME_CELLS_FAILED = 1
EXIT_INTERRUPTED = 130


# --------------------------------------------------------------------------------------------------
# Running


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


# --------------------------------------------------------------------------------------------------
# The command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid", help="YAML file: models, methods, sparsities, corrections, seeds, prune "
                        "settings and eval settings (docs/sweeps.md)")
    parser.add_argument("--out", default=None, help="output directory (default: sweeps/<GRID's file name> "
                        "in the current directory); rerunning with the same one resumes")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the cells and which of them are finished, without running anything")


def main(args) -> int:
    grid_path = Path(args.grid)
    grid = load_grid(grid_path)
    out = Path(args.out) if args.out else Path("sweeps") / grid_path.stem
    try:
        return run_sweep(grid, out, dry_run=args.dry_run, grid_file=grid_path)
    except KeyboardInterrupt:
        print(f"sweep interrupted: finished cells are kept in {out}; rerun the same command to continue",
              file=sys.stderr)
        return EXIT_INTERRUPTED
