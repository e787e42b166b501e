"""Host memory: what the process has used at most, and keeping the C allocator from holding on to
memory that the run has freed (every block allocates and frees its weights); and the error a run
raises when the device's memory ran out and nothing it could do itself helped."""
from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM where there is one, not ru_maxrss, which a
    process started by fork and exec inherits from its parent (a run launched by a process holding
    several GB would report those)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# Allocations above this size get their own mapping and go back to the system when freed.
MMAP_THRESHOLD_BYTES = 4 * 2**20
# Retraining on the CPU, where the host is the device: a step's activations (one window's are 1 MiB
# per hidden-size tensor at 256 tokens of a 1B model) and the temporaries between them come and go on
# the heap, which they fragment: a 1B model's forward pass raised resident memory by 690 MiB for 336
# MiB of saved activations (step peak 2.73 GiB); with them mapped and unmapped, the peak is 2.53 GiB
# in the same time (docs/memory.md): zeroing fresh pages costs little beside a CPU's matrix products.
ACTIVATION_MMAP_THRESHOLD_BYTES = 512 * 2**10


def limit_heap_fragmentation(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> None:
    """Keep glibc from serving block-sized tensors from its heap, where freed memory stays resident.

    glibc raises its mmap threshold (up to 32 MiB) each time a large allocation is freed, after which
    weight-sized tensors come from the heap; a heap fragmented by a block's many tensors is rarely
    returned to the system, and resident memory then grows with every block (2.0 GiB instead of
    0.8 GiB for a 1B model). Fixing the threshold turns that off. At 4 MiB rather than glibc's
    128 KiB default the peak is the same (0.77 GiB on the 1B benchmark) while small per-batch
    tensors still come from the heap: mapping and zeroing each of them cost 6 s of system time in
    a 20 s prune of the 8.5 M reference model (4 s at 4 MiB, 1 s without the fix but 0.9 GiB peak).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-3, threshold_bytes)  # M_MMAP_THRESHOLD; a no-op outside glibc
    except (OSError, AttributeError):
        pass


def default_activation_budget() -> int:
    import psutil

    return int(psutil.virtual_memory().available * 0.5)


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim), after a block is done.

    Tensors under the mmap threshold come from the heap; after a block, freed ones leave pages that
    glibc keeps (about 10-20 MB on a 1B model's blocks), and the next block's peak would sit on top.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class DeviceMemoryError(RuntimeError):
    """The device ran out of memory, and the run could not lower its own need any further: the
    message names the settings that would (one line from the command, no traceback)."""
