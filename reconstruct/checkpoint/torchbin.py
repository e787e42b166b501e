"""PyTorch `pytorch_model*.bin` checkpoints, as Wanda's and SparseGPT's reference code saved them.

The files are pickles. They are read with `torch.load(weights_only=True)`: tensors only, never a full
unpickle of foreign code.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import CheckpointError
from .safetensors import CheckpointReader

BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


class TorchBinReader(CheckpointReader):
    """`pytorch_model*.bin` shards, loaded tensors-only and memory-mapped (pages read when touched).

    The same questions as the safetensors reader, whose dtype() and row_chunks() it shares."""

    def __init__(self, directory: Path):
        self._shards: dict[str, dict[str, torch.Tensor]] = {}  # file name -> its mapped tensors
        super().__init__(directory)

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / BIN_INDEX
        if index.exists():
            return dict(json.loads(index.read_text())["weight_map"])
        return {name: BIN_SINGLE for name in self._shard(BIN_SINGLE)}

    def _shard(self, filename: str) -> dict[str, torch.Tensor]:
        if filename in self._shards:
            return self._shards[filename]
        path = self.directory / filename
        if not path.exists():
            raise CheckpointError(f"shard {path} listed in the index is missing; re-download it")
        try:
            try:
                tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                # Files in the pre-1.6 (non-zip) format cannot be memory-mapped: read them whole.
                tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(
                f"cannot read {path} as PyTorch weights with weights_only=True ({error}). reconstruct "
                "never unpickles arbitrary objects; re-save the model with `save_pretrained` "
                "(safetensors) in an environment you trust") from error
        if not isinstance(tensors, dict):
            raise CheckpointError(f"{path} holds a {type(tensors).__name__}, not a state dict of tensors")
        self._shards[filename] = tensors
        return tensors

    def _tensor(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.directory}; "
                                  "the shards are incomplete or belong to another model")
        return self._shard(self.file_of[name])[name]

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        tensor = self._tensor(name)
        return tensor.dtype, tuple(tensor.shape)

    def get(self, name: str) -> torch.Tensor:
        return self._tensor(name).clone()  # a private copy: the mapped pages are never written

    def read(self, name: str) -> torch.Tensor:
        return self.get(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._tensor(name)[start:stop].clone()

