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
import gc
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from calib.sources import is_hub_source, local_file

from .api import prune, retrain
from .config import ConfigError, RetrainConfig, RunConfig, default_device
from .eval import LM_EVAL_INSTALL_COMMAND, evaluate
from .pruning import NMPattern, PruningError

log = logging.getLogger(__name__)

EXIT_SOME_CELLS_FAILED = 1
EXIT_INTERRUPTED = 130
DENSE = "dense"  # the method name of a model's unpruned baseline cell

# Settings that change how fast or where a cell runs, not its numbers: a finished cell stays valid
# when they change (the same list as RunConfig.fingerprint's, plus evaluation's).
RESOURCE_SETTINGS = frozenset({"device", "batch_size", "offload_activations", "activation_budget_gb",
                               "cache_dir"})
# Settings of the correction's fit: they change nothing in a cell without a correction (except
# --target none, which also changes what the pruning statistics are gathered on).
FITTING_SETTINGS = frozenset({"rank", "alpha", "steps", "lr", "weight_decay", "warmup", "check_every",
                              "patience", "fit_batch_size", "granularity", "target", "heldout"})
# Prune settings that the grid itself sets per cell (or the sweep manages): not allowed under `prune:`.
GRID_OWNED_PRUNE_SETTINGS = frozenset({"model", "out", "method", "sparsity", "pattern", "correction",
                                       "seed", "overwrite", "resume"})
EVAL_SETTINGS = frozenset({"data", "seqlen", "tasks", "batch_size", "limit", "include_path", "device",
                           "dtype", "text_field", "cache_dir"})
TOP_LEVEL_KEYS = frozenset({"models", "methods", "sparsities", "corrections", "seeds", "prune", "eval",
                            "keep_checkpoints", "retrain"})
# Retrain settings that the grid or the sweep sets per cell: not allowed under `retrain:` (besides params).
GRID_OWNED_RETRAIN_SETTINGS = frozenset({"model", "out", "overwrite", "resume"})
PLOT_DPI = 100


# --------------------------------------------------------------------------------------------------
# The grid


@dataclass(frozen=True)
class Named:
    """A model or an evaluation source: what is passed on (`location`) and its short `name`."""

    name: str
    location: str


@dataclass(frozen=True)
class Sparsity:
    """One entry of `sparsities`: a fraction of zeros, or an N:M pattern (with its implied fraction)."""

    value: float
    pattern: str | None = None

    @property
    def label(self) -> str:
        return self.pattern or f"{self.value:g}"

    @property
    def token(self) -> str:  # for cell ids and file names, where ':' is awkward
        return self.pattern.replace(":", "of") if self.pattern else f"{self.value:g}"

    def prune_settings(self) -> dict:
        return {"pattern": self.pattern} if self.pattern else {"sparsity": self.value}

    def sort_key(self) -> tuple:
        return (self.value, self.pattern is not None, self.pattern or "")


@dataclass(frozen=True)
class Cell:
    """One prune + eval (or, for method "dense", the eval of the model as it is)."""

    id: str
    model: Named
    method: str
    sparsity: Sparsity | None  # None for the dense baseline
    correction: str | None
    seed: int | None
    prune_settings: dict = field(hash=False)  # api.prune's keyword arguments, without model and out
    eval_settings: dict = field(hash=False)   # evaluate's keyword arguments, without model and data
    data: tuple[Named, ...] = ()
    retrain_settings: dict | None = field(default=None, hash=False)  # chained: api.retrain's, params included
    pruned_by: str | None = None              # chained: the id of the prune cell whose checkpoint it retrains

    @property
    def label(self) -> str:
        """The correction column of the tables: the prune's correction, then what retrained it."""
        if self.retrain_settings:
            return chained_label(self.correction, self.retrain_settings["params"])
        return self.correction

    @property
    def is_dense(self) -> bool:
        return self.method == DENSE

    def recorded_settings(self) -> dict:
        """What the cell's numbers depend on; a finished cell is valid only while these are unchanged.

        The prune settings are complete, defaults included: a default that changes in a later version
        of the engine makes the cell's result stale just as an edited grid does."""
        def significant(settings: dict) -> dict:
            return {k: v for k, v in settings.items() if k not in RESOURCE_SETTINGS}

        prune_settings = {}
        if not self.is_dense:
            config = asdict(RunConfig(model=self.model.location, out="", **self.prune_settings))
            prune_settings = {k: v for k, v in config.items() if k not in ("model", "out", "overwrite", "resume")}
            if config["correction"] == "none":  # a new fitting default leaves prune-only cells valid
                prune_settings = {k: v for k, v in prune_settings.items()
                                  if k not in FITTING_SETTINGS or (k == "target" and v == "none")}
        retrain_settings = {}
        if self.retrain_settings:
            config = asdict(RetrainConfig(model="", out="", **self.retrain_settings))
            retrain_settings = {k: v for k, v in config.items() if k not in GRID_OWNED_RETRAIN_SETTINGS}
        return _json_normalised({"model": self.model.location, "method": self.method,
                                 **({"retrain": significant(retrain_settings)} if retrain_settings else {}),
                                 "prune": significant(prune_settings),
                                 "eval": significant(self.eval_settings),
                                 "data": {source.name: source.location for source in self.data}})


@dataclass
class Grid:
    models: list[Named]
    methods: list[str]
    sparsities: list[Sparsity]
    corrections: list[str]        # names: a correction, or a named recipe of `correction_settings`
    seeds: list[int]
    prune: dict
    eval: dict
    data: list[Named]
    keep_checkpoints: bool = False
    retrain: dict = field(default_factory=dict)   # settings shared by the chained retrain cells
    retrain_params: list[str] = field(default_factory=list)
    # A named entry of `corrections` ({name: full-dense, correction: full, target: dense, lr: 3e-4}):
    # its prune settings, which override `prune:` for that entry's cells.
    correction_settings: dict[str, dict] = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        """Each model's dense baseline first (so that it is there early), then its pruned cells."""
        cells = []
        for model in self.models:
            cells.append(Cell(id=_cell_id(model.name, DENSE), model=model, method=DENSE, sparsity=None,
                              correction=None, seed=None, prune_settings={}, eval_settings=self.eval,
                              data=tuple(self.data)))
            for method in self.methods:
                for sparsity in self.sparsities:
                    for correction in self.corrections:
                        for seed in self.seeds:
                            recipe = self.correction_settings.get(correction, {"correction": correction})
                            settings = {**self.prune, "method": method, **sparsity.prune_settings(),
                                        **recipe, "seed": seed}
                            pruned = Cell(
                                id=_cell_id(model.name, method, sparsity.token, correction, f"seed{seed}"),
                                model=model, method=method, sparsity=sparsity, correction=correction,
                                seed=seed, prune_settings=settings, eval_settings=self.eval,
                                data=tuple(self.data))
                            cells.append(pruned)
                            for params in self.retrain_params:
                                cells.append(Cell(
                                    id=f"{pruned.id}-{_cell_id(f'retrain_{params}')}", model=model, method=method,
                                    sparsity=sparsity, correction=correction, seed=seed,
                                    prune_settings=settings, eval_settings=self.eval, data=tuple(self.data),
                                    retrain_settings={**self.retrain, "params": params, "seed": seed},
                                    pruned_by=pruned.id))
        return cells


def chained_label(correction: str, params: str) -> str:
    """A chained retrain cell's row in the tables."""
    return f"{correction} + retrain {params}"


def _cell_id(*parts: str) -> str:
    # Readable and stable: the same grid entry always gets the same directory name.
    return "-".join(re.sub(r"[^A-Za-z0-9._+]+", "_", part) for part in parts)


def load_grid(path: str | os.PathLike) -> Grid:
    """Read and check a grid YAML file; every error names the offending entry."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with models, methods, sparsities, corrections, ...")
    unknown = set(raw) - TOP_LEVEL_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(TOP_LEVEL_KEYS)}")
    prune_settings = _prune_settings(raw.get("prune") or {})
    grid = Grid(
        models=_named_entries(_required_list(raw, "models"), "models", keep_suffix=True),
        methods=[str(m) for m in _required_list(raw, "methods")],
        sparsities=[_parse_sparsity(s) for s in _required_list(raw, "sparsities")],
        **_corrections(_required_list(raw, "corrections")),
        seeds=[_parse_seed(s) for s in _required_list(raw, "seeds")] if "seeds" in raw else [0],
        prune=prune_settings,
        eval=_eval_settings(raw.get("eval") or {}, prune_settings),
        data=_eval_sources(raw.get("eval") or {}),
        keep_checkpoints=_parse_bool(raw.get("keep_checkpoints", False), "keep_checkpoints"),
        **_retrain_settings(raw.get("retrain")),
    )
    if not grid.data and not grid.eval.get("tasks"):
        raise ConfigError(f"{path}: eval needs `data` (perplexity sources) or `tasks` (zero-shot), or both")
    _check_unique([m.name for m in grid.models], "model names (give each model a `name`)")
    _check_unique([s.name for s in grid.data], "eval data names (give each source a `name`)")
    _check_unique([s.location for s in grid.data], "eval data sources")
    _check_unique([c.id for c in grid.cells()], "cells (a method, sparsity, correction or seed is listed twice)")
    _check_prune_settings(grid)
    _check_data_files(grid)
    return grid


def _required_list(raw: dict, key: str) -> list:
    value = raw.get(key)
    if isinstance(value, (str, int, float, dict)):
        value = [value]
    if not value:
        raise ConfigError(f"the grid needs a non-empty list `{key}`")
    return list(value)


def _named_entries(entries: list, what: str, keep_suffix: bool) -> list[Named]:
    """Strings (the name is derived from the path) or mappings {name: ..., path: ...}."""
    named = []
    for entry in entries:
        if isinstance(entry, dict):
            if set(entry) - {"name", "path"} or "path" not in entry:
                raise ConfigError(f"{what} entry {entry}: use a string or {{name: ..., path: ...}}")
            location = _local_path_or_name(str(entry["path"]))
            name = str(entry.get("name") or _short_name(location, keep_suffix))
        else:
            location = _local_path_or_name(str(entry))
            name = _short_name(location, keep_suffix)
        named.append(Named(name=name, location=location))
    return named


def _short_name(location: str, keep_suffix: bool) -> str:
    """The last path component: ~/models/llama -> llama, facebook/opt-1.3b -> opt-1.3b; for data
    files without the suffix: data/test.txt -> test."""
    path = Path(location)
    return (path.name if keep_suffix else path.stem) or location


def _local_path_or_name(value: str) -> str:
    """An existing local path made absolute (so that results do not depend on the current directory);
    anything else (a hub id, "c4", "wikitext2") as given, with ~ expanded."""
    if is_hub_source(value):
        return value  # calib reads these names as the hub datasets even if such a file exists
    expanded = Path(value).expanduser()
    return str(expanded.resolve()) if expanded.exists() else str(expanded)


def _parse_sparsity(entry) -> Sparsity:
    if isinstance(entry, bool):
        raise ConfigError(f"sparsity {entry!r} is not a number or an N:M pattern")
    if isinstance(entry, int) and entry > 1:
        # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124.
        raise ConfigError(f"sparsity {entry} is not a fraction; write N:M patterns in quotes, e.g. \"2:4\" "
                          "(unquoted, YAML reads 2:4 as the number 124)")
    if isinstance(entry, str) and ":" in entry:
        try:
            pattern = NMPattern.parse(entry.strip())
        except PruningError as error:
            raise ConfigError(str(error)) from None
        return Sparsity(value=pattern.sparsity, pattern=str(pattern))
    try:
        value = float(entry)
    except (TypeError, ValueError):
        raise ConfigError(f"sparsity {entry!r} is neither a fraction such as 0.5 nor an N:M pattern such "
                          "as \"2:4\"") from None
    if not 0 <= value < 1:
        raise ConfigError(f"sparsity {value} is outside [0, 1)")
    return Sparsity(value=value)


def _parse_seed(entry) -> int:
    if isinstance(entry, bool) or not isinstance(entry, int):
        raise ConfigError(f"seed {entry!r} is not an integer")
    return entry


def _parse_bool(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, not {value!r}")
    return value


def _prune_settings(raw: dict) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError("`prune:` must be a mapping of prune settings, e.g. {calib: c4, nsamples: 128}")
    return _checked_prune_settings(raw, "`prune:`", GRID_OWNED_PRUNE_SETTINGS)


def _checked_prune_settings(raw: dict, where: str, owned_by_grid: frozenset) -> dict:
    """Prune settings given in `where` (`prune:` or a correction recipe): none that the grid owns,
    none unknown, local paths made absolute."""
    owned = set(raw) & owned_by_grid
    if owned:
        raise ConfigError(f"prune settings {sorted(owned)} in {where} are set by the grid (models, methods, "
                          "sparsities, corrections, seeds) or by the sweep itself; remove them")
    unknown = set(raw) - set(RunConfig.field_names())
    if unknown:
        raise ConfigError(f"unknown prune settings {sorted(unknown)} in {where}; known: "
                          f"{sorted(set(RunConfig.field_names()) - owned_by_grid)}")
    return _with_local_paths(dict(raw), ("calib", "tokenizer", "cache_dir"))


def _with_local_paths(settings: dict, keys: tuple[str, ...]) -> dict:
    """`settings` with the paths under `keys` that exist made absolute (in place)."""
    for key in keys:
        if isinstance(settings.get(key), str):
            settings[key] = _local_path_or_name(settings[key])
    return settings


def _corrections(entries: list) -> dict:
    """`corrections: [none, masklora, {name: full-dense, correction: full, target: dense, lr: 3e-4}]`.

    A plain entry is a `--correction` value. A mapping is a named recipe: a correction and any prune
    settings that differ from `prune:` for its cells (the target, learning rate, steps, rank, ...), so
    that one grid compares whole repair recipes; its name is the table's row and part of the cell ids."""
    names, recipes = [], {}
    for entry in entries:
        if not isinstance(entry, dict):
            names.append(str(entry))
            continue
        if "name" not in entry or "correction" not in entry:
            raise ConfigError(f"a corrections entry given as a mapping needs `name` and `correction`: {entry}")
        name = str(entry["name"])
        settings = _checked_prune_settings({k: v for k, v in entry.items() if k != "name"},
                                           f"corrections entry {name!r}", GRID_OWNED_PRUNE_SETTINGS - {"correction"})
        names.append(name)
        recipes[name] = settings
    return {"corrections": names, "correction_settings": recipes}


def _retrain_settings(raw) -> dict:
    """`retrain: {params: [norm, masklora], steps: 1000, data: c4, ...}`: chained retrain cells."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or "params" not in raw:
        raise ConfigError("`retrain:` must be a mapping with a `params` list, e.g. {params: [norm, masklora], "
                          "data: c4, steps: 1000}")
    params = raw["params"] if isinstance(raw["params"], list) else [raw["params"]]
    settings = {k: v for k, v in raw.items() if k != "params"}
    owned = set(settings) & (GRID_OWNED_RETRAIN_SETTINGS | {"seed"})
    if owned:
        raise ConfigError(f"retrain settings {sorted(owned)} are set by the sweep (the seed is each cell's); "
                          "remove them from `retrain:`")
    unknown = set(settings) - set(RetrainConfig.field_names())
    if unknown:
        raise ConfigError(f"unknown retrain settings {sorted(unknown)}; known: {sorted(RetrainConfig.field_names())}")
    _with_local_paths(settings, ("data", "tokenizer", "cache_dir", "teacher"))
    return {"retrain": settings, "retrain_params": [str(p) for p in params]}


def _eval_settings(raw: dict, prune_settings: dict) -> dict:
    """evaluate()'s keyword arguments other than the model and the data sources."""
    if not isinstance(raw, dict):
        raise ConfigError("`eval:` must be a mapping, e.g. {data: [wikitext2], seqlen: 2048}")
    unknown = set(raw) - EVAL_SETTINGS
    if unknown:
        raise ConfigError(f"unknown eval settings {sorted(unknown)}; known: {sorted(EVAL_SETTINGS)}")
    settings = {k: v for k, v in raw.items() if k != "data"}
    settings.setdefault("seqlen", 2048)
    # Evaluate where the pruning runs unless told otherwise.
    settings.setdefault("device", prune_settings.get("device", default_device()))
    if isinstance(settings.get("tasks"), str):
        settings["tasks"] = [t for t in settings["tasks"].split(",") if t]
    return _with_local_paths(settings, ("include_path", "cache_dir"))


def _eval_sources(raw: dict) -> list[Named]:
    data = raw.get("data") or []
    if isinstance(data, str):
        data = [s for s in data.split(",") if s]
    return _named_entries(list(data), "eval data", keep_suffix=False)


def _check_unique(values: list[str], what: str) -> None:
    duplicates = sorted({v for v in values if values.count(v) > 1})
    if duplicates:
        raise ConfigError(f"duplicate {what}: {duplicates}")


def _check_prune_settings(grid: Grid) -> None:
    """Let RunConfig check every cell's settings now rather than hours into the sweep."""
    for cell in grid.cells():
        if cell.is_dense:
            continue
        try:
            RunConfig(model=cell.model.location, out=cell.id, **cell.prune_settings).validate()
            if cell.retrain_settings:
                RetrainConfig(model=cell.model.location, out=cell.id, **cell.retrain_settings).validate()
        except ConfigError as error:
            raise ConfigError(f"cell {cell.id}: {error}") from None


def _check_data_files(grid: Grid) -> None:
    """A missing calibration or evaluation file would fail every cell, each after its prune: say so now."""
    sources = [source.location for source in grid.data]
    if isinstance(grid.prune.get("calib"), str):
        sources.append(grid.prune["calib"])
    for source in sources:
        if not is_hub_source(source):
            local_file(source)  # raises CalibrationError (a ValueError) naming the problem


def _json_normalised(value):
    """`value` as it reads back from JSON (tuples become lists), so that comparisons are fair."""
    return json.loads(json.dumps(value, default=str))


# --------------------------------------------------------------------------------------------------
# One cell's directory and state


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
            recorded = _read_json(self.result)["settings"]
            return "finished" if recorded == self.cell.recorded_settings() else "changed"
        if self.failure.exists():
            return "failed"
        return "partial" if self.path.exists() else "pending"

    def settings_difference(self) -> str:
        recorded = _read_json(self.result)["settings"]
        return "; ".join(_differences(recorded, self.cell.recorded_settings())) or "none"

    def start(self) -> None:
        """Keep what an earlier attempt with the same settings left (to resume from); else start empty."""
        settings = self.cell.recorded_settings()
        if self.settings_file.exists() and _read_json(self.settings_file) != settings:
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


def _read_json(path: Path):
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
        peak_memory_resettable = _reset_peak_memory()
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
            _reset_peak_memory()
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
        _reset_peak_memory()
        retrain(str(source), str(directory.checkpoint), **cell.retrain_settings, overwrite=True, resume=True)
    shutil.copyfile(directory.checkpoint / "report.json", directory.report)
    shutil.rmtree(directory.path / "pruned", ignore_errors=True)
    return directory.checkpoint


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reset_peak_memory() -> bool:
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
        row["error"] = _read_json(directory.failure)["error"]
    if row["status"] != "finished":
        return row
    result = _read_json(directory.result)
    for name, value in result["perplexity"].items():
        row[f"ppl_{name}"] = value
    if result.get("zero_shot"):
        for task, value in result["zero_shot"]["acc"].items():
            row[f"acc_{task}"] = value
        row["zero_shot_mean"] = result["zero_shot"]["mean_acc"]
    row["eval_time_s"] = result["eval_time_s"]
    if cell.retrain_settings:
        row.update(_retrain_summary(_read_json(directory.report)))
    elif not cell.is_dense:
        row.update(_prune_summary(_read_json(directory.report)))
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
            path = plots / f"ppl-{_cell_id(model.name, source.name)}.png"
            if plot_perplexity(model_rows, f"ppl_{source.name}", grid, path,
                               title=f"{model.name}: perplexity on {source.name} (seqlen {grid.eval['seqlen']})"):
                written.append(path)
        model_directories = [d for d in directories if d.cell.model == model]
        path = plots / f"heldout-{_cell_id(model.name)}.png"
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
        blocks = [b for b in _read_json(directory.report)["blocks"] if "heldout_before" in b]
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
