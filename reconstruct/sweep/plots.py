"""The sweep's plots, plots/*.png: perplexity against sparsity, and per-block held-out error.

Drawn with matplotlib's object API on the Agg canvas: no pyplot, no global backend to set.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from .cells import CellDirectory, read_json
from .grid import DENSE, Grid, Sparsity, readable_id
from .report import result_rows

PLOT_DPI = 100


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
