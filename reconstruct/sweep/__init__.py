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

The package, each module importing only those listed above it:

    grid.py       Named, Sparsity, Cell, Grid: what a grid is, and the cells it expands to
    grid_file.py  load_grid: reading and checking a grid's YAML file
    cells.py      CellDirectory (one cell's files and state); running one cell
    report.py     the result rows, results.csv and results.md
    plots.py      plots/*.png
    run.py        run_sweep: the loop over the cells, the plan (--dry-run), the directory's lock
    __init__.py   the command: add_arguments and main (what cli.py calls)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cells import CellDirectory, prune_and_evaluate, retrain_chained, run_cell
from .grid import DENSE, Cell, Grid, Named, Sparsity, chained_label
from .grid_file import load_grid
from .plots import plot_heldout_error, plot_perplexity, write_plots
from .report import markdown_report, result_row, result_rows, write_csv, write_tables
from .run import EXIT_SOME_CELLS_FAILED, print_plan, run_sweep

# What callers and tests use. prune, evaluate and retrain are not among them: cells.py looks them up,
# so a test replaces them in reconstruct.sweep.cells (here they would be replaced to no effect).
__all__ = ["DENSE", "EXIT_INTERRUPTED", "EXIT_SOME_CELLS_FAILED", "Cell", "CellDirectory", "Grid", "Named",
           "Sparsity", "add_arguments", "chained_label", "load_grid", "main", "markdown_report",
           "plot_heldout_error", "plot_perplexity", "print_plan", "prune_and_evaluate", "result_row",
           "result_rows", "retrain_chained", "run_cell", "run_sweep", "write_csv", "write_plots",
           "write_tables"]

EXIT_INTERRUPTED = 130


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
