"""The runs' settings, validated before anything is read or written: `RunConfig` (prune) and
`RetrainConfig` (retrain), and the choices their fields take."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

import torch

from .corrections import CorrectionError, make_correction
from .pruning import METHODS, NMPattern, PruningError

GRANULARITIES = ("block", "sublayer", "linear")
TARGETS = ("sparse-inputs", "dense", "mix", "none")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


class ConfigError(ValueError):
    """A setting out of range or inconsistent with another; the message says which and how to fix it."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class RunConfig:
    model: str
    out: str
    method: str = "wanda"
    sparsity: float | None = None        # default 0.5, or what --pattern implies
    pattern: str | None = None           # "2:4", "4:8": N kept of every M inputs
    layers: list[str] | None = None      # regexes over linear names inside a block; None = all
    masks_from: str | None = None        # take pruned weights and mask from this checkpoint (pruned elsewhere)
    calib: str = "c4"
    text_field: str = "text"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    device: str = field(default_factory=default_device)
    dtype: str | None = None             # bf16 | fp16 | fp32; None = the checkpoint's
    tokenizer: str | None = None         # default: the model's directory
    batch_size: int = 8                  # windows per forward pass (halved on CUDA out-of-memory)
    correction: str = "masklora"
    rank: int = 64                       # rank and target: chosen by docs/sweep-defaults
    alpha: float | None = None           # None: 2·rank, PERP's scale s = alpha/rank = 2 at any rank
    steps: int = 250                     # the knee of docs/sweep-steps within 1.5x the old time
    lr: float = 3e-3                     # chosen by the sweep in docs/benchmarks.md
    weight_decay: float = 0.0
    warmup: float = 0.1
    check_every: int = 0                 # held-out error every N steps: keep the best, stop early; 0 = off
    patience: int = 2                    # checks without improvement before stopping
    fit_batch_size: int = 1              # windows per optimisation step
    granularity: str = "block"
    target: str | None = None            # None: dense for block granularity (docs/sweep-defaults), else sparse-inputs
    heldout: float = 0.1                 # fraction of calibration windows held out for the guard
    offload_activations: str = "auto"    # auto | ram | disk
    activation_budget_gb: float | None = None  # auto: disk when the stores would exceed this
    overwrite: bool = False
    resume: bool = False
    cache_dir: str | None = None
    error_windows: int = 4               # windows the per-layer error report is measured on; 0 = none
    prefetch: str = "auto"               # read the next block in the background: auto (accelerators) | on | off

    # -- derived values ------------------------------------------------------------------------------
    @property
    def nm_pattern(self) -> NMPattern | None:
        return NMPattern.parse(self.pattern) if self.pattern else None

    @property
    def effective_sparsity(self) -> float:
        if self.nm_pattern:
            return self.nm_pattern.sparsity
        return 0.5 if self.sparsity is None else float(self.sparsity)

    @property
    def fit_target(self) -> str:
        """What a correction fits towards. Unset: the dense model's own activations, the best on both
        testbeds; sublayer and linear units fit on the dense block's own sub-outputs (sparse-inputs),
        the only target they support."""
        if self.target is not None:
            return self.target
        return "dense" if self.granularity == "block" else "sparse-inputs"

    @property
    def lora_alpha(self) -> float:
        return 2.0 * self.rank if self.alpha is None else float(self.alpha)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype] if self.dtype else None

    @property
    def heldout_windows(self) -> int:
        if make_correction(self.correction) is None:
            return 0
        return max(1, round(self.nsamples * self.heldout))

    def fingerprint(self) -> str:
        """A hash of every setting that changes the output; a resumed run must match it."""
        ignored = {"out", "overwrite", "resume", "device", "batch_size", "offload_activations",
                   "activation_budget_gb", "cache_dir", "error_windows", "prefetch"}  # none changes the weights
        relevant = {k: v for k, v in asdict(self).items() if k not in ignored}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    # -- validation ----------------------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        try:
            pattern = self.nm_pattern
            make_correction(self.correction)
        except (PruningError, CorrectionError) as error:
            raise ConfigError(str(error)) from None
        if self.sparsity is not None and not 0 <= self.sparsity < 1:
            raise ConfigError(f"sparsity {self.sparsity} is outside [0, 1); e.g. --sparsity 0.5 zeroes half "
                              "of each layer's weights")
        if self.masks_from and (self.sparsity is not None or pattern):
            raise ConfigError("--masks-from takes the mask from the pruned checkpoint; drop --sparsity and "
                              "--pattern")
        if pattern and self.sparsity is not None and abs(self.sparsity - pattern.sparsity) > 1e-9:
            raise ConfigError(f"--sparsity {self.sparsity} contradicts --pattern {pattern} (which means "
                              f"sparsity {pattern.sparsity:g}); give only one of them")
        for name in ("nsamples", "seqlen", "batch_size", "fit_batch_size", "rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.error_windows < 0:
            raise ConfigError(f"error_windows must be 0 (no per-layer error report) or more, not {self.error_windows}")
        if self.steps < 0 or self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.warmup <= 1:
            raise ConfigError("fitting needs steps >= 0, lr > 0, weight_decay >= 0 and 0 <= warmup <= 1")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"--alpha must be positive (the LoRA scale is alpha/rank), not {self.alpha}; "
                              "leave it out for 2·rank")
        if self.check_every < 0 or self.patience < 1:
            raise ConfigError(f"--check-every must be 0 (off) or a number of steps, and --patience at least 1; "
                              f"got {self.check_every} and {self.patience}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {', '.join(GRANULARITIES)}")
        if self.target is not None and self.target not in TARGETS:
            raise ConfigError(f"target must be one of {', '.join(TARGETS)}")
        if self.granularity != "block" and self.fit_target != "sparse-inputs":
            raise ConfigError(f"--granularity {self.granularity} supports only --target sparse-inputs")
        if self.dtype and self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r}: choose bf16, fp16 or fp32")
        if self.prefetch not in ("auto", "on", "off"):
            raise ConfigError(f"prefetch must be auto, on or off, not {self.prefetch!r}")
        if self.offload_activations not in ("auto", "ram", "disk"):
            raise ConfigError("--offload-activations must be auto, ram or disk")
        if self.heldout_windows and (not 0 < self.heldout < 1 or self.nsamples - self.heldout_windows < 1):
            raise ConfigError(f"a correction needs held-out windows and training windows: with nsamples="
                              f"{self.nsamples} and heldout={self.heldout} that is impossible; use "
                              "--nsamples 2 or more and 0 < --heldout < 1")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but CUDA is not available; use --device cpu")
        return self

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# --------------------------------------------------------------------------------------------------
# Global retraining (PERP's main experiment): the whole pruned model, next-token loss
RETRAIN_PARAMS = ("bias", "norm", "bias+norm", "scalelora", "masklora", "masklora+norm", "lora-prune", "full")
# Default learning rates per trained subset, chosen on the testbed (docs/benchmarks.md, "Global
# retraining"): a handful of norm/bias parameters tolerate a larger step than low-rank factors, and
# masked full fine-tuning, which moves every kept weight, needs a much smaller one.
RETRAIN_DEFAULT_LR = {"bias": 1e-2, "norm": 1e-2, "bias+norm": 1e-2, "scalelora": 1e-3, "masklora": 1e-3,
                      "masklora+norm": 1e-3, "lora-prune": 1e-3, "full": 3e-4}
# Where the parameters live between their uses: on the device, or in host memory (FSDP2's CPU offload)
RETRAIN_OFFLOAD = ("none", "cpu")


@dataclass
class RetrainConfig:
    model: str
    out: str
    params: str = "masklora"             # which subset trains (RETRAIN_PARAMS)
    data: str = "c4"
    text_field: str = "text"
    steps: int = 1000
    batch_size: int = 8                  # windows per optimisation step
    grad_accum: int | None = None        # the batch is split into this many passes; None: the memory plan's
    seqlen: int = 2048
    lr: float | None = None              # default: RETRAIN_DEFAULT_LR[params]
    weight_decay: float = 0.0
    warmup: float = 0.1
    rank: int = 16
    alpha: float | None = None           # None: 2·rank, as prune (s = alpha/rank = 2 at any rank)
    seed: int = 0
    device: str = field(default_factory=default_device)
    dtype: str | None = None             # bf16 | fp16 | fp32 for the frozen weights; None = the checkpoint's
    tokenizer: str | None = None
    gradient_checkpointing: bool | None = None  # None: on only if the memory plan needs it
    fsdp: bool = False                   # under torchrun: shard the weights across ranks (FSDP2)
    offload: str = "none"                # "cpu": parameters in host memory, each block on the device only
                                         # for its forward and backward (FSDP2's CPUOffloadPolicy)
    eval_every: int = 100                # held-out loss every this many steps (and at start and end)
    eval_windows: int = 16               # validation windows, from documents never trained on
    save_every: int = 100                # resumable training state every this many steps (0: never)
    teacher: str | None = None           # a dense model: adds KL(teacher || student) on the logits
    distill: float = 1.0                 # weight of the KL term
    teacher_device: str | None = None    # default: the student's device
    allow_dense: bool = False            # retrain a checkpoint that has no zeros in its linears
    max_memory: float | None = None      # GB per rank the memory plan must fit; None: what is free
    overwrite: bool = False
    resume: bool = False
    cache_dir: str | None = None

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else RETRAIN_DEFAULT_LR[self.params]

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype] if self.dtype else None

    @property
    def micro_batch_size(self) -> int:
        """Windows per forward/backward pass (one pass of the batch until the plan has chosen)."""
        return self.batch_size // (self.grad_accum or 1)

    @property
    def lora_alpha(self) -> float:
        return 2.0 * self.rank if self.alpha is None else float(self.alpha)

    def fingerprint(self) -> str:
        """A hash of every setting that changes the output; a resumed run must match it."""
        # --fsdp, the passes per step (--grad-accum: the batch is global) and checkpointing change
        # float rounding only, as the number of ranks does, and save the same state; the memory
        # plan may choose them differently on another machine; --offload keeps the same numbers in
        # host memory
        ignored = {"out", "overwrite", "resume", "device", "teacher_device", "cache_dir", "save_every", "fsdp",
                   "grad_accum", "gradient_checkpointing", "max_memory", "offload"}
        relevant = {k: v for k, v in asdict(self).items() if k not in ignored}
        # The alpha in effect: a run started when the default was a fixed 32.0 (rank 16) resumes
        relevant["alpha"] = self.lora_alpha
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> "RetrainConfig":
        if self.params not in RETRAIN_PARAMS:
            raise ConfigError(f"unknown --params {self.params!r}; choose from {', '.join(RETRAIN_PARAMS)}")
        for name in ("steps", "batch_size", "grad_accum", "seqlen", "rank", "eval_every", "eval_windows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_memory is not None and not self.max_memory > 0:
            raise ConfigError(f"--max-memory must be a positive number of GB, not {self.max_memory}; "
                              "leave it out to plan for the memory that is free")
        if self.grad_accum is not None and self.batch_size % self.grad_accum:
            raise ConfigError(f"--batch-size {self.batch_size} is not divisible by --grad-accum "
                              f"{self.grad_accum}: each of the {self.grad_accum} passes needs the same "
                              "number of windows")
        if (self.lr is not None and self.lr <= 0) or self.weight_decay < 0 or not 0 <= self.warmup <= 1:
            raise ConfigError("training needs lr > 0, weight_decay >= 0 and 0 <= warmup <= 1")
        if self.save_every < 0 or self.distill < 0:
            raise ConfigError("--save-every and --distill must be 0 or more")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"--alpha must be positive (the LoRA scale is alpha/rank), not {self.alpha}; "
                              "leave it out for 2·rank")
        if self.dtype and self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r}: choose bf16, fp16 or fp32")
        if self.offload not in RETRAIN_OFFLOAD:
            raise ConfigError(f"--offload {self.offload!r}: choose {' or '.join(RETRAIN_OFFLOAD)}")
        if self.fsdp and self.teacher:
            raise ConfigError("--fsdp with --teacher is not supported: the teacher would be a whole copy of a "
                              "model on every rank; retrain without --teacher, or without --fsdp")
        for device in (self.device, self.teacher_device or self.device):
            if device.startswith("cuda") and not torch.cuda.is_available():
                raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu")
        return self

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
