"""What a retraining run reads besides its settings: the pruned model's linears and their zeros, the
dense teacher, and the training and validation windows."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..config import RetrainConfig
from ..corrections import Correction, CorrectionError, CorrectionOptions
from ..fit import autocast_for
from ..models import ModelAdapter, UnsupportedModelError, open_model, prunable_linears, tokenizer_for_data
from ..tensors import zero_count
from .sharded_model import placeholders, zero_counts


def prunable_linears_by_name(adapter: ModelAdapter) -> dict[str, nn.Linear]:
    """Every prunable linear in the decoder blocks, by name in the model."""
    return {f"{adapter.block_name(index)}.{name}": linear
            for index, block in enumerate(adapter.blocks) for name, linear in prunable_linears(block).items()}


def sparsity_of(model: nn.Module, names) -> dict[str, float]:
    sparsity = {}
    for name in names:
        weight = model.get_submodule(name).weight.detach()
        sparsity[name] = zero_count(weight) / weight.numel()
    return sparsity


def load_student(adapter: ModelAdapter, sharded: bool) -> tuple[nn.Module, dict[str, list[int]], dict[str, float]]:
    """(the pruned model, its pruned linears' shapes by name, their sparsity). No mask is made: each
    linear's is its zeros (corrections/effective.py). Loaded whole, or, where FSDP will hold the
    parameters (`sharded`), weightless until each rank reads its shards' rows: placeholders, and the
    zeros counted in each rank's rows (sharded_model.py)."""
    linears = prunable_linears_by_name(adapter)
    shapes = {name: list(linear.weight.shape) for name, linear in linears.items()}
    if not sharded:
        model = adapter.load_all()
        return model, shapes, sparsity_of(model, shapes)
    zeros = zero_counts(adapter, linears)
    return placeholders(adapter), shapes, {name: zeros[name] / math.prod(shape) for name, shape in shapes.items()}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied parameters once


def check_correction_against_model(adapter: ModelAdapter, correction: Correction, options: CorrectionOptions) -> None:
    """A trial attachment to a weightless copy of the model: `--params bias` on a model without
    biases fails here, before any weight is read."""
    trial = copy.deepcopy(adapter.model)
    try:
        correction.attach(trial, list(prunable_linears_by_name(adapter)), options, torch.Generator())
    except CorrectionError as error:
        raise CorrectionError(f"--params {correction.name}: {error}") from None


def open_teacher(config: RetrainConfig, student: ModelAdapter) -> ModelAdapter:
    """The dense teacher's checkpoint, opened (weightless) and checked against the student."""
    teacher = open_model(config.teacher, config.torch_dtype)
    student_vocab = student.model.get_output_embeddings().weight.shape[0]
    teacher_vocab = teacher.model.get_output_embeddings().weight.shape[0]
    if student_vocab != teacher_vocab:
        raise UnsupportedModelError(
            f"--teacher {config.teacher} has a vocabulary of {teacher_vocab} tokens, the student "
            f"{student_vocab}: distillation compares their next-token distributions, so they must "
            "share a tokenizer (use the dense model the student was pruned from)")
    return teacher


def load_teacher(config: RetrainConfig, teacher: ModelAdapter) -> nn.Module:
    """The dense teacher, frozen, in its own dtype on --teacher-device. It costs one more copy of
    the model's weights in memory (no optimiser state, no activations kept for backward)."""
    model = teacher.load_all().to(config.teacher_device or config.device).eval()
    model.requires_grad_(False)
    return model


@torch.no_grad()
def teacher_logits(teacher: nn.Module, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The teacher's logits for `ids`, computed on its own device in its dtype, on the student's."""
    teacher_device = next(teacher.parameters()).device
    with autocast_for(teacher_device, next(teacher.parameters()).dtype):
        return teacher(input_ids=ids.to(teacher_device), use_cache=False).logits.to(device)


def training_data(config: RetrainConfig, adapter: ModelAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows, validation windows): packed token windows, the validation ones from
    documents never trained on."""
    import calib

    tokenizer = tokenizer_for_data(config.tokenizer or adapter.checkpoint.directory)
    return calib.training_windows(config.data, tokenizer, config.steps * config.batch_size,
                                  config.eval_windows, config.seqlen, seed=config.seed,
                                  text_field=config.text_field, cache_dir=config.cache_dir)
