"""Activation stores: the hidden states of every calibration window at one depth of the model.

A store is one tensor of shape [windows, seqlen, hidden], either in host RAM or in a file on disk
mapped into memory (`torch.from_file`), so the rest of the engine sees the same thing either way and
the operating system pages a disk store in and out as batches are read. Batches go to the accelerator
one at a time; nothing here knows about models.
"""
from __future__ import annotations

import errno
import math
import os
from pathlib import Path

import torch

from .checkpoint.writer import fsync_directory


class ActivationStore:
    """Hidden states for `windows` calibration windows, in RAM (`path=None`) or memory-mapped."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, path: Path | None = None):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.path = Path(path) if path else None
        numel = math.prod(self.shape)
        if self.path is None:
            self.data = torch.empty(self.shape, dtype=dtype)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            with open(self.path, "wb") as handle:
                _reserve(handle, nbytes, self.path)
            self.data = torch.from_file(str(self.path), shared=True, size=numel, dtype=dtype).view(self.shape)

    @classmethod
    def open(cls, path: Path, shape, dtype) -> "ActivationStore":
        """Map an existing store file (e.g. the inputs saved for resuming), without copying it."""
        store = cls.__new__(cls)
        store.shape, store.dtype, store.path = tuple(shape), dtype, Path(path)
        expected = math.prod(shape) * dtype.itemsize
        try:
            size = os.path.getsize(path)
        except OSError as error:
            raise _unreadable(path, error) from error
        if size != expected:  # a shorter file would be silently extended with zeros by the mapping
            raise _unreadable(path, f"{size} bytes where {expected} were saved")
        store.data = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=dtype).view(shape)
        return store

    @classmethod
    def load(cls, path: Path, shape, dtype) -> "ActivationStore":
        """Read an existing store file into RAM (the file is left as it is)."""
        store = cls(shape, dtype)
        try:
            with open(path, "rb") as handle:
                for window in range(len(store)):  # straight into the store: no second copy
                    view = store.data[window].view(torch.uint8).numpy()
                    if handle.readinto(memoryview(view).cast("B")) != view.nbytes:
                        raise ValueError("file shorter than the store")
        except (OSError, ValueError) as error:
            raise _unreadable(path, error) from error
        return store

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, windows) -> torch.Tensor:
        return self.data[windows]

    def __setitem__(self, windows, value: torch.Tensor) -> None:
        self.data[windows] = value.to("cpu", self.dtype)

    def gather(self, indices: list[int] | torch.Tensor) -> torch.Tensor:
        return self.data[torch.as_tensor(indices, dtype=torch.long)]

    def save_to(self, destination: Path) -> None:
        """Write the store's contents to `destination` atomically (temporary file, then rename)."""
        temporary = destination.with_suffix(destination.suffix + ".tmp")
        try:
            with open(temporary, "wb") as handle:
                for window in range(len(self)):  # one window at a time: no second copy of the store
                    handle.write(memoryview(self.data[window].contiguous().view(torch.uint8).numpy()))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, destination)
            fsync_directory(destination.parent)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            if error.errno == errno.ENOSPC:
                raise _no_space(destination) from error
            raise

    def delete(self) -> None:
        self.data = None
        if self.path is not None and self.path.exists():
            self.path.unlink()


def _reserve(handle, nbytes: int, path: Path) -> None:
    """Allocate a store file's blocks now: a memory-mapped write that a full disk cannot back kills
    the process with SIGBUS, where an allocation up front fails with ENOSPC."""
    if nbytes and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(handle.fileno(), 0, nbytes)
            return
        except OSError as error:
            if error.errno == errno.ENOSPC:
                path.unlink(missing_ok=True)
                raise _no_space(path) from error
            # Not supported by this file system: a sparse file, as without posix_fallocate.
    handle.truncate(nbytes)


def _unreadable(path: Path, reason) -> OSError:
    """A saved store that cannot be read back (truncated, missing), as the run's OutputError."""
    from .checkpoint import OutputError

    return OutputError(f"cannot read the saved activations {path} ({reason}); rerun without --resume to "
                       "start over")


def _no_space(path: Path) -> OSError:
    """A full disk, as the run's OutputError: what to do, and that finished blocks are kept."""
    from .checkpoint import OutputError

    return OutputError(errno.ENOSPC, f"no space left on the device for the activations {path.name} in "
                       f"{path.parent}; free some space (or use --offload-activations ram) and rerun the "
                       "same command with --resume: the blocks already finished are kept")


def bytes_per_store(windows: int, seqlen: int, hidden: int, dtype: torch.dtype) -> int:
    return windows * seqlen * hidden * torch.empty((), dtype=dtype).element_size()


class StoreFactory:
    """Makes stores in RAM or on disk, by a memory budget for the stores alive at the same time."""

    def __init__(self, mode: str, directory: Path, budget_bytes: int | None, streams: int):
        if mode not in ("auto", "ram", "disk"):
            raise ValueError(f"offload_activations must be auto, ram or disk, not {mode!r}")
        self.mode = mode
        self.directory = Path(directory)
        self.budget_bytes = budget_bytes
        self.streams = streams  # how many stores of full size live at once (inputs, targets, outputs, …)

    def choose(self, shape, dtype) -> str:
        if self.mode != "auto":
            return self.mode
        need = bytes_per_store(*shape, dtype) * self.streams
        return "disk" if self.budget_bytes is not None and need > self.budget_bytes else "ram"

    def create(self, name: str, shape, dtype) -> ActivationStore:
        where = self.choose(shape, dtype)
        return ActivationStore(shape, dtype, self.directory / f"{name}.bin" if where == "disk" else None)

    def open(self, path: Path, shape, dtype) -> ActivationStore:
        """A saved store (a resume point): read into RAM, or mapped from its file, by the same rule
        as new stores. Only a RAM copy may be overwritten (the driver writes a block's outputs over
        its inputs when they are in RAM)."""
        if self.choose(shape, dtype) == "ram":
            return ActivationStore.load(path, shape, dtype)
        return ActivationStore.open(path, shape, dtype)
