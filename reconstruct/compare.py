"""`reconstruct compare RUN [RUN ...]`: the per-layer sparsity and error of several runs, side by side.

Each RUN is a pruned checkpoint directory, a sweep cell directory (both hold report.json) or a
report.json file. Printed are

* a layer table: a row per pruned linear (in the order of the first run that has it), a column pair
  (sparsity, relative output error) per run, and a totals row (the run's overall sparsity and the
  mean of its layers' errors);
* a block table, when any run fitted a correction: each block's held-out output error before and
  after the correction, per run.

`--csv FILE` writes the same numbers as one CSV (a `section` column says which table a row is from).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError

REPORT_NAME = "report.json"


@dataclass
class Run:
    label: str   # the column heading: the shortest path suffix that tells the runs apart
    path: Path   # the report.json file
    report: dict

    @property
    def description(self) -> str:
        report = self.report
        sparsity = report.get("pattern") or f"{report['sparsity']:g}"
        return f"{report['method']} {sparsity}, correction {report['correction']}, model {report['model']}"


def load_runs(locations: list[str]) -> list[Run]:
    paths = [report_path(location) for location in locations]
    labels = distinct_labels([path.parent if path.name == REPORT_NAME else path for path in paths])
    return [Run(label, path, json.loads(path.read_text())) for label, path in zip(labels, paths)]


def report_path(location: str) -> Path:
    """The report.json of a checkpoint or sweep cell directory, or the file itself."""
    path = Path(location).expanduser()
    if path.is_dir():
        path = path / REPORT_NAME
    if not path.is_file():
        unfinished = Path(str(location).rstrip("/") + ".partial")
        hint = (f"; {unfinished} is an unfinished run, which has no report yet" if unfinished.exists()
                else "; pass a pruned checkpoint directory, a sweep cell directory or a report.json file")
        raise ConfigError(f"no report at {path}{hint}")
    return path


def distinct_labels(paths: list[Path]) -> list[str]:
    """The last path component of each run, lengthened by parents while two runs share a label."""
    parts = [path.resolve().parts for path in paths]
    depth = [1] * len(paths)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashing = {i for i, label in enumerate(labels) if labels.count(label) > 1 and depth[i] < len(parts[i])}
        if not clashing:
            return labels
        for i in clashing:
            depth[i] += 1


# --------------------------------------------------------------------------------------------------
# The tables, as rows of numbers (None where a run has no value)


def layer_rows(runs: list[Run]) -> list[tuple[str, list[float | None]]]:
    """(layer name, [sparsity, rel_error of each run...]) per layer, then the totals row."""
    names = []
    for run in runs:
        names += [entry["name"] for entry in run.report["layers"] if entry["name"] not in names]
    by_run = [{entry["name"]: entry for entry in run.report["layers"]} for run in runs]
    rows = []
    for name in names:
        values = []
        for layers in by_run:
            entry = layers.get(name)
            values += [entry["sparsity"], entry["rel_error"]] if entry else [None, None]
        rows.append((name, values))
    totals = []
    for run in runs:
        errors = [entry["rel_error"] for entry in run.report["layers"] if entry["rel_error"] is not None]
        totals += [run.report["totals"]["pruned_sparsity"], statistics.fmean(errors) if errors else None]
    rows.append(("total (sparsity of all; mean error)", totals))
    return rows


def block_rows(runs: list[Run]) -> list[tuple[str, list[float | None]]]:
    """(block, [held-out error before, after of each run...]); empty when no run has a correction."""
    by_run = [{block["index"]: block for block in run.report["blocks"] if "heldout_before" in block}
              for run in runs]
    indices = sorted(set().union(*by_run))
    rows = []
    for index in indices:
        values = []
        for blocks in by_run:
            block = blocks.get(index)
            values += [block["heldout_before"], block["heldout_after"]] if block else [None, None]
        rows.append((f"block {index}", values))
    return rows


# --------------------------------------------------------------------------------------------------
# Printing and CSV


def format_table(title: str, runs: list[Run], pair: tuple[str, str], rows) -> str:
    """A plain-text table: the row name, then a column pair per run under the run's label."""
    cells = [[name] + [_format(value) for value in values] for name, values in rows]
    name_width = max(len(title), *(len(row[0]) for row in cells))
    widths = []
    for i, run in enumerate(runs):
        column_values = [row[1 + 2 * i: 3 + 2 * i] for row in cells]
        value_width = max(len(pair[0]), len(pair[1]), *(len(v) for pair_values in column_values for v in pair_values))
        widths.append(max(value_width, (len(run.label) - 2) // 2 + 1))
    line_1 = [title.ljust(name_width)] + [run.label.rjust(2 * w + 2) for run, w in zip(runs, widths)]
    line_2 = [" " * name_width] + [f"{pair[0].rjust(w)}  {pair[1].rjust(w)}" for w in widths]
    lines = ["  ".join(line_1), "  ".join(line_2)]
    for row in cells:
        columns = [row[0].ljust(name_width)]
        for i, w in enumerate(widths):
            columns.append(f"{row[1 + 2 * i].rjust(w)}  {row[2 + 2 * i].rjust(w)}")
        lines.append("  ".join(columns))
    return "\n".join(line.rstrip() for line in lines)


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def comparison_text(runs: list[Run]) -> str:
    legend = [f"{run.label}: {run.description}  ({run.path})" for run in runs]
    parts = ["\n".join(legend), format_table("layer", runs, ("sparsity", "rel_error"), layer_rows(runs))]
    blocks = block_rows(runs)
    if blocks:
        parts.append(format_table("held-out block output error", runs, ("before", "after"), blocks))
        # Where "after" exceeds "before" the guard kept the pruned-only block: say so, or it reads as a bug.
        reverted = [f"{run.label}: {run.report['totals']['reverted_blocks']}" for run in runs
                    if run.report["totals"].get("reverted_blocks")]
        if reverted:
            parts.append("blocks whose correction was reverted (held-out error rose), kept pruned only:\n  "
                         + "\n  ".join(reverted))
    return "\n\n".join(parts)


def write_csv(runs: list[Run], path: Path) -> None:
    header = ["section", "name"]
    for run in runs:
        header += [f"{run.label}:sparsity", f"{run.label}:rel_error",
                   f"{run.label}:heldout_before", f"{run.label}:heldout_after"]
    layers = layer_rows(runs)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for number, (name, values) in enumerate(layers):
            section = "total" if number == len(layers) - 1 else "layer"
            writer.writerow([section, name, *_interleave(values, before=True)])
        for name, values in block_rows(runs):
            writer.writerow(["block", name, *_interleave(values, before=False)])


def _interleave(pairs: list[float | None], before: bool) -> list[str]:
    """Each run's pair into its four CSV columns: layer pairs first, held-out pairs second."""
    columns = []
    for i in range(0, len(pairs), 2):
        values = ["" if v is None else repr(v) for v in pairs[i:i + 2]]
        columns += values + ["", ""] if before else ["", ""] + values
    return columns


# --------------------------------------------------------------------------------------------------
# The command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="pruned checkpoint directories, sweep cell directories or report.json files")
    parser.add_argument("--csv", default=None, metavar="FILE", help="also write the tables to this CSV file")


def main(args) -> int:
    runs = load_runs(args.runs)
    print(comparison_text(runs))
    if args.csv:
        write_csv(runs, Path(args.csv))
        print(f"\nwrote {args.csv}")
    return 0
