"""Wall time per phase of a run, so that report.json and the progress bar say where the time goes.

A run's phases follow one another, so their times add up to the run's wall time up to the report
(what is left over, a few Python statements between phases, is reported as `other`).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

# The start-up phases, then each block's (in the order they run).
STARTUP_PHASES = ("imports", "open", "calibration", "capture")
BLOCK_PHASES = ("load", "observe", "prune", "fit", "replay", "write")


class PhaseClock:
    """Seconds spent in named phases, summed when a phase is entered more than once.

    On CUDA, kernels run asynchronously: the device is synchronised when a phase ends, so that its
    kernels are charged to the phase that launched them and not to the next one that waits."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def rounded(self) -> dict[str, float]:
        return {name: round(seconds, 3) for name, seconds in self.seconds.items()}


def summary(seconds: dict[str, float], phases=BLOCK_PHASES) -> str:
    """'load 0.1 observe 2.3 … s': the progress bar's postfix for one block."""
    return " ".join(f"{name} {seconds[name]:.1f}" for name in phases if name in seconds) + " s"


def process_age_seconds() -> float:
    """Seconds since this process started: interpreter start-up and imports included. Only
    meaningful for a command-line run, whose process is the run."""
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())
