#!/usr/bin/env python
"""Benchmark: wall time and peak host memory of pruning one model, per method.

Each run is a fresh `python -m reconstruct prune` process (so imports and peak RSS are its own) with
OMP_NUM_THREADS fixed. Without --model it builds the reference model of the issue: a random
LLaMA of about 8.5 M parameters (hidden 256, 8 blocks, MLP 688, vocabulary 4096), calibrated on 128
windows of 256 tokens.

    python scripts/bench_prune.py                        # the reference setting, one thread
    python scripts/bench_prune.py --model ~/.cache/reconstruct/testbed/llama \
        --calib ~/.cache/reconstruct/testbed/train.txt --methods wanda,sparsegpt
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REFERENCE_MODEL = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
                       num_key_value_heads=4, intermediate_size=688, max_position_embeddings=512)


def build_reference(workdir: Path) -> tuple[Path, Path]:
    from reconstruct.tiny import save_tiny_model, write_sample_text

    model = workdir / "llama-8.5m"
    if not (model / "config.json").exists():
        save_tiny_model(model, "llama", **REFERENCE_MODEL)
    text = workdir / "calib.txt"
    if not text.exists():
        write_sample_text(text, repeats=400)
    return model, text


def run_once(model: Path, calib: Path, method: str, args, workdir: Path) -> dict:
    out = workdir / f"out-{method}"
    command = [sys.executable, "-m", "reconstruct", "prune", str(model), "--out", str(out),
               "--method", method, "--sparsity", str(args.sparsity), "--calib", str(calib),
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--correction",
               args.correction, "--device", args.device, "--overwrite", "--cache-dir", str(workdir / "tokens")]
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    started = time.perf_counter()
    process = psutil.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak_rss = 0
    while process.poll() is None:  # sample the child's RSS (the report's own figure is ru_maxrss)
        try:
            peak_rss = max(peak_rss, process.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    stdout, stderr = process.communicate()
    if process.returncode:
        raise SystemExit(f"{method} failed:\n{stderr.decode()[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"method": method, "process_s": elapsed, "engine_s": report["totals"]["wall_time_s"],
            "peak_rss_gib": max(peak_rss, report["totals"]["peak_host_rss_bytes"]) / 2**30,
            "sparsity": report["totals"]["pruned_sparsity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint to prune (default: the 8.5 M reference LLaMA)")
    parser.add_argument("--calib", default=None, help="calibration file (default: generated sample text)")
    parser.add_argument("--methods", default="wanda,sparsegpt,magnitude")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--correction", default="none")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-prune-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model, calib = build_reference(workdir)
    model = Path(args.model).expanduser() if args.model else model
    calib = Path(args.calib).expanduser() if args.calib else calib

    print(f"model {model}, calibration {args.nsamples} x {args.seqlen} from {calib}, "
          f"{args.threads} thread(s), correction {args.correction}")
    print("| method | process wall s | engine wall s | peak RSS GiB | sparsity |")
    print("|---|---|---|---|---|")
    for method in args.methods.split(","):
        r = run_once(model, calib, method, args, workdir)
        print(f"| {r['method']} | {r['process_s']:.2f} | {r['engine_s']:.2f} | {r['peak_rss_gib']:.3f} | "
              f"{r['sparsity']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
