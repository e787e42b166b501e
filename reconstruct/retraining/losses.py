"""The training losses, as sums over predicted tokens: a batch split into passes (gradient
accumulation, or ranks) divides the summed loss once by the whole batch's token count."""
from __future__ import annotations

import torch
from torch import nn

# Tokens whose next-token distributions the losses handle at a time: their fp32 temporaries are
# [LOSS_CHUNK_TOKENS × vocabulary] (the memory plan counts them), never [tokens × vocabulary]: at 7B,
# 8 windows of 2048 tokens and a 128k vocabulary one such tensor would be 8 GiB.
LOSS_CHUNK_TOKENS = 1024


def next_token_loss_sum(logits: torch.Tensor, ids: torch.Tensor, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Σ over predicted tokens of −log p(next token): a sum, divided once by the batch's token count.
    Computed `chunk_tokens` tokens at a time in fp32."""
    return ChunkedNextTokenLoss.apply(logits, ids, chunk_tokens)


def _predicting_chunks(logits: torch.Tensor, chunk_tokens: int):
    """(window, positions) of every predicting position (all but each window's last), in runs of at
    most `chunk_tokens`: views of the logits, no copy."""
    for window in range(logits.shape[0]):
        for start in range(0, logits.shape[1] - 1, chunk_tokens):
            yield window, slice(start, min(start + chunk_tokens, logits.shape[1] - 1))


def _next_tokens(ids: torch.Tensor, window: int, positions: slice) -> torch.Tensor:
    """The tokens that `positions` of `window` predict: each position's successor."""
    return ids[window, positions.start + 1:positions.stop + 1]


def _chunked_sum(logits: torch.Tensor, chunk_tokens: int, chunk_loss) -> torch.Tensor:
    """Σ over the predicting chunks of `chunk_loss(window, positions)`, in fp32."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, not {chunk_tokens}")
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for window, positions in _predicting_chunks(logits, chunk_tokens):
        total += chunk_loss(window, positions)
    return total


def _chunked_gradient(logits: torch.Tensor, chunk_tokens: int, grad: torch.Tensor, chunk_gradient) -> torch.Tensor:
    """The logits' gradient, `chunk_gradient(window, positions)` (an fp32 chunk, free to be scaled in
    place) times `grad` at each predicting chunk; zero at each window's last position, which predicts
    nothing."""
    grad_logits = torch.zeros_like(logits)
    for window, positions in _predicting_chunks(logits, chunk_tokens):
        grad_logits[window, positions] = chunk_gradient(window, positions).mul_(grad)
    return grad_logits


class ChunkedNextTokenLoss(torch.autograd.Function):
    """Σ −log p(next token) over predicted tokens, a chunk of tokens at a time in fp32. Saves the
    logits (in their dtype) and the ids; the backward recomputes each chunk's softmax, where the
    gradient is softmax − one-hot(next token) per token. Whole, autograd kept the fp32 log-softmax of
    every token from the forward to the backward, and made two more such tensors there."""

    @staticmethod
    def forward(ctx, logits, ids, chunk_tokens: int):
        ctx.chunk_tokens = chunk_tokens
        ctx.save_for_backward(logits, ids)
        return _chunked_sum(logits, chunk_tokens, lambda window, positions: nn.functional.cross_entropy(
            logits[window, positions].float(), _next_tokens(ids, window, positions), reduction="sum"))

    @staticmethod
    def backward(ctx, grad):
        logits, ids = ctx.saved_tensors

        def softmax_less_target(window, positions):
            chunk = nn.functional.softmax(logits[window, positions].float(), dim=-1)
            targets = _next_tokens(ids, window, positions)
            chunk[torch.arange(len(targets), device=chunk.device), targets] -= 1
            return chunk

        return _chunked_gradient(logits, ctx.chunk_tokens, grad, softmax_less_target), None, None


class ChunkedDistillation(torch.autograd.Function):
    """Σ KL(teacher ‖ student) over predicted tokens, a chunk of tokens at a time in fp32. Saves the
    two logits tensors (in their dtype) and recomputes each chunk's softmaxes in the backward pass,
    where the gradient is softmax(student) − softmax(teacher) per token."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, chunk_tokens: int):
        ctx.chunk_tokens = chunk_tokens
        ctx.save_for_backward(student_logits, teacher_logits)

        def kl(window, positions):
            student = nn.functional.log_softmax(student_logits[window, positions].float(), dim=-1)
            teacher = nn.functional.log_softmax(teacher_logits[window, positions].float(), dim=-1)
            return nn.functional.kl_div(student, teacher, log_target=True, reduction="sum")

        return _chunked_sum(student_logits, chunk_tokens, kl)

    @staticmethod
    def backward(ctx, grad):
        student_logits, teacher_logits = ctx.saved_tensors

        def softmax_difference(window, positions):
            chunk = nn.functional.softmax(student_logits[window, positions].float(), dim=-1)
            return chunk.sub_(nn.functional.softmax(teacher_logits[window, positions].float(), dim=-1))

        return _chunked_gradient(student_logits, ctx.chunk_tokens, grad, softmax_difference), None, None


def distillation_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Σ over predicted tokens of KL(teacher ‖ student) on the next-token distributions, computed
    `chunk_tokens` tokens at a time (no [tokens × vocabulary] fp32 tensor is made whole)."""
    return ChunkedDistillation.apply(student_logits, teacher_logits.detach(), chunk_tokens)
