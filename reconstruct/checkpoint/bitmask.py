"""The legacy compressed-tensors bitmask formats, decoded a tensor (or a range of its rows) at a time.

llm-compressor <= 0.10 saved `sparse-bitmask` / `sparse-24-bitmask` tensors (compressed-tensors
<= 0.14), which today's compressed-tensors cannot decode and transformers 5 refuses to load. They are
decoded here, a tensor at a time, into the dense matrix with exact zeros that it stands for.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError
from .safetensors import READ_CHUNK_BYTES, CheckpointReader

BITMASK_FORMATS = ("sparse-bitmask", "sparse-24-bitmask")
# The parts a compressed module is stored as: <module>.shape, .compressed, .bitmask (, .row_offsets).
# compressed-tensors <= 0.8 named them <module>.weight.shape etc.
BITMASK_PARTS = ("shape", "compressed", "bitmask", "row_offsets")


def bitmask_format(directory: Path) -> str | None:
    """The legacy sparsity format named in config.json, if any."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    quantization = config.get("quantization_config") or config.get("compression_config") or {}
    sparsity = quantization.get("sparsity_config") or {}
    found = sparsity.get("format")
    if found and found not in (*BITMASK_FORMATS, "dense"):
        raise CheckpointError(f"{directory}: sparsity format {found!r} is not one this version reads "
                              f"(it reads {', '.join(BITMASK_FORMATS)} and dense checkpoints)")
    return found if found in BITMASK_FORMATS else None



class BitmaskDecoder:
    """A reader over another reader that shows each compressed module as its dense `<module>.weight`.

    sparse-bitmask: `shape` int64 [2]; `compressed` the kept values, row-major, 1-D; `bitmask` uint8
    [rows, ceil(cols/8)], bits little-endian within a byte along the row; `row_offsets` int64 [rows],
    where each row starts in `compressed`. sparse-24-bitmask: `shape` [2, 1]; `compressed` [rows,
    cols/2]; `bitmask` as above. A value at a position whose bit is clear is +0.0.
    """

    def __init__(self, base, sparse_format: str | None):
        self.base, self.directory, self.sparse_format = base, base.directory, sparse_format
        self.compressed: dict[str, str] = {}  # dense name -> prefix of its stored parts
        for name in base.file_of:
            if name.endswith(".bitmask"):
                prefix = name[:-len(".bitmask")]
                dense = prefix if prefix.endswith(".weight") else prefix + ".weight"
                missing = [part for part in ("shape", "compressed") if f"{prefix}.{part}" not in base]
                if missing:
                    raise CheckpointError(f"{name}: its {', '.join(missing)} tensor is missing; the "
                                          "compressed checkpoint is incomplete")
                self.compressed[dense] = prefix
        parts = {f"{prefix}.{part}" for prefix in self.compressed.values() for part in BITMASK_PARTS}
        self.file_of = {name: file for name, file in base.file_of.items() if name not in parts}
        for dense, prefix in self.compressed.items():
            self.file_of[dense] = base.file_of[f"{prefix}.compressed"]
        self._shapes: dict[str, tuple[int, int]] = {}
        self._row_starts: dict[str, np.ndarray] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def dtype(self) -> torch.dtype:
        return self.base.dtype()

    def _shape(self, name: str) -> tuple[int, int]:
        if name not in self._shapes:
            shape = self.base.get(f"{self.compressed[name]}.shape").reshape(-1).tolist()
            if len(shape) != 2:
                raise CheckpointError(f"{name}: stored shape {shape} is not that of a matrix")
            self._shapes[name] = (int(shape[0]), int(shape[1]))
        return self._shapes[name]

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        if name not in self.compressed:
            return self.base.info(name)
        dtype, _ = self.base.info(f"{self.compressed[name]}.compressed")
        return dtype, self._shape(name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.compressed:
            return self.base.get(name)
        return self.get_rows(name, 0, self._shape(name)[0])

    def read(self, name: str) -> torch.Tensor:
        return self.base.read(name) if name not in self.compressed else self.get(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name not in self.compressed:
            return self.base.get_rows(name, start, stop)
        prefix = self.compressed[name]
        rows, cols = self._shape(name)
        start, stop = max(0, start), min(stop, rows)
        bits = self.base.get_rows(f"{prefix}.bitmask", start, stop).numpy()
        keep = torch.from_numpy(np.unpackbits(bits, axis=1, bitorder="little")[:, :cols].astype(bool))
        if keep.shape != (stop - start, cols):
            raise CheckpointError(f"{name}: bitmask of shape {tuple(bits.shape)} does not cover a "
                                  f"{rows} x {cols} matrix")
        values = self._kept_values(name, prefix, start, stop, rows)
        if values.numel() != int(keep.sum()):
            raise CheckpointError(f"{name}: {values.numel()} stored values for {int(keep.sum())} set "
                                  "bits; the compressed tensor is damaged")
        dense = torch.zeros(keep.shape, dtype=values.dtype)
        dense[keep] = values
        return dense

    def _kept_values(self, name: str, prefix: str, start: int, stop: int, rows: int) -> torch.Tensor:
        """The stored values of rows start:stop. Where each row's values begin is counted from the
        bitmask itself (the stored row_offsets say the same, and sparse-24 has none)."""
        compressed = f"{prefix}.compressed"
        _, stored_shape = self.base.info(compressed)
        if len(stored_shape) == 2:  # sparse-24-bitmask: [rows, cols/2]
            return self.base.get_rows(compressed, start, stop).reshape(-1)
        if name not in self._row_starts:
            bits = self.base.get(f"{prefix}.bitmask").numpy()
            per_row = np.unpackbits(bits, axis=1, bitorder="little")[:, :self._shape(name)[1]].sum(axis=1)
            self._row_starts[name] = np.concatenate([[0], np.cumsum(per_row)])
        first, last = int(self._row_starts[name][start]), int(self._row_starts[name][stop])
        return self.base.get_rows(compressed, first, last)

    def row_chunks(self, name: str, chunk_bytes: int | None = None) -> list[tuple[int, int]]:
        return CheckpointReader.row_chunks(self, name, chunk_bytes or READ_CHUNK_BYTES)
