"""`estimate(model_config, settings)`: the memory of one `reconstruct retrain` step, item by item, from
the model's config and the settings alone, before any weight is read.

Each item is held at some moments of a step; the peak is the largest sum of what coexists at one of
them, on the device (per rank) and on the host (per rank):

    logits and loss               every block's saved activations (or, with checkpointing, every
                                  block's input), the logits, the loss's fp32 chunk and gradients
    backward of the last block    the same activations, that block's recomputed ones (checkpointing),
                                  the gradients flowing through it, one linear's effective weight
    backward of the first block   every gradient; one block's activations
    optimizer step                every gradient, AdamW's moments and its step's temporaries

What is counted follows the code of retraining/, corrections/ and distributed.py: autocast to the
weights' half precision, fp32 trainable parameters; FSDP2 sharding parameters, gradients and optimiser
state, gathering one block (and prefetching the next) and one vocabulary-sized unit at a time,
offloading to the host with `--offload cpu`; keep-masks that cost nothing, computed as `weight != 0`
where they are used; one linear's effective weight at a time, formed again in its backward pass
(corrections/effective.py); the next-token loss and the KL term of distillation in chunks of
`loss_chunk_tokens` tokens (retraining/losses.py); the gradients of several processes without FSDP
all-reduced in fp32 buckets (distributed.sum_gradients); the logits freed by the loss's backward.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from . import render
from .items import device_items, host_items
from .settings import DEVICE_MOMENTS, DTYPE_NAMES, HOST_MOMENTS, SHORT, MemoryItem, PlanSettings
from .shapes import LOW_RANK, ModelShape, model_shape


@dataclass
class MemoryPlan:
    """One rank's memory for `settings` (resolved: micro_batch and gradient_checkpointing set)."""
    settings: PlanSettings
    model: ModelShape
    weight_dtype: str                # "bf16", "fp16" or "fp32"
    trainable: dict[str, int]
    items: list[MemoryItem]
    notes: list[str] = field(default_factory=list)

    def moments(self, where: str = "device") -> dict[str, int]:
        names = DEVICE_MOMENTS if where == "device" else HOST_MOMENTS
        return {moment: sum(i.bytes for i in self.items if i.where == where and moment in i.moments)
                for moment in names}

    def peak(self, where: str = "device") -> tuple[str, int]:
        """(the moment, its bytes) of the largest sum; the first of equal ones."""
        moments = self.moments(where)
        moment = max(moments, key=lambda name: moments[name])
        return moment, moments[moment]

    @property
    def peak_bytes(self) -> int:
        return self.peak("device")[1]

    @property
    def host_peak_bytes(self) -> int:
        return self.peak("host")[1]

    @property
    def passes(self) -> int:
        return math.ceil(self.settings.windows_per_rank / self.settings.micro_batch)

    def describe_settings(self) -> str:
        s = self.settings
        ranks = f"{s.world_size} ranks" if s.world_size > 1 else "1 rank"
        extra = [label for label, on in (("--fsdp", s.fsdp and s.world_size > 1),
                                         ("--offload cpu", s.offload == "cpu"), ("--teacher", s.teacher)) if on]
        return (f"seqlen {s.seqlen}, batch {s.batch_size} = {ranks} × {self.passes} "
                f"pass{'es' if self.passes > 1 else ''} of {s.micro_batch} window{'s' if s.micro_batch > 1 else ''}, "
                f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}"
                + (", " + ", ".join(extra) if extra else ""))

    def render(self) -> str:
        s, shape = self.settings, self.model
        trainable = sum(self.trainable.values())
        head = (f"memory plan: {shape.model_type}, {render.quantity(shape.total_params)} parameters in "
                f"{shape.layers} blocks, {self.weight_dtype} weights on {s.device}; --params {s.params}"
                + (f" (rank {s.rank})" if any(p in LOW_RANK for p in s.params.split("+")) else "")
                + f": {render.quantity(trainable)} trainable ({100 * trainable / shape.total_params:.2g} %)\n"
                + self.describe_settings())
        rows = [[item.name, render.size(item.bytes) if item.where == "device" else "",
                 render.size(item.bytes) if item.where == "host" else "", _held(item), item.how]
                for item in self.items]
        items = render.table(["item", "device", "host", "held", "how"], rows, right={1, 2})
        moments = []
        for where in ("device", "host"):
            peak = self.peak(where)[0]
            moments += [[f"{where}: {SHORT[name]}", name, render.size(total), "<- peak" if name == peak else ""]
                        for name, total in self.moments(where).items()]
        summary = render.table(["moment", "(per rank)", "total", ""], moments, right={2})
        notes = "".join(f"\nnote: {note}" for note in self.notes)
        return f"{head}\n\n{items}\n\n{summary}{notes}"

    def as_dict(self) -> dict:
        settings = {k: v for k, v in dataclasses.asdict(self.settings).items() if k != "teacher_config"}
        device_moment, device_peak = self.peak("device")
        host_moment, host_peak = self.peak("host")
        return {"settings": settings, "model_type": self.model.model_type,
                "model_params": self.model.total_params, "trainable_params": self.trainable,
                "passes_per_step": self.passes,
                "device_peak_bytes": device_peak, "device_peak_moment": device_moment,
                "host_peak_bytes": host_peak, "host_peak_moment": host_moment,
                "device_moments": self.moments("device"), "host_moments": self.moments("host"),
                "items": [item.as_dict() for item in self.items], "notes": list(self.notes)}


def _held(item: MemoryItem) -> str:
    everywhere = DEVICE_MOMENTS if item.where == "device" else HOST_MOMENTS
    if set(item.moments) == set(everywhere):
        return "all"
    return ",".join(SHORT[moment] for moment in item.moments)


# --------------------------------------------------------------------------------------------------
def estimate(model_config, settings: PlanSettings) -> MemoryPlan:
    """The memory plan of `settings` for the model of `model_config` (a transformers config or its
    dict), per rank, item by item. Raises PlanError for a config or settings it cannot plan."""
    settings = settings.validate().resolved()
    shape = model_shape(model_config)
    teacher = model_shape(settings.teacher_config) if settings.teacher_config is not None else shape

    dtype, notes = _weight_dtype(settings, shape)
    trainable = shape.trainable_params(settings.params, settings.rank)
    device = device_items(shape, teacher, settings, dtype, trainable)
    plan = MemoryPlan(settings, shape, dtype, trainable, device, notes)
    plan.items = device + host_items(shape, teacher, settings, dtype, trainable, plan.peak_bytes)
    if shape.assumption:
        plan.notes.append(shape.assumption)
    return plan


def _weight_dtype(settings: PlanSettings, shape: ModelShape) -> tuple[str, list[str]]:
    """The frozen weights' dtype: the one given, else the config's, else bf16 (said in a note)."""
    if settings.dtype is not None:
        return DTYPE_NAMES[settings.dtype], []
    name = str(shape.config_dtype).removeprefix("torch.")
    if name in DTYPE_NAMES:
        return DTYPE_NAMES[name], []
    return "bf16", ["the weights' dtype is neither given nor in the config: bf16 assumed"]
