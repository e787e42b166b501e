"""Global retraining (PERP's main experiment): the whole pruned model, the ordinary next-token loss,
a tiny trainable subset, merged so that every zero of the checkpoint stays exactly +0.0.

    model = the pruned checkpoint, any format `checkpoint` reads; masks = its linears' zeros
    attach the correction to the model (the same corrections/ as layer-wise repair: one big unit)
    for each step:
        loss = next-token cross-entropy on a batch of packed windows [+ distill · KL(teacher ‖ student)]
        backward, AdamW step, linear schedule with warm-up
        every --eval-every steps: held-out loss; every --save-every steps: a resumable state
    judge the merged model on the held-out windows: merge if it is no worse than the input, else
    keep the input's weights (never worse); write the checkpoint with prune's writer, report, plot

Only the trainable parameters, their optimiser state, the data position and the random state are
saved while training: the frozen model is the input checkpoint itself.

Under torchrun every rank loads the frozen model from the checkpoint itself (no weight is ever
broadcast), takes a contiguous share of each step's windows, and the gradients of the few trainable
parameters are summed across ranks in one flat buffer per step: `--batch-size` is global, and the
same command gives the same model on 1 or N ranks up to float rounding. Rank 0 writes.

With --fsdp (a model that does not fit one device) the weights are sharded across the ranks with
FSDP2 instead: each rank keeps 1/N of every parameter on its device, each block is gathered whole for
its own forward and backward pass, and FSDP sums the gradients. No rank loads the whole model: each
reads the rows of its own shards from the checkpoint; at the end each block in turn is gathered on
rank 0, merged and written; the training state is saved in each rank's shards.

With --offload cpu the same FSDP2 units keep their parameters, gradients and AdamW's state in host
memory (CPUOffloadPolicy), on one process (a process group of one) or on several (sharded as with
--fsdp), and each block is copied to the device only for its own forward and backward pass.

    inputs.py    the pruned model's linears and zeros, the teacher, the training and validation windows
    planning.py  the memory plan: the budget, the passes and checkpointing chosen before any weight is read
    losses.py    next-token loss and distillation, as sums over tokens
    trainer.py   Retrainer: set-up, the training loop, the held-out loss, the never-worse merge, writing
    state.py     the resumable training state (saved, resumed), stopping on Ctrl-C
    report.py    report.json's contents and loss.png
    sharding.py  --fsdp: the model sharded, and how the corrections reach its sharded parameters
    sharded_model.py  under FSDP: each rank reads its shards' rows; the model written block by block
    sharded_state.py  under FSDP: the training state's tensors saved and read in each rank's shards
    out_of_memory.py  out of device memory: what the memory plan would choose, in the command's flags
"""
from __future__ import annotations

import dataclasses

import torch

from .. import distributed
from ..config import RetrainConfig
from ..memory import ACTIVATION_MMAP_THRESHOLD_BYTES, MMAP_THRESHOLD_BYTES, limit_heap_fragmentation
from ..models import open_model
from ..plan import Plan
from .inputs import open_teacher
from .planning import plan_memory
from .trainer import Retrainer, RetrainResult, TrainingError


def run(config: RetrainConfig, invocation: str | None = None) -> RetrainResult:
    """Run `config`; under torchrun, as one of several data-parallel processes. `invocation`: how the
    run was started (the command line, or the Python call), for the report and the model card."""
    # --offload cpu is FSDP2's, which needs a process group even on one process: a group of one
    with distributed.process_group(config.device, single_process_group=config.offload == "cpu") as device:
        # Freed activations and per-linear temporaries go back to the system, not to a heap that
        # stays resident (memory.py; measured in docs/memory.md); on the CPU the activations too
        limit_heap_fragmentation(ACTIVATION_MMAP_THRESHOLD_BYTES if torch.device(device).type == "cpu"
                                 else MMAP_THRESHOLD_BYTES)
        return Retrainer(dataclasses.replace(config, device=device), invocation).run()


def plan(config: RetrainConfig) -> Plan:
    """The memory plan `run(config)` would follow, from the models' configs: no weight is read."""
    with distributed.process_group(config.device) as device:
        student = open_model(config.model, config.torch_dtype)
        teacher = open_teacher(config, student) if config.teacher else None
        return plan_memory(dataclasses.replace(config, device=device), student, teacher, torch.device(device))


__all__ = ["RetrainResult", "Retrainer", "TrainingError", "plan", "run"]
