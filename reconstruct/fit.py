"""Fitting a correction so that a pruned unit's output matches its target, with a never-worse guard.

The loop is PERP's: MSE on the unit's output, AdamW, a linear schedule with warm-up, fp32 trainable
parameters (under autocast when the block is stored in half precision), no gradient clipping. The
guard measures the relative output error on held-out calibration batches before fitting and, after
fitting, with exactly the weights merging would write: a correction that is worse, or not finite,
is not merged but discarded, and the pruned unit is left as it was.

With several processes (torchrun) every rank runs this loop for the same batches in the same order;
`run(i)` and `target(i)` give None on a rank that holds none of batch i's windows. Errors, the
loss's normaliser and the gradients are summed over ranks, so every rank takes the same steps and
the same decision, and the result is the one-process result up to float rounding.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from . import distributed
from .corrections import Correction, CorrectionOptions


@dataclass(frozen=True)
class FitOptions:
    steps: int = 200
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup: float = 0.1           # fraction of steps with a linearly rising learning rate
    # Every `check_every` steps (0: never) the held-out error is measured: the best state seen is
    # the one kept, and fitting stops after `patience` checks in a row without improvement.
    check_every: int = 0
    patience: int = 2
    correction: CorrectionOptions = CorrectionOptions()


@dataclass
class FitReport:
    error_before: float           # relative output error of the pruned unit, training batches
    error_after: float
    heldout_before: float
    heldout_after: float
    trainable_params: int
    fit_time_s: float
    merged: bool
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


# A unit's forward on calibration batch i, and the output it should produce (None: none of the
# batch's windows is on this rank).
RunBatch = Callable[[int], "torch.Tensor | None"]

# The training error in the report is measured on at most this many training batches (evenly
# spread): it is a report, while the guard's decision rests on all held-out batches.
TRAIN_ERROR_SAMPLE = 32


@torch.no_grad()
def relative_error(run: RunBatch, target: RunBatch, batches: list[int]) -> float:
    """Σ‖output − target‖² / Σ‖target‖² over the given batches (float64 sums, over all ranks)."""
    error = reference = 0.0
    for i in batches:
        wanted = target(i)
        if wanted is None:
            continue
        wanted = wanted.double()
        error += (run(i).double() - wanted).pow(2).sum().item()
        reference += wanted.pow(2).sum().item()
    error, reference = distributed.sum_floats([error, reference], "summing output errors")
    return error / reference if reference > 0 else error


def linear_schedule(optimizer, steps: int, warmup_fraction: float):
    """Linear warm-up over `warmup_fraction` of the steps, then linear decay to zero."""
    warmup = max(1, int(steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_for(device: torch.device, dtype: torch.dtype):
    """Autocast to the frozen weights' half precision, or no autocast for fp32 weights."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device_type=device.type, dtype=dtype)
    return torch.autocast(device_type=device.type, enabled=False)


def fit_correction(unit: nn.Module, correction: Correction, masks: dict[str, torch.Tensor],
                   run: RunBatch, target: RunBatch, train_batches: list[int], heldout_batches: list[int],
                   options: FitOptions, generator: torch.Generator, device: torch.device,
                   compute_dtype: torch.dtype) -> FitReport:
    """Attach `correction` to `unit`, fit it, merge it, and keep it only if it did not make things worse."""
    started = time.perf_counter()
    train_sample = train_batches[::max(1, len(train_batches) // TRAIN_ERROR_SAMPLE)][:TRAIN_ERROR_SAMPLE]
    heldout_before = relative_error(run, target, heldout_batches)
    error_before = relative_error(run, target, train_sample)

    attachment = correction.attach(unit, masks, options.correction, generator)
    for parameter in unit.parameters():
        parameter.requires_grad_(False)
    for parameter in attachment.trainable:
        parameter.requires_grad_(True)
    trainable = sum(p.numel() for p in attachment.trainable)

    def heldout_now() -> float:
        with attachment.merged_view():
            return relative_error(run, target, heldout_batches)

    try:
        note, heldout_after = _optimise(attachment.trainable, run, target, train_batches, options, generator,
                                        device, compute_dtype, heldout_now)
        if heldout_after is None:  # not measured on the final weights by the held-out checks
            heldout_after = heldout_now()
        with attachment.merged_view():  # judged as it would be written, before anything is merged
            error_after = relative_error(run, target, train_sample)
    except torch.cuda.OutOfMemoryError:
        # The unit as it was, wrappers gone: the caller retries with a smaller batch or reloads the
        # block, and a reload must find the model's own modules, not the correction's wrappers.
        attachment.discard()
        for parameter in unit.parameters():
            parameter.requires_grad_(False)
        raise
    merged = math.isfinite(heldout_after) and math.isfinite(error_after) and heldout_after <= heldout_before
    if merged:
        attachment.merge()
    else:
        # Never worse: the pruned unit stays exactly as it was.
        attachment.discard()
        reason = "non-finite output" if not math.isfinite(heldout_after) else "held-out error increased"
        note = f"{note}; reverted: {reason}".lstrip("; ")
    for parameter in unit.parameters():
        parameter.requires_grad_(False)
    return FitReport(error_before, error_after if merged else error_before, heldout_before,
                     heldout_after, trainable, time.perf_counter() - started, merged, note)


def _optimise(trainable, run, target, train_batches, options, generator, device, compute_dtype,
              heldout_now: Callable[[], float]) -> tuple[str, float | None]:
    """The training loop; returns a note (empty when nothing unusual happened) and, when held-out
    checks ran, the held-out error of the weights it leaves (None: not measured)."""
    if not trainable or options.steps <= 0:
        return "nothing to train", None
    optimizer = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=options.weight_decay)
    scheduler = linear_schedule(optimizer, options.steps, options.warmup)
    best = BestState(trainable, options.patience)
    order: list[int] = []
    values_of: dict[int, float] = {}  # the number of output values of each batch, on all ranks
    for step in range(options.steps):
        if not order:  # a fresh seeded shuffle of the training batches each epoch
            order = [train_batches[i] for i in torch.randperm(len(train_batches), generator=generator)]
        batch = order.pop()
        with torch.no_grad():
            wanted = target(batch)
        output = None
        if wanted is not None:
            wanted = wanted.float()
            with autocast_for(device, compute_dtype):
                output = run(batch)
        # The loss is the mean squared error over the whole batch, wherever its windows are: each
        # rank's sum of squares divided by the number of values on all ranks (on one process this
        # is mse_loss's mean, with the same gradients bit for bit).
        if batch not in values_of:  # a batch's size is the same at every epoch: counted once
            values_of[batch] = distributed.sum_floats([0 if wanted is None else wanted.numel()],
                                                      "counting a batch")[0]
        values = values_of[batch]
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        if output is not None:
            share = nn.functional.mse_loss(output.float(), wanted, reduction="sum") / values
            share.backward()
            loss = share.item()
        loss = distributed.sum_gradients(trainable, [loss])[0]
        if not math.isfinite(loss):
            return f"stopped at step {step}: loss is not finite", None
        optimizer.step()
        scheduler.step()
        if options.check_every and (step + 1) % options.check_every == 0 and step + 1 < options.steps:
            if best.stop_after(heldout_now()):
                return best.restore(heldout_now(), f"stopped early at step {step + 1}")
    return best.restore(heldout_now(), "") if best.checked else ("", None)


class BestState:
    """Early stopping against calibration overfitting: the trainable parameters at the lowest
    held-out error seen, and whether the error has stopped improving."""

    def __init__(self, trainable: list[nn.Parameter], patience: int):
        self.trainable, self.patience = trainable, patience
        self.error, self.saved, self.since_best, self.checked = math.inf, None, 0, False

    def stop_after(self, error: float) -> bool:
        """Record a held-out check; True once `patience` checks in a row did not improve on the best."""
        self.checked = True
        if error < self.error:
            self.error, self.since_best = error, 0
            self.saved = [p.detach().clone() for p in self.trainable]
        else:
            self.since_best += 1
        return self.since_best >= self.patience

    def restore(self, final_error: float, note: str) -> tuple[str, float]:
        """Go back to the best checked state if it beats the final one; returns the note and the
        held-out error of the state kept."""
        if self.saved is None or not self.error < final_error:
            return note, final_error
        with torch.no_grad():
            for parameter, saved in zip(self.trainable, self.saved):
                parameter.copy_(saved)
        return f"{note}; kept the state of the best held-out check".lstrip("; "), self.error
