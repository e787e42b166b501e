"""The training state's tensors when FSDP2 holds the parameters (`--fsdp`, `--offload cpu`): each rank
writes its own shards of the trainable parameters and of AdamW's moments with
torch.distributed.checkpoint (DCP), so that no rank gathers a whole copy of them on its host (with
`--params full` that copy is three fp32 copies of the model). `state.py` keeps the rest (the step, the
schedule, the history, AdamW's hyper-parameters) in its small file, which names the DCP directory.

A DCP directory is read back into whatever holds the parameters then: FSDP's shards on any number of
ranks, or whole tensors on one process, so a run may resume with or without sharding. Each save
writes a new directory named by its step and removes the older ones only once the new resume point
is in place: a run killed while saving resumes from the previous state.
"""
from __future__ import annotations

import shutil
import warnings

import torch

from .. import distributed
from ..checkpoint import RunDirectory

PREFIX = "train_state-"
SUFFIX = ".dcp"


def directory_name(step: int) -> str:
    return f"{PREFIX}{step:08d}{SUFFIX}"


def is_sharded_state(parameters: list[torch.nn.Parameter]) -> bool:
    """Whether to save this way: FSDP holds the trainable parameters."""
    return any(distributed.is_sharded(p) for p in parameters)


def _tensors(parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    """What DCP writes and reads in place: the parameters and each one's AdamW state, by position."""
    return {"trainable": {str(i): p.detach() for i, p in enumerate(parameters)},
            "optimizer": {str(i): optimizer.state[p] for i, p in enumerate(parameters) if p in optimizer.state}}


def save_sharded_tensors(run_dir: RunDirectory, parameters: list[torch.nn.Parameter],
                         optimizer: torch.optim.Optimizer, step: int) -> dict:
    """Every rank writes its shards into the step's DCP directory (a collective); returns what the
    small state file keeps of them: the directory's name and AdamW's hyper-parameters."""
    import torch.distributed.checkpoint as dcp

    name = directory_name(step)
    distributed.on_main(lambda: shutil.rmtree(run_dir.work / name, ignore_errors=True), "clearing the state")
    dcp.save(_tensors(parameters, optimizer), checkpoint_id=run_dir.work / name)
    groups = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    return {"sharded_state": name, "param_groups": groups, "moments": bool(optimizer.state)}


def load_sharded_tensors(run_dir: RunDirectory, saved: dict, parameters: list[torch.nn.Parameter],
                         optimizer: torch.optim.Optimizer) -> None:
    """Read a state written by `save_sharded_tensors` into `parameters` and `optimizer`, each rank its
    own part (or whole tensors, on one process without sharding)."""
    import torch.distributed.checkpoint as dcp

    if saved["moments"]:  # AdamW makes its state at its first step: made here to be read into
        for parameter in parameters:
            optimizer.state[parameter] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(parameter),
                                          "exp_avg_sq": torch.zeros_like(parameter)}
    with torch.no_grad(), warnings.catch_warnings():
        # On one process without a process group DCP reads everything, as intended here, and says so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(_tensors(parameters, optimizer), checkpoint_id=run_dir.work / saved["sharded_state"])
    for group, hyper in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        group.update(hyper)


def remove_older_states(run_dir: RunDirectory, keep: str | None) -> None:
    """Rank 0: every DCP directory but `keep` (None: all of them, when the run is finished)."""
    for path in run_dir.work.glob(f"{PREFIX}*{SUFFIX}"):
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)
