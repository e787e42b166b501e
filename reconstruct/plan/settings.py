"""The settings a memory plan is made for, the items it counts and the moments of a step they are
held at. Nothing here computes: `items` does the arithmetic, `estimate` sums it."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .shapes import PlanError

LOSS = "logits and loss"
LAST_BLOCK = "backward of the last block"
FIRST_BLOCK = "backward of the first block"
STEP = "optimizer step"
DEVICE_MOMENTS = (LOSS, LAST_BLOCK, FIRST_BLOCK, STEP)
FORWARD_BACKWARD = (LOSS, LAST_BLOCK, FIRST_BLOCK)

LOADING = "loading"
TRAINING = "training"
SAVING = "saving the training state"
WRITING = "writing"
HOST_MOMENTS = (LOADING, TRAINING, SAVING, WRITING)

# How the rendered table names the moments
SHORT = {LOSS: "loss", LAST_BLOCK: "bwd-last", FIRST_BLOCK: "bwd-first", STEP: "step",
         LOADING: "load", TRAINING: "train", SAVING: "save", WRITING: "write"}

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class PlanSettings:
    """The settings of `reconstruct retrain` that decide its memory. `micro_batch` and
    `gradient_checkpointing` left None are the planner's to choose (`choose`); `estimate` takes them
    at the command's defaults (one pass of every window of a rank, no checkpointing).

    micro_batch is the number of windows per forward/backward pass on one rank: the CLI's
    `--grad-accum` is batch_size / micro_batch (RetrainConfig.micro_batch_size is
    batch_size // grad_accum, and each rank splits its share of the batch into passes of that size)."""
    params: str = "masklora"
    rank: int = 16
    seqlen: int = 2048
    batch_size: int = 8              # windows per optimisation step, over all ranks
    micro_batch: int | None = None
    gradient_checkpointing: bool | None = None
    dtype: str | None = None         # of the frozen weights; None: the config's, else bf16
    world_size: int = 1
    fsdp: bool = False
    offload: str | None = None       # "cpu": parameters, gradients and optimiser state on the host
    teacher: bool = False            # distillation from a dense teacher
    teacher_config: object = field(default=None, compare=False)  # None: the student's shape
    teacher_on_device: bool = True   # False: --teacher-device puts its weights on another device
    loss_chunk_tokens: int = 1024
    steps: int = 1000
    eval_windows: int = 16
    saves_state: bool = True         # False: --save-every 0, no training state is ever saved
    device: str = "cuda"             # "cuda" or "cpu" (then the host is the device)

    @property
    def windows_per_rank(self) -> int:
        return math.ceil(self.batch_size / self.world_size)

    @property
    def sharded(self) -> bool:
        """FSDP2 holds the parameters: --fsdp over several processes, or --offload on any number."""
        return (self.fsdp and self.world_size > 1) or self.offload == "cpu"

    def validate(self) -> "PlanSettings":
        for name in ("rank", "seqlen", "batch_size", "world_size", "loss_chunk_tokens", "steps"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.micro_batch is not None and not 1 <= self.micro_batch <= self.batch_size:
            raise PlanError(f"a micro-batch of {self.micro_batch} windows: the batch has {self.batch_size}")
        if self.offload not in (None, "cpu"):
            raise PlanError(f"--offload {self.offload!r}: only 'cpu' is known")
        if self.device not in DEVICES:
            raise PlanError(f"device {self.device!r}: the planner knows {', '.join(DEVICES)}")
        if self.offload and self.device == "cpu":
            raise PlanError("--offload cpu on the CPU: the parameters are already in host memory")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise PlanError(f"dtype {self.dtype!r}: choose from bf16, fp16, fp32")
        return self

    def resolved(self) -> "PlanSettings":
        """Unset choices at the command's defaults. A micro-batch larger than a rank's share of the
        batch is that share, as in retrain.Retrainer.passes (each rank splits its own windows)."""
        return dataclasses.replace(
            self, micro_batch=min(self.micro_batch or self.windows_per_rank, self.windows_per_rank),
            gradient_checkpointing=bool(self.gradient_checkpointing))


@dataclass(frozen=True)
class MemoryItem:
    name: str
    bytes: int
    where: str                       # "device" or "host"
    moments: tuple[str, ...]         # when it is held
    how: str                         # the arithmetic, in words

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
