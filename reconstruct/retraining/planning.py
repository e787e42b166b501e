"""The memory plan of a retraining run (reconstruct.plan), made from the model's config and the
settings before any weight is read: the budget (`--max-memory`, else the free memory of the device,
on the CPU the host's available memory), the settings the user left open (`--grad-accum`,
`--gradient-checkpointing`) chosen to fit it, and DoesNotFitError, naming what would fit, when
nothing does."""
from __future__ import annotations

import dataclasses
import logging

import torch

from .. import distributed
from ..config import RetrainConfig
from ..models import ModelAdapter
from ..plan import DoesNotFitError, Plan, PlanError, PlanSettings, choose
from .losses import LOSS_CHUNK_TOKENS

log = logging.getLogger(__name__)

GB = 10**9


def memory_budget(config: RetrainConfig, device: torch.device) -> int:
    """Bytes the run may use per rank: --max-memory, else what is free now (the device's free memory
    on an accelerator, the host's available memory on the CPU). Under torchrun the smallest of the
    ranks' budgets, so that every rank chooses the same passes (FSDP's collectives need as many)."""
    if config.max_memory is not None:
        budget = int(config.max_memory * GB)
    elif device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        budget = psutil.virtual_memory().available
    if distributed.world_size() > 1:
        smallest = distributed.all_reduce_max(torch.tensor([-float(budget)], dtype=torch.float64),
                                              "agreeing on the memory budget")
        budget = int(-smallest.item())
    return budget


def plan_settings(config: RetrainConfig, adapter: ModelAdapter, teacher: ModelAdapter | None,
                  device: torch.device) -> PlanSettings:
    """The run's settings as the planner takes them; what the user left open stays None."""
    return settings_for(config, str(adapter.storage_dtype).removeprefix("torch."),
                        None if teacher is None else teacher.model.config, device, distributed.world_size())


def settings_for(config: RetrainConfig, dtype: str | None, teacher_config, device: torch.device,
                 world_size: int) -> PlanSettings:
    """`config` as PlanSettings for `world_size` ranks (`dtype`: the frozen weights', None for the
    model config's; `teacher_config`: None for the student's shape). What the user left open
    (`--grad-accum`, `--gradient-checkpointing`) stays None for the planner to choose."""
    micro_batch = None if config.grad_accum is None else config.batch_size // config.grad_accum
    return PlanSettings(
        params=config.params, rank=config.rank, seqlen=config.seqlen, batch_size=config.batch_size,
        micro_batch=micro_batch, gradient_checkpointing=config.gradient_checkpointing,
        dtype=dtype, world_size=world_size,
        fsdp=config.fsdp or (config.offload == "cpu" and device.type == "cpu"),  # FSDP2 holds them either way
        # On the CPU the parameters are in host memory already: --offload cpu changes only who holds them
        offload="cpu" if config.offload == "cpu" and device.type != "cpu" else None,
        teacher=bool(config.teacher), teacher_config=teacher_config,
        teacher_on_device=(config.teacher_device or config.device) == config.device,
        loss_chunk_tokens=LOSS_CHUNK_TOKENS, steps=config.steps, eval_windows=config.eval_windows,
        saves_state=config.save_every > 0,
        device="cpu" if device.type == "cpu" else "cuda")


def plan_memory(config: RetrainConfig, adapter: ModelAdapter, teacher: ModelAdapter | None,
                device: torch.device) -> Plan:
    """The plan for `config` on `device`; raises DoesNotFitError (before any weight is read) when
    even the smallest setting left open does not fit."""
    settings = plan_settings(config, adapter, teacher, device)
    # --offload cpu is offered where there is a device to offload from
    return choose(adapter.model.config, settings, memory_budget(config, device),
                  offload_available=device.type != "cpu")


def plan_for_run(config: RetrainConfig, adapter: ModelAdapter, teacher: ModelAdapter | None,
                 device: torch.device) -> Plan | None:
    """The plan a run follows. DoesNotFitError stops the run before any weight is read; a model the
    planner cannot describe (PlanError) runs without a plan, with the settings given or one pass of
    the batch without checkpointing, as before the planner existed."""
    try:
        return plan_memory(config, adapter, teacher, device)
    except DoesNotFitError:
        raise
    except PlanError as error:
        log.warning("no memory plan for this run (%s): --grad-accum and --gradient-checkpointing are as "
                    "given, or 1 and off", error)
        return None


def with_plan(config: RetrainConfig, plan: Plan | None) -> RetrainConfig:
    """`config` with the planner's choices for the settings the user left open (None); a setting
    the user gave is kept as given. Without a plan: one pass of the batch, no checkpointing."""
    return dataclasses.replace(
        config, grad_accum=(config.grad_accum if config.grad_accum is not None
                            else plan.grad_accum if plan else 1),
        gradient_checkpointing=(config.gradient_checkpointing if config.gradient_checkpointing is not None
                                else plan.gradient_checkpointing if plan else False))
