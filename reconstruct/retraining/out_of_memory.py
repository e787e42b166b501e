"""What `retrain` says when the device ran out of memory: the settings the memory plan
(`reconstruct.plan`) would choose for this device, or what it says would fit instead, in the
command's own flags. Never a traceback: the user's next step is a setting."""
from __future__ import annotations

import dataclasses
import os

import torch

from .. import distributed
from ..checkpoint import RunDirectory
from ..config import RetrainConfig
from ..memory import DeviceMemoryError
from ..plan import DoesNotFitError, PlanError, PlanSettings, choose
from ..plan.choose import needed
from ..plan.render import size
from .planning import settings_for
from .state import saved_step

# When the plan cannot help (a model it cannot shape, say): the settings that lower the device's need
GENERIC_ADVICE = ("--gradient-checkpointing, a larger --grad-accum (fewer windows per pass), --offload cpu, "
                  "or --fsdp over several devices under torchrun")


def device_memory_bytes(device: torch.device) -> int:
    """The budget the plan is asked about: the device's whole memory (what is free after the failure
    says nothing), or on the CPU the host's."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_settings(config: RetrainConfig, world_size: int, device: torch.device) -> PlanSettings:
    """The run's settings as its plan took them (planning.settings_for), with the micro-batch and
    checkpointing left to the planner: the ones given did not fit."""
    return dataclasses.replace(settings_for(config, config.dtype, None, device, world_size),
                               micro_batch=None, gradient_checkpointing=None)


def given_settings(config: RetrainConfig) -> str:
    flags = [f"--batch-size {config.batch_size}", f"--grad-accum {config.grad_accum}", f"--seqlen {config.seqlen}"]
    flags += ["--gradient-checkpointing"] if config.gradient_checkpointing else []
    flags += [f"--offload {config.offload}"] if config.offload != "none" else []
    return " ".join(flags)


def out_of_memory_message(config: RetrainConfig, model_config, device: torch.device, world_size: int,
                          error: BaseException) -> str:
    """The message of the DeviceMemoryError raised for `error`: what ran out, with which settings,
    and what the plan would choose (`model_config`: None when the model was not opened yet)."""
    first_line = str(error).splitlines()[0] if str(error) else "no details"
    message = f"the device ran out of memory ({first_line}) with {given_settings(config)}. "
    if model_config is None:
        return message + f"Lower the need with {GENERIC_ADVICE}"
    budget = device_memory_bytes(device)
    try:
        plan = choose(model_config, plan_settings(config, world_size, device), budget)
    except DoesNotFitError as does_not_fit:
        return message + f"The memory plan: {does_not_fit}"
    except PlanError:
        return message + f"Lower the need with {GENERIC_ADVICE}"
    chosen = [f"--grad-accum {plan.grad_accum}"] + (["--gradient-checkpointing"] if plan.gradient_checkpointing else [])
    if plan.grad_accum == config.grad_accum and plan.gradient_checkpointing == config.gradient_checkpointing:
        return (message + f"The memory plan expected these settings to fit ({plan.memory.describe_settings()}; "
                "it is an estimate, and other processes may hold memory on the device): lower the need with "
                + GENERIC_ADVICE)
    return (message + f"For this device the memory plan chooses {' '.join(chosen)} "
            f"({plan.memory.describe_settings()}: {size(needed(plan.memory))}); or use {GENERIC_ADVICE}")


def out_of_memory_error(config: RetrainConfig, adapter, device: torch.device, run_dir: RunDirectory,
                        error: BaseException) -> DeviceMemoryError:
    """The error to raise for `error`, a torch out-of-memory error (`adapter`: the opened model, or
    None), saying also where the last saved training state is."""
    message = out_of_memory_message(config, adapter.config if adapter is not None else None, device,
                                    distributed.world_size(), error)
    saved = saved_step(run_dir)
    if saved:
        message += f". The training state of step {saved} is kept in {run_dir.work}: add --resume to continue"
    return DeviceMemoryError(message)
