"""The end of a retraining run on paper: report.json's contents and loss.png."""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import torch

from .. import distributed
from ..config import RetrainConfig
from ..memory import peak_rss_bytes
from ..versions import package_versions

log = logging.getLogger(__name__)


def final_report(config: RetrainConfig, verdict: dict, history: dict, shapes: dict[str, list[int]],
                 sparsity_before: dict[str, float], sparsity_after: dict[str, float], *, trainable: int,
                 model_parameters: int, sharded: bool, device: torch.device, wall_time_s: float,
                 invocation: str, memory_plan: dict | None = None) -> dict:
    """The report: the settings and versions, sizes, totals, the never-worse verdict, the loss
    curves, each masked linear's sparsity before and after (by name, in `shapes`' order), and the
    memory plan the run followed (reconstruct.plan.Plan.as_dict)."""
    rates = history["tokens_per_s"]
    peak_device = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    total = sum(math.prod(shape) for shape in shapes.values())
    return {
        "command": "retrain", "model": config.model, "params": config.params,
        "world_size": distributed.world_size(), "fsdp": sharded,
        "config": {**vars(config), "lr": config.learning_rate},
        "argv": " ".join(sys.argv), "invocation": invocation, "versions": package_versions(),
        "trainable_params": trainable, "model_params": model_parameters,
        "trainable_fraction": trainable / model_parameters,
        "tokens_trained": config.steps * config.batch_size * config.seqlen,
        "totals": {"wall_time_s": round(wall_time_s, 3),
                   "tokens_per_s": sorted(rates)[len(rates) // 2] if rates else None,
                   "peak_host_rss_bytes": peak_rss_bytes(), "peak_device_bytes": peak_device,
                   "sparsity_before": sum(sparsity_before[n] * math.prod(shapes[n]) for n in shapes) / total,
                   "sparsity_after": sum(sparsity_after[n] * math.prod(shapes[n]) for n in shapes) / total},
        **verdict,
        "loss_curve": {"step": history["step"], "loss": history["loss"]},
        "heldout_loss": history["heldout"],
        "memory_plan": memory_plan,
        "layers": [{"name": name, "shape": shapes[name], "sparsity_before": sparsity_before[name],
                    "sparsity_after": sparsity_after[name]} for name in shapes],
    }


def plot_losses(report: dict, path: Path) -> None:
    """loss.png: the training loss per step and the held-out loss (needs matplotlib: the `plots` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed, so no loss.png was drawn (pip install 'reconstruct[plots]'); "
                    "the curve is in report.json")
        return
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(report["loss_curve"]["step"], report["loss_curve"]["loss"], lw=0.8, label="training loss")
    if report["heldout_loss"]:
        steps, losses = zip(*report["heldout_loss"])
        axes.plot(steps, losses, "o-", label="held-out loss")
    axes.set_xlabel("step")
    axes.set_ylabel("next-token loss (nats)")
    axes.set_title(f"{Path(report['model']).name}: retrain {report['params']}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
