"""The resumable training state: what a step changes, saved every --save-every steps and on Ctrl-C,
and restored by --resume.

Only the trainable parameters, their optimiser state, the schedule, the loss history and each rank's
random state are saved: the frozen model is the input checkpoint itself. The random states are named
by step and the one of the training state's step is loaded, so a run killed between the two files
never resumes step k with step k+s's random state; older ones are deleted once the new training state
is in place. Every tensor is saved whole by rank 0, or, where FSDP holds the parameters (--fsdp,
--offload cpu), in each rank's shards (sharded_state.py). Whole tensors are read back on 1 or N ranks,
with or without --fsdp; shards by the same number of ranks.
"""
from __future__ import annotations

import logging
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import distributed
from ..config import ConfigError, RetrainConfig
from ..checkpoint import OutputError, RunDirectory
from ..faults import fault_point
from .sharded_state import is_sharded_state, load_sharded_tensors, remove_older_states, save_sharded_tensors

log = logging.getLogger(__name__)

TRAINING_STATE = "train_state.pt"


def rng_file(step: int, rank: int) -> str:
    return f"rng-{step:08d}-{rank:05d}.pt"


def rng_step(filename: str) -> int:
    """The step of a random-state file; -1 for an older version's rng-RANK.pt (older than any step)."""
    parts = filename.removesuffix(".pt").split("-")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else -1


def empty_history() -> dict:
    return {"step": [], "loss": [], "heldout": [], "tokens_per_s": []}


@dataclass
class TrainingState:
    """What a step changes: the trainable parameters (FSDP's shards of them under --fsdp), AdamW,
    the schedule, the gradient scaler (fp16 only) and the history of losses."""

    parameters: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    history: dict = field(default_factory=empty_history)


def save_training_state(run_dir: RunDirectory, config: RetrainConfig, device: torch.device,
                        training: TrainingState, step: int) -> None:
    """Each rank's random state, then (rank 0) the trainable parameters, optimiser, schedule and
    history, then state.json, the resume marker; then the random states of earlier steps go."""
    run_dir.save_torch(rng_file(step, distributed.rank()), {
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None})
    distributed.barrier("waiting for every rank to save its random state")
    fault_point("retrain-random-state-saved")
    if is_sharded_state(training.parameters):  # each rank writes its own shards (sharded_state.py)
        trainable, optimizer = None, save_sharded_tensors(run_dir, training.parameters, training.optimizer, step)
    else:  # whole tensors, the file one process writes
        trainable = [distributed.full_tensor(p).detach().cpu() for p in training.parameters]
        optimizer = distributed.whole_optimizer_state(training.optimizer)

    def save():
        state = {"step": step, "fingerprint": config.fingerprint(), "trainable": trainable,
                 "optimizer": optimizer, "scheduler": training.scheduler.state_dict(),
                 "scaler": training.scaler.state_dict() if training.scaler else None, "history": training.history}
        run_dir.save_torch(TRAINING_STATE, state)
        fault_point("retrain-training-state-saved")
        run_dir.save_state({"fingerprint": config.fingerprint(), "step": step,
                            "command": "retrain", "world_size": distributed.world_size()})
        # Earlier steps only: another rank may already be writing the next step's random state
        for path in run_dir.work.glob("rng-*.pt"):
            if rng_step(path.name) < step:
                path.unlink(missing_ok=True)
    distributed.on_main(save, "saving the training state")
    distributed.on_main(lambda: remove_older_states(run_dir, trainable is None and optimizer["sharded_state"]),
                        "removing the previous training state")


def saved_step(run_dir: RunDirectory) -> int:
    try:
        return run_dir.load_state().get("step", 0)
    except (OSError, ValueError):
        return 0


def resume_training_state(run_dir: RunDirectory, config: RetrainConfig, device: torch.device,
                          training: TrainingState) -> int:
    """Restore `training` (and the random state) from the unfinished run; return its step."""
    state = distributed.on_main(run_dir.load_state, "reading the resume point")
    if state.get("command") != "retrain" or state["fingerprint"] != config.fingerprint():
        raise ConfigError(f"the unfinished run in {run_dir.work} was started with different settings "
                          "(or by another command); rerun without --resume (and with --overwrite if "
                          "needed) to start over")
    saved = load_saved(run_dir, TRAINING_STATE)
    if saved["trainable"] is None:  # written in shards (sharded_state.py)
        load_sharded_tensors(run_dir, saved["optimizer"], training.parameters, training.optimizer)
    else:
        with torch.no_grad():
            for parameter, value in zip(training.parameters, saved["trainable"], strict=True):
                parameter.copy_(distributed.shard_like(value.to(parameter.device), parameter))
        distributed.load_optimizer_state(training.optimizer, saved["optimizer"])
    training.scheduler.load_state_dict(saved["scheduler"])
    if training.scaler and saved["scaler"]:
        training.scaler.load_state_dict(saved["scaler"])
    training.history = saved["history"]
    random_state = rng_file(saved["step"], distributed.rank())  # of the training state's step
    started_with = state.get("world_size", 1)
    if started_with == distributed.world_size() and (run_dir.work / random_state).exists():
        rng = load_saved(run_dir, random_state)
        torch.set_rng_state(rng["rng"])
        if rng["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda_rng"], device)
    else:
        # Another number of ranks (or a state saved by an older version): the windows, gradients and
        # optimiser state are the same (the batch is global), only dropout's random stream starts afresh.
        why = (f"resuming with {distributed.world_size()} processes where the run started with {started_with}"
               if started_with != distributed.world_size() else f"no {random_state} in {run_dir.work}")
        log.warning("%s: training continues from step %d, with a new random state for dropout", why,
                    saved["step"])
        torch.manual_seed(config.seed + distributed.rank() + saved["step"])
    log.info("resuming at step %d of %d", saved["step"], config.steps)
    return saved["step"]


def load_saved(run_dir: RunDirectory, name: str) -> dict:
    """A file of the training state, tensors only; a damaged one is an OutputError saying what to do."""
    path = run_dir.work / name
    try:
        return torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as error:  # a truncated zip is a RuntimeError
        raise OutputError(f"cannot read the training state {path} ({error}); rerun without --resume to "
                          "start over") from error


@contextmanager
def stop_requests():
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop at the end of the current step, so that a
    consistent state can be saved; a second Ctrl-C stops at once."""
    requested: list[int] = []

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        log.warning("stopping after this step (a second Ctrl-C stops at once)")

    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {sig: signal.signal(sig, handler) for sig in signals}
    except ValueError:  # not the main thread: signals cannot be caught here
        previous = {}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
