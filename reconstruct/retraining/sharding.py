"""`retrain --fsdp`: the model, correction attached, sharded across the ranks (FSDP2), and how the
corrections reach parameters that FSDP holds as shards."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .. import distributed
from ..corrections import ParameterAccess


class ShardedParameterAccess(ParameterAccess):
    """FSDP registers its own gathered parameter at every forward, so a rounded copy set in a sharded
    parameter's place would be ignored: the sharded parameter's values are rounded to the storage
    dtype in place instead (the same numbers the merge writes), and restored afterwards. A parameter
    that is not sharded is swapped as usual."""

    @contextmanager
    def rounded(self, module: nn.Module, leaf: str, dtype: torch.dtype):
        parameter = getattr(module, leaf)
        if not distributed.is_sharded(parameter):
            with super().rounded(module, leaf, dtype):
                yield
            return
        with torch.no_grad():
            values = parameter.detach().clone()
            parameter.copy_(parameter.to(dtype).to(parameter.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                parameter.copy_(values)


def shard_trainable(model: nn.Module, trainable: list[nn.Parameter], blocks,
                    device: torch.device, offload: bool = False) -> list[nn.Parameter]:
    """Shard `model` (correction attached) across the ranks' devices (`offload`: kept in host memory,
    each block copied to the device for its passes); return the `trainable` parameters as FSDP
    re-registers them (sharded copies), in the same order, so that the optimiser's saved state is
    laid out as on one process."""
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    trainable_names = [names[id(p)] for p in trainable]
    distributed.shard_model(model, [*blocks, *vocabulary_units(model)], device, offload=offload)
    return [model.get_parameter(name) for name in trainable_names]


def vocabulary_units(model: nn.Module) -> list[nn.Module]:
    """The input embeddings and the output head, each an FSDP2 unit of its own where they are not
    tied. FSDP2 keeps the root's parameters gathered from the forward to the end of the backward: as
    the root's, both vocabulary-sized matrices would be whole on every rank for the whole pass (0.26 GB
    at 1B, 1 GB for LLaMA-2-70B); as units of their own each is gathered just for its passes, one at a time.
    A tied pair shares one parameter, which can belong to one unit only: it stays the root's."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is embeddings.weight:
        return []
    return [embeddings, head]
