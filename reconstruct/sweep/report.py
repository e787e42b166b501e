"""The sweep's tables: results.csv (a row per cell) and results.md (perplexity per method x correction
against sparsity, dense beside), both rebuilt from the cells' files.
"""
from __future__ import annotations

import csv
import math
import os
import statistics
from pathlib import Path

from .cells import CellDirectory, read_json
from .grid import DENSE, Grid, Sparsity, chained_label


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
