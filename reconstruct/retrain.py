"""Global retraining (PERP's main experiment): the whole pruned model, the ordinary next-token loss,
a tiny trainable subset, merged so that every zero of the checkpoint stays exactly +0.0.

    model = the pruned checkpoint, any format `formats` reads; masks = its linears' zeros
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
its own forward and backward pass, and FSDP sums the gradients. At the end the model is gathered
whole on every rank's host for the merge, and rank 0 writes it.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .api import ConfigError, RetrainConfig
from .corrections import CorrectionError, CorrectionOptions, make_correction
from .driver import package_versions, zero_count
from .fit import autocast_for, linear_schedule
from .lock import run_lock
from .memory import peak_rss_bytes
from .models import ModelAdapter, UnsupportedModelError, open_model, prunable_linears, tokenizer_for_data
from .pruning.base import keep_only
from .writer import RunDirectory

log = logging.getLogger(__name__)

TRAINING_STATE = "train_state.pt"


class TrainingError(ValueError):
    """Training cannot go on (a non-finite loss); the message says where and what to do."""


@dataclass
class RetrainResult:
    report: dict
    out: Path


# --------------------------------------------------------------------------------------------------
# The mask and the sparsity of a pruned checkpoint
def masks_from_zeros(adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    """Keep-masks (True = non-zero) of every linear in the decoder blocks, by name in the model: the
    checkpoint's zeros are the mask, found per tensor (no assumption about which layers were pruned)."""
    masks = {}
    for index, block in enumerate(adapter.blocks):
        for name, linear in prunable_linears(block).items():
            masks[f"{adapter.block_name(index)}.{name}"] = linear.weight.detach() != 0
    return masks


def sparsity_of(model: nn.Module, names) -> dict[str, float]:
    sparsity = {}
    for name in names:
        weight = model.get_submodule(name).weight.detach()
        sparsity[name] = zero_count(weight) / weight.numel()
    return sparsity


def restore_exact_zeros(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Make each masked linear's zero set exactly its mask, with +0.0 (never −0.0) at pruned entries.

    A kept weight that a correction moved to exactly zero (its storage dtype rounds the sum to 0) is
    set to the dtype's smallest normal number, so that the zero set stays the mask; returns how many."""
    rounded = 0
    with torch.no_grad():
        for name, mask in masks.items():
            weight = model.get_submodule(name).weight
            keep_only(weight, mask)
            lost = mask & (weight == 0)
            count = int(lost.sum())
            if count:  # rare; masked_fill_ has no fast path for bf16, so it is not run for nothing
                weight.masked_fill_(lost, torch.finfo(weight.dtype).tiny)
                rounded += count
    return rounded


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied parameters once


# --------------------------------------------------------------------------------------------------
# The losses
def next_token_loss_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Σ over predicted tokens of −log p(next token): a sum, divided once by the batch's token count."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                       reduction="sum")


def distillation_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Σ over predicted tokens of KL(teacher ‖ student) on the next-token distributions."""
    student = nn.functional.log_softmax(student_logits[:, :-1].float(), dim=-1).flatten(0, 1)
    teacher = nn.functional.log_softmax(teacher_logits[:, :-1].float(), dim=-1).flatten(0, 1)
    return nn.functional.kl_div(student, teacher, log_target=True, reduction="sum")


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


# --------------------------------------------------------------------------------------------------
class Retrainer:
    """One retraining run; `run()` is the loop in the module docstring."""

    def __init__(self, config: RetrainConfig):
        self.config = config
        self.device = torch.device(config.device)
        self.started = time.perf_counter()
        self.correction = make_correction(config.params)
        self.options = CorrectionOptions(rank=config.rank, alpha=config.alpha)

    # -- set-up: every check before any work -----------------------------------------------------------
    def open(self) -> None:
        config = self.config
        self.adapter = open_model(config.model, config.torch_dtype)
        self.check_correction_against_model()
        self.teacher = self.open_teacher() if config.teacher else None
        self.model = self.adapter.load_all()
        self.masks = masks_from_zeros(self.adapter)
        self.sparsity_before = sparsity_of(self.model, self.masks)
        zeros = sum(self.sparsity_before[n] * m.numel() for n, m in self.masks.items())
        if zeros == 0 and not config.allow_dense:
            raise UnsupportedModelError(
                f"{config.model} has no zeros in the linear layers of its blocks: it is not pruned. Prune "
                "it first (`reconstruct prune`), or pass --allow-dense to retrain it anyway")
        self.model_parameters = parameter_count(self.model)
        if self.sharded:  # each rank moves only its shards to the device, in prepare_training
            if self.compute_dtype == torch.float16:
                raise UnsupportedModelError(
                    "--fsdp with fp16 weights is not supported (the gradient scaler would see only this "
                    "rank's shards); use --dtype bf16 or fp32")
            return
        self.model.to(self.device)
        self.masks = {name: mask.to(self.device) for name, mask in self.masks.items()}

    @property
    def sharded(self) -> bool:
        """--fsdp with several processes (on one process there is nothing to shard)."""
        return self.config.fsdp and distributed.world_size() > 1

    def check_correction_against_model(self) -> None:
        """A trial attachment to a weightless copy of the model: `--params bias` on a model without
        biases fails here, before any weight is read."""
        trial = copy.deepcopy(self.adapter.model)
        masks = {f"{self.adapter.block_name(i)}.{name}": torch.ones(linear.weight.shape, dtype=torch.bool,
                                                                    device="meta")
                 for i, block in enumerate(self.adapter.blocks) for name, linear in prunable_linears(block).items()}
        try:
            self.correction.attach(trial, masks, self.options, torch.Generator())
        except CorrectionError as error:
            raise CorrectionError(f"--params {self.config.params}: {error}") from None

    def open_teacher(self) -> nn.Module:
        """The dense teacher, frozen, in its own dtype on --teacher-device. It costs one more copy of
        the model's weights in memory (no optimiser state, no activations kept for backward)."""
        teacher = open_model(self.config.teacher, self.config.torch_dtype)
        student_vocab = self.adapter.model.get_output_embeddings().weight.shape[0]
        teacher_vocab = teacher.model.get_output_embeddings().weight.shape[0]
        if student_vocab != teacher_vocab:
            raise UnsupportedModelError(
                f"--teacher {self.config.teacher} has a vocabulary of {teacher_vocab} tokens, the student "
                f"{student_vocab}: distillation compares their next-token distributions, so they must "
                "share a tokenizer (use the dense model the student was pruned from)")
        model = teacher.load_all().to(self.config.teacher_device or self.config.device).eval()
        model.requires_grad_(False)
        return model

    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        import calib

        config = self.config
        tokenizer = tokenizer_for_data(config.tokenizer or self.adapter.checkpoint.directory)
        return calib.training_windows(config.data, tokenizer, config.steps * config.batch_size,
                                      config.eval_windows, config.seqlen, seed=config.seed,
                                      text_field=config.text_field, cache_dir=config.cache_dir)

    # -- the run -------------------------------------------------------------------------------------
    def run(self) -> RetrainResult:
        """The whole run, holding the output directory's lock (rank 0 holds it for all ranks)."""
        self.run_dir = RunDirectory(Path(self.config.out))
        with run_lock(self.run_dir.out):  # a second run with the same --out stops before touching anything
            return self._run()

    def _run(self) -> RetrainResult:
        config = self.config
        self.open()
        # Rank 0 reads the data (the token cache is written once); bad data fails before any write.
        self.train_windows, self.validation = distributed.on_main(self.data, "reading the training data")
        resuming = distributed.on_main(lambda: self.run_dir.prepare(config.overwrite, config.resume),
                                       "preparing the output directory")
        self.prepare_training()
        step = self.resume() if resuming else 0
        if not resuming:
            self.history["heldout"].append([0, self.heldout_loss()])
        self.train(step)
        verdict = self.merge_if_not_worse()
        report = self.final_report(verdict)
        distributed.barrier("waiting for every rank to finish training")
        out = distributed.on_main(lambda: self.write(report), "writing the checkpoint")
        log.info("wrote %s", out)
        return RetrainResult(report, out)

    def prepare_training(self) -> None:
        """The correction attached, its optimiser, schedule and gradient scaler; the random state."""
        config = self.config
        torch.manual_seed(config.seed + distributed.rank())  # dropout, where the model has any
        self.attachment = self.correction.attach(self.model, self.masks, self.options,
                                                 torch.Generator().manual_seed(config.seed))
        self.model.requires_grad_(False)
        for parameter in self.attachment.trainable:
            parameter.requires_grad_(True)
        self.trainable = sum(p.numel() for p in self.attachment.trainable)
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # What the optimiser updates: the attachment's parameters, or FSDP's shards of them
        self.trainable_parameters = self.shard() if self.sharded else self.attachment.trainable
        self.optimizer = torch.optim.AdamW(self.trainable_parameters, lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.scheduler = linear_schedule(self.optimizer, config.steps, config.warmup)
        self.scaler = (torch.amp.GradScaler(self.device.type) if self.compute_dtype == torch.float16 else None)
        self.history = {"step": [], "loss": [], "heldout": [], "tokens_per_s": []}

    def shard(self) -> list[nn.Parameter]:
        """--fsdp: shard the model (correction attached) across the ranks' devices; return the trainable
        parameters as FSDP re-registers them (sharded copies), in the attachment's order, so that the
        optimiser's saved state is laid out as on one process."""
        names = {id(p): name for name, p in self.model.named_parameters(remove_duplicate=False)}
        trainable = [names[id(p)] for p in self.attachment.trainable]
        distributed.shard_model(self.model, self.adapter.blocks, self.device)
        return [self.model.get_parameter(name) for name in trainable]

    def passes(self, windows: torch.Tensor):
        """This rank's share of `windows` in micro-batches, as (ids, counted) pairs.

        Under --fsdp every rank must run as many passes as the busiest one (each pass gathers every
        block's weights with collectives): a rank with fewer windows adds passes on windows[:1]
        whose results are not counted."""
        size = self.config.micro_batch_size
        own = distributed.shard(len(windows))
        passes = [(micro, True) for micro in windows[own.start:own.stop].split(size)]
        if self.sharded:
            busiest = math.ceil(math.ceil(len(windows) / distributed.world_size()) / size)
            passes += [(windows[:1], False)] * (busiest - len(passes))
        return [(ids.to(self.device), counted) for ids, counted in passes]

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.adapter.storage_dtype

    # -- training ------------------------------------------------------------------------------------
    def train(self, first_step: int) -> None:
        config = self.config
        progress = tqdm(range(first_step, config.steps), initial=first_step, total=config.steps,
                        desc=f"retrain {config.params}", unit="step",
                        disable=None if distributed.is_main() else True)
        tokens_per_step = config.batch_size * config.seqlen
        self.model.train()
        with stop_requests() as stop:
            for step in progress:
                started = time.perf_counter()
                loss = self.train_step(step)
                rate = tokens_per_step / (time.perf_counter() - started)
                self.history["step"].append(step + 1)
                self.history["loss"].append(loss)
                self.history["tokens_per_s"].append(rate)
                if (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
                    self.history["heldout"].append([step + 1, self.heldout_loss()])
                progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
                # Ctrl-C reaches the ranks at different moments: they stop together, after the same step.
                if distributed.sum_floats([len(stop)], "agreeing whether to stop")[0] > 0:
                    self.save_training_state(step + 1)
                    raise KeyboardInterrupt
                if config.save_every and (step + 1) % config.save_every == 0:
                    self.save_training_state(step + 1)
        if config.save_every and first_step < config.steps:
            self.save_training_state(config.steps)  # a run killed while writing resumes here

    def train_step(self, step: int) -> float:
        """One optimisation step on windows step·B … (step+1)·B; returns the loss (per token)."""
        config = self.config
        batch = self.train_windows[step * config.batch_size:(step + 1) * config.batch_size]
        tokens = batch[:, 1:].numel()  # of the whole batch, on every rank: the loss is one mean
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for ids, counted in self.passes(batch):  # this rank's contiguous share of the windows
            with autocast_for(self.device, self.compute_dtype):
                logits = self.model(input_ids=ids, use_cache=False).logits
            loss = next_token_loss_sum(logits, ids)
            if self.teacher is not None:
                loss = loss + config.distill * distillation_sum(logits, self.teacher_logits(ids))
            loss = loss / tokens if counted else loss * 0.0  # an uncounted pass adds zero gradients
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.item()
            del logits, loss
        if self.sharded:  # FSDP summed the gradients during backward
            total = distributed.sum_floats([total], "summing the loss")[0]
        else:
            total = distributed.sum_gradients(self.trainable_parameters, [total])[0]
        if not math.isfinite(total):
            saved = self.saved_step()
            raise TrainingError(
                f"the loss is not finite at step {step + 1} ({total}); nothing of this step was applied. "
                + (f"The last good state (step {saved}) is kept in {self.run_dir.work}. " if saved else "")
                + "Lower --lr (or use bf16 instead of fp16) and run again with --overwrite")
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return total

    @torch.no_grad()
    def teacher_logits(self, ids: torch.Tensor) -> torch.Tensor:
        teacher_device = next(self.teacher.parameters()).device
        with autocast_for(teacher_device, next(self.teacher.parameters()).dtype):
            return self.teacher(input_ids=ids.to(teacher_device), use_cache=False).logits.to(self.device)

    @torch.no_grad()
    def heldout_loss(self) -> float:
        """Mean next-token loss on the validation windows (documents never trained on)."""
        was_training = self.model.training
        self.model.eval()
        total = 0.0
        for ids, counted in self.passes(self.validation):
            with autocast_for(self.device, self.compute_dtype):
                loss = float(next_token_loss_sum(self.model(input_ids=ids, use_cache=False).logits, ids))
            total += loss if counted else 0.0
        self.model.train(was_training)
        total = distributed.sum_floats([total], "summing the held-out loss")[0]
        return total / self.validation[:, 1:].numel()

    # -- resumable state -----------------------------------------------------------------------------
    def save_training_state(self, step: int) -> None:
        """Each rank's random state, then (rank 0) the trainable parameters, optimiser, schedule and
        history, then state.json, the resume marker, last."""
        self.run_dir.save_torch(rng_file(distributed.rank()), {
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None})
        distributed.barrier("waiting for every rank to save its random state")
        # Whole tensors, gathered by every rank under --fsdp: the file one process writes
        trainable = [distributed.full_tensor(p).detach().cpu() for p in self.trainable_parameters]
        optimizer = distributed.whole_optimizer_state(self.optimizer)

        def save():
            state = {"step": step, "fingerprint": self.config.fingerprint(), "trainable": trainable,
                     "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler else None, "history": self.history}
            self.run_dir.save_torch(TRAINING_STATE, state)
            self.run_dir.save_state({"fingerprint": self.config.fingerprint(), "step": step,
                                     "command": "retrain", "world_size": distributed.world_size()})
        distributed.on_main(save, "saving the training state")

    def saved_step(self) -> int:
        try:
            return self.run_dir.load_state().get("step", 0)
        except (OSError, ValueError):
            return 0

    def resume(self) -> int:
        state = distributed.on_main(self.run_dir.load_state, "reading the resume point")
        if state.get("command") != "retrain" or state["fingerprint"] != self.config.fingerprint():
            raise ConfigError(f"the unfinished run in {self.run_dir.work} was started with different settings "
                              "(or by another command); rerun without --resume (and with --overwrite if "
                              "needed) to start over")
        saved = torch.load(self.run_dir.work / TRAINING_STATE, weights_only=True)
        with torch.no_grad():
            for parameter, value in zip(self.trainable_parameters, saved["trainable"], strict=True):
                parameter.copy_(distributed.shard_like(value.to(parameter.device), parameter))
        distributed.load_optimizer_state(self.optimizer, saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler and saved["scaler"]:
            self.scaler.load_state_dict(saved["scaler"])
        self.history = saved["history"]
        random_state = self.run_dir.work / rng_file(distributed.rank())
        if state.get("world_size", 1) == distributed.world_size() and random_state.exists():
            rng = torch.load(random_state, weights_only=True)
            torch.set_rng_state(rng["rng"])
            if rng["cuda_rng"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda_rng"], self.device)
        else:
            # Another number of ranks: the windows, gradients and optimiser state are the same (the
            # batch is global), only dropout's random stream starts afresh.
            log.warning("resuming with %d processes where the run started with %d: training continues "
                        "from step %d, with a new random state for dropout", distributed.world_size(),
                        state.get("world_size", 1), saved["step"])
            torch.manual_seed(self.config.seed + distributed.rank() + saved["step"])
        log.info("resuming at step %d of %d", saved["step"], self.config.steps)
        return saved["step"]

    # -- the end -------------------------------------------------------------------------------------
    def merge_if_not_worse(self) -> dict:
        """Judge the model exactly as it would be written; merge the correction only if its held-out loss
        is finite and no worse than the input's (the never-worse guard), else keep the input's weights."""
        before = self.history["heldout"][0][1]
        with self.attachment.merged_view():
            after = self.heldout_loss()
        merged = math.isfinite(after) and after <= before
        if self.sharded:  # merging and writing need whole tensors: on the host, where it was loaded
            distributed.unshard_model_(self.model, "cpu")
            self.masks = {name: mask.cpu() for name, mask in self.masks.items()}
        if merged:
            self.attachment.merge()
        else:
            self.attachment.discard()
            log.warning("retraining made the held-out loss worse (%.4f -> %.4f): the input's weights are "
                        "written unchanged; try a lower --lr", before, after)
        self.model.requires_grad_(False)
        self.history["heldout"].append([self.config.steps, after])
        kept_rounded = restore_exact_zeros(self.model, self.masks)
        return {"merged": merged, "heldout_before": before, "heldout_after": after,
                "kept_weights_rounded_to_zero": kept_rounded}

    def write(self, report: dict) -> Path:
        """The blocks' shards and the rest (embeddings, final norm, head) in the input's tensor names,
        the plot, then the index, config, tokenizer and report: OUT.partial becomes OUT."""
        adapter, total = self.adapter, self.adapter.num_blocks + 1
        shards = []
        for index in range(adapter.num_blocks):
            shards.append(self.run_dir.shard_name(index, total))
            self.run_dir.save_shard(shards[-1], adapter.module_tensors(adapter.block_name(index)))
        shards.append(self.run_dir.shard_name(adapter.num_blocks, total))
        self.run_dir.save_shard(shards[-1], adapter.non_block_tensors())
        plot_losses(report, self.run_dir.work / "loss.png")
        return self.run_dir.finish(adapter.checkpoint.directory, adapter.output_config(), shards, report)

    def final_report(self, verdict: dict) -> dict:
        config = self.config
        after = sparsity_of(self.model, self.masks)
        shapes = {name: list(mask.shape) for name, mask in self.masks.items()}
        rates = self.history["tokens_per_s"]
        peak_device = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        total = sum(math.prod(shape) for shape in shapes.values())
        return {
            "command": "retrain", "model": config.model, "params": config.params,
            "world_size": distributed.world_size(), "fsdp": self.sharded,
            "config": {**vars(config), "lr": config.learning_rate},
            "argv": " ".join(sys.argv), "versions": package_versions(),
            "trainable_params": self.trainable, "model_params": self.model_parameters,
            "trainable_fraction": self.trainable / self.model_parameters,
            "tokens_trained": config.steps * config.batch_size * config.seqlen,
            "totals": {"wall_time_s": round(time.perf_counter() - self.started, 3),
                       "tokens_per_s": sorted(rates)[len(rates) // 2] if rates else None,
                       "peak_host_rss_bytes": peak_rss_bytes(), "peak_device_bytes": peak_device,
                       "sparsity_before": sum(self.sparsity_before[n] * math.prod(shapes[n]) for n in shapes) / total,
                       "sparsity_after": sum(after[n] * math.prod(shapes[n]) for n in shapes) / total},
            **verdict,
            "loss_curve": {"step": self.history["step"], "loss": self.history["loss"]},
            "heldout_loss": self.history["heldout"],
            "layers": [{"name": name, "shape": shapes[name], "sparsity_before": self.sparsity_before[name],
                        "sparsity_after": after[name]} for name in self.masks],
        }


def plot_losses(report: dict, path: Path) -> None:
    """loss.png: the training loss per step and the held-out loss (needs matplotlib: the `plots` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed, so no loss.png was drawn (pip install 'reconstruct[plots]'); "
                    "the curve is in report.json")
        return
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(report["loss_curve"]["step"], report["loss_curve"]["loss"], lw=0.8, label="training loss")
    if report["heldout_loss"]:
        steps, losses = zip(*report["heldout_loss"])
        axes.plot(steps, losses, "o-", label="held-out loss")
    axes.set_xlabel("step")
    axes.set_ylabel("next-token loss (nats)")
    axes.set_title(f"{Path(report['model']).name}: retrain {report['params']}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def rng_file(rank: int) -> str:
    return f"rng-{rank:05d}.pt"


def run(config: RetrainConfig) -> RetrainResult:
    """Run `config`; under torchrun, as one of several data-parallel processes."""
    with distributed.process_group(config.device) as device:
        return Retrainer(dataclasses.replace(config, device=device)).run()

