"""Several processes, one result: torchrun's process group and the few collectives the engine needs.

`torchrun --nproc_per_node N -m reconstruct prune ...` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK and MASTER_ADDR/MASTER_PORT in their environment. `process_group(device)` joins them: one
process per device, cuda:LOCAL_RANK with NCCL or the CPU with gloo, and a timeout on every
collective so that a rank that died or hangs makes the others fail instead of waiting forever.

Every function here is a no-op (or the identity) on one process, so the engine reads like the
single-process algorithm with a few marked points where ranks meet:

    rank(), world_size(), is_main()      who am I
    shard(count)                         my contiguous share of `count` items
    barrier(what)                        wait for every rank
    all_reduce_sum(tensor, what)         in place; callers pass fp64 where bitwise results matter
    all_reduce_max(tensor, what)
    sum_floats(values, what)             Python floats summed across ranks in fp64
    sum_gradients(parameters, scalars)   fp32 buckets of 64 MiB per optimisation step
    broadcast_object(value, what)        rank 0's value on every rank
    owners(costs) / broadcast_(t, src)   share out pieces of work; send each result from its owner
    on_main(fn, what)                    rank 0 alone runs fn (writes, locks); its result or its
                                         error reaches every rank
    check_identical(groups, what)        checksums compared across ranks; a mismatch raises

and, for `retrain --fsdp`, a model whose parameters are sharded across ranks (FSDP2):

    shard_model(model, blocks, device)   fully_shard each block, then the root; gradients summed;
                                         offload=True: the shards in host memory (`--offload cpu`)
    is_sharded(t) / full_tensor(t)       a sharded tensor (DTensor)? its whole value on every rank
    shard_like(full, like)               this rank's part of a whole value, sharded as `like`
    whole_optimizer_state(optimizer)     its state_dict() with whole tensors: what one process saves
    load_optimizer_state(optimizer, s)   ... and back, each rank keeping its part

Nothing global is kept but torch.distributed's own default process group. Collectives must be
called by every rank in the same order: never inside a branch that only some ranks take, and never
while iterating a set or a dict whose order could differ between ranks.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")

# How long a collective may wait for the other ranks. A block's serial work (rank 0 writing its
# shard, the slowest rank's share) must fit in it; a rank that died is noticed sooner by gloo and
# NCCL (its connection closes) or by torchrun, which stops the others.
TIMEOUT_ENV = "RECONSTRUCT_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800


class DistributedError(RuntimeError):
    """Ranks that disagree, or a rank that failed or vanished."""


# --------------------------------------------------------------------------------------------------
# The process group
def launched_with_several_processes() -> bool:
    """True under torchrun (or any launcher setting WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_seconds() -> float:
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise DistributedError(f"{TIMEOUT_ENV}={value!r} is not a positive number of seconds")
    return seconds


@contextmanager
def process_group(device: str, single_process_group: bool = False):
    """Join torchrun's process group for the duration of the block; yield this process's device.

    Without torchrun (one process), or when the caller already set up a group, nothing happens and
    `device` is yielded unchanged, unless `single_process_group`: then a group of one process is made
    (an in-memory store, no network), for what needs a group even alone (FSDP2's CPU offload). Under
    torchrun, `--device cuda` means cuda:LOCAL_RANK."""
    if dist.is_initialized():
        yield device
        return
    if not launched_with_several_processes():
        if not single_process_group:
            yield device
            return
        if torch.device(device).index is not None:
            torch.cuda.set_device(device)  # NCCL's communicator is made for the current device
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1, timeout=timedelta(seconds=timeout_seconds()))
        try:  # no peer to wait for: torn down even when the block raised, so a next run starts clean
            yield device
        finally:
            dist.destroy_process_group()
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if device != "cuda":
            raise DistributedError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; "
                                   "pass --device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device == "cpu":
        backend = "gloo"
    else:
        raise DistributedError(f"--device {device}: several processes need --device cuda or cpu")
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds()))
    yield device
    # Not reached when the block raised: the other ranks may be gone, tearing down could wait on
    # them, and the process is about to exit anyway.
    dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0, the one that writes. Also true before the group is joined on the launcher's rank 0."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def shard(count: int) -> range:
    """This rank's contiguous share of `count` items (sizes differ by at most one, the same split on
    every rank)."""
    n, r = world_size(), rank()
    return range(count * r // n, count * (r + 1) // n)


# --------------------------------------------------------------------------------------------------
# Collectives (no-ops on one process)
def _communication_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(what: str, operation: Callable[[], T]) -> T:
    try:
        return operation()
    except DistributedError:
        raise
    except RuntimeError as error:  # DistBackendError, timeouts, a peer's closed connection
        raise DistributedError(f"rank {rank()} of {world_size()}: {what}: another rank failed, stopped or "
                               f"timed out ({str(error).splitlines()[0] if str(error) else error!r}); see "
                               "the first error in torchrun's output. Output already written is kept: rerun "
                               "the same torchrun command with --resume") from error


def barrier(what: str) -> None:
    if world_size() > 1:
        _collective(what, dist.barrier)


def _all_reduce(tensor: torch.Tensor, op, what: str) -> torch.Tensor:
    if world_size() == 1:
        return tensor
    device = _communication_device()
    moved = tensor if tensor.device == device else tensor.to(device)
    _collective(what, lambda: dist.all_reduce(moved, op=op))
    if moved is not tensor:  # reduce into the caller's tensor, never only into a temporary copy
        tensor.copy_(moved)
    return tensor


def all_reduce_sum(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Sum `tensor` over ranks, in place. For results that must not depend on the number of ranks,
    accumulate and reduce in fp64 and cast afterwards."""
    return _all_reduce(tensor, dist.ReduceOp.SUM, what)


def all_reduce_max(tensor: torch.Tensor, what: str) -> torch.Tensor:
    return _all_reduce(tensor, dist.ReduceOp.MAX, what)


def sum_floats(values: list[float], what: str) -> list[float]:
    """Python floats summed over ranks (in fp64); the same list on every rank."""
    if world_size() == 1:
        return list(values)
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64), what).tolist()


# Gradients are summed this many bytes at a time (the memory plan's ALL_REDUCE_BUCKET)
GRADIENT_BUCKET_BYTES = 2**26


def _gradient_buckets(parameters: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    """Consecutive parameters in groups of at most GRADIENT_BUCKET_BYTES of fp32 (a larger one alone)."""
    buckets, current, size = [], [], 0
    for parameter in parameters:
        if current and size + 4 * parameter.numel() > GRADIENT_BUCKET_BYTES:
            buckets.append(current)
            current, size = [], 0
        current.append(parameter)
        size += 4 * parameter.numel()
    return buckets + ([current] if current else [])


def sum_gradients(parameters: list[torch.nn.Parameter], scalars: list[float]) -> list[float]:
    """Sum the parameters' gradients over ranks, in fp32 buckets of at most GRADIENT_BUCKET_BYTES,
    and a few scalars in fp64; return the summed scalars. A parameter without a gradient on this rank
    (no window of the batch is here) contributes zeros.

    fp32, not fp64: two ranks' fp32 gradients summed once round as one rank's accumulation of the
    same two passes does, and a whole fp64 copy of every gradient (16 bytes per weight with the
    concatenation, for `--params full`) is what made several processes need more memory than one."""
    if world_size() == 1:
        return list(scalars)
    device = _communication_device()
    for bucket in _gradient_buckets(parameters):
        flat = torch.empty(sum(p.numel() for p in bucket), dtype=torch.float32, device=device)
        offset = 0
        for parameter in bucket:
            part = flat[offset:offset + parameter.numel()]
            if parameter.grad is None:
                part.zero_()
            else:
                part.copy_(parameter.grad.reshape(-1))
            offset += parameter.numel()
        _collective("summing gradients", lambda: dist.all_reduce(flat))
        offset = 0
        for parameter in bucket:
            summed = flat[offset:offset + parameter.numel()].view_as(parameter)
            if parameter.grad is None:
                parameter.grad = summed.to(parameter.device, parameter.dtype, copy=True)
            else:
                parameter.grad.copy_(summed)
            offset += parameter.numel()
        del flat
    return sum_floats(scalars, "summing the loss")


def broadcast_object(value: T, what: str) -> T:
    """Rank 0's `value` on every rank (pickled; for small things: settings, state, token windows)."""
    if world_size() == 1:
        return value
    holder = [value if is_main() else None]
    _collective(what, lambda: dist.broadcast_object_list(holder, src=0))
    return holder[0]


def broadcast_(tensor: torch.Tensor, source: int, what: str) -> torch.Tensor:
    """Overwrite `tensor` in place, on every rank, with rank `source`'s (its bytes: any dtype)."""
    if world_size() == 1:
        return tensor
    if not tensor.is_contiguous():
        raise DistributedError(f"{what}: cannot broadcast a non-contiguous tensor in place")
    device = _communication_device()
    raw = tensor.view(torch.uint8) if tensor.dim() else tensor.reshape(1).view(torch.uint8)
    moved = raw if raw.device == device else raw.to(device)
    _collective(what, lambda: dist.broadcast(moved, src=source))
    if moved is not raw:  # into the caller's tensor, never only into a temporary copy
        raw.copy_(moved)
    return tensor


def owners(costs: list[float]) -> list[int]:
    """The rank that does each of several pieces of work: the costliest first, each to the least
    loaded rank (ties to the lower rank). The same answer on every rank; all 0 on one process."""
    load = [0.0] * world_size()
    owner = [0] * len(costs)
    for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner[item] = min(range(len(load)), key=lambda r: (load[r], r))
        load[owner[item]] += costs[item]
    return owner


def on_main(fn: Callable[[], T], what: str) -> T:
    """Run `fn` on rank 0 only (writing files, taking a lock) and give its result to every rank.

    If it raises, rank 0 re-raises the error and every other rank raises DistributedError quoting
    it, so that all ranks stop at the same point with the same reason."""
    if world_size() == 1:
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as caught:  # noqa: BLE001 - reported to the other ranks, then re-raised
            error = caught
    outcome = broadcast_object((result, None if error is None else f"{type(error).__name__}: {error}"), what)
    if error is not None:
        raise error
    if outcome[1] is not None:
        raise DistributedError(f"rank 0 failed while {what}: {outcome[1]}")
    return outcome[0]


# --------------------------------------------------------------------------------------------------
# A model sharded across ranks (FSDP2, `retrain --fsdp`): each rank holds 1/N of every parameter
def shard_model(model: nn.Module, units: Iterable[nn.Module], device: torch.device,
                offload: bool = False) -> None:
    """Shard `model`'s parameters (frozen and trainable) and buffers across ranks on `device`: each
    of `units` (the blocks, the embeddings, the head) is one FSDP2 unit, gathered whole just for its
    own forward and backward, and the rest (the final norm) is the root's unit. One process:
    nothing happens, unless `offload`: then, on any number of processes (a group of one included),
    the shards, their gradients and the optimiser's step stay in host memory (FSDP2's
    CPUOffloadPolicy) and each unit is copied to `device` only for its forward and backward.

    FSDP2 allows frozen and trainable parameters in one unit (only the trainable ones get gradients,
    and those must share a dtype: the corrections' fp32 parameters do). Gradients are summed, not
    averaged, over ranks: the training loss is already divided by the global batch's token count.
    Every rank must then run the same number of forward (and backward) passes: each pass gathers
    the parameters with a collective."""
    if world_size() == 1 and not offload:
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    # Pinned host memory makes the copies to an accelerator asynchronous; there is none to pin for on the CPU
    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    for unit in units:
        fully_shard(unit, mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # A plain SUM: with a divide factor FSDP uses PREMUL_SUM, which gloo does not have.
            module.set_force_sum_reduction_for_comms(True)


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's whole value, on every rank (a collective: every rank gathers the same
    tensors in the same order); a plain tensor is returned as it is."""
    if not is_sharded(tensor):
        return tensor
    local = tensor.to_local()
    if local.device.type != tensor.device_mesh.device_type:  # offloaded to the host: gathered on the device
        from torch.distributed.tensor import DTensor

        tensor = DTensor.from_local(local.to(tensor.device_mesh.device_type), tensor.device_mesh, tensor.placements,
                                    shape=tensor.shape, stride=tensor.stride(), run_check=False)
    return _collective("gathering a sharded tensor", tensor.full_tensor)


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full` (which every rank holds, e.g. read from a file), sharded as `like`
    is; `full` itself where `like` is a plain tensor. No communication."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def whole_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded tensor (AdamW's moments of a sharded parameter)
    replaced by its whole value on the host: the same file whether or not the parameters were
    sharded. A collective where they are."""
    state = optimizer.state_dict()
    # state_dict() hands out the live per-parameter dicts: build new ones rather than edit them
    state["state"] = {index: {key: full_tensor(value).cpu() if is_sharded(value) else value
                              for key, value in state["state"][index].items()}
                      for index in sorted(state["state"])}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a state saved by `whole_optimizer_state`; where a parameter is sharded, this rank keeps
    its part of each of the parameter's tensors (the step counter is a scalar and stays whole)."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    state = dict(state, state={
        index: {key: shard_like(value, parameters[index])
                if torch.is_tensor(value) and value.shape == parameters[index].shape and value.dim() else value
                for key, value in values.items()}
        for index, values in state["state"].items()})
    optimizer.load_state_dict(state)


# --------------------------------------------------------------------------------------------------
# Proving that every rank holds the same tensors
CHECKSUM_CHUNK_WORDS = 2**20  # 4-byte words summed at a time
_CHECKSUM_MODULUS = 65521  # a prime: the weight of each word cycles with its position
_checksum_weights: dict[torch.device, torch.Tensor] = {}


def _weights(device: torch.device, position: int, count: int) -> torch.Tensor:
    """(position + i) % modulus + 1 for i < count: a slice of one table made once per device (every
    block is checked twice on every rank, so the table is not rebuilt each time)."""
    table = _checksum_weights.get(device)
    if table is None:
        table = torch.arange(CHECKSUM_CHUNK_WORDS + _CHECKSUM_MODULUS, device=device) % _CHECKSUM_MODULUS + 1
        _checksum_weights[device] = table
    offset = position % _CHECKSUM_MODULUS
    return table[offset:offset + count]


def checksum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """A position-weighted sum of the tensors' bytes, read as 4-byte words (a quarter of the
    products bytes would need) and the last 0-3 bytes of each tensor alone: an int64 on the CPU,
    computed on the tensors' device. The sums wrap around modulo 2**64, the same on every rank:
    equal bytes give equal checksums; a difference is caught unless it is contrived."""
    total, position = torch.zeros((), dtype=torch.int64), 0  # position: in the words and bytes so far
    for tensor in tensors:
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        whole = data.numel() // 4 * 4
        words = data[:whole] if data.storage_offset() % 4 == 0 else data[:whole].clone()  # aligned
        for part in (words.view(torch.int32), data[whole:]):
            for start in range(0, part.numel(), CHECKSUM_CHUNK_WORDS):
                piece = part[start:start + CHECKSUM_CHUNK_WORDS].to(torch.int64)
                total += (piece * _weights(piece.device, position, piece.numel())).sum().cpu()
                position += piece.numel()
    return total


def check_identical(groups: dict[str, list[torch.Tensor]], what: str) -> None:
    """Raise DistributedError unless every rank holds the same bytes in each group of tensors (e.g.
    {"masks": [...], "weights": [...]}); one collective for all groups. Pass the groups in the same
    order on every rank."""
    if world_size() == 1:
        return
    sums = torch.stack([checksum(tensors) for tensors in groups.values()])
    extremes = all_reduce_max(torch.cat([sums, -sums]), f"comparing {what}")
    differing = [name for i, name in enumerate(groups) if int(extremes[i]) != -int(extremes[len(groups) + i])]
    if differing:
        raise DistributedError(f"{what}: the {' and '.join(differing)} differ between ranks, so the ranks "
                               "would no longer compute the same model. This is a bug or non-deterministic "
                               "hardware (mixed GPU types?); run with one process, or report it")


# --------------------------------------------------------------------------------------------------
# The engine's statistics
def all_reduce_statistics(stats: dict, linears: dict, with_hessian: bool, device, with_sums: bool = False) -> dict:
    """Sum each linear's input statistics (fp64 sums and token counts) over ranks; return them by
    linear name, shared between linears exactly as on one process.

    Linears that read the same input share one accumulator, which is reduced once. A linear may have
    no statistics on some ranks (a mixture-of-experts expert none of their tokens was routed to), so
    which accumulators exist is agreed first, in the block's own order of linears, the same on every
    rank."""
    if world_size() == 1:
        return stats
    from .stats import InputStatistics

    names = list(linears)
    # For each linear, the index of the first linear sharing its accumulator here (-1: none here);
    # the maximum over ranks is the index on every rank that has one.
    leader = torch.tensor([-1 if stats.get(name) is None else
                           next(j for j, other in enumerate(names) if stats.get(other) is stats[name])
                           for name in names], dtype=torch.int64)
    leader = all_reduce_max(leader, "agreeing which layers have statistics").tolist()
    reduced = {}
    for i, name in enumerate(names):
        if leader[i] != i:
            continue
        accumulator = stats.get(name) or InputStatistics(linears[name].in_features, device, with_hessian,
                                                         with_sums)
        tokens = torch.tensor([accumulator.tokens], dtype=torch.float64)  # exact below 2**53 tokens
        all_reduce_sum(tokens, f"summing token counts of {name}")
        accumulator.tokens = int(tokens.item())
        all_reduce_sum(accumulator.squared_norms, f"summing input norms of {name}")
        if accumulator.sums is not None:
            all_reduce_sum(accumulator.sums, f"summing inputs of {name}")
        if accumulator.hessian_sum is not None:
            all_reduce_sum(accumulator.hessian_sum, f"summing the Hessian of {name}")
        reduced[name] = accumulator
    return {name: reduced[names[leader[i]]] for i, name in enumerate(names) if leader[i] >= 0}
