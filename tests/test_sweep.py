"""reconstruct sweep: grid checks, resuming after an interruption, failing cells, tables and plots.

Offline and small: a tiny LLaMA from reconstruct.tiny, its sample text for calibration and a short
text for perplexity, 4 calibration windows of 32 tokens and 2 fitting steps per cell.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from reconstruct import sweep
from reconstruct.cli import main as cli
from reconstruct.tiny import save_tiny_model, write_sample_text


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RECONSTRUCT_CACHE", str(tmp_path / "reconstruct-cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-files")
    return {"model": save_tiny_model(root / "llama", "llama"),
            "calib": write_sample_text(root / "calib.txt"),
            "eval": write_sample_text(root / "eval.txt", repeats=2)}  # ~40 windows: a quick evaluation


def write_grid(directory: Path, files: dict, **changes) -> Path:
    grid = {"models": [str(files["model"])], "methods": ["magnitude"], "sparsities": [0.5, "2:4"],
            "corrections": ["none", "masklora"], "seeds": [0],
            "prune": {"calib": str(files["calib"]), "nsamples": 4, "seqlen": 32, "steps": 2, "device": "cpu"},
            "eval": {"data": [str(files["eval"])], "seqlen": 32, "batch_size": 8}}
    grid.update(changes)
    path = directory / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


class Recorder:
    """Wraps prune or evaluate: records the model or output of each call, optionally raises instead."""

    def __init__(self, function, fail_when=None, error: BaseException | None = None):
        self.function, self.fail_when, self.error = function, fail_when, error
        self.calls: list[str] = []

    def __call__(self, first, *args, **kwargs):
        target = str(args[0]) if args else str(first)  # prune(model, out): the out; evaluate(model)
        self.calls.append(target)
        if self.fail_when and self.fail_when(target):
            raise self.error
        return self.function(first, *args, **kwargs)


def cell_ids(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "cells").iterdir())


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assert_png_has_content(path: Path) -> None:
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(np.std(image[..., :3])) > 0.01  # not a blank canvas


# --------------------------------------------------------------------------------------------------
def test_grid_cells_and_ids(tmp_path, files):
    grid = sweep.load_grid(write_grid(tmp_path, files, seeds=[0, 1]))
    ids = [cell.id for cell in grid.cells()]
    assert ids[0] == "llama-dense"
    assert "llama-magnitude-0.5-masklora-seed1" in ids and "llama-magnitude-2of4-none-seed0" in ids
    assert len(ids) == 1 + 2 * 2 * 2
    pattern_cell = next(c for c in grid.cells() if c.id == "llama-magnitude-2of4-none-seed0")
    assert pattern_cell.prune_settings["pattern"] == "2:4" and "sparsity" not in pattern_cell.prune_settings


def test_named_correction_recipes_override_prune_settings(tmp_path, files):
    recipe = {"name": "full-dense", "correction": "full", "target": "dense", "lr": 1e-4}
    grid = sweep.load_grid(write_grid(tmp_path, files, corrections=["masklora", recipe]))
    cells = {cell.id: cell for cell in grid.cells()}
    full = cells["llama-magnitude-0.5-full_dense-seed0"]
    assert full.label == "full-dense"
    assert (full.prune_settings["correction"], full.prune_settings["target"], full.prune_settings["lr"]) == \
        ("full", "dense", 1e-4)
    assert full.prune_settings["steps"] == 2  # the rest still comes from `prune:`
    plain = cells["llama-magnitude-0.5-masklora-seed0"]
    assert plain.prune_settings["correction"] == "masklora" and "target" not in plain.prune_settings
    assert full.recorded_settings()["prune"]["target"] == "dense"


@pytest.mark.parametrize("changes, message", [
    ({"corrections": [{"name": "x", "lr": 1e-3}]}, "needs `name` and `correction`"),
    ({"corrections": [{"name": "x", "correction": "full", "method": "wanda"}]}, "set by the grid"),
    ({"corrections": [{"name": "x", "correction": "full", "learning_rate": 1}]}, "unknown prune settings"),
    ({"corrections": [{"name": "x", "correction": "full", "target": "nonsense"}]}, "target"),
    ({"sparsities": [124]}, "quotes"),                       # what YAML makes of an unquoted 2:4
    ({"sparsities": [1.5]}, "outside"),
    ({"methods": ["magnitude", "magnitude"]}, "duplicate cells"),
    ({"colour": "red"}, "unknown keys"),
    ({"prune": {"method": "wanda"}}, "set by the grid"),
    ({"prune": {"nsample": 4}}, "unknown prune settings"),
    ({"eval": {"data": [], "seqlen": 32}}, "eval needs"),
    ({"corrections": ["nonsense"]}, "unknown correction"),
    ({"eval": {"data": ["/nowhere/test.txt"], "seqlen": 32}}, "neither a known dataset"),
])
def test_grid_errors_say_what_is_wrong(tmp_path, files, changes, message):
    with pytest.raises(ValueError, match=message):  # ConfigError, or calib's CalibrationError
        sweep.load_grid(write_grid(tmp_path, files, **changes))


def test_interrupted_sweep_resumes_without_redoing_finished_cells(tmp_path, files, monkeypatch):
    grid, out = write_grid(tmp_path, files), tmp_path / "out"
    # First run: Ctrl-C while the second pruned cell is pruning.
    interrupted = Recorder(sweep.cells.prune, fail_when=lambda o: "0.5-masklora" in o, error=KeyboardInterrupt())
    monkeypatch.setattr(sweep.cells, "prune", interrupted)
    assert cli(["sweep", str(grid), "--out", str(out)]) == sweep.EXIT_INTERRUPTED
    first = out / "cells" / "llama-magnitude-0.5-none-seed0"
    assert (first / "result.json").exists() and (out / "cells" / "llama-dense" / "result.json").exists()
    assert not (out / "cells" / "llama-magnitude-0.5-masklora-seed0" / "result.json").exists()
    assert [row["status"] for row in read_csv(out / "results.csv")][:3] == ["finished", "finished", "partial"]
    finished_before = {p: (p.stat().st_mtime_ns, p.read_text()) for p in out.glob("cells/*/result.json")}

    # Second run: only the unfinished cells are pruned and evaluated.
    pruned = Recorder(interrupted.function)
    evaluated = Recorder(sweep.cells.evaluate)
    monkeypatch.setattr(sweep.cells, "prune", pruned)
    monkeypatch.setattr(sweep.cells, "evaluate", evaluated)
    assert cli(["sweep", str(grid), "--out", str(out)]) == 0
    assert sorted(Path(p).parent.name for p in pruned.calls) == [
        "llama-magnitude-0.5-masklora-seed0", "llama-magnitude-2of4-masklora-seed0",
        "llama-magnitude-2of4-none-seed0"]
    assert str(files["model"]) not in evaluated.calls  # the dense baseline is not evaluated again
    for path, (mtime, text) in finished_before.items():
        assert path.stat().st_mtime_ns == mtime and path.read_text() == text

    rows = read_csv(out / "results.csv")
    assert [row["cell"] for row in rows] == [
        "llama-dense", "llama-magnitude-0.5-none-seed0", "llama-magnitude-0.5-masklora-seed0",
        "llama-magnitude-2of4-none-seed0", "llama-magnitude-2of4-masklora-seed0"]
    assert all(row["status"] == "finished" and float(row["ppl_eval"]) > 1 for row in rows)
    corrected = rows[2]
    assert float(corrected["achieved_sparsity"]) == pytest.approx(0.5)
    assert float(corrected["heldout_before"]) > 0 and float(corrected["heldout_after"]) > 0
    assert float(corrected["prune_time_s"]) > 0 and float(corrected["peak_host_gib"]) > 0
    assert rows[0]["heldout_before"] == "" and rows[1]["heldout_before"] == ""  # dense; no correction

    table = (out / "results.md").read_text()
    assert "| method | correction | dense | 0.5 | 2:4 |" in table
    assert "| magnitude | masklora |" in table and "| magnitude | none |" in table
    for name in ("ppl-llama-eval.png", "heldout-llama.png"):
        assert_png_has_content(out / "plots" / name)

    # Checkpoints are deleted after evaluation by default; the reports stay.
    assert not list(out.glob("cells/*/checkpoint*"))
    assert json.loads((out / "cells" / "llama-magnitude-0.5-masklora-seed0" / "report.json").read_text())["blocks"]

    # A third run has nothing to do; a changed setting is refused rather than mixed in.
    monkeypatch.setattr(sweep.cells, "prune", Recorder(interrupted.function, fail_when=lambda o: True,
                                                       error=AssertionError("nothing should be pruned")))
    assert cli(["sweep", str(grid), "--out", str(out)]) == 0
    changed = write_grid(tmp_path, files, prune={"calib": str(files["calib"]), "nsamples": 6, "seqlen": 32,
                                                 "steps": 2, "device": "cpu"})
    assert cli(["sweep", str(changed), "--out", str(out)]) == 2  # a ConfigError, explained on stderr


def test_failing_cell_is_reported_and_others_run(tmp_path, files, monkeypatch, capsys):
    grid, out = write_grid(tmp_path, files, corrections=["none"]), tmp_path / "out"
    monkeypatch.setattr(sweep.cells, "prune", Recorder(sweep.cells.prune, fail_when=lambda o: "2of4" in o,
                                                       error=RuntimeError("boom")))
    assert cli(["sweep", str(grid), "--out", str(out)]) == sweep.EXIT_SOME_CELLS_FAILED
    rows = {row["cell"]: row for row in read_csv(out / "results.csv")}
    failed = rows["llama-magnitude-2of4-none-seed0"]
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: boom"
    assert rows["llama-magnitude-0.5-none-seed0"]["status"] == "finished"
    assert rows["llama-dense"]["status"] == "finished"
    assert "## Failed cells" in (out / "results.md").read_text()
    assert "| magnitude | none |" in (out / "results.md").read_text()
    assert "llama-magnitude-2of4-none-seed0" in capsys.readouterr().out

    # Rerunning retries the failed cell only.
    pruned = Recorder(sweep.cells.prune.function)
    monkeypatch.setattr(sweep.cells, "prune", pruned)
    assert cli(["sweep", str(grid), "--out", str(out)]) == 0
    assert [Path(p).parent.name for p in pruned.calls] == ["llama-magnitude-2of4-none-seed0"]
    assert not (out / "cells" / "llama-magnitude-2of4-none-seed0" / "failed.json").exists()


def test_unfinished_cell_continues_where_it_stopped(tmp_path, files, monkeypatch):
    """Interrupted in its prune: the prune resumes at the block it stopped in. Interrupted in its
    evaluation: the complete checkpoint is evaluated without pruning again."""
    from reconstruct.layerwise import driver

    grid = write_grid(tmp_path, files, sparsities=[0.5], corrections=["none"], keep_checkpoints=True)
    out = tmp_path / "out"
    cell = out / "cells" / "llama-magnitude-0.5-none-seed0"
    process_block = driver.Driver._process_block
    blocks_done, interrupt_at = [], [1]

    def process_block_until_interrupted(self, index, *args):
        if index in interrupt_at:
            interrupt_at.remove(index)
            raise KeyboardInterrupt
        blocks_done.append(index)
        return process_block(self, index, *args)

    monkeypatch.setattr(driver.Driver, "_process_block", process_block_until_interrupted)
    assert cli(["sweep", str(grid), "--out", str(out)]) == sweep.EXIT_INTERRUPTED
    assert (cell / "checkpoint.partial" / "state.json").exists()

    # Second run: block 1 only, then Ctrl-C during the evaluation.
    assert blocks_done == [0]
    blocks_done.clear()
    monkeypatch.setattr(sweep.cells, "evaluate", Recorder(sweep.cells.evaluate,
                                                          fail_when=lambda m: m.startswith(str(cell)),
                                                          error=KeyboardInterrupt()))
    assert cli(["sweep", str(grid), "--out", str(out)]) == sweep.EXIT_INTERRUPTED
    assert blocks_done == [1]
    assert (cell / "checkpoint" / "report.json").exists() and not (cell / "result.json").exists()

    # Third run: evaluation only.
    pruned = Recorder(sweep.cells.prune)
    monkeypatch.setattr(sweep.cells, "prune", pruned)
    monkeypatch.setattr(sweep.cells, "evaluate", sweep.cells.evaluate.function)
    assert cli(["sweep", str(grid), "--out", str(out)]) == 0
    assert pruned.calls == []
    assert (cell / "result.json").exists() and (cell / "checkpoint" / "config.json").exists()  # kept


def test_dry_run_lists_cells_and_runs_nothing(tmp_path, files, monkeypatch, capsys):
    monkeypatch.setattr(sweep.cells, "prune", Recorder(sweep.cells.prune, fail_when=lambda o: True,
                                                       error=AssertionError()))
    assert cli(["sweep", str(write_grid(tmp_path, files)), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "pending   llama-magnitude-2of4-masklora-seed0" in printed and "5 cells, 5 to run" in printed
    assert not (tmp_path / "out").exists()


def test_chained_retrain_cells_reuse_the_prune_checkpoint(tmp_path, files, monkeypatch):
    """`retrain: {params: [...]}`: each prune cell is followed by a retrain cell per params, which
    retrains that cell's checkpoint (pruned once), then the checkpoint goes; the table has the rows."""
    grid = write_grid(tmp_path, files, sparsities=[0.5], corrections=["none"],
                      retrain={"params": ["norm", "masklora"], "data": str(files["calib"]), "steps": 2,
                               "batch_size": 2, "seqlen": 32, "eval_windows": 1, "device": "cpu"})
    ids = [cell.id for cell in sweep.load_grid(grid).cells()]
    assert ids == ["llama-dense", "llama-magnitude-0.5-none-seed0", "llama-magnitude-0.5-none-seed0-retrain_norm",
                   "llama-magnitude-0.5-none-seed0-retrain_masklora"]
    pruned, retrained = Recorder(sweep.cells.prune), Recorder(sweep.cells.retrain)
    monkeypatch.setattr(sweep.cells, "prune", pruned)
    monkeypatch.setattr(sweep.cells, "retrain", retrained)
    out = tmp_path / "out"
    assert cli(["sweep", str(grid), "--out", str(out)]) == 0
    assert len(pruned.calls) == 1 and len(retrained.calls) == 2
    rows = {row["cell"]: row for row in read_csv(out / "results.csv")}
    chained = rows["llama-magnitude-0.5-none-seed0-retrain_masklora"]
    assert chained["status"] == "finished" and chained["correction"] == "none + retrain masklora"
    assert float(chained["achieved_sparsity"]) == pytest.approx(0.5) and float(chained["ppl_eval"]) > 1
    assert "| magnitude | none + retrain norm |" in (out / "results.md").read_text()
    assert not list(out.glob("cells/*/checkpoint*")) and not list(out.glob("cells/*/pruned"))
    bad = write_grid(tmp_path, files, retrain={"params": ["norm"], "seed": 3})
    assert cli(["sweep", str(bad), "--out", str(tmp_path / "bad")]) == 2


def test_a_prune_command_line_does_not_import_the_sweep(tmp_path):
    """The sweep's module (evaluation, YAML) is imported for the sweep command only; both parse."""
    import subprocess
    import sys

    program = ("import sys; from reconstruct.cli import build_parser, command_of\n"
               "argv = sys.argv[1:]\n"
               "args = build_parser(command_of(argv)).parse_args(argv)\n"
               "print(args.command, 'reconstruct.sweep' in sys.modules)")
    root = str(Path(__file__).parent.parent)
    prune_line, sweep_help = [
        subprocess.run([sys.executable, "-c", program, *argv], capture_output=True, text=True, check=True,
                       cwd=root, env={"PYTHONPATH": root, "PATH": ""}).stdout
        for argv in (["-v", "prune", "MODEL", "--out", "OUT"], ["sweep", "--help"])]
    assert prune_line.split() == ["prune", "False"]
    assert "--dry-run" in sweep_help  # the sweep's own arguments


def test_prune_only_cells_do_not_record_fitting_settings(tmp_path, files):
    """A new fitting default (rank, target, steps...) must not make the `none` cells stale."""
    grid = sweep.load_grid(write_grid(tmp_path, files))
    cells = {cell.id: cell for cell in grid.cells()}
    plain = cells["llama-magnitude-0.5-none-seed0"].recorded_settings()["prune"]
    corrected = cells["llama-magnitude-0.5-masklora-seed0"].recorded_settings()["prune"]
    assert "rank" not in plain and "steps" not in plain and "target" not in plain
    assert corrected["rank"] is not None and corrected["steps"] == 2
    assert plain["sparsity"] == corrected["sparsity"] == 0.5
