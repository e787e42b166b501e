"""Catching what each block is called with, and calling a block standalone with it.

The model's own forward computes everything a block needs besides the hidden states: the attention
mask (causal, sliding-window, per layer type), rotary `position_embeddings`, `position_ids`, … Rather
than re-deriving these per family, we let the model compute them and catch them: every block is
replaced by a stand-in that records its arguments and passes the hidden states through unchanged.

Calibration windows are full-length and unpadded, so these keyword arguments depend only on the
sequence length, not on the tokens: we catch them once, with a batch of one window, and broadcast
their batch dimension to whatever batch a block is later called with.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .store import ActivationStore

# Caches are never wanted: each block runs standalone on whole windows.
_DROPPED_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class _StopForward(Exception):
    """Raised by the last stand-in: nothing after the blocks needs to run."""


class _BlockStandIn(nn.Module):
    """Records a block's call and returns its hidden states unchanged."""

    def __init__(self, record: list, stop: bool):
        super().__init__()
        self.record, self.stop = record, stop

    def forward(self, hidden_states, *args, **kwargs):
        self.record.append((hidden_states, args, kwargs))
        if self.stop:
            raise _StopForward
        return hidden_states


def _swap_blocks(blocks: nn.ModuleList, stand_ins: list[nn.Module]) -> list[nn.Module]:
    originals = list(blocks)
    for index, stand_in in enumerate(stand_ins):
        blocks[index] = stand_in
    return originals


def _run_until_stopped(model: nn.Module, input_ids: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass


def clean_kwargs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kwargs = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return tuple(args), kwargs


def catch_block_kwargs(model: nn.Module, blocks: nn.ModuleList, window: torch.Tensor
                       ) -> tuple[list[tuple], torch.Tensor]:
    """Each block's extra positional and keyword arguments, caught from one window's forward pass,
    and block 0's hidden-state input for that window (which tells the width blocks work in)."""
    records: list = []
    stand_ins = [_BlockStandIn(records, stop=(i == len(blocks) - 1)) for i in range(len(blocks))]
    originals = _swap_blocks(blocks, stand_ins)
    try:
        _run_until_stopped(model, window[None])
    finally:
        _swap_blocks(blocks, originals)
    if len(records) != len(blocks):
        raise RuntimeError(f"the model called {len(records)} of its {len(blocks)} blocks during a forward "
                           "pass; blocks that are skipped or called twice are not supported")
    return [clean_kwargs(args, kwargs) for _, args, kwargs in records], records[0][0]


def catch_block0_inputs(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor,
                        store: ActivationStore, batch_size: int, device) -> None:
    """Fill `store` with block 0's hidden-state input for every calibration window."""
    records: list = []
    originals = _swap_blocks(blocks, [_BlockStandIn(records, stop=True)])
    try:
        for start in range(0, len(windows), batch_size):
            records.clear()
            _run_until_stopped(model, windows[start:start + batch_size].to(device))
            store[start:start + batch_size] = records[0][0]
    finally:
        _swap_blocks(blocks, originals)


# --------------------------------------------------------------------------------------------------
def map_tensors(value: Any, fn) -> Any:
    """Apply `fn` to every tensor inside nested tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def kwargs_to(call: tuple, device) -> tuple:
    return map_tensors(call, lambda t: t.to(device))


def _broadcast_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    # Caught with a batch of one window: widen that leading dimension to the batch being run.
    if tensor.dim() >= 2 and tensor.shape[0] == 1 and batch != 1:
        return tensor.expand(batch, *tensor.shape[1:])
    return tensor


def call_block(block: nn.Module, hidden: torch.Tensor, call: tuple) -> torch.Tensor:
    """Run one block standalone on a batch of hidden states; accept tensor or tuple outputs."""
    args, kwargs = map_tensors(call, lambda t: _broadcast_batch(t, hidden.shape[0]))
    return first_output(block(hidden, *args, **kwargs))


def first_output(output):
    """The hidden states of a module's output, whether it returns a tensor or a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output
