"""reconstruct compare: two real (tiny) runs side by side, in the terminal and as CSV."""
from __future__ import annotations

import csv
import json

import pytest

from reconstruct.api import prune
from reconstruct.cli import main as cli
from reconstruct.compare import distinct_labels
from reconstruct.tiny import save_tiny_model, write_sample_text


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A magnitude run without correction and a Wanda run with MaskLoRA, of the same tiny LLaMA."""
    root = tmp_path_factory.mktemp("compare")
    model = save_tiny_model(root / "llama", "llama")
    text = write_sample_text(root / "calib.txt")
    common = dict(calib=str(text), nsamples=4, seqlen=32, device="cpu", cache_dir=str(root / "cache"))
    prune(str(model), str(root / "magnitude"), method="magnitude", sparsity=0.5, correction="none", **common)
    prune(str(model), str(root / "wanda"), method="wanda", sparsity=0.6, correction="masklora", steps=2, **common)
    return root / "magnitude", root / "wanda"


def test_compare_prints_both_runs_side_by_side(runs, capsys):
    magnitude, wanda = runs
    assert cli(["compare", str(magnitude), str(wanda / "report.json")]) == 0
    printed = capsys.readouterr().out
    layer_header = next(line for line in printed.splitlines() if line.startswith("layer "))
    assert "magnitude" in layer_header and "wanda" in layer_header
    report = json.loads((wanda / "report.json").read_text())
    for layer in report["layers"]:
        row = next(line for line in printed.splitlines() if line.startswith(layer["name"] + " "))
        assert len(row.split()) == 1 + 2 * 2  # the name, then sparsity and error of each run
    assert "total" in printed
    block_lines = [line for line in printed.splitlines() if line.startswith("block ")]
    assert len(block_lines) == len(report["blocks"])
    assert all(line.split()[2:4] == ["-", "-"] for line in block_lines)  # magnitude run: no correction


def test_compare_writes_csv(runs, tmp_path):
    magnitude, wanda = runs
    output = tmp_path / "compare.csv"
    assert cli(["compare", str(magnitude), str(wanda), "--csv", str(output)]) == 0
    with open(output, newline="") as handle:
        rows = list(csv.DictReader(handle))
    report = json.loads((wanda / "report.json").read_text())
    sections = [row["section"] for row in rows]
    assert sections.count("layer") == len(report["layers"]) and sections.count("total") == 1
    assert sections.count("block") == len(report["blocks"])
    total = next(row for row in rows if row["section"] == "total")
    assert float(total["magnitude:sparsity"]) == pytest.approx(0.5)
    assert float(total["wanda:sparsity"]) == pytest.approx(report["totals"]["pruned_sparsity"])
    block = next(row for row in rows if row["section"] == "block")
    assert float(block["wanda:heldout_before"]) > 0 and block["magnitude:heldout_before"] == ""


def test_missing_report_is_an_input_error(tmp_path, capsys):
    assert cli(["compare", str(tmp_path / "nowhere")]) == 2
    assert "no report" in capsys.readouterr().err


def test_labels_are_lengthened_until_distinct(tmp_path):
    paths = [tmp_path / "a" / "checkpoint", tmp_path / "b" / "checkpoint", tmp_path / "c"]
    assert distinct_labels(paths) == ["a/checkpoint", "b/checkpoint", "c"]
