"""The training losses, as sums over predicted tokens: a batch split into passes (gradient
accumulation, or ranks) divides the summed loss once by the whole batch's token count."""
from __future__ import annotations

import torch
from torch import nn


def next_token_loss_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Σ over predicted tokens of −log p(next token): a sum, divided once by the batch's token count."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                       reduction="sum")


def distillation_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Σ over predicted tokens of KL(teacher ‖ student) on the next-token distributions."""
    student = nn.functional.log_softmax(student_logits[:, :-1].float(), dim=-1).flatten(0, 1)
    teacher = nn.functional.log_softmax(teacher_logits[:, :-1].float(), dim=-1).flatten(0, 1)
    return nn.functional.kl_div(student, teacher, log_target=True, reduction="sum")
