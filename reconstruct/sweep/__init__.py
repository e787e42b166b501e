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
import csv
import importlib.util
import logging
import math
import os
import shutil
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

from ..api import ConfigError
from ..eval import LM_EVAL_INSTALL_COMMAND
from .cells import CellDirectory, prune_and_evaluate, read_json, reset_peak_memory, retrain_chained, run_cell
from .grid import DENSE, Cell, Grid, Named, Sparsity, chained_label, readable_id
from .grid_file import load_grid

log = logging.getLogger(__name__)

EXIT_SOME_CELLS_FAILED = 1
EXIT_INTERRUPTED = 130
PLOT_DPI = 100


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
# Results: one row per cell


def result_rows(directories: list[CellDirectory], grid: Grid) -> list[dict]:
    return [result_row(directory, grid) for directory in directories]


def result_row(directory: CellDirectory, grid: Grid) -> dict:
    """A cell's row of results.csv; the numbers are empty until the cell has finished."""
    cell = directory.cell
    row = {"cell": cell.id, "model": cell.model.name, "method": cell.method,
           "sparsity": cell.sparsity.value if cell.sparsity else 0.0,
           "pattern": cell.sparsity.pattern if cell.sparsity else None,
           "correction": cell.label, "seed": cell.seed, "status": directory.state()}
    for source in grid.data:
        row[f"ppl_{source.name}"] = None
    for task in grid.eval.get("tasks") or []:
        row[f"acc_{task}"] = None
    if grid.eval.get("tasks"):
        row["zero_shot_mean"] = None
    row.update(achieved_sparsity=None, prune_time_s=None, peak_host_gib=None, peak_device_gib=None,
               heldout_before=None, heldout_after=None, reverted_blocks=None, eval_time_s=None, error=None)
    if row["status"] == "failed":
        row["error"] = read_json(directory.failure)["error"]
    if row["status"] != "finished":
        return row
    result = read_json(directory.result)
    for name, value in result["perplexity"].items():
        row[f"ppl_{name}"] = value
    if result.get("zero_shot"):
        for task, value in result["zero_shot"]["acc"].items():
            row[f"acc_{task}"] = value
        row["zero_shot_mean"] = result["zero_shot"]["mean_acc"]
    row["eval_time_s"] = result["eval_time_s"]
    if cell.retrain_settings:
        row.update(_retrain_summary(read_json(directory.report)))
    elif not cell.is_dense:
        row.update(_prune_summary(read_json(directory.report)))
    return row


def _prune_summary(report: dict) -> dict:
    totals = report["totals"]
    corrected = [b for b in report["blocks"] if "heldout_before" in b]
    return {"achieved_sparsity": totals["pruned_sparsity"], "prune_time_s": totals["wall_time_s"],
            "peak_host_gib": totals["peak_host_rss_bytes"] / 2**30,
            "peak_device_gib": totals["peak_device_bytes"] / 2**30,
            "heldout_before": statistics.fmean(b["heldout_before"] for b in corrected) if corrected else None,
            "heldout_after": statistics.fmean(b["heldout_after"] for b in corrected) if corrected else None,
            "reverted_blocks": len(totals["reverted_blocks"]) if corrected else None}


def _retrain_summary(report: dict) -> dict:
    totals = report["totals"]
    return {"achieved_sparsity": totals["sparsity_after"], "prune_time_s": totals["wall_time_s"],
            "peak_host_gib": totals["peak_host_rss_bytes"] / 2**30,
            "peak_device_gib": totals["peak_device_bytes"] / 2**30,
            "heldout_before": report["heldout_before"], "heldout_after": report["heldout_after"],
            "reverted_blocks": None if report["merged"] else "all"}


def write_tables(directories: list[CellDirectory], grid: Grid, out: Path) -> None:
    rows = result_rows(directories, grid)
    write_csv(rows, out / "results.csv")
    (out / "results.md").write_text(markdown_report(rows, grid))


def write_csv(rows: list[dict], path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: _csv_value(v) for k, v in row.items()} for row in rows)
    os.replace(temporary, path)


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


# --------------------------------------------------------------------------------------------------
# results.md: perplexity per method x correction (rows) and sparsity (columns), dense beside


def markdown_report(rows: list[dict], grid: Grid) -> str:
    settings = ", ".join(f"{key}={_display(value)}" for key, value in grid.prune.items())
    lines = ["# Sweep results", "",
             "- Models: " + ", ".join(f"{model.name} ({_display(model.location)})" for model in grid.models),
             f"- Prune settings: {settings or 'the defaults'}",
             f"- Perplexity at seqlen {grid.eval['seqlen']}; each entry is the mean over seeds "
             f"{', '.join(map(str, grid.seeds))} (± their standard deviation when there are several)", ""]
    metrics = [(f"ppl_{source.name}", f"perplexity on {source.name} ({_display(source.location)})")
               for source in grid.data]
    if grid.eval.get("tasks"):
        metrics.append(("zero_shot_mean", f"mean zero-shot accuracy ({', '.join(grid.eval['tasks'])})"))
    for model in grid.models:
        model_rows = [row for row in rows if row["model"] == model.name]
        for column, title in metrics:
            lines += [f"## {model.name}: {title}", "", *_metric_table(model_rows, column, grid), ""]
    failed = [row for row in rows if row["status"] == "failed"]
    if failed:
        lines += ["## Failed cells", "", *[f"- `{row['cell']}`: {row['error']}" for row in failed], ""]
    return "\n".join(lines)


def _display(value) -> str:
    """Paths under the home directory as ~/...: shorter, and the same on every machine."""
    text = str(value)
    home = str(Path.home())
    return "~" + text[len(home):] if text.startswith(home + os.sep) else text


def _metric_table(rows: list[dict], column: str, grid: Grid) -> list[str]:
    sparsities = sorted(grid.sparsities, key=Sparsity.sort_key)
    dense = _aggregate([row for row in rows if row["method"] == DENSE], column)
    table = ["| method | correction | dense | " + " | ".join(s.label for s in sparsities) + " |",
             "|---|---|---:|" + "---:|" * len(sparsities)]
    labels = [label for correction in grid.corrections
              for label in [correction, *(chained_label(correction, p) for p in grid.retrain_params)]]
    for method in grid.methods:
        for correction in labels:
            entries = [_aggregate([row for row in rows if row["method"] == method
                                   and row["correction"] == correction and _same_sparsity(row, s)], column)
                       for s in sparsities]
            table.append(f"| {method} | {correction} | {dense} | " + " | ".join(entries) + " |")
    return table


def _same_sparsity(row: dict, sparsity: Sparsity) -> bool:
    return row["pattern"] == sparsity.pattern and math.isclose(row["sparsity"], sparsity.value)


def _aggregate(rows: list[dict], column: str) -> str:
    """Mean (± sd) over the finished seeds; says so when some seeds failed or are still to run."""
    values = [row[column] for row in rows if row["status"] == "finished" and row[column] is not None]
    if not values:
        return "failed" if any(row["status"] == "failed" for row in rows) else "–"
    text = f"{statistics.fmean(values):.2f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values):.2f}"
    if len(values) < len(rows):
        text += f" ({len(values)} of {len(rows)} seeds)"
    return text


# --------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend to set)


def write_plots(directories: list[CellDirectory], grid: Grid, out: Path) -> list[Path]:
    rows = result_rows(directories, grid)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    written = []
    for model in grid.models:
        model_rows = [row for row in rows if row["model"] == model.name]
        for source in grid.data:
            path = plots / f"ppl-{readable_id(model.name, source.name)}.png"
            if plot_perplexity(model_rows, f"ppl_{source.name}", grid, path,
                               title=f"{model.name}: perplexity on {source.name} (seqlen {grid.eval['seqlen']})"):
                written.append(path)
        model_directories = [d for d in directories if d.cell.model == model]
        path = plots / f"heldout-{readable_id(model.name)}.png"
        if plot_heldout_error(model_directories, grid, path, model.name):
            written.append(path)
    return written


def _new_figure(width: float = 6.4, height: float = 4.2):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=PLOT_DPI, layout="constrained")
    return figure, figure.subplots()


def plot_perplexity(rows: list[dict], column: str, grid: Grid, path: Path, title: str) -> bool:
    """Perplexity against sparsity, a line per method + correction (mean over finished seeds).

    N:M patterns are drawn as separate square markers, labelled, at their implied sparsity: they are a
    different kind of sparsity from the unstructured fractions the lines connect. Returns False (and
    writes nothing) when no pruned cell has finished yet."""
    figure, axes = _new_figure()
    colours = _colour_cycle()
    plotted = False
    for method in grid.methods:
        for correction in grid.corrections:
            series = [row for row in rows if row["method"] == method and row["correction"] == correction]
            unstructured = _means_by_sparsity([r for r in series if not r["pattern"]], column)
            patterns = _means_by_sparsity([r for r in series if r["pattern"]], column)
            if not unstructured and not patterns:
                continue
            colour = next(colours)
            label = f"{method} + {correction}"
            if unstructured:
                xs, ys = zip(*[(s, v) for (s, _), v in unstructured.items()])
                axes.plot(xs, ys, marker="o", color=colour, label=label)
                label = None
            for (sparsity, pattern), value in patterns.items():
                axes.plot([sparsity], [value], marker="s", linestyle="none", color=colour, label=label)
                axes.annotate(pattern, (sparsity, value), textcoords="offset points", xytext=(5, 3), fontsize=8)
                label = None
            plotted = True
    if not plotted:
        return False
    dense = [row[column] for row in rows if row["method"] == DENSE and row["status"] == "finished"]
    if dense:
        axes.axhline(dense[0], color="black", linestyle=":", label=f"dense ({dense[0]:.2f})")
    _log_y_axis(axes)
    axes.set_xlabel("sparsity (fraction of weights set to zero)")
    axes.set_ylabel("perplexity (log scale)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(path)
    return True


def _means_by_sparsity(rows: list[dict], column: str) -> dict[tuple[float, str | None], float]:
    values: dict[tuple[float, str | None], list[float]] = {}
    for row in rows:
        if row["status"] == "finished" and row[column] is not None:
            values.setdefault((row["sparsity"], row["pattern"]), []).append(row[column])
    return {key: statistics.fmean(v) for key, v in sorted(values.items(), key=lambda item: item[0][0])}


def plot_heldout_error(directories: list[CellDirectory], grid: Grid, path: Path, model_name: str) -> bool:
    """Per-block held-out output error before and after the correction, at the grid's highest sparsity.

    One line pair per method + correction (dashed: pruned only; solid: corrected), for the first seed
    that finished. Returns False when no corrected cell at that sparsity has finished."""
    # The highest fraction; an unstructured one before an N:M pattern of the same fraction.
    highest = max(grid.sparsities, key=lambda s: (s.value, s.pattern is None))
    figure, axes = _new_figure()
    colours = _colour_cycle()
    seeds = []
    any_reverted = False
    for method in grid.methods:
        for correction in grid.corrections:
            blocks = _heldout_blocks(directories, method, highest, correction)
            if blocks is None:
                continue
            seed, entries = blocks
            seeds.append(seed)
            colour = next(colours)
            indices = [b["index"] for b in entries]
            axes.plot(indices, [b["heldout_before"] for b in entries], linestyle="--", marker="o",
                      markerfacecolor="none", color=colour, label=f"{method} + {correction}: before")
            axes.plot(indices, [b["heldout_after"] for b in entries], linestyle="-", marker="o", color=colour,
                      label=f"{method} + {correction}: after")
            # The guard keeps the pruned-only block where the correction made held-out error worse.
            reverted = [b for b in entries if b.get("merged") is False]
            if reverted:
                axes.plot([b["index"] for b in reverted], [b["heldout_after"] for b in reverted], marker="x",
                          markersize=10, linestyle="none", color="black",
                          label="reverted (not merged)" if not any_reverted else None)
                any_reverted = True
    if not seeds:
        return False
    _log_y_axis(axes)
    axes.set_xlabel("block")
    axes.set_ylabel("held-out relative output error (log scale)")
    seed_text = f"seed {seeds[0]}" if len(set(seeds)) == 1 else "first finished seed of each"
    axes.set_title(f"{model_name}: per-block held-out error at sparsity {highest.label} ({seed_text})",
                   fontsize=10)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    figure.savefig(path)
    return True


def _heldout_blocks(directories: list[CellDirectory], method: str, sparsity: Sparsity,
                    correction: str) -> tuple[int, list[dict]] | None:
    """(seed, corrected blocks of its report) for the first finished matching cell, if any."""
    for directory in directories:
        cell = directory.cell
        if (cell.method, cell.sparsity, cell.correction) != (method, sparsity, correction) or cell.pruned_by:
            continue
        if directory.state() != "finished":
            continue
        blocks = [b for b in read_json(directory.report)["blocks"] if "heldout_before" in b]
        if blocks:
            return cell.seed, blocks
    return None


def _log_y_axis(axes) -> None:
    """A log y axis labelled with plain numbers (matplotlib's default reads 3.245 x 10^2). Within a
    decade only the minor ticks fall inside the range, so they get labels; across decades they would
    crowd, so only the powers of ten do."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axes.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:.4g}")
    axes.yaxis.set_major_formatter(plain)
    low, high = axes.get_ylim()
    axes.yaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())


def _colour_cycle():
    from itertools import cycle

    return cycle(f"C{i}" for i in range(10))


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
