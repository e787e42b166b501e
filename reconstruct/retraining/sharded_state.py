"""The training state's tensors when FSDP2 holds the parameters (`--fsdp`, `--offload cpu`): each rank
writes its own shards of the trainable parameters and of AdamW's moments, so that no rank gathers a
whole copy of them on its host (with `--params full` that copy is three fp32 copies of the model).
`state.py` keeps the rest (the step, the schedule, the history, AdamW's hyper-parameters) in its
small file, which names the shards' directory.

Each rank's shards are one safetensors file, read back with safetensors: no pickle anywhere, which
rules out torch.distributed.checkpoint (it unpickles its metadata file). A rank's shard is its rows
of each tensor as FSDP2 splits them, so the state is read back by the same number of ranks; another
number is refused with the command that would resume. Each save writes a new directory named by its
step and removes the older ones only once the new resume point is in place: a run killed while
saving resumes from the previous state.
"""
from __future__ import annotations

import shutil

import torch

from .. import distributed
from ..checkpoint import OutputError, RunDirectory
from ..config import ConfigError

PREFIX = "train_state-"
SUFFIX = ".shards"
MOMENTS = ("step", "exp_avg", "exp_avg_sq")  # AdamW's state of one parameter


def directory_name(step: int) -> str:
    return f"{PREFIX}{step:08d}{SUFFIX}"


def is_sharded_state(parameters: list[torch.nn.Parameter]) -> bool:
    """Whether to save this way: FSDP holds the trainable parameters."""
    return any(distributed.is_sharded(p) for p in parameters)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor."""
    return tensor.to_local() if distributed.is_sharded(tensor) else tensor


def _rank_file(name: str) -> str:
    return f"{name}/rank-{distributed.rank():05d}.safetensors"


def save_sharded_tensors(run_dir: RunDirectory, parameters: list[torch.nn.Parameter],
                         optimizer: torch.optim.Optimizer, step: int) -> dict:
    """Every rank writes its shards into the step's directory; returns what the small state file
    keeps of them: the directory's name, the number of ranks and AdamW's hyper-parameters."""
    from safetensors.torch import save_file

    name = directory_name(step)

    def fresh_directory():  # a directory a killed save of the same step left behind is replaced
        shutil.rmtree(run_dir.work / name, ignore_errors=True)
        (run_dir.work / name).mkdir(parents=True)

    distributed.on_main(fresh_directory, "making the state's directory")
    tensors = {}
    for i, parameter in enumerate(parameters):
        tensors[f"trainable.{i}"] = _local(parameter.detach())
        for key, value in optimizer.state.get(parameter, {}).items():
            if key in MOMENTS:
                tensors[f"{key}.{i}"] = _local(value.detach())
    tensors = {key: value.cpu().contiguous() for key, value in tensors.items()}
    save_file(tensors, str(run_dir.work / _rank_file(name)))
    distributed.barrier("waiting for every rank to write its shards of the training state")
    groups = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    return {"sharded_state": name, "ranks": distributed.world_size(), "param_groups": groups,
            "moments": bool(optimizer.state)}


def load_sharded_tensors(run_dir: RunDirectory, saved: dict, parameters: list[torch.nn.Parameter],
                         optimizer: torch.optim.Optimizer) -> None:
    """Read a state written by `save_sharded_tensors` into `parameters` and `optimizer`, each rank its
    own shards."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ranks = saved.get("ranks", 1)
    if ranks != distributed.world_size():
        raise ConfigError(f"the unfinished run in {run_dir.work} saved its training state in the shards of "
                          f"{ranks} process(es), this one has {distributed.world_size()}: resume it with the "
                          f"same number (torchrun --nproc_per_node {ranks}, or no torchrun for 1), or rerun "
                          "without --resume to start over")
    path = run_dir.work / _rank_file(saved["sharded_state"])
    try:
        stored = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise OutputError(f"cannot read the training state {path} ({error}); rerun without --resume to start "
                          "over") from error
    if saved["moments"]:  # AdamW makes its state at its first step: made here to be read into
        for parameter in parameters:
            optimizer.state[parameter] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(parameter),
                                          "exp_avg_sq": torch.zeros_like(parameter)}
    with torch.no_grad():
        for i, parameter in enumerate(parameters):
            targets = {"trainable": parameter, **{key: optimizer.state[parameter][key]
                                                  for key in MOMENTS if parameter in optimizer.state}}
            for key, target in targets.items():
                local = _local(target)
                value = stored.get(f"{key}.{i}")
                if value is None or value.shape != local.shape:
                    raise OutputError(f"the training state {path} does not match this run's parameters "
                                      f"({key}.{i}); rerun without --resume to start over")
                local.copy_(value)
    for group, hyper in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        group.update(hyper)


def remove_older_states(run_dir: RunDirectory, keep: str | None) -> None:
    """Rank 0: every shards directory but `keep` (None: all of them, when the run is finished)."""
    for path in run_dir.work.glob(f"{PREFIX}*{SUFFIX}"):
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)
