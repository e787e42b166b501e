"""Safetensors checkpoints, read a tensor (or a range of its rows) at a time, by checkpoint name.

A shard's header (8-byte length, then JSON) says where each tensor's bytes lie; a block's weights are
read from those byte ranges into memory of their own, large tensors a chunk of rows at a time.
"""
from __future__ import annotations

import json
import math
import os
import struct
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import CheckpointError

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors")
READ_CHUNK_BYTES = 16 * 2**20  # large tensors are copied and compared in pieces of about this size
# torch's dtypes and the format's codes for them, one way for the writer and back for the reader
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                      torch.float8_e5m2: "F8_E5M2"}
SAFETENSORS_TO_TORCH = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


def read_into(handle, target: memoryview) -> int:
    """Fill `target` from a binary file's current position; returns the bytes read (fewer only at
    the end of the file). One `readinto` may return less than asked: Linux reads at most about
    2 GiB per call, and any read may be short."""
    done = 0
    while done < len(target):
        count = handle.readinto(target[done:])
        if not count:
            break
        done += count
    return done


class CheckpointReader:
    """Reads individual tensors from a directory of safetensors shards, by checkpoint name."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.file_of: dict[str, str] = self._weight_map()
        # shard -> name -> (safetensors dtype code, shape, byte range of its data): each shard's header
        # is parsed once, for every tensor of it that `info` and `read` are asked about
        self._layouts: dict[Path, dict[str, tuple[str, tuple[int, ...], int, int]]] = {}

    def _weight_map(self) -> dict[str, str]:
        from safetensors import safe_open

        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            return dict(json.loads(index.read_text())["weight_map"])
        single = self.directory / "model.safetensors"
        if single.exists():
            try:
                with safe_open(str(single), "pt") as shard:
                    return {name: single.name for name in shard.keys()}
            except Exception as error:
                raise CheckpointError(f"{single} is not a readable safetensors file ({error}); "
                                      "re-download or re-save the checkpoint") from error
        raise CheckpointError(f"no weights in {self.directory} (looked for {' or '.join(WEIGHT_FILES)}, "
                              "and pytorch_model.bin or its index); pass the checkpoint's directory")

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def dtype(self) -> torch.dtype:
        """The storage dtype of the checkpoint's first floating-point tensor (read from the header)."""
        for name in self.file_of:
            dtype, _ = self.info(name)
            if dtype.is_floating_point:
                return dtype
        return torch.float32

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """A tensor's dtype and shape, from its shard's header (no data is read), remembered: the
        error report asks for the same tensors' row ranges at every batch."""
        code, shape, _, _ = self._layout(name)
        return SAFETENSORS_TO_TORCH[code], shape

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor. Pages of the memory-mapped shard are read when touched, so a large
        embedding matrix costs only the rows a forward pass looks up."""
        with self._open(name) as handle:
            return self._read(name, lambda: handle.get_tensor(name))

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, read from its shard now into memory of its own (a block's weights).

        `get`'s tensor is a view of the memory-mapped file: a pruner that then writes into it pays a
        copy-on-write page fault for every page it touches, which on the virtual machines we measured
        made zeroing half of a weight matrix about 6 times slower than on private memory
        (docs/benchmarks.md); reading the bytes with one `readinto` costs a little more than touching
        every mapped page does, and the read happens here rather than in the first forward pass."""
        code, shape, start, stop = self._layout(name)
        if math.prod(shape) * SAFETENSORS_TO_TORCH[code].itemsize != stop - start:
            raise self._damaged(name, self._shard_path(name),
                                ValueError(f"its header gives {stop - start} bytes for shape {list(shape)}"))
        return self._read_bytes(name, shape, 0)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of the tensor (its first dimension), read from their byte range into memory
        of their own: each rank's shard of a tensor under `retrain --fsdp`, and nothing else of it."""
        _, shape, _, _ = self._layout(name)
        row_bytes = math.prod(shape[1:]) * self.info(name)[0].itemsize
        return self._read_bytes(name, (stop - start, *shape[1:]), start * row_bytes)

    def _read_bytes(self, name: str, shape: tuple[int, ...], offset: int) -> torch.Tensor:
        """A tensor of `shape` from the bytes of `name` that begin `offset` bytes into its data."""
        code, _, start, stop = self._layout(name)
        shard = self._shard_path(name)
        tensor = torch.empty(shape, dtype=SAFETENSORS_TO_TORCH[code])
        target = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        if start + offset + len(target) > stop:
            raise self._damaged(name, shard, ValueError(f"{len(target)} bytes at {offset} are past its end"))
        try:
            with open(shard, "rb", buffering=0) as handle:
                handle.seek(start + offset)
                count = read_into(handle, target)
        except OSError as error:
            raise self._damaged(name, shard, error) from error
        if count != len(target):
            raise self._damaged(name, shard, EOFError(f"read {count} of its {len(target)} bytes"))
        return tensor

    def _layout(self, name: str) -> tuple[str, tuple[int, ...], int, int]:
        """A tensor's dtype code, shape and the byte range of its data in its shard, from the shard's
        header (8-byte length, then JSON), parsed once per shard. A header that does not fit the
        file (a truncated or corrupted shard) is an error here, as safetensors' own open makes it."""
        shard = self._shard_path(name)
        if shard not in self._layouts:
            try:
                with open(shard, "rb") as handle:
                    size = os.fstat(handle.fileno()).st_size
                    length = struct.unpack("<Q", handle.read(8))[0]
                    if length > size - 8:
                        raise EOFError(f"the file has {size} bytes, its header claims {length}")
                    header = json.loads(handle.read(length))
                data = 8 + length  # the tensors' bytes follow the header; offsets count from there
                layout = {key: (entry["dtype"], tuple(entry["shape"]), data + entry["data_offsets"][0],
                                data + entry["data_offsets"][1])
                          for key, entry in header.items() if key != "__metadata__"}
                if any(stop > size for _, _, _, stop in layout.values()):
                    raise EOFError(f"the file has {size} bytes, its header describes more")
            except FileNotFoundError as error:
                raise CheckpointError(f"shard {shard} listed in the index is missing; re-download it") from error
            except (OSError, EOFError, ValueError, KeyError, TypeError, struct.error) as error:
                raise self._damaged(name, shard, error) from error
            self._layouts[shard] = layout
        if name not in self._layouts[shard]:
            raise self._damaged(name, shard, KeyError("the shard's header does not list it"))
        return self._layouts[shard][name]

    def _shard_path(self, name: str) -> Path:
        if name not in self.file_of:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.directory}; "
                                  "the shards are incomplete or belong to another model")
        return self.directory / self.file_of[name]

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of the tensor (its first dimension): a bounded read of a large tensor."""
        with self._open(name) as handle:
            return self._read(name, lambda: handle.get_slice(name)[start:stop])

    def row_chunks(self, name: str, chunk_bytes: int | None = None) -> list[tuple[int, int]]:
        """(start, stop) row ranges of at most about `chunk_bytes` (default READ_CHUNK_BYTES) each, one
        row at least, covering a tensor of one dimension or more."""
        chunk_bytes = chunk_bytes or READ_CHUNK_BYTES
        dtype, shape = self.info(name)
        row_bytes = max(1, dtype.itemsize * math.prod(shape[1:]))
        step = max(1, chunk_bytes // row_bytes)
        return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]

    @contextmanager
    def _open(self, name: str):
        from safetensors import safe_open

        shard = self._shard_path(name)
        try:
            handle = safe_open(str(shard), "pt", device="cpu")
        except FileNotFoundError as error:
            raise CheckpointError(f"shard {shard} listed in the index is missing; re-download it") from error
        except Exception as error:
            raise self._damaged(name, shard, error) from error
        with handle:
            yield handle

    def _read(self, name: str, read):
        try:
            return read()
        except Exception as error:
            raise self._damaged(name, self.directory / self.file_of[name], error) from error

    @staticmethod
    def _damaged(name: str, shard: Path, error: Exception) -> CheckpointError:
        return CheckpointError(f"cannot read {name!r} from {shard}: the file is truncated or "
                               f"corrupted ({error}); re-download or re-save it")
