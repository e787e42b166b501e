"""A sweep's grid: the models, methods, sparsities, corrections and seeds to cross, and the cells it
expands to, in the order the sweep runs them (grid_file.py reads one from its YAML file).

A cell's `recorded_settings()` are what its numbers depend on: a finished cell is valid only while
they are unchanged.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from ..config import RetrainConfig, RunConfig

DENSE = "dense"  # the method name of a model's unpruned baseline cell

# Settings that change how fast or where a cell runs, not its numbers: a finished cell stays valid
# when they change (the same list as RunConfig.fingerprint's, plus evaluation's).
RESOURCE_SETTINGS = frozenset({"device", "batch_size", "offload_activations", "activation_budget_gb",
                               "cache_dir"})
# Settings of the correction's fit: they change nothing in a cell without a correction (except
# --target none, which also changes what the pruning statistics are gathered on).
FITTING_SETTINGS = frozenset({"rank", "alpha", "steps", "lr", "weight_decay", "warmup", "check_every",
                              "patience", "fit_batch_size", "granularity", "target", "heldout"})
# Retrain settings that the grid or the sweep sets per cell: not allowed under `retrain:` (besides params).
GRID_OWNED_RETRAIN_SETTINGS = frozenset({"model", "out", "overwrite", "resume"})


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
            cells.append(Cell(id=readable_id(model.name, DENSE), model=model, method=DENSE, sparsity=None,
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
                                id=readable_id(model.name, method, sparsity.token, correction, f"seed{seed}"),
                                model=model, method=method, sparsity=sparsity, correction=correction,
                                seed=seed, prune_settings=settings, eval_settings=self.eval,
                                data=tuple(self.data))
                            cells.append(pruned)
                            for params in self.retrain_params:
                                cells.append(Cell(
                                    id=f"{pruned.id}-{readable_id(f'retrain_{params}')}", model=model, method=method,
                                    sparsity=sparsity, correction=correction, seed=seed,
                                    prune_settings=settings, eval_settings=self.eval, data=tuple(self.data),
                                    retrain_settings={**self.retrain, "params": params, "seed": seed},
                                    pruned_by=pruned.id))
        return cells


def chained_label(correction: str, params: str) -> str:
    """A chained retrain cell's row in the tables."""
    return f"{correction} + retrain {params}"


def readable_id(*parts: str) -> str:
    # Readable and stable: the same grid entry always gets the same directory name.
    return "-".join(re.sub(r"[^A-Za-z0-9._+]+", "_", part) for part in parts)



def _json_normalised(value):
    """`value` as it reads back from JSON (tuples become lists), so that comparisons are fair."""
    return json.loads(json.dumps(value, default=str))
