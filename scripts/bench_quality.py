#!/usr/bin/env python
"""Benchmark: held-out perplexity of pruning methods × corrections × sparsities on the testbed model.

Prints (and writes as Markdown) a table with the dense model's perplexity beside every pruned one, and
the wall time of each run. Results are kept in RESULTS.json as they come, so an interrupted benchmark
continues where it stopped. Build the testbed first with `python scripts/make_testbed.py`.

    python scripts/bench_quality.py                                  # the full table
    python scripts/bench_quality.py --methods wanda --sparsities 0.7 --corrections none,masklora
    python scripts/bench_quality.py --methods wanda --sparsities 0.7 --corrections masklora \
        --lr 3e-4,1e-3,3e-3 --steps 100,200                          # the defaults' sweep
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import time
from pathlib import Path

import torch

TESTBED = Path(os.environ.get("RECONSTRUCT_TESTBED", "~/.cache/reconstruct/testbed")).expanduser()
ALL_CORRECTIONS = "none,bias,norm,bias+norm,scalelora,lora-prune,masklora,masklora+norm"


def heldout_perplexity(model_dir: Path, test_file: Path, seqlen: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calib import eval_tokens
    from reconstruct.eval import perplexity

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = eval_tokens(str(test_file), tokenizer, seqlen)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return perplexity(model, tokens, seqlen, batch_size=8)


def cell_key(method, sparsity, correction, lr, steps) -> str:
    return f"{method}|{sparsity}|{correction}|lr={lr}|steps={steps}"


def run_cell(args, model_dir: Path, method: str, sparsity: str, correction: str, lr: float, steps: int) -> dict:
    from reconstruct.api import prune

    out = Path(args.workdir) / "checkpoint"
    pattern = sparsity if ":" in sparsity else None
    started = time.perf_counter()
    report = prune(str(model_dir), str(out), method=method, sparsity=None if pattern else float(sparsity),
                   pattern=pattern, correction=correction, calib=str(args.calib), nsamples=args.nsamples,
                   seqlen=args.seqlen, steps=steps, lr=lr, device=args.device, overwrite=True, seed=args.seed)
    seconds = time.perf_counter() - started
    ppl = heldout_perplexity(out, args.test, args.seqlen)
    shutil.rmtree(out)
    reverted = report["totals"]["reverted_blocks"]
    return {"ppl": ppl, "seconds": seconds, "reverted": reverted}


def render(results: dict, args, methods, sparsities, corrections, lrs, steps_list) -> str:
    lines = [f"Held-out perplexity of the testbed model `{args.model}` (seqlen {args.seqlen}); "
             f"dense: **{results['dense']['ppl']:.2f}**. Calibration: {args.nsamples} × {args.seqlen} tokens "
             f"of `{Path(args.calib).name}`; per-run wall time in brackets (s, CPU).", ""]
    sweep_fit = len(lrs) > 1 or len(steps_list) > 1
    header = ["method", "correction"] + (["lr", "steps"] if sweep_fit else []) + [str(s) for s in sparsities]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for method, correction, lr, steps in itertools.product(methods, corrections, lrs, steps_list):
        row = [method, correction] + ([f"{lr:g}", str(steps)] if sweep_fit else [])
        for sparsity in sparsities:
            cell = results.get(cell_key(method, sparsity, correction, lr, steps))
            if cell is None:
                row.append("")
            elif "error" in cell:
                row.append("n/a")
            else:
                mark = "*" if cell["reverted"] else ""
                row.append(f"{cell['ppl']:.2f}{mark} ({cell['seconds']:.0f})")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "`*`: at least one block's correction was reverted by the never-worse guard. "
              "n/a: the correction does not apply (e.g. bias on a model without biases)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama", help="testbed model name or checkpoint path (default: llama)")
    parser.add_argument("--calib", default=str(TESTBED / "train.txt"))
    parser.add_argument("--test", default=str(TESTBED / "test.txt"))
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--sparsities", default="0.5,0.6,0.7,0.8,2:4")
    parser.add_argument("--corrections", default=ALL_CORRECTIONS)
    parser.add_argument("--lr", default="3e-3", help="comma-separated: several values sweep it")
    parser.add_argument("--steps", default="200", help="comma-separated: several values sweep it")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", default="/tmp/reconstruct-bench-quality")
    parser.add_argument("--results", default=None, help="JSON of finished cells (default: WORKDIR/RESULTS.json)")
    parser.add_argument("--markdown", default=None, help="also write the table here")
    args = parser.parse_args()

    model_dir = Path(args.model).expanduser()
    if not model_dir.exists():
        model_dir = TESTBED / args.model
    if not (model_dir / "config.json").exists():
        raise SystemExit(f"no model at {model_dir}: run `python scripts/make_testbed.py` first")
    args.test, args.calib = Path(args.test), Path(args.calib)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    results_file = Path(args.results or Path(args.workdir) / "RESULTS.json")
    results = json.loads(results_file.read_text()) if results_file.exists() else {}

    methods = args.methods.split(",")
    sparsities = args.sparsities.split(",")
    corrections = args.corrections.split(",")
    lrs = [float(v) for v in args.lr.split(",")]
    steps_list = [int(v) for v in args.steps.split(",")]

    if "dense" not in results:
        results["dense"] = {"ppl": heldout_perplexity(model_dir, args.test, args.seqlen)}
    for method, sparsity, correction, lr, steps in itertools.product(methods, sparsities, corrections, lrs,
                                                                   steps_list):
        key = cell_key(method, sparsity, correction, lr, steps)
        if key in results:
            continue
        try:
            results[key] = run_cell(args, model_dir, method, sparsity, correction, lr, steps)
        except ValueError as error:  # a correction that does not apply to this model
            results[key] = {"error": str(error)}
        print(key, results[key], flush=True)
        results_file.write_text(json.dumps(results, indent=1))
    table = render(results, args, methods, sparsities, corrections, lrs, steps_list)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
