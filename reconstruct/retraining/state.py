"""The resumable training state: what a step changes, saved every --save-every steps and on Ctrl-C,
and restored by --resume.

Only the trainable parameters, their optimiser state, the schedule, the loss history and each rank's
random state are saved: the frozen model is the input checkpoint itself. Every tensor is saved whole
by rank 0, or, where FSDP holds the parameters (--fsdp, --offload cpu), in each rank's shards with
torch.distributed.checkpoint (sharded_state.py); either is read back on 1 or N ranks, with or without
--fsdp, so a run may resume on another number of ranks.
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
from ..checkpoint import RunDirectory
from .sharded_state import is_sharded_state, load_sharded_tensors, remove_older_states, save_sharded_tensors

log = logging.getLogger(__name__)

TRAINING_STATE = "train_state.pt"


def rng_file(rank: int) -> str:
    return f"rng-{rank:05d}.pt"


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
    history, then state.json, the resume marker, last."""
    run_dir.save_torch(rng_file(distributed.rank()), {
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None})
    distributed.barrier("waiting for every rank to save its random state")
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
        run_dir.save_state({"fingerprint": config.fingerprint(), "step": step,
                            "command": "retrain", "world_size": distributed.world_size()})
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
    saved = torch.load(run_dir.work / TRAINING_STATE, weights_only=True)
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
    random_state = run_dir.work / rng_file(distributed.rank())
    if state.get("world_size", 1) == distributed.world_size() and random_state.exists():
        rng = torch.load(random_state, weights_only=True)
        torch.set_rng_state(rng["rng"])
        if rng["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda_rng"], device)
    else:
        # Another number of ranks: the windows, gradients and optimiser state are the same (the
        # batch is global), only dropout's random stream starts afresh.
        log.warning("resuming with %d processes where the run started with %d: training continues "
                    "from step %d, with a new random state for dropout", distributed.world_size(),
                    state.get("world_size", 1), saved["step"])
        torch.manual_seed(config.seed + distributed.rank() + saved["step"])
    log.info("resuming at step %d of %d", saved["step"], config.steps)
    return saved["step"]


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
