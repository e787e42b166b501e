"""What a run reports: each linear's output error (`LayerErrorMeter`), report.json's per-layer and
per-block entries, the progress bar's line for a block, and the final report.

The per-layer and per-block entries are kept in the resume point (state.py) as each block finishes,
so a resumed run's report covers the blocks that an earlier process did.
"""
from __future__ import annotations

import math
import sys

import torch
from torch import nn

from .. import distributed
from ..fit import FitReport
from ..memory import peak_rss_bytes
from ..tensors import zero_count
from ..timing import BLOCK_PHASES, STARTUP_PHASES, PhaseClock, summary
from ..versions import package_versions


class LayerErrorMeter:
    """Forward hooks measuring each linear's relative output error against its dense weights, on the
    first `windows` calibration windows replayed (0: not measured).

    A sample is enough for a report, and measuring costs one more matmul per linear on the sampled
    tokens (as much as replaying them): with all windows it made the replay twice as long.
    `dense_rows(name)` yields (rows, dense weight of those rows) pieces: the dense weights are read
    back from the checkpoint a few MB at a time rather than kept as a copy of the whole block.
    """

    def __init__(self, linears: dict[str, nn.Linear], dense_rows, windows: int):
        self.linears, self.dense_rows = linears, dense_rows
        self.windows = windows
        self.error = dict.fromkeys(linears, 0.0)
        self.reference = dict.fromkeys(linears, 0.0)
        self.batch_windows = 0      # windows in the batch being replayed
        self.measured_windows = 0   # how many of them, from its first, are measured
        self._handles = []

    @classmethod
    def for_block(cls, adapter, block_name: str, linears: dict[str, nn.Linear], windows: int,
                  device: torch.device) -> "LayerErrorMeter":
        """A meter reading the dense weights of `block_name`'s linears from `adapter`'s checkpoint."""
        # Small pieces on the CPU (host memory is the limit there), larger ones for an accelerator
        # (fewer host-to-device copies).
        piece = 2**20 if device.type == "cpu" else 16 * 2**20
        return cls(linears, lambda linear: adapter.dense_rows(f"{block_name}.{linear}", chunk_bytes=piece), windows)

    def __enter__(self):
        if self.windows:
            for name, linear in self.linears.items():
                self._handles.append(linear.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()

    def batch(self, start: int, stop: int) -> None:
        """Tell the meter that windows start:stop are replayed next."""
        self.batch_windows = stop - start
        self.measured_windows = max(0, min(stop, self.windows) - start)

    def _hook(self, name):
        def hook(module, args, output):
            if not self.measured_windows:
                return
            x = args[0]
            if x.dim() >= 3 and x.shape[0] == self.batch_windows:  # [windows, tokens, in]: the sample
                x, output = x[:self.measured_windows], output[:self.measured_windows]
            # (A mixture-of-experts expert sees the tokens routed to it, [tokens, in]: all of them.)
            # One matmul with the weight change gives the output change: X·(W_dense − W)ᵀ.
            for rows, dense_weight in self.dense_rows(name):
                change = nn.functional.linear(x, (dense_weight.to(module.weight.device) - module.weight[rows])
                                              .to(x.dtype)).float()
                self.error[name] += float(change.pow(2).sum())
                self.reference[name] += float((output[..., rows].float() + change).pow(2).sum())
        return hook

    def relative(self, name: str) -> float | None:
        """‖ΔY‖²/‖Y_dense‖² of the sample; None when not measured, NaN for an all-zero output."""
        if not self.windows:
            return None
        return self.error[name] / self.reference[name] if self.reference[name] > 0 else float("nan")

    def sum_across_ranks(self) -> None:
        """The sample windows may lie on several ranks: sum their errors (in the linears' order)."""
        names = list(self.linears)
        sums = distributed.sum_floats([self.error[n] for n in names] + [self.reference[n] for n in names],
                                      "summing per-layer errors")
        self.error, self.reference = dict(zip(names, sums[:len(names)])), dict(zip(names, sums[len(names):]))


# --------------------------------------------------------------------------------------------------
# A block's entries
def layer_entries(index: int, block_name: str, linears: dict[str, nn.Linear], meter: LayerErrorMeter,
                  notes: dict[str, str]) -> list[dict]:
    """report.json's `layers` entries of block `index`: each linear's shape, sparsity and error."""
    entries = []
    for name, linear in linears.items():
        weight = linear.weight.detach()
        entries.append({"block": index, "name": f"{block_name}.{name}",
                        "shape": list(weight.shape),
                        "sparsity": zero_count(weight) / weight.numel(),
                        "rel_error": meter.relative(name), **({"note": notes[name]} if name in notes else {})})
    return entries


def block_entry(index: int, fit_reports: list[tuple[str, FitReport]]) -> dict:
    """report.json's `blocks` entry of block `index`: what the correction did to each unit."""
    entry = {"index": index}
    if fit_reports:
        entry["units"] = [{"unit": unit, **report.as_dict()} for unit, report in fit_reports]
        entry["merged"] = all(r.merged for _, r in fit_reports)
        entry["error_before"] = _mean(r.error_before for _, r in fit_reports)
        entry["error_after"] = _mean(r.error_after for _, r in fit_reports)
        entry["heldout_before"] = _mean(r.heldout_before for _, r in fit_reports)
        entry["heldout_after"] = _mean(r.heldout_after for _, r in fit_reports)
        entry["trainable_params"] = sum(r.trainable_params for _, r in fit_reports)
        entry["fit_time_s"] = round(sum(r.fit_time_s for _, r in fit_reports), 3)
    return entry


def block_times(clock: PhaseClock) -> dict:
    return {"time_s": round(sum(clock.seconds.values()), 3), "phases_s": clock.rounded()}


def block_summary(entry: dict, layers: list[dict]) -> str:
    """The progress line's summary of a finished block: its sparsity and mean per-layer output error
    (its `layers` entries), what the correction did, and where the block's time went."""
    weights = sum(math.prod(layer["shape"]) for layer in layers)
    zeros = sum(layer["sparsity"] * math.prod(layer["shape"]) for layer in layers)
    parts = [f"sparsity {zeros / max(1, weights):.3f}"]
    errors = [layer["rel_error"] for layer in layers if layer.get("rel_error") is not None]
    if errors:
        parts.append(f"mean layer error {sum(errors) / len(errors):.4g}")
    if "heldout_before" in entry:
        verdict = "merged" if entry["merged"] else "reverted"
        parts.append(f"held-out error {entry['heldout_before']:.4f} -> {entry['heldout_after']:.4f} ({verdict})")
    return f"{', '.join(parts)}; {summary(entry['phases_s'], BLOCK_PHASES)}"


# --------------------------------------------------------------------------------------------------
# The run's report
def final_report(config, layers: list[dict], blocks: list[dict], clock: PhaseClock, wall: float,
                 invocation: str) -> dict:
    """report.json: the settings, versions, totals and every layer's and block's entry. `clock`: the
    run's phases, on the device whose peak memory is reported; `wall`: the run's seconds so far;
    `invocation`: the command line or Python call that started the run."""
    total = sum(math.prod(e["shape"]) for e in layers)
    zeros = sum(e["sparsity"] * math.prod(e["shape"]) for e in layers)
    peak_device = (torch.cuda.max_memory_allocated(clock.device) if clock.device.type == "cuda" else 0)
    return {
        "model": config.model,
        "method": f"masks-from {config.masks_from}" if config.masks_from else config.method,
        "sparsity": None if config.masks_from else config.effective_sparsity,
        "world_size": distributed.world_size(),
        "pattern": config.pattern, "correction": config.correction,
        "config": {k: v for k, v in vars(config).items()},
        "command": " ".join(sys.argv),
        "invocation": invocation,
        "versions": package_versions(),
        "totals": {"wall_time_s": round(wall, 3), "phases_s": run_phases(clock, wall),
                   "peak_host_rss_bytes": peak_rss_bytes(), "peak_device_bytes": peak_device,
                   "pruned_sparsity": zeros / total if total else 0.0,
                   "reverted_blocks": [b["index"] for b in blocks if b.get("merged") is False]},
        "layers": layers,
        "blocks": blocks,
    }


def run_phases(clock: PhaseClock, wall: float) -> dict[str, float]:
    """The run's seconds per phase: start-up, the blocks' phases summed, and `other`, the time
    between phases, so that they add up to the wall time. A resumed run counts only the blocks
    this process did."""
    seconds = clock.seconds
    phases = {name: seconds.get(name, 0.0) for name in STARTUP_PHASES + BLOCK_PHASES}
    phases["other"] = max(0.0, wall - sum(phases.values()))
    return {name: round(value, 3) for name, value in phases.items()}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
