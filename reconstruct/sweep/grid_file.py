"""Reading a grid's YAML file (`load_grid`): every setting is checked before anything runs, and each
error names the offending entry. docs/sweeps.md has the format.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from calib.sources import is_hub_source, local_file

from ..config import ConfigError, RetrainConfig, RunConfig, default_device
from ..pruning import NMPattern, PruningError
from .grid import GRID_OWNED_RETRAIN_SETTINGS, Grid, Named, Sparsity

# Prune settings that the grid itself sets per cell (or the sweep manages): not allowed under `prune:`.
GRID_OWNED_PRUNE_SETTINGS = frozenset({"model", "out", "method", "sparsity", "pattern", "correction",
                                       "seed", "overwrite", "resume"})
EVAL_SETTINGS = frozenset({"data", "seqlen", "tasks", "batch_size", "limit", "include_path", "device",
                           "dtype", "text_field", "cache_dir"})
TOP_LEVEL_KEYS = frozenset({"models", "methods", "sparsities", "corrections", "seeds", "prune", "eval",
                            "keep_checkpoints", "retrain"})


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
