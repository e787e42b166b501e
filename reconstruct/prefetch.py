"""Reading the next block's weights from disk in a background thread while the current one computes.

The driver asks for block i+1 as soon as block i is loaded; block i+1's tensors are then read while
block i is observed, pruned, fitted and replayed, and its `load` phase only assigns them. On CUDA the
tensors are copied into pinned (page-locked) host memory, from which the copy to the device is a
direct transfer that does not block the host. On the CPU the disk is read in the thread, into the
block's own memory.

The cost is one more block's weights in host memory while they wait, which is why `--prefetch auto`
turns it on only for an accelerator: on the CPU host memory is the limit (docs/memory.md).
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

Tensors = dict[str, torch.Tensor]


class BlockPrefetcher:
    """`start(i)` begins reading block i in the background; `take(i)` waits for it and returns its
    tensors (None if it was never started). A read error is raised by `take`, when the block is
    needed, as it would have been without prefetching."""

    def __init__(self, reader: Callable[[int], Callable[[], Tensors]], pin_memory: bool):
        self.reader = reader          # block index -> a function reading its tensors (thread-safe)
        self.pin_memory = pin_memory
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reconstruct-prefetch")
        self._pending: dict[int, Future] = {}

    def start(self, index: int) -> None:
        if index not in self._pending:
            read = self.reader(index)  # resolved here, in the caller's thread
            self._pending[index] = self._executor.submit(self._read, read)

    def take(self, index: int) -> Tensors | None:
        future = self._pending.pop(index, None)
        return future.result() if future is not None else None

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read(self, read: Callable[[], Tensors]) -> Tensors:
        # The reader reads the files now, into memory of the block's own (CheckpointReader.read).
        if self.pin_memory:
            return {name: tensor.pin_memory() for name, tensor in read().items()}
        return read()
