"""`choose(model_config, settings, max_memory_bytes)`: the micro-batch and gradient checkpointing that
fit a memory budget, each candidate judged by `estimate`.

The micro-batch (windows per forward/backward pass on one rank) is a divisor of the rank's share of
the global batch, so every pass has the same size and the step's result is the same whatever is
chosen (the loss is one mean over the batch). The order of preference:

  - on the device's memory: the largest micro-batch without checkpointing (recomputing every
    block costs about a third more compute, while fewer windows per pass cost little at real
    sequence lengths); failing that, the largest with it;
  - with `--offload cpu`: the fewest passes, then no checkpointing. Every pass moves every block's
    weights from the host to the device (twice, three times with checkpointing), so at 70B eight
    passes of one window move about 2 TB per step over PCIe, one pass of eight a fifth of that.

A setting the user gave is never changed; when nothing fits, DoesNotFitError says what would: the
planner's own choice instead of the user's, `--fsdp` over N devices, `--offload cpu`, a smaller
`--seqlen`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .estimate import MemoryPlan, estimate
from .render import size
from .settings import PlanSettings
from .shapes import PlanError

# The share of the budget kept free for what the plan does not count: the caching allocator's
# fragmentation (its reserved memory exceeds the allocated peak) and kernels' workspaces.
HEADROOM = 0.10
FSDP_DEVICES = (2, 4, 8, 16, 32, 64, 128, 256)
SMALLEST_SEQLEN = 128


class DoesNotFitError(PlanError):
    """Even the smallest setting the user left open does not fit; `options` lists what would."""

    def __init__(self, message: str, smallest: MemoryPlan, options: list[str]):
        super().__init__(message)
        self.smallest = smallest
        self.options = options


@dataclass
class Plan:
    memory: MemoryPlan
    max_memory_bytes: int
    chosen: tuple[str, ...]          # the settings the planner chose ("micro_batch", "gradient_checkpointing")

    @property
    def settings(self) -> PlanSettings:
        return self.memory.settings

    @property
    def micro_batch(self) -> int:
        return self.settings.micro_batch

    @property
    def gradient_checkpointing(self) -> bool:
        return self.settings.gradient_checkpointing

    @property
    def grad_accum(self) -> int:
        """The CLI's --grad-accum for this micro-batch: passes per step over all ranks' windows."""
        return self.settings.batch_size // self.settings.micro_batch

    @property
    def usable_bytes(self) -> int:
        return usable(self.max_memory_bytes)

    def render(self) -> str:
        def origin(name):
            return "chosen" if name in self.chosen else "given"
        return (f"budget {size(self.max_memory_bytes)} per {'rank' if self.settings.device == 'cuda' else 'host'}, "
                f"{size(self.usable_bytes)} usable ({HEADROOM:.0%} kept for the allocator)\n"
                f"micro-batch {self.micro_batch} (--grad-accum {self.grad_accum}): {origin('micro_batch')}; "
                f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}: "
                f"{origin('gradient_checkpointing')}\n\n{self.memory.render()}")

    def as_dict(self) -> dict:
        return {"max_memory_bytes": self.max_memory_bytes, "usable_bytes": self.usable_bytes,
                "micro_batch": self.micro_batch, "grad_accum": self.grad_accum,
                "gradient_checkpointing": self.gradient_checkpointing, "chosen": list(self.chosen),
                **self.memory.as_dict()}


def usable(max_memory_bytes: int) -> int:
    return int(max_memory_bytes * (1 - HEADROOM))


def needed(plan: MemoryPlan) -> int:
    """What must fit the budget: the device's peak, or on the CPU the host's."""
    return plan.host_peak_bytes if plan.settings.device == "cpu" else plan.peak_bytes


def candidates(settings: PlanSettings) -> list[PlanSettings]:
    """The settings to try, best first; only the ones the user left open (None) vary."""
    share = settings.windows_per_rank
    micros = ([settings.micro_batch] if settings.micro_batch is not None
              else [d for d in range(share, 0, -1) if share % d == 0])
    checkpointing = ([settings.gradient_checkpointing] if settings.gradient_checkpointing is not None
                     else [False, True])
    tried = [dataclasses.replace(settings, micro_batch=micro, gradient_checkpointing=on)
             for on in checkpointing for micro in micros]
    if settings.offload == "cpu":  # the fewest passes first; sorted() keeps no checkpointing first among equals
        tried = sorted(tried, key=lambda candidate: -candidate.micro_batch)
    return tried


def first_fitting(model_config, settings: PlanSettings, max_memory_bytes: int) -> MemoryPlan | None:
    for candidate in candidates(settings):
        plan = estimate(model_config, candidate)
        if needed(plan) <= usable(max_memory_bytes):
            return plan
    return None


def choose(model_config, settings: PlanSettings, max_memory_bytes: int, offload_available: bool = True) -> Plan:
    """The plan that fits `max_memory_bytes` (per device; on the CPU, the host's memory), less
    HEADROOM. Raises DoesNotFitError when none does; `offload_available` False leaves --offload cpu
    out of the options it names (a command that has no such flag yet)."""
    settings.validate()
    plan = first_fitting(model_config, settings, max_memory_bytes)
    chosen = tuple(name for name in ("micro_batch", "gradient_checkpointing") if getattr(settings, name) is None)
    if plan is not None:
        return Plan(plan, max_memory_bytes, chosen)
    smallest = estimate(model_config, candidates(settings)[-1])
    options = alternatives(model_config, settings, max_memory_bytes, offload_available)
    given = describe_given(settings)
    message = (f"--params {settings.params} needs {size(needed(smallest))} "
               f"{'per device' if settings.device == 'cuda' else 'of host memory'} at the least "
               f"({smallest.describe_settings()}; peak at {smallest.peak()[0]}), more than the "
               f"{size(usable(max_memory_bytes))} usable of {size(max_memory_bytes)}"
               + (f"; {given} as given" if given else "") + ". ")
    message += ("These would fit: " + "; ".join(options) + "." if options
                else "Nothing the planner knows of fits (--fsdp" + (", --offload cpu" if offload_available else "")
                + ", a smaller --seqlen).")
    raise DoesNotFitError(message, smallest, options)


def describe_given(settings: PlanSettings) -> str:
    given = []
    if settings.micro_batch is not None:
        given.append(f"a micro-batch of {settings.micro_batch} (--grad-accum "
                     f"{settings.batch_size // settings.micro_batch})")
    if settings.gradient_checkpointing is not None:
        given.append(f"gradient checkpointing {'on' if settings.gradient_checkpointing else 'off'}")
    return " and ".join(given)


def alternatives(model_config, settings: PlanSettings, max_memory_bytes: int,
                 offload_available: bool = True) -> list[str]:
    """What would fit instead, each judged by the same estimator: the planner's own choice of the
    settings the user gave, then, with the user's settings kept, --fsdp over the fewest devices,
    --offload cpu, the longest smaller --seqlen."""
    options = []
    free = dataclasses.replace(settings, micro_batch=None, gradient_checkpointing=None)
    if free != settings and (plan := first_fitting(model_config, free, max_memory_bytes)):
        options.append(f"leaving the micro-batch and checkpointing to the planner ({plan.describe_settings()}: "
                       f"{size(needed(plan))})")
    if settings.device == "cuda":
        for devices in (n for n in FSDP_DEVICES if n > settings.world_size or not settings.sharded):
            trial = dataclasses.replace(settings, fsdp=True, world_size=devices)
            if plan := first_fitting(model_config, trial, max_memory_bytes):
                options.append(f"--fsdp over {devices} devices (torchrun --nproc_per_node {devices}; "
                               f"{size(plan.peak_bytes)} per device)")
                break
        if offload_available and settings.offload is None and (
                plan := first_fitting(model_config, dataclasses.replace(settings, offload="cpu"), max_memory_bytes)):
            options.append(f"--offload cpu ({size(plan.peak_bytes)} on the device, "
                           f"{size(plan.host_peak_bytes)} of host memory per rank)")
    seqlen = settings.seqlen // 2
    while seqlen >= SMALLEST_SEQLEN:
        if plan := first_fitting(model_config, dataclasses.replace(settings, seqlen=seqlen), max_memory_bytes):
            options.append(f"--seqlen {seqlen} ({size(needed(plan))})")
            break
        seqlen //= 2
    return options
