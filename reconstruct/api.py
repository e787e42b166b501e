"""`prune()` and `retrain()` for Python users: the settings (`reconstruct.config`) validated, then the
run."""
from __future__ import annotations

from pathlib import Path

from .config import ConfigError, RetrainConfig, RunConfig
from .layerwise import run as run_pruning
from .model_card import python_call
from .retraining import plan as plan_retraining
from .retraining import run as run_retraining


def prune(model: str, out: str, *, startup_s: float = 0.0, invocation: str | None = None, **settings) -> dict:
    """Prune (and by default repair) `model` into the checkpoint directory `out`; return the report.

    Settings are the fields of `RunConfig`, e.g. `prune("meta-llama/Llama-2-7b-hf", "out",
    method="sparsegpt", sparsity=0.6, correction="masklora", calib="c4")`. `startup_s`: seconds
    already spent on this run before the call (the command line passes its process's age: interpreter
    start-up and imports), counted in the report's wall time as the phase `imports`. `invocation`:
    how the run was started, for the report and the model card (the command line passes its own;
    default: this call, with its settings).
    """
    unknown = set(settings) - set(RunConfig.field_names())
    if unknown:
        raise ConfigError(f"unknown settings {sorted(unknown)}; known: {RunConfig.field_names()}")
    config = RunConfig(model=str(model), out=str(Path(out)), **settings).validate()
    return run_pruning(config, startup_s, invocation or python_call("prune", model, out, settings)).report


def _retrain_config(model: str, out: str, settings: dict) -> RetrainConfig:
    unknown = set(settings) - set(RetrainConfig.field_names())
    if unknown:
        raise ConfigError(f"unknown settings {sorted(unknown)}; known: {RetrainConfig.field_names()}")
    return RetrainConfig(model=str(model), out=str(Path(out)), **settings).validate()


def plan_retrain(model: str, out: str = "", **settings):
    """The memory plan (`reconstruct.plan.Plan`) `retrain(model, out, **settings)` would run with,
    made without reading any weight; raises `reconstruct.plan.DoesNotFitError` when nothing fits."""
    return plan_retraining(_retrain_config(model, out, settings))


def retrain(model: str, out: str, *, invocation: str | None = None, **settings) -> dict:
    """Retrain a pruned `model` globally (next-token loss, a tiny trainable subset, every zero kept)
    into the checkpoint directory `out`; return the report.

    Settings are the fields of `RetrainConfig`, e.g. `retrain("llama-wanda70", "out", params="masklora",
    data="c4", steps=1000)`. `invocation`: as for `prune`.
    """
    config = _retrain_config(model, out, settings)
    return run_retraining(config, invocation or python_call("retrain", model, out, settings)).report
