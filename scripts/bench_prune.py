#!/usr/bin/env python
"""Benchmark: wall time, CPU time and peak host memory of pruning one model, side by side.

Each run is a fresh process with OMP_NUM_THREADS fixed, so imports and peak memory are its own:

* ours: `python -m reconstruct prune … --correction none`;
* the floor: `scripts/floor_two_passes.py`, two bare forward passes over every block (what any
  sequential pruner must do at least), imports and model loading included;
* with `--anchor PYTHON`: llm-compressor's one-shot pruning (`scripts/anchor_llmcompressor.py`) run
  by another interpreter, the one of a virtual environment where llm-compressor is installed (it
  needs another torch than ours).

* with `--baseline DIR`: the same command run from another checkout of reconstruct (before a change).

All calibrate on the same token windows, in the same order, with the same batch size. The runs
alternate (baseline, ours, anchor, floor, then again: a machine whose load changes affects all
alike) and the table gives medians over `--repeats`; the ratios are medians of the per-round ratios.
CPU time is user + system of the child process (os.wait4), a steadier measure than wall time on a
shared machine. Without --model it builds the reference model of issue 12: a random LLaMA of about
8.5 M parameters (hidden 256, 8 blocks, MLP 688, vocabulary 4096), calibrated on 128 windows of 256
tokens.

    python scripts/bench_prune.py                                     # ours and the floor
    python scripts/bench_prune.py --anchor /work/venv-llmc/bin/python --methods wanda,sparsegpt
    python scripts/bench_prune.py --model /tmp/perf-1b/llama-1b --nsamples 16 --seqlen 128 \
        --anchor /work/venv-llmc/bin/python --methods wanda
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

SCRIPTS = Path(__file__).resolve().parent
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


def write_windows(model: Path, calib: Path, args, workdir: Path) -> Path:
    """The calibration windows reconstruct will use (same source, tokenizer, seed, cache), saved for
    the floor and the anchor."""
    import calib as calibration
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    windows = calibration.calibration_windows(str(calib), AutoTokenizer.from_pretrained(model), args.nsamples,
                                              args.seqlen, seed=0, cache_dir=workdir / "tokens")
    path = workdir / f"windows-{args.nsamples}x{args.seqlen}.safetensors"
    save_file({"input_ids": windows.contiguous()}, str(path))
    return path


def measure(command: list[str], threads: int, log: Path, pythonpath: str | None = None) -> dict:
    """Run `command` as a child process: its wall time, CPU time (user + system) and peak RSS."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if pythonpath:
        environment["PYTHONPATH"] = pythonpath
    started = time.perf_counter()
    with open(log, "w") as output:
        # Run from the log's directory: `python -m` puts the working directory first on sys.path, and
        # a checkout there would shadow the one PYTHONPATH names.
        process = subprocess.Popen(command, env=environment, stdout=output, stderr=subprocess.STDOUT, cwd=log.parent)
        watched, peak_rss = psutil.Process(process.pid), 0
        while True:
            # wait4 reaps the child and returns its own resource usage (CPU time, high-water RSS).
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            try:
                peak_rss = max(peak_rss, watched.memory_info().rss)
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    wall = time.perf_counter() - started
    if process.returncode:
        raise SystemExit(f"{command[:3]} failed (exit {process.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_gib": max(peak_rss, usage.ru_maxrss * 1024) / 2**30}


def ours_command(model, calib, method, args, workdir) -> list[str]:
    return [sys.executable, "-m", "reconstruct", "prune", str(model), "--out", str(workdir / f"out-{method}"),
            "--method", method, "--sparsity", str(args.sparsity), "--calib", str(calib),
            "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--correction", "none",
            "--batch-size", str(args.batch_size), "--device", "cpu", "--overwrite",
            "--cache-dir", str(workdir / "tokens")]


def anchor_command(model, windows, method, args, workdir) -> list[str]:
    return [args.anchor, str(SCRIPTS / "anchor_llmcompressor.py"), str(model), str(windows),
            str(workdir / f"anchor-{method}"), "--method", method, "--sparsity", str(args.sparsity),
            "--batch-size", str(args.batch_size)]


def floor_command(model, windows, args) -> list[str]:
    return [sys.executable, str(SCRIPTS / "floor_two_passes.py"), str(model), str(windows),
            "--batch-size", str(args.batch_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint to prune (default: the 8.5 M reference LLaMA)")
    parser.add_argument("--calib", default=None, help="calibration file (default: generated sample text)")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass, for all runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (ours, anchor, floor)")
    parser.add_argument("--anchor", default=None, metavar="PYTHON",
                        help="interpreter of an environment with llm-compressor installed")
    parser.add_argument("--baseline", default=None, metavar="DIR",
                        help="another checkout of reconstruct (e.g. `git archive main`), run in turn with "
                        "this one as `baseline`: before/after a change in the same rounds")
    parser.add_argument("--no-floor", action="store_true", help="do not time the two bare passes")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    if args.anchor and not Path(args.anchor).exists():
        parser.error(f"--anchor {args.anchor}: no such interpreter")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-prune-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model, calib = build_reference(workdir) if not args.model else (None, None)
    model = Path(args.model).expanduser() if args.model else model
    calib = Path(args.calib).expanduser() if args.calib else calib
    if calib is None:
        from reconstruct.tiny import write_sample_text
        calib = write_sample_text(workdir / "calib.txt", repeats=400)
    windows = write_windows(model, calib, args, workdir)

    print(f"model {model}, calibration {args.nsamples} x {args.seqlen} from {calib}, batch {args.batch_size}, "
          f"{args.threads} thread(s), {args.repeats} rounds, load average at start "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    results = {}
    for method in args.methods.split(","):
        runs = {"ours": [], "baseline": [], "anchor": [], "floor": []}
        phases = []
        for round_ in range(args.repeats):
            if args.baseline:
                runs["baseline"].append(measure(ours_command(model, calib, method, args, workdir), args.threads,
                                                workdir / f"log-baseline-{method}-{round_}.txt", args.baseline))
            runs["ours"].append(measure(ours_command(model, calib, method, args, workdir), args.threads,
                                        workdir / f"log-ours-{method}-{round_}.txt"))
            report = json.loads((workdir / f"out-{method}" / "report.json").read_text())
            phases.append(report["totals"]["phases_s"])
            if args.anchor:
                runs["anchor"].append(measure(anchor_command(model, windows, method, args, workdir), args.threads,
                                              workdir / f"log-anchor-{method}-{round_}.txt"))
            if not args.no_floor:
                runs["floor"].append(measure(floor_command(model, windows, args), args.threads,
                                             workdir / f"log-floor-{method}-{round_}.txt"))
            print(f"  {method} round {round_ + 1}: " + ", ".join(
                f"{who} {r[-1]['wall_s']:.1f} s wall {r[-1]['cpu_s']:.1f} s CPU" for who, r in runs.items() if r),
                flush=True)
        results[method] = {"runs": runs, "phases": phases}
        print_method(method, runs, phases)
    (workdir / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"\nraw results: {workdir / 'results.json'}; load average at the end "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def print_method(method: str, runs: dict, phases: list[dict]) -> None:
    print(f"\n### {method}\n")
    print("| run | wall s (median) | CPU s (median) | peak RSS GiB (max) |")
    print("|---|---|---|---|")
    for who, measured in runs.items():
        if measured:
            print(f"| {who} | {median(measured, 'wall_s'):.2f} | {median(measured, 'cpu_s'):.2f} | "
                  f"{max(r['peak_rss_gib'] for r in measured):.3f} |")
    for other in ("baseline", "anchor", "floor"):
        if runs[other]:
            wall = statistics.median(a["wall_s"] / b["wall_s"] for a, b in zip(runs["ours"], runs[other]))
            cpu = statistics.median(a["cpu_s"] / b["cpu_s"] for a, b in zip(runs["ours"], runs[other]))
            print(f"\nours / {other}: wall {wall:.2f}x, CPU {cpu:.2f}x (medians of the per-round ratios)")
    names = list(phases[0])
    print("\nours per phase (s, median): " + ", ".join(
        f"{name} {statistics.median(p[name] for p in phases):.2f}" for name in names))


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


if __name__ == "__main__":
    main()
