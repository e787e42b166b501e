"""When FSDP2 holds the parameters (`--fsdp` on several ranks, `--offload cpu`): the model read shard by
shard, and written block by block, so that no host ever holds the whole model.

    placeholders(adapter)        every parameter of the weightless skeleton an uninitialised tensor
                                 on the CPU: memory never written, so
                                 never resident (only the pages a rank's shard is copied from are
                                 ever read). The correction attaches as usual, and its new parameters
                                 are real (the LoRA factors drawn from the seeded generator as on one
                                 process)
    (sharding.shard_trainable)   FSDP2 makes each rank's shards: 1/N of every parameter
    fill_shards(model, adapter)  each rank reads the rows of its own shards from the checkpoint (their
                                 byte ranges); no keep-mask is made: each is its weight's zeros
    write_blocks(...)            block by block: the block's whole tensors gathered on rank 0, its
                                 correction merged (or dropped), the exact zeros restored, its shard
                                 written, its memory freed; then the rest (embeddings, norm, head)

Each rank reads 1/N of the checkpoint; what a rank holds on its host at most is its shards (with
--offload cpu) and, on rank 0 while writing, one block. The numbers written are those of the
unsharded path: the same reads, dtype conversions, merge and zero restoration, per block.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import distributed
from ..checkpoint import CheckpointError, RunDirectory
from ..corrections.base import LinearWrapper
from ..memory import return_freed_memory
from ..models import ModelAdapter
from ..tensors import keep_only, zero_count


def placeholder(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor of `shape`, its values to be read from the checkpoint once sharded. A
    large one is a fresh mapping of the allocator that is never written: it costs address space, not
    memory (FSDP2 copies each rank's rows of it into the shard, which fill_shards then overwrites).
    FSDP2 needs contiguous parameters, which rules out a zero-stride expanded tensor."""
    return torch.empty(shape, dtype=dtype)


def placeholders(adapter: ModelAdapter) -> nn.Module:
    """The skeleton with a placeholder for every parameter still on `meta`; a tied head shares the
    embedding's, as `load_all` ties them."""
    model = adapter.model
    if getattr(adapter.config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for leaf, parameter in list(module._parameters.items()):
            if parameter is not None and parameter.is_meta:
                if id(parameter) not in made:
                    made[id(parameter)] = nn.Parameter(placeholder(parameter.shape, parameter.dtype),
                                                       requires_grad=False)
                module._parameters[leaf] = made[id(parameter)]
    return model


def own_rows(rows: int) -> tuple[int, int]:
    """The rows of a tensor's first dimension in this rank's FSDP2 shard: torch.chunk's split into
    world_size pieces of ceil(rows / N) rows (the last ones shorter or empty)."""
    size = math.ceil(rows / distributed.world_size())
    start = min(distributed.rank() * size, rows)
    return start, min(start + size, rows)


def read_rows(adapter: ModelAdapter, stored: str, start: int, stop: int) -> torch.Tensor:
    """Rows of a checkpoint tensor in the run's dtype: their byte range where the reader has one
    (safetensors), else its own row reader."""
    reader = adapter.checkpoint
    read = reader.read_rows if hasattr(reader, "read_rows") else reader.get_rows
    return read(stored, start, stop).to(adapter.storage_dtype)


def zero_counts(adapter: ModelAdapter, linears: dict[str, nn.Linear]) -> dict[str, int]:
    """Each pruned linear's zeros, counted in this rank's rows and summed over the ranks."""
    local = []
    for name in linears:
        stored = adapter.checkpoint_name(f"{name}.weight")
        start, stop = own_rows(linears[name].weight.shape[0])
        local.append(zero_count(read_rows(adapter, stored, start, stop)) if stop > start else 0)
    return dict(zip(linears, map(round, distributed.sum_floats(local, "counting the zeros"))))


def wrapper_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, LinearWrapper)}


def checkpoint_source(name: str, wrappers: set[str]) -> str:
    """The model's own name of a parameter seen through a correction's wrapper (`q_proj.base.weight`
    and `full`'s `q_proj.weight` are both the checkpoint's `q_proj.weight`)."""
    module, _, leaf = name.rpartition(".")
    if module.endswith(".base") and module[:-len(".base")] in wrappers:
        module = module[:-len(".base")]
    return f"{module}.{leaf}" if module else leaf


@torch.no_grad()
def fill_shards(model: nn.Module, adapter: ModelAdapter) -> None:
    """Every parameter that comes from the checkpoint: this rank's rows of it, read and copied into
    its shard. The correction's new parameters keep the values its attach gave them; no keep-mask is
    made (each wrapper's is its frozen weight's zeros, corrections/effective.py). The rows read are
    freed back to the system (retraining.run fixed glibc's mmap threshold)."""
    wrappers, done = wrapper_names(model), set()
    for module_name, module in model.named_modules():
        for leaf, parameter in module._parameters.items():
            if parameter is None or id(parameter) in done:
                continue
            done.add(id(parameter))
            try:
                stored = adapter.checkpoint_name(checkpoint_source(f"{module_name}.{leaf}".lstrip("."), wrappers))
            except CheckpointError:
                continue  # a correction's own parameter (LoRA factors): not in the checkpoint
            local = parameter.to_local() if distributed.is_sharded(parameter) else parameter
            start, stop = own_rows(parameter.shape[0]) if parameter.dim() else (0, 0)
            if parameter.dim() and stop == start:
                continue
            values = (read_rows(adapter, stored, start, stop) if parameter.dim()
                      else adapter.checkpoint.get(stored).to(adapter.storage_dtype)).to(parameter.dtype)
            if module_name in wrappers:  # `full`'s master: the weight with +0.0 at its pruned entries
                values = values.masked_fill(values == 0, 0.0)
            local.copy_(values)
    return_freed_memory()


def gather_to_main_(module: nn.Module, done: set[int]) -> None:
    """Replace `module`'s sharded parameters by their whole values, on rank 0's host; elsewhere by
    weightless ones (on meta). A collective: every rank gathers the same tensors in the same order.
    `done`: ids of parameters already gathered (a tied one is gathered once)."""
    gathered: dict[int, nn.Parameter] = {}
    for child in module.modules():
        for leaf, parameter in list(child._parameters.items()):
            if parameter is None or not distributed.is_sharded(parameter) or id(parameter) in done:
                continue
            if id(parameter) not in gathered:
                whole = distributed.full_tensor(parameter).detach()
                whole = whole.cpu() if distributed.is_main() else whole.to("meta")
                gathered[id(parameter)] = nn.Parameter(whole, requires_grad=parameter.requires_grad)
            setattr(child, leaf, gathered[id(parameter)])
    done.update(gathered)


def release_(module: nn.Module) -> None:
    """Every parameter of `module` to meta, freeing it; set in place rather than by `module.to()`,
    which FSDP2 intercepts to re-shard parameters that are no longer its own."""
    for child in module.modules():
        for leaf, parameter in list(child._parameters.items()):
            if parameter is not None:
                child._parameters[leaf] = nn.Parameter(parameter.detach().to("meta"), requires_grad=False)


def finish_module(module: nn.Module, prefix: str, adapter: ModelAdapter, merged: bool, wrappers: set[str],
                  linears: list[str]) -> int:
    """Rank 0, one gathered block (or the root): each wrapper merged (LinearWrapper.merge: pruned
    entries +0.0, kept ones never rounded to zero) or dropped, fp32 masters kept (written rounded to
    the storage dtype) or replaced by the checkpoint's values, and a −0.0 of the pruned `linears`
    written as +0.0. Returns the count of kept weights rounded to zero."""
    rounded = 0
    for name in sorted(wrappers):
        if name.startswith(prefix):
            wrapper = model_get(module, prefix, name)
            parent_name, _, child = name.rpartition(".")
            if merged:
                linear, count = wrapper.merge()
                rounded += count
            else:
                linear = wrapper.base
            setattr(model_get(module, prefix, parent_name), child, linear)
    if not merged:  # the masters of norms or biases: the input's values
        for name, parameter in list(module.named_parameters(prefix=prefix.rstrip("."))):
            if parameter.requires_grad:
                owner, _, leaf = name.rpartition(".")
                value = adapter.checkpoint.get(adapter.checkpoint_name(name)).to(adapter.storage_dtype)
                setattr(model_get(module, prefix, owner), leaf, nn.Parameter(value, requires_grad=False))
    module.requires_grad_(False)
    with torch.no_grad():
        for name in linears:
            weight = model_get(module, prefix, name).weight
            keep_only(weight, weight != 0)
    return rounded


def model_get(module: nn.Module, prefix: str, name: str) -> nn.Module:
    """A submodule of `module` (which the model calls `prefix`) by its name in the model."""
    return module.get_submodule(name[len(prefix):] if prefix else name)


def write_blocks(model: nn.Module, adapter: ModelAdapter, run_dir: RunDirectory, merged: bool,
                 linears: list[str]) -> tuple[list[str], dict[str, float], int]:
    """Every block's shard, then the rest's, one block whole on rank 0's host at a time; returns the
    shards' names, the sparsity of each of the pruned `linears` (names in the model) and the kept
    weights rounded to zero (rank 0's numbers, on every rank). Every rank calls it: the gathering is
    a collective."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():  # every unit sharded, whatever the last pass left (FSDP2 keeps the
        if isinstance(module, FSDPModule):  # root's gathered after a forward, and would put it back)
            module.reshard()
    wrappers, done = wrapper_names(model), set()
    shards, sparsity, rounded = [], {}, 0
    total = adapter.num_blocks + 1
    for index in range(adapter.num_blocks):
        name = adapter.block_name(index)
        block = model.get_submodule(name)
        gather_to_main_(block, done)
        shards.append(run_dir.shard_name(index, total))
        if distributed.is_main():
            own = [linear for linear in linears if linear.startswith(name + ".")]
            rounded += finish_module(block, name + ".", adapter, merged, wrappers, own)
            for linear in own:
                weight = model.get_submodule(linear).weight
                sparsity[linear] = zero_count(weight) / weight.numel()
            run_dir.save_shard(shards[-1], adapter.module_tensors(name))
        release_(block)  # freed: the next block is gathered into its room
        return_freed_memory()
    gather_to_main_(model, done)  # embeddings, final norm, head
    shards.append(run_dir.shard_name(adapter.num_blocks, total))
    if distributed.is_main():
        finish_module(model, "", adapter, merged, set(), [])
        run_dir.save_shard(shards[-1], adapter.non_block_tensors())
    sparsity, rounded = distributed.broadcast_object((sparsity, rounded), "sharing the written sparsity")
    return shards, sparsity, rounded
