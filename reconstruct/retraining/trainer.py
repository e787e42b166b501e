"""One retraining run, start to end: the loop in the package's docstring (`reconstruct.retraining`)."""
from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import distributed
from ..config import RetrainConfig
from ..corrections import CorrectionOptions, ParameterAccess, make_correction
from ..faults import fault_point
from ..fit import autocast_for, linear_schedule
from ..lock import run_lock
from ..memory import return_freed_memory
from ..model_card import changed_settings, python_call
from ..models import UnsupportedModelError, open_model
from ..progress import Progress
from ..checkpoint import RunDirectory
from .inputs import (check_correction_against_model, load_student, load_teacher, open_teacher, parameter_count,
                     sparsity_of, teacher_logits, training_data)
from .planning import plan_for_run, with_plan
from .losses import distillation_sum, next_token_loss_sum
from .output import merge_if_not_worse, write_output
from .out_of_memory import out_of_memory_error
from .report import final_report
from .sharded_model import fill_shards, write_blocks
from .sharding import ShardedParameterAccess, shard_trainable
from .state import TrainingState, resume_training_state, save_training_state, saved_step, stop_requests

log = logging.getLogger(__name__)

# Off a terminal (a log, a batch job), a progress line after every this many steps: a step takes from
# a tenth of a second (a small model) to tens of seconds (a 7B model on one device).
PROGRESS_EVERY_STEPS = 10


class TrainingError(ValueError):
    """Training cannot go on (a non-finite loss); the message says where and what to do."""


@dataclass
class RetrainResult:
    report: dict
    out: Path


class Retrainer:
    """One retraining run; `run()` is the loop in the package's docstring."""

    def __init__(self, config: RetrainConfig, invocation: str | None = None):
        self.config = config
        self.invocation = invocation or python_call("retrain", config.model, config.out, changed_settings(config))
        self.device = torch.device(config.device)
        self.started = time.perf_counter()
        self.correction = make_correction(config.params)
        # Under --fsdp the corrections reach the parameters FSDP holds as shards their own way
        access = ShardedParameterAccess() if self.sharded else ParameterAccess()
        self.options = CorrectionOptions(rank=config.rank, alpha=config.lora_alpha, parameter_access=access,
                                         weights_unread=self.sharded)
        self.attachment = None  # the correction, once attached (prepare_training)

    # -- set-up: every check before any work -----------------------------------------------------------
    def open(self) -> None:
        config = self.config
        self.adapter = open_model(config.model, config.torch_dtype)
        check_correction_against_model(self.adapter, self.correction, self.options)
        teacher = open_teacher(config, self.adapter) if config.teacher else None
        # The memory plan, before any weight is read: it fails here if nothing fits, and chooses
        # the passes per step and checkpointing where the user left them open.
        self.plan = plan_for_run(config, self.adapter, teacher, self.device)
        self.config = config = with_plan(config, self.plan)
        if self.plan:
            log.info("%s", self.plan.render())
        self.teacher = load_teacher(config, teacher) if teacher else None
        # The pruned model; no mask is kept: each pruned linear's is its zeros
        self.model, self.shapes, self.sparsity_before = load_student(self.adapter, self.sharded)
        zeros = sum(self.sparsity_before[n] * math.prod(shape) for n, shape in self.shapes.items())
        if zeros == 0 and not config.allow_dense:
            raise UnsupportedModelError(
                f"{config.model} has no zeros in the linear layers of its blocks: it is not pruned. Prune "
                "it first (`reconstruct prune`), or pass --allow-dense to retrain it anyway")
        self.model_parameters = parameter_count(self.model)
        if self.sharded:  # each rank moves only its shards to the device, in prepare_training
            if self.compute_dtype == torch.float16:
                flag = "--offload cpu" if self.offloaded else "--fsdp"
                raise UnsupportedModelError(
                    f"{flag} with fp16 weights is not supported (the gradient scaler would see only this "
                    "rank's shards, FSDP's); use --dtype bf16 or fp32")
            return
        self.model.to(self.device)

    @property
    def sharded(self) -> bool:
        """FSDP2 holds the parameters: --fsdp with several processes (on one process there is nothing
        to shard), or --offload cpu on any number (FSDP2 is what moves the blocks to the device)."""
        return (self.config.fsdp and distributed.world_size() > 1) or self.offloaded

    @property
    def offloaded(self) -> bool:
        return self.config.offload == "cpu"

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.adapter.storage_dtype

    # -- the run -------------------------------------------------------------------------------------
    def run(self) -> RetrainResult:
        """The whole run, holding the output directory's lock (rank 0 holds it for all ranks)."""
        self.run_dir = RunDirectory(Path(self.config.out))
        with run_lock(self.run_dir.out):  # a second run with the same --out stops before touching anything
            try:
                return self._run()
            except torch.cuda.OutOfMemoryError as error:  # a message naming the settings, not a traceback
                raise out_of_memory_error(self.config, getattr(self, "adapter", None), self.device, self.run_dir,
                                          error) from error

    def _run(self) -> RetrainResult:
        distributed.on_main(lambda: self.run_dir.check_output(self.config.overwrite),
                            "checking the output directory")
        self.open()
        config = self.config  # with the memory plan's choices
        # Rank 0 reads the data (the token cache is written once); bad data fails before any write.
        self.train_windows, self.validation = distributed.on_main(lambda: training_data(config, self.adapter),
                                                                  "reading the training data")
        resuming = distributed.on_main(lambda: self.run_dir.prepare(config.overwrite, config.resume),
                                       "preparing the output directory")
        # The guard's "before": the input model itself, before anything is attached. Under --fsdp the
        # model reaches the devices only once sharded, with the correction attached: its merged view
        # at step 0 (the identity for every correction but ScaleLoRA at a rank whose 1/√r rounds).
        before = None if resuming or self.sharded else self.heldout_loss()
        self.prepare_training()
        if resuming:
            step = resume_training_state(self.run_dir, config, self.device, self.training)
        else:
            step = 0
            self.training.history["heldout"].append([0, self.heldout_loss() if before is None else before])
        self.train(step)
        return_freed_memory()  # the steps' freed tensors, before the merge and the writer's peak
        verdict = self.merge_if_not_worse()
        return_freed_memory()
        shards = None
        if self.sharded:  # merged (or not) block by block as rank 0 writes it: the model is never whole
            shards, sparsity_after, verdict["kept_weights_rounded_to_zero"] = write_blocks(
                self.model, self.adapter, self.run_dir, verdict["merged"], list(self.shapes))
        else:
            sparsity_after = sparsity_of(self.model, self.shapes)
        report = final_report(config, verdict, self.training.history, self.shapes, self.sparsity_before,
                              sparsity_after,
                              trainable=self.trainable, model_parameters=self.model_parameters,
                              sharded=self.sharded, device=self.device,
                              memory_plan=self.plan.as_dict() if self.plan else None,
                              wall_time_s=time.perf_counter() - self.started, invocation=self.invocation)
        distributed.barrier("waiting for every rank to finish training")
        out = distributed.on_main(lambda: write_output(self.adapter, self.run_dir, report, shards),
                                  "writing the checkpoint")
        log.info("wrote %s", out)
        return RetrainResult(report, out)

    def prepare_training(self) -> None:
        """The correction attached, its optimiser, schedule and gradient scaler; the random state."""
        config = self.config
        torch.manual_seed(config.seed + distributed.rank())  # dropout, where the model has any
        self.attachment = self.correction.attach(self.model, self.shapes, self.options,
                                                 torch.Generator().manual_seed(config.seed))
        self.model.requires_grad_(False)
        for parameter in self.attachment.trainable:
            parameter.requires_grad_(True)
        self.trainable = sum(p.numel() for p in self.attachment.trainable)
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # What the optimiser updates: the attachment's parameters, or FSDP's shards of them
        parameters = (shard_trainable(self.model, self.attachment.trainable, self.adapter.blocks, self.device,
                                      offload=self.offloaded)
                      if self.sharded else self.attachment.trainable)
        if self.sharded:
            fill_shards(self.model, self.adapter)
        optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.training = TrainingState(
            parameters, optimizer, linear_schedule(optimizer, config.steps, config.warmup),
            torch.amp.GradScaler(self.device.type) if self.compute_dtype == torch.float16 else None)

    def passes(self, windows: torch.Tensor):
        """This rank's share of `windows` in micro-batches, as (ids, counted) pairs.

        Under --fsdp every rank must run as many passes as the busiest one (each pass gathers every
        block's weights with collectives): a rank with fewer windows adds passes on windows[:1]
        whose results are not counted."""
        size = self.config.micro_batch_size
        own = distributed.shard(len(windows))
        # (an empty share splits into one empty tensor, which no model can run: no pass at all)
        passes = [(micro, True) for micro in windows[own.start:own.stop].split(size) if len(micro)]
        if self.sharded:
            busiest = math.ceil(math.ceil(len(windows) / distributed.world_size()) / size)
            passes += [(windows[:1], False)] * (busiest - len(passes))
        return [(ids.to(self.device), counted) for ids, counted in passes]

    # -- training ------------------------------------------------------------------------------------
    def train(self, first_step: int) -> None:
        config, history = self.config, self.training.history
        progress = Progress(config.steps, f"retrain {config.params}", "step", initial=first_step,
                            enabled=distributed.is_main(), every=PROGRESS_EVERY_STEPS)
        tokens_per_step = config.batch_size * config.seqlen
        self.model.train()
        with stop_requests() as stop, progress:
            for step in range(first_step, config.steps):
                started = time.perf_counter()
                loss = self.train_step(step)
                rate = tokens_per_step / (time.perf_counter() - started)
                history["step"].append(step + 1)
                history["loss"].append(loss)
                history["tokens_per_s"].append(rate)
                summary = f"loss {loss:.4f}, {rate:,.0f} tokens/s"
                if (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
                    history["heldout"].append([step + 1, self.heldout_loss()])
                    summary += f", held-out loss {history['heldout'][-1][1]:.4f}"
                progress.update(summary=summary)
                # Ctrl-C reaches the ranks at different moments: they stop together, after the same step.
                if distributed.sum_floats([len(stop)], "agreeing whether to stop")[0] > 0:
                    self.save_state(step + 1)
                    raise KeyboardInterrupt
                if config.save_every and (step + 1) % config.save_every == 0:
                    self.save_state(step + 1)
                fault_point("retrain-step")
        if config.save_every and first_step < config.steps:
            self.save_state(config.steps)  # a run killed while writing resumes here

    def save_state(self, step: int) -> None:
        save_training_state(self.run_dir, self.config, self.device, self.training, step)

    def train_step(self, step: int) -> float:
        """One optimisation step on windows step·B … (step+1)·B; returns the loss (per token)."""
        config, training = self.config, self.training
        batch = self.train_windows[step * config.batch_size:(step + 1) * config.batch_size]
        tokens = batch[:, 1:].numel()  # of the whole batch, on every rank: the loss is one mean
        training.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for ids, counted in self.passes(batch):  # this rank's contiguous share of the windows
            with autocast_for(self.device, self.compute_dtype):
                logits = self.model(input_ids=ids, use_cache=False).logits
            loss = next_token_loss_sum(logits, ids)
            if self.teacher is not None:
                loss = loss + config.distill * distillation_sum(logits, teacher_logits(self.teacher, ids, self.device))
            # The losses saved the logits for their backward, which frees them; a name held here would
            # keep [tokens × vocabulary] until the whole backward ends (0.5 GiB at 7B, 8 × 2048 tokens)
            del logits
            loss = loss / tokens if counted else loss * 0.0  # an uncounted pass adds zero gradients
            (training.scaler.scale(loss) if training.scaler else loss).backward()
            total += loss.item()
            del loss
        if self.sharded:  # FSDP summed the gradients during backward
            total = distributed.sum_floats([total], "summing the loss")[0]
        else:
            total = distributed.sum_gradients(training.parameters, [total])[0]
        if not math.isfinite(total):
            saved = saved_step(self.run_dir)
            raise TrainingError(
                f"the loss is not finite at step {step + 1} ({total}); nothing of this step was applied. "
                + (f"The last good state (step {saved}) is kept in {self.run_dir.work}. " if saved else "")
                + "Lower --lr (or use bf16 instead of fp16) and run again with --overwrite")
        if training.scaler:
            training.scaler.step(training.optimizer)
            training.scaler.update()
        else:
            training.optimizer.step()
        training.scheduler.step()
        return total

    @torch.no_grad()
    def heldout_loss(self) -> float:
        """Mean next-token loss on the validation windows (documents never trained on), of the model
        as it would be written now (the merged view, once a correction is attached: not the model
        with fp32 copies of its trained parameters); at the end, the checkpoint the never-worse
        guard lets through."""
        was_training = self.model.training
        self.model.eval()
        total = 0.0
        as_written = self.attachment.merged_view if self.attachment else nullcontext
        for ids, counted in self.passes(self.validation):
            with as_written(), autocast_for(self.device, self.compute_dtype):
                loss = float(next_token_loss_sum(self.model(input_ids=ids, use_cache=False).logits, ids))
            total += loss if counted else 0.0
        self.model.train(was_training)
        total = distributed.sum_floats([total], "summing the held-out loss")[0]
        return total / self.validation[:, 1:].numel()

    # -- the end -------------------------------------------------------------------------------------
    def merge_if_not_worse(self) -> dict:
        """The never-worse guard: the model judged exactly as it would be written (the wrappers'
        merged view) against the input's held-out loss, measured at step 0."""
        before, after = self.training.history["heldout"][0][1], self.heldout_loss()
        self.training.history["heldout"].append([self.config.steps, after])
        # Sharded, each block is merged or not as it is written (sharded_model.write_blocks)
        return merge_if_not_worse(self.attachment, self.model, self.shapes, before, after,
                                  merge_now=not self.sharded)
