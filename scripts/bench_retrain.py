#!/usr/bin/env python
"""Benchmark of global retraining (`reconstruct retrain`) on the testbed models.

quality: prune each testbed model (magnitude 50%, Wanda 70%), retrain it with each trainable subset
    and report held-out perplexity beside dense, the pruned model and the layer-wise default
    (`reconstruct prune` with its default correction). Defaults: 290 steps x 8 windows x 256
    tokens = 593,920 training tokens (the issue's budget is 600k), each subset at its default
    learning rate. Results are kept in RESULTS.json as they come: an interrupted run continues.
speed: tokens/s side by side in one run, each configuration in its own process (so peak memory is
    its own): ours are the real `reconstruct retrain` command on a magnitude-50% copy of the model
    (tokens/s and peak memory from its report.json), against plain PEFT LoRA (same rank, model,
    batch, a training loop of its own: the baseline), norm against full, each with and without
    gradient checkpointing.

Quality results are cached in RESULTS.json under keys that name every setting (steps, batch,
seqlen, device) and the code's version (git commit, marked dirty when the tree has changes), so a
number from other settings or other code is never reused.

    python scripts/make_testbed.py                      # once: the testbed models
    python scripts/bench_retrain.py quality --markdown docs/retrain-quality.md
    python scripts/bench_retrain.py speed               # needs peft (pip install peft)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import TESTBED, heldout_perplexity  # noqa: E402

# "dense" retrains the unpruned model the same way: the control that shows what more training on
# this data does by itself (the testbed models are small and not trained to convergence).
PRUNINGS = {"magnitude0.5": ("magnitude", 0.5), "wanda0.7": ("wanda", 0.7), "dense": (None, 0.0)}
# family:pruning:params[:lr]; most important first (an interrupted run keeps what it finished).
DEFAULT_CELLS = ("llama:wanda0.7:masklora llama:wanda0.7:norm llama:wanda0.7:full llama:magnitude0.5:norm "
                 "llama:magnitude0.5:masklora opt:magnitude0.5:bias+norm opt:magnitude0.5:norm "
                 "opt:wanda0.7:masklora opt:wanda0.7:bias+norm opt:wanda0.7:full llama:magnitude0.5:full "
                 "opt:magnitude0.5:masklora")
LR_SWEEP = ("llama:wanda0.7:masklora:3e-3 llama:wanda0.7:masklora:3e-4 llama:wanda0.7:norm:3e-3 "
            "llama:wanda0.7:norm:3e-2 llama:wanda0.7:full:3e-4 llama:wanda0.7:full:3e-5")


def code_version() -> str:
    """The commit the benchmark runs (with "+dirty" when the tree has changes), else the package's."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        from reconstruct.versions import __version__

        return __version__


# --------------------------------------------------------------------------------------------------
# Quality
def quality(args) -> None:
    from reconstruct.api import prune, retrain
    from reconstruct.config import RETRAIN_DEFAULT_LR

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "RESULTS.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}

    suffix = f"|seqlen={args.seqlen}|device={args.device}|code={code_version()}"

    def record(key, compute):
        key += suffix
        if key not in results:
            started = time.perf_counter()
            results[key] = {**compute(), "seconds": round(time.perf_counter() - started, 1)}
            results_file.write_text(json.dumps(results, indent=1))
            print(key, results[key], flush=True)
        return results[key]

    calib, test = str(TESTBED / "train.txt"), TESTBED / "test.txt"
    for cell in args.cells.split():
        family, pruning, params, *lr = cell.split(":")
        lr = float(lr[0]) if lr else RETRAIN_DEFAULT_LR[params]
        method, sparsity = PRUNINGS[pruning]
        dense = TESTBED / family
        record(f"{family}|dense", lambda: {"ppl": heldout_perplexity(dense, test, args.seqlen)})
        pruned = dense if method is None else work / f"{family}-{pruning}"
        if not (pruned / "config.json").exists():
            prune(str(dense), str(pruned), method=method, sparsity=sparsity, correction="none", calib=calib,
                  nsamples=128, seqlen=args.seqlen, device=args.device, overwrite=True)
        record(f"{family}|{pruning}|pruned", lambda: {"ppl": heldout_perplexity(pruned, test, args.seqlen)})

        def layerwise():
            out = work / "layerwise"
            report = prune(str(dense), str(out), method=method, sparsity=sparsity, calib=calib, nsamples=128,
                           seqlen=args.seqlen, device=args.device, overwrite=True)
            return {"ppl": heldout_perplexity(out, test, args.seqlen), "time_s": report["totals"]["wall_time_s"]}
        if method is not None:
            record(f"{family}|{pruning}|layer-wise default", layerwise)

        def retrained():
            out = work / "retrained"
            report = retrain(str(pruned), str(out), params=params, data=calib, steps=args.steps,
                             batch_size=args.batch_size, seqlen=args.seqlen, lr=lr, device=args.device,
                             overwrite=True, eval_every=args.steps, eval_windows=16, save_every=0,
                             allow_dense=method is None)
            return {"ppl": heldout_perplexity(out, test, args.seqlen), "merged": report["merged"],
                    "lr": lr, "tokens": report["tokens_trained"], "time_s": report["totals"]["wall_time_s"],
                    "tokens_per_s": report["totals"]["tokens_per_s"],
                    "trainable_fraction": report["trainable_fraction"],
                    "sparsity": report["totals"]["sparsity_after"],
                    "heldout_loss": [report["heldout_before"], report["heldout_after"]]}
        record(f"{family}|{pruning}|{params}|lr={lr:g}|steps={args.steps}|batch={args.batch_size}", retrained)
    table = render(results)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


def render(results: dict) -> str:
    """One row per (model, pruning): dense, pruned, layer-wise default, each retrained cell."""
    lines = ["| model | pruning | dense | pruned | cell | ppl | gap closed | lr | trainable | tokens | time (s) |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for key, cell in results.items():
        parts = key.split("|")
        if len(parts) < 3 or parts[2] == "pruned":
            continue
        family, pruning = parts[0], parts[1]
        dense = results[f"{family}|dense"]["ppl"]
        pruned = results.get(f"{family}|{pruning}|pruned", {"ppl": float("nan")})["ppl"]
        name = parts[2] + ("" if cell.get("merged", True) else " (not merged)")
        gap = f"{100 * (pruned - cell['ppl']) / (pruned - dense):.1f}%" if pruning != "dense" else "(control)"
        trained = (f"{cell['lr']:g} | {100 * cell['trainable_fraction']:.3f}% | {cell['tokens']:,}" if "lr" in cell
                   else " | | ")
        lines.append(f"| {family} | {pruning} | {dense:.2f} | {pruned:.2f} | {name} | {cell['ppl']:.2f} | {gap} | "
                     f"{trained} | {cell.get('time_s', cell['seconds']):.0f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Speed: one process per configuration
SPEED_CONFIGS = ["peft-lora", "masklora", "norm", "full", "peft-lora+gc", "masklora+gc", "norm+gc", "full+gc"]


def speed(args) -> None:
    # The configurations take turns (A B C … A B C …) and each keeps its median round, so that a
    # change in the machine's load during the run falls on all of them alike.
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for config in args.configs.split(","):
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            result = subprocess.run([sys.executable, __file__, "speed-worker", "--config", config,
                                     "--model", str(args.model), "--batch-size", str(args.batch_size),
                                     "--seqlen", str(args.seqlen), "--steps", str(args.steps),
                                     "--workdir", str(args.workdir)],
                                    capture_output=True, text=True, env=env)
            if result.returncode:
                raise SystemExit(f"{config} failed:\n{result.stderr[-3000:]}")
            runs.setdefault(config, []).append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(runs[config][-1], flush=True)
    rows = [sorted(results, key=lambda row: row["step_s"])[len(results) // 2] for results in runs.values()]
    by_name = {row["config"]: row for row in rows}
    lines = [f"Training speed on `{Path(args.model).name}` (CPU, {args.threads} thread(s)), batch {args.batch_size} x "
             f"{args.seqlen} tokens, ours: the `reconstruct retrain` command's median tokens/s over "
             f"{args.steps + 2} steps (report.json); PEFT: median of {args.steps} steps after 2 warm-up steps; each "
             f"configuration in its own process, {args.rounds} rounds in turn, the median round kept.", "", "| configuration | tokens/s | step (s) | peak RSS (MiB) | trainable |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['config']} | {row['tokens_per_s']:,.0f} | {row['step_s']:.3f} | "
                     f"{row['peak_rss_mib']:.0f} | {row['trainable']:,} |")
    for ours, anchor in (("masklora", "peft-lora"), ("norm", "full"), ("masklora+gc", "peft-lora+gc")):
        if ours in by_name and anchor in by_name:
            lines.append(f"\n{ours} / {anchor} tokens/s: **{by_name[ours]['tokens_per_s'] / by_name[anchor]['tokens_per_s']:.2f}x**")
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")


def speed_worker(args) -> None:
    """One configuration: ours, the real `reconstruct retrain` command; PEFT LoRA, its own loop."""
    name, _, checkpointing = args.config.partition("+gc")
    if name == "peft-lora":
        return peft_worker(args, bool(checkpointing))
    pruned = Path(args.workdir) / "pruned-magnitude0.5"
    if not (pruned / "config.json").exists():
        run_command(["prune", str(args.model), "--out", str(pruned), "--method", "magnitude", "--sparsity", "0.5",
                     "--correction", "none", "--calib", str(TESTBED / "train.txt"), "--seqlen", str(args.seqlen),
                     "--device", "cpu", "--overwrite"])
    out = Path(args.workdir) / f"retrained-{args.config}"
    # Every step a full batch in one pass (as the PEFT loop), no held-out loss between the steps
    run_command(["retrain", str(pruned), "--out", str(out), "--params", name, "--data", str(TESTBED / "train.txt"),
                 "--steps", str(args.steps + 2), "--batch-size", str(args.batch_size), "--seqlen", str(args.seqlen),
                 "--grad-accum", "1", "--rank", "16", "--eval-every", str(args.steps + 2), "--eval-windows", "2",
                 "--save-every", "0", "--device", "cpu", "--overwrite",
                 "--gradient-checkpointing" if checkpointing else "--no-gradient-checkpointing"])
    report = json.loads((out / "report.json").read_text())
    tokens_per_s = report["totals"]["tokens_per_s"]  # the command's median over its steps
    print(json.dumps({"config": args.config, "step_s": args.batch_size * args.seqlen / tokens_per_s,
                      "tokens_per_s": tokens_per_s, "peak_rss_mib": report["totals"]["peak_host_rss_bytes"] / 2**20,
                      "trainable": report["trainable_params"]}))


def run_command(arguments: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "reconstruct", *arguments], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"reconstruct {arguments[0]} failed:\n{result.stderr[-3000:]}")


def peft_worker(args, checkpointing: bool) -> None:
    """The baseline: plain PEFT LoRA on the same model with half of each block linear zeroed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from reconstruct.memory import peak_rss_bytes
    from reconstruct.retraining.losses import next_token_loss_sum

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    targets = set()
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in module_name:
                weight = module.weight
                weight[weight.abs() <= weight.abs().flatten().kthvalue(weight.numel() // 2).values] = 0
                targets.add(module_name.rsplit(".", 1)[-1])
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=sorted(targets)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seqlen),
                        generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(args.steps + 2):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = next_token_loss_sum(model(input_ids=ids, use_cache=False).logits, ids) / ids[:, 1:].numel()
        loss.backward()
        optimizer.step()
        if step >= 2:
            times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    print(json.dumps({"config": args.config, "step_s": step_s, "tokens_per_s": args.batch_size * args.seqlen / step_s,
                      "peak_rss_mib": peak_rss_bytes() / 2**20, "trainable": sum(p.numel() for p in trainable)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    q = commands.add_parser("quality")
    q.add_argument("--cells", default=DEFAULT_CELLS,
                   help="space-separated family:pruning:params[:lr] (default: the issue's table; "
                   f"the learning-rate sweep of docs/benchmarks.md is: {LR_SWEEP})")
    q.add_argument("--steps", type=int, default=290)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--seqlen", type=int, default=256)
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    q.add_argument("--workdir", default="/tmp/reconstruct-bench-retrain")
    q.add_argument("--markdown", default=None)
    for name in ("speed", "speed-worker"):
        s = commands.add_parser(name)
        s.add_argument("--model", default=str(TESTBED / "llama"))
        s.add_argument("--batch-size", type=int, default=8)
        s.add_argument("--seqlen", type=int, default=256)
        s.add_argument("--steps", type=int, default=8)
        s.add_argument("--threads", type=int, default=1)
        s.add_argument("--rounds", type=int, default=3, help="turns each configuration takes (median kept)")
        s.add_argument("--configs", default=",".join(SPEED_CONFIGS))
        s.add_argument("--config", default="masklora")
        s.add_argument("--markdown", default=None)
        s.add_argument("--workdir", default="/tmp/reconstruct-bench-retrain-speed")
    args = parser.parse_args()
    {"quality": quality, "speed": speed, "speed-worker": speed_worker}[args.command](args)


if __name__ == "__main__":
    main()
