"""The losses in chunks of tokens (retraining/losses.py): the value and gradient of the whole
next-token loss and of the whole KL(teacher ‖ student), without a [tokens × vocabulary] fp32 tensor."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from reconstruct.retraining.losses import distillation_sum, next_token_loss_sum


def whole_next_token_loss(logits, ids):
    """The loss as it was computed before: one fp32 cross-entropy over every predicted token."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")


def whole_kl(student_logits, teacher_logits):
    """The term as it was computed before issue 18: two whole fp32 log-softmaxes."""
    student = nn.functional.log_softmax(student_logits[:, :-1].float(), dim=-1).flatten(0, 1)
    teacher = nn.functional.log_softmax(teacher_logits[:, :-1].float(), dim=-1).flatten(0, 1)
    return nn.functional.kl_div(student, teacher, log_target=True, reduction="sum")


def losses(which: str, windows: int, length: int, vocab: int, dtype, generator):
    """(chunked(logits, chunk), whole(logits)) for the loss `which`, given its other input (the next
    tokens, or the teacher's logits), drawn from `generator`."""
    if which == "next-token":
        ids = torch.randint(0, vocab, (windows, length), generator=generator)
        return (lambda x, chunk: next_token_loss_sum(x, ids, chunk)), (lambda x: whole_next_token_loss(x, ids))
    teacher = (torch.randn(windows, length, vocab, generator=generator) * 3).to(dtype)
    return (lambda x, chunk: distillation_sum(x, teacher, chunk)), (lambda x: whole_kl(x, teacher))


class LargestFloat32(TorchDispatchMode):
    """The most elements of any fp32 tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("which", ["next-token", "kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 5, 7, 1024])
def test_the_chunked_loss_is_the_whole_loss(which, dtype, chunk):
    g = torch.Generator().manual_seed(0)
    chunked, whole = losses(which, 3, 8, 50, dtype, g)
    logits = (torch.randn(3, 8, 50, generator=g) * 3).to(dtype)
    grads, values = [], []
    for compute in (lambda x: chunked(x, chunk), whole):
        leaf = logits.clone().requires_grad_(True)
        value = compute(leaf)
        (value * 0.5).backward()
        values.append(value.detach())
        grads.append(leaf.grad)
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-4)
    assert grads[0].dtype == grads[1].dtype == dtype
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    assert not grads[0][:, -1].any()  # a window's last position predicts nothing


@pytest.mark.parametrize("which", ["next-token", "kl"])
def test_no_fp32_tensor_of_every_token_is_made(which):
    vocab, chunk = 64, 16
    chunked, whole = losses(which, 2, 65, vocab, torch.bfloat16, torch.Generator().manual_seed(0))
    logits = torch.randn(2, 65, vocab, dtype=torch.bfloat16, requires_grad=True)
    with LargestFloat32() as chunked_mode:
        chunked(logits, chunk).backward()
    assert chunked_mode.largest == chunk * vocab
    with LargestFloat32() as whole_mode:  # the check can fail: the whole loss makes [128 × 64] fp32 tensors
        whole(logits).backward()
    assert whole_mode.largest == 2 * 64 * vocab


@pytest.mark.parametrize("which", ["next-token", "kl"])
def test_a_chunk_of_no_tokens_is_refused(which):
    chunked, _ = losses(which, 1, 4, 5, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="chunk_tokens must be at least 1, not 0"):
        chunked(torch.randn(1, 4, 5), 0)
