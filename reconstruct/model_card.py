"""OUT/README.md: the output's model card, in the Hugging Face convention, made from the run's report.

A YAML header the Hub reads (`base_model`, `tags`, `library_name`), then what a reader needs to
reproduce and judge the checkpoint: the command that made it (the command line, or the Python call
with its settings), the method and its target, the sparsity measured per layer, the correction, and
the errors or losses the run measured. Every number is report.json's; the card adds none.

    prune_card(report)     a `reconstruct prune` output
    retrain_card(report)   a `reconstruct retrain` output
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
from collections import defaultdict

TAGS = ("pruned", "sparse", "reconstruct")
# Over this many layers (a 7B model has 224) the per-layer table is folded under a summary by kind
# of linear (q_proj, up_proj, ...), so that the card opens on what matters.
FOLDED_LAYERS = 100
# The LoRA variants, whose rank and alpha a card names (norm and bias training have neither).
LOW_RANK = ("masklora", "scalelora", "lora-prune")


def command_line(argv: list[str]) -> str:
    """The command as typed: `reconstruct` and its arguments, quoted for a POSIX shell."""
    return shlex.join(["reconstruct", *argv])


def python_call(function: str, model, out, settings: dict) -> str:
    """A run started from Python, as the call that started it: `reconstruct.prune('m', 'out', ...)`."""
    arguments = [repr(str(model)), repr(str(out))] + [f"{name}={value!r}" for name, value in settings.items()]
    return f"reconstruct.{function}({', '.join(arguments)})"


def changed_settings(config) -> dict:
    """A settings dataclass's (RunConfig's, RetrainConfig's) fields that differ from their defaults,
    the model and output aside: the call that would make the same run."""
    changed = {}
    for field in dataclasses.fields(config):
        if field.name in ("model", "out"):
            continue
        default = (field.default_factory() if field.default_factory is not dataclasses.MISSING
                   else field.default)
        if getattr(config, field.name) != default:
            changed[field.name] = getattr(config, field.name)
    return changed


# --------------------------------------------------------------------------------------------------
def prune_card(report: dict) -> str:
    config = report["config"]
    target = (report["method"] if report["sparsity"] is None  # masks-from: the mask came with the weights
              else f"{report['method']}, sparsity {report['sparsity']:g}"
              + (f" ({report['pattern']} pattern)" if report.get("pattern") else ""))
    correction = report["correction"]
    if correction and correction != "none":
        alpha = 2 * config["rank"] if config.get("alpha") is None else config["alpha"]
        correction = (f"{correction} fitted per {config['granularity']} towards the "
                      f"{_fit_target(config)} outputs: rank {config['rank']}, alpha {alpha:g}, "
                      f"{config['steps']} steps at lr {config['lr']:g}; merged only where the held-out "
                      "output error does not increase")
    else:
        correction = "none (pruned only)"
    totals = report["totals"]
    lines = [*_header(report["model"]),
             f"# {report['model']}, pruned: {target}", "",
             f"Pruned block by block with `reconstruct prune` (reconstruct {_version(report)}).", "",
             *_command(report["invocation"]),
             "## Method", "",
             "| | |", "|---|---|",
             f"| pruning | {target} |",
             f"| correction | {correction} |",
             f"| calibration | {config['calib']}: {config['nsamples']} windows of {config['seqlen']} tokens, "
             f"seed {config['seed']} |", "",
             "## Results", "",
             f"Sparsity of the pruned linear layers: **{totals['pruned_sparsity']:.4f}**. "
             f"Wall time {totals['wall_time_s']:.1f} s.", ""]
    blocks = [block for block in report["blocks"] if "heldout_before" in block]
    if blocks:
        reverted = totals["reverted_blocks"]
        lines += ["Relative output error of each block on held-out calibration windows, before and after "
                  "the correction (" + (f"reverted, as worse: blocks {reverted}" if reverted
                                        else "every block's correction was merged") + "):", "",
                  "| block | held-out error before | after | merged |", "|---|---|---|---|",
                  *(f"| {b['index']} | {b['heldout_before']:.6g} | {b['heldout_after']:.6g} | "
                    f"{'yes' if b['merged'] else 'no'} |" for b in blocks), ""]
    rows = [[layer["name"], "×".join(map(str, layer["shape"])), f"{layer['sparsity']:.4f}",
             "" if layer.get("rel_error") is None else f"{layer['rel_error']:.6g}"] for layer in report["layers"]]
    lines += _layer_table("Per linear layer: its sparsity, and the relative output error against the dense "
                          f"layer on the first {config['error_windows']} calibration windows (empty: not measured).",
                          ["layer", "shape", "sparsity", "output error"], rows,
                          {"sparsity": [layer["sparsity"] for layer in report["layers"]]})
    return "\n".join(lines) + "\n"


def retrain_card(report: dict) -> str:
    config, totals = report["config"], report["totals"]
    params = report["params"]
    trains = params
    if any(part in LOW_RANK for part in params.split("+")):
        alpha = 2 * config["rank"] if config.get("alpha") is None else config["alpha"]
        trains += f" (rank {config['rank']}, alpha {alpha:g})"
    verdict = ("merged: no worse than the input" if report["merged"]
               else "NOT merged: worse than the input, whose weights were written unchanged")
    lines = [*_header(report["model"]),
             f"# {report['model']}, retrained: {params}", "",
             f"Retrained globally with `reconstruct retrain` (reconstruct {_version(report)}): the next-token "
             "loss, a small trainable subset, every zero of the input kept exactly.", "",
             *_command(report["invocation"]),
             "## Method", "",
             "| | |", "|---|---|",
             f"| trained | {trains}: {report['trainable_params']:,} parameters, "
             f"{100 * report['trainable_fraction']:.3f}% of the model |",
             f"| sparsity | the input's zeros, kept: {totals['sparsity_before']:.4f} before, "
             f"{totals['sparsity_after']:.4f} after |",
             f"| training | {config['data']}: {config['steps']} steps of {config['batch_size']} windows of "
             f"{config['seqlen']} tokens ({report['tokens_trained']:,} tokens), lr {config['lr']:g}, "
             f"seed {config['seed']} |"]
    if config.get("teacher"):
        lines.append(f"| distillation | KL to {config['teacher']}, weight {config['distill']:g} |")
    lines += ["", "## Results", "",
              f"Held-out loss (validation windows never trained on): **{report['heldout_before']:.4f} → "
              f"{report['heldout_after']:.4f}** (perplexity {_perplexity(report['heldout_before'])} → "
              f"{_perplexity(report['heldout_after'])}); {verdict}. "
              + (f"{report['kept_weights_rounded_to_zero']} kept weights that the merge rounded to zero were "
                 "set to the dtype's smallest subnormal, so that the zero set stays the input's. "
                 if report.get("kept_weights_rounded_to_zero") else "")
              + f"Wall time {totals['wall_time_s']:.1f} s.", "",
              "| step | held-out loss | perplexity |", "|---|---|---|",
              *(f"| {step} | {loss:.4f} | {_perplexity(loss)} |" for step, loss in report["heldout_loss"]), ""]
    rows = [[layer["name"], "×".join(map(str, layer["shape"])), f"{layer['sparsity_before']:.4f}",
             f"{layer['sparsity_after']:.4f}"] for layer in report["layers"]]
    lines += _layer_table("Per linear layer: its sparsity before and after.",
                          ["layer", "shape", "sparsity before", "after"], rows,
                          {"sparsity": [layer["sparsity_after"] for layer in report["layers"]]})
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
def _header(base_model: str) -> list[str]:
    # JSON's quoted string is also YAML's, whatever the path holds (a colon, a #)
    return ["---", f"base_model: {json.dumps(str(base_model))}", "tags:", *(f"- {tag}" for tag in TAGS),
            "library_name: transformers", "---", ""]


def _command(invocation: str) -> list[str]:
    return ["## How it was made", "", "```", invocation, "```", ""]


def _version(report: dict) -> str:
    return report.get("versions", {}).get("reconstruct", "?")


def _fit_target(config: dict) -> str:
    target = config.get("target") or ("dense" if config["granularity"] == "block" else "sparse-inputs")
    return {"dense": "dense model's", "sparse-inputs": "dense block's, on the pruned model's inputs,",
            "mix": "midpoint of the dense model's and the dense block's", "none": "dense model's (no error "
            "propagation)"}.get(target, target)


def _perplexity(loss: float) -> str:
    return f"{math.exp(loss):.2f}" if math.isfinite(loss) and loss < 700 else "inf"


def _layer_table(caption: str, columns: list[str], rows: list[list[str]], values: dict[str, list[float]]) -> list[str]:
    table = [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns),
             *(f"| {' | '.join(row)} |" for row in rows)]
    if len(rows) <= FOLDED_LAYERS:
        return [caption, "", *table, ""]
    # Summarised by kind of linear: the name without its block number (model.layers.3.mlp.up_proj -> mlp.up_proj)
    by_kind = defaultdict(list)
    for row, value in zip(rows, values["sparsity"]):
        by_kind[re.sub(r"^.*?\.\d+\.", "", row[0])].append(value)
    summary = ["| linear | layers | sparsity min | mean | max |", "|---|---|---|---|---|",
               *(f"| {kind} | {len(v)} | {min(v):.4f} | {sum(v) / len(v):.4f} | {max(v):.4f} |"
                 for kind, v in by_kind.items())]
    return ["Sparsity by kind of linear layer, over the blocks:", "", *summary, "",
            "<details>", f"<summary>{caption} ({len(rows)} layers)</summary>", "", *table, "", "</details>", ""]
