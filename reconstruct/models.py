"""Model access: find a causal LM's parts generically and stream one block's weights at a time.

The model is built as a skeleton whose parameters live on the `meta` device (no memory). Weights are
read straight from the checkpoint's safetensors shards when a block is processed, and written back in
the checkpoint's own tensor names and layout, so the output loads exactly as the input did.

One code path serves every family. What differs between families is confined to `FAMILY_HINTS`: how
a checkpoint names a block's tensors when that differs from the modules' names.
"""
from __future__ import annotations

import copy
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, CheckpointReader, StreamedTensor, open_checkpoint, resolve_checkpoint_dir

log = logging.getLogger(__name__)


class UnsupportedModelError(ValueError):
    """The model's structure is not one the engine can walk block by block."""


# --------------------------------------------------------------------------------------------------
# Per-family hints: (pattern in the model's naming, replacement in the checkpoint's naming).
# transformers >= 5 fuses Mixtral's experts in memory but saves and loads the per-expert layout below.
FAMILY_HINTS: dict[str, list[tuple[str, str]]] = {
    "mixtral": [
        (r"\.mlp\.experts\.(\d+)\.gate_proj\.", r".block_sparse_moe.experts.\1.w1."),
        (r"\.mlp\.experts\.(\d+)\.up_proj\.", r".block_sparse_moe.experts.\1.w3."),
        (r"\.mlp\.experts\.(\d+)\.down_proj\.", r".block_sparse_moe.experts.\1.w2."),
        (r"\.mlp\.gate\.", r".block_sparse_moe.gate."),
    ],
}

# --------------------------------------------------------------------------------------------------
# Fused mixture-of-experts weights, unfused so that each expert's matrices are ordinary linears
class ExpertMLP(nn.Module):
    """One expert as three linears: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, act_fn, dtype, device):
        super().__init__()
        make = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden, intermediate, **make)
        self.up_proj = nn.Linear(hidden, intermediate, **make)
        self.down_proj = nn.Linear(intermediate, hidden, **make)
        self.act_fn = act_fn

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.ModuleList):
    """Replaces transformers' fused experts (3-D `gate_up_proj`, `down_proj`) with per-expert linears.

    The forward reproduces the fused one: each token goes to its top-k experts and their outputs are
    summed with the router's weights. Per-expert linears let hooks see exactly the tokens routed to an
    expert, which is what Wanda's norms and SparseGPT's Hessian must be computed from. As a ModuleList
    its tensors are named `experts.{e}.gate_proj.weight`, the layout checkpoints are saved in.
    """

    def __init__(self, fused: nn.Module):
        experts, intermediate2, hidden = fused.gate_up_proj.shape
        super().__init__(
            ExpertMLP(hidden, intermediate2 // 2, fused.act_fn, fused.gate_up_proj.dtype, "meta")
            for _ in range(experts))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        output = torch.zeros_like(hidden_states)
        for expert_index, expert in enumerate(self):
            token_index, slot = torch.where(top_k_index == expert_index)
            if token_index.numel() == 0:
                continue
            routed = expert(hidden_states[token_index]) * top_k_weights[token_index, slot, None]
            output.index_add_(0, token_index, routed.to(output.dtype))
        return output


def is_fused_experts(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    return ("gate_up_proj" in params and "down_proj" in params and params["gate_up_proj"].dim() == 3
            and hasattr(module, "act_fn") and not any(name.endswith("bias") for name in params))


def unfuse_experts(block: nn.Module) -> None:
    """Swap every fused-experts module inside `block` for an UnfusedExperts (on meta, to be loaded)."""
    for name, module in list(block.named_modules()):
        if name and is_fused_experts(module):
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, child, UnfusedExperts(module))


# --------------------------------------------------------------------------------------------------
@dataclass
class ModelAdapter:
    """A skeleton model plus where its blocks are and how its tensors are named in the checkpoint."""

    model: nn.Module
    config: object
    checkpoint: CheckpointReader
    blocks_path: str
    storage_dtype: torch.dtype
    model_type: str
    name_hints: list[tuple[str, str]] = field(default_factory=list)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_name(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"

    # -- naming -------------------------------------------------------------------------------------
    def checkpoint_name(self, model_name: str) -> str:
        """The checkpoint's name for a tensor the model calls `model_name`."""
        candidates = [model_name]
        renamed = model_name
        for pattern, replacement in self.name_hints:
            renamed = re.sub(pattern, replacement, renamed)
        candidates.insert(0, renamed)
        prefix = getattr(self.model, "base_model_prefix", "") + "."
        for name in list(candidates):
            if prefix != "." and name.startswith(prefix):
                candidates.append(name[len(prefix):])  # older checkpoints omit the base prefix
        for name in candidates:
            if name in self.checkpoint:
                return name
        raise CheckpointError(
            f"tensor {model_name!r} (tried {candidates}) is missing from the checkpoint in "
            f"{self.checkpoint.directory}; the shards are incomplete or the layout is not one this "
            f"version knows for model_type={self.model_type!r}")

    # -- loading and releasing weights ---------------------------------------------------------------
    def load_module(self, module_name: str, dtype: torch.dtype | None = None,
                    state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Materialise one submodule's parameters from the checkpoint (in `dtype`, default the run's),
        or from `state`, its tensors already read by `module_reader`."""
        module = self.model.get_submodule(module_name)
        if state is None:
            state = self.module_reader(module_name, dtype)()
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as error:  # e.g. a size mismatch: the weights are not the config's model
            raise CheckpointError(f"{self.checkpoint.directory}: the tensors of {module_name or 'the model'} "
                                  f"do not fit the architecture its config.json describes ({error}); "
                                  "the config and the weights belong to different models") from None
        return module

    def module_reader(self, module_name: str, dtype: torch.dtype | None = None):
        """A function reading one submodule's tensors from the checkpoint, by the module's own names
        (in `dtype`, default the run's). The names are resolved now; the function touches only the
        checkpoint's files, not the model, so it may run in another thread."""
        module = self.model.get_submodule(module_name)
        names = {name: self.checkpoint_name(f"{module_name}.{name}" if module_name else name)
                 for name in module.state_dict(keep_vars=True)}
        dtype = dtype or self.storage_dtype

        def read() -> dict[str, torch.Tensor]:
            return {name: self.checkpoint.read(stored).to(dtype) for name, stored in names.items()}
        return read

    def load_block(self, index: int, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        return self.load_module(self.block_name(index), state=state)

    def release(self, module: nn.Module) -> None:
        """Return a module's parameters to the meta device, freeing their memory."""
        module.to("meta")

    def output_config(self):
        """The config written with the output: the input's, with the dtype the tensors are stored in."""
        config = copy.deepcopy(self.config)
        config.dtype = self.storage_dtype
        return config

    def stored_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a tensor is written out in: floating point in the storage dtype, others as is."""
        return self.storage_dtype if dtype.is_floating_point else dtype

    def for_storage(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor as it is written out: in its stored dtype, on the CPU, contiguous."""
        return tensor.detach().to("cpu", self.stored_dtype(tensor.dtype)).contiguous()

    def streamed_copy(self, name: str) -> "torch.Tensor | StreamedTensor":
        """A checkpoint tensor as it is written out, read and converted a chunk of rows at a time."""
        dtype, shape = self.checkpoint.info(name)
        if not shape:
            return self.for_storage(self.checkpoint.get(name))

        def chunks():
            for start, stop in self.checkpoint.row_chunks(name):
                yield self.for_storage(self.checkpoint.get_rows(name, start, stop))
        return StreamedTensor(self.stored_dtype(dtype), shape, chunks)

    def dense_rows(self, module_name: str, parameter: str = "weight", chunk_bytes: int = 2**20):
        """(rows, values) pieces of a loaded module's parameter as the checkpoint holds it (in the run's
        dtype): the dense weights, read back after pruning instead of kept as a copy."""
        name = self.checkpoint_name(f"{module_name}.{parameter}")
        for start, stop in self.checkpoint.row_chunks(name, chunk_bytes):
            yield slice(start, stop), self.checkpoint.get_rows(name, start, stop).to(self.storage_dtype)

    def module_tensors(self, module_name: str) -> dict[str, torch.Tensor]:
        """A loaded module's tensors keyed by checkpoint name, as they are written out."""
        module = self.model.get_submodule(module_name)
        return {self.checkpoint_name(f"{module_name}.{name}"): self.for_storage(tensor)
                for name, tensor in module.state_dict().items()}

    def block_checkpoint_names(self) -> set[str]:
        names = set()
        for index, block in enumerate(self.blocks):
            names.update(self.checkpoint_name(f"{self.block_name(index)}.{name}") for name in block.state_dict())
        return names

    def non_block_names(self) -> list[str]:
        """Checkpoint names of every tensor outside the blocks (embeddings, final norm, head, …)."""
        in_blocks = self.block_checkpoint_names()
        return [name for name in self.checkpoint.file_of if name not in in_blocks]

    def _non_block_parameters(self):
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if not name.startswith(self.blocks_path + "."):
                module_name, _, leaf = name.rpartition(".")
                yield name, self.model.get_submodule(module_name), leaf, param

    def load_embeddings(self) -> None:
        """Materialise the non-block modules that compute block 0's inputs; the head stays on meta."""
        head = self.model.get_output_embeddings()
        head_only = set()
        if head is not None and head.weight is not self.model.get_input_embeddings().weight:
            head_only = {id(p) for p in head.parameters()}
        for name, module, leaf, param in self._non_block_parameters():
            if param.is_meta and id(param) not in head_only:
                self._load_parameter(name, module, leaf, param)

    def load_all(self) -> nn.Module:
        """Materialise every parameter, blocks and head included: global retraining needs the whole
        model. A tied head (the config says so) shares the loaded embedding, as the checkpoint stores
        that matrix once; the skeleton on meta is not tied."""
        for index in range(self.num_blocks):
            self.load_block(index)
        self.load_embeddings()
        if getattr(self.config, "tie_word_embeddings", False):
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight
        for name, module, leaf, param in self._non_block_parameters():
            if param.is_meta:  # the head's own parameters
                self._load_parameter(name, module, leaf, param)
        return self.model

    def _load_parameter(self, name: str, module: nn.Module, leaf: str, param: nn.Parameter) -> None:
        """One parameter outside the blocks, from the checkpoint, checked against the skeleton's shape."""
        value = self.checkpoint.get(self.checkpoint_name(name)).to(self.storage_dtype)
        if value.shape != param.shape:
            raise CheckpointError(f"{self.checkpoint.directory}: {name} has shape {list(value.shape)}, its "
                                  f"config.json needs {list(param.shape)}; the config and the weights belong "
                                  "to different models")
        setattr(module, leaf, nn.Parameter(value, requires_grad=False))

    def non_block_tensors(self) -> dict[str, "torch.Tensor | StreamedTensor"]:
        """Every tensor outside the blocks as it is written out: from the loaded model where the model
        holds it (a retrained final norm), else copied from the checkpoint a chunk at a time.

        A loaded parameter whose name has no tensor in the checkpoint is an error unless it is tied
        to one that is written (a tied head, which the checkpoint stores once): otherwise a retrained
        parameter would silently be written as the input's copy, or not at all."""
        in_model, unnamed = {}, {}
        for name, tensor in self.model.state_dict().items():
            if not name.startswith(self.blocks_path + ".") and not tensor.is_meta:
                try:
                    in_model[self.checkpoint_name(name)] = tensor
                except CheckpointError:
                    unnamed[name] = tensor
        written = {tensor.data_ptr() for tensor in in_model.values()}
        parameters = {name for name, _ in self.model.named_parameters(remove_duplicate=False)}
        for name, tensor in unnamed.items():
            if name in parameters and tensor.data_ptr() not in written:
                raise CheckpointError(
                    f"cannot write {name}: the checkpoint in {self.checkpoint.directory} has no tensor of that "
                    f"name, so the output would keep the input's copy instead of this run's; this version does "
                    f"not know the tensor names of model_type={self.model_type!r} (please report it)")
        return {name: self.for_storage(in_model[name]) if name in in_model else self.streamed_copy(name)
                for name in self.non_block_names()}

    def release_embeddings(self) -> None:
        for _, module, leaf, param in self._non_block_parameters():
            setattr(module, leaf, nn.Parameter(param.to("meta"), requires_grad=False))


def load_tokenizer(source: str | os.PathLike):
    """The tokenizer of a directory or hub id; a clear error when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as error:
        raise UnsupportedModelError(f"cannot load a tokenizer from {source} ({error}); pass --tokenizer "
                                    "with a directory or hub id that has one") from error


def tokenizer_for_data(source: str | os.PathLike):
    """The tokenizer of `source` as `calib`'s functions take it. A local directory's is loaded only
    if some data is not in the token cache yet: its cache key comes from its files. A hub id's is
    loaded now: its cache key comes from the loaded tokenizer."""
    from calib.corpora import TokenizerFiles

    if Path(source).is_dir():
        return TokenizerFiles(source, lambda: load_tokenizer(source))
    return load_tokenizer(source)


def find_blocks(model: nn.Module, num_layers: int | None) -> str:
    """The dotted path of the ModuleList holding the decoder blocks, found by shape, not by name."""
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            has_linear = any(isinstance(m, nn.Linear) for m in module[0].modules()) or any(
                is_fused_experts(m) for m in module[0].modules())
            if len(kinds) == 1 and has_linear:
                candidates.append((len(module) == num_layers, len(module), name))
    if not candidates:
        raise UnsupportedModelError(
            f"{type(model).__name__}: could not find the decoder blocks (an nn.ModuleList of identical "
            "blocks containing linear layers). This architecture is not supported yet.")
    candidates.sort(reverse=True)
    return candidates[0][2]


def open_model(model: str | os.PathLike, dtype: torch.dtype | None = None,
               attn_implementation: str | None = "sdpa") -> ModelAdapter:
    """Open a checkpoint lazily: a weightless skeleton and a reader for its shards."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = resolve_checkpoint_dir(model)
    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as error:
        raise UnsupportedModelError(f"cannot read a transformers config in {directory}: {error}") from error
    reader = open_checkpoint(directory)
    if getattr(reader, "sparse_format", None) and hasattr(config, "quantization_config"):
        # Decoded to dense tensors with zeros: nothing is compressed any more, and the serving stack
        # (vLLM, transformers 5) rejects a sparsity_config, so the output must not carry it.
        del config.quantization_config
    storage_dtype = dtype or _config_dtype(config) or reader.dtype()
    try:
        with init_empty_weights(include_buffers=False):
            try:
                skeleton = AutoModelForCausalLM.from_config(config, dtype=storage_dtype,
                                                            attn_implementation=attn_implementation)
            except ValueError as error:
                # Some families (e.g. Gemma 2) have no SDPA attention: fall back to eager attention.
                if attn_implementation in (None, "eager") or "attention implementation" not in str(error):
                    raise
                skeleton = AutoModelForCausalLM.from_config(config, dtype=storage_dtype,
                                                            attn_implementation="eager")
    except ValueError as error:
        raise UnsupportedModelError(
            f"{directory}: model_type={getattr(config, 'model_type', '?')!r} is not a causal "
            f"language model transformers can build ({error})") from error
    skeleton.eval()
    blocks_path = find_blocks(skeleton, getattr(config, "num_hidden_layers", None))
    for block in skeleton.get_submodule(blocks_path):
        unfuse_experts(block)
    model_type = getattr(config, "model_type", "")
    return ModelAdapter(model=skeleton, config=config, checkpoint=reader, blocks_path=blocks_path,
                        storage_dtype=storage_dtype, model_type=model_type,
                        name_hints=FAMILY_HINTS.get(model_type, []))


def _config_dtype(config) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def prunable_linears(block: nn.Module, include: list[str] | None = None) -> dict[str, nn.Linear]:
    """The block's linear layers (by name relative to the block), optionally filtered by patterns.

    `include` holds regular expressions matched against the names (e.g. "mlp" or "q_proj|k_proj").
    Routers of mixtures of experts are never pruned: their few outputs decide where tokens go.
    """
    linears = {name: module for name, module in block.named_modules()
               if isinstance(module, nn.Linear) and not _is_router(name, module)}
    if include:
        linears = {name: m for name, m in linears.items() if any(re.search(p, name) for p in include)}
    return linears


def _is_router(name: str, module: nn.Linear) -> bool:
    return name.endswith((".gate", ".router")) and module.out_features < 256
