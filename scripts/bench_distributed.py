#!/usr/bin/env python
"""Benchmark: the same prune + MaskLoRA command, then the same retrain command, on 1 process and on
N ranks (torchrun, gloo, CPU), in one run.

Each run is a fresh process (or torchrun launch) with OMP_NUM_THREADS=1 per process, so N ranks use
N cores. For prune it reports the wall time of each, the ratio, each rank's peak host memory (sampled
RSS), the per-block split (pruning vs fitting, from report.json), and checks that the N-rank
checkpoint has the 1-rank zeros with weights within float tolerance (max |Δw|). For retrain
(MaskLoRA on the 1-process pruned checkpoint, `--retrain-steps` steps of `--fit-batch-size`
windows) it reports the training tokens/s of each (report.json's `tokens_per_s`: the median step's, which excludes
start-up and the held-out evaluations), their ratio, the peak memory, and the same comparison.

Without --model it builds bench_prune.py's reference model (a random LLaMA of 8.5 M parameters:
hidden 256, 8 blocks, MLP 688).

    python scripts/bench_distributed.py                       # 1 vs 2 ranks, the defaults below (~10 min)
    python scripts/bench_distributed.py --nsamples 64 --seqlen 128   # shorter windows: scales worse
    python scripts/bench_distributed.py --ranks 4 --steps 100 --fit-batch-size 16
    python scripts/bench_distributed.py --retrain-steps 0          # prune only
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune import build_reference  # noqa: E402


def measure(command: list[str], environment: dict) -> tuple[float, list[int], list[float]]:
    """Run `command`; return wall seconds, and the peak RSS and CPU seconds of each worker process
    (sampled every 50 ms: the CPU time misses at most a worker's last 50 ms).

    CPU seconds per worker show how the work is divided even when other jobs share the cores and
    the wall time cannot."""
    started = time.perf_counter()
    process = psutil.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peaks: dict[int, int] = {}
    cpu: dict[int, float] = {}
    while process.poll() is None:
        try:
            workers = [p for p in process.children(recursive=True) if "reconstruct" in " ".join(p.cmdline())]
            for worker in workers or [process]:
                peaks[worker.pid] = max(peaks.get(worker.pid, 0), worker.memory_info().rss)
                times = worker.cpu_times()
                cpu[worker.pid] = times.user + times.system
        except psutil.Error:
            pass
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    _, stderr = process.communicate()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr.decode()[-3000:]}")
    return elapsed, sorted(peaks.values(), reverse=True), sorted(cpu.values(), reverse=True)


def block_split(out: Path) -> tuple[float, float]:
    report = json.loads((out / "report.json").read_text())
    blocks = report["blocks"]
    total = sum(b["time_s"] for b in blocks)
    fit = sum(b.get("fit_time_s", 0.0) for b in blocks)
    return total - fit, fit


def compare(one_out: Path, many_out: Path) -> tuple[float, bool]:
    """The largest |Δw| between two checkpoints, and whether their zeros are the same."""
    from safetensors.torch import load_file

    largest, same_zeros = 0.0, True
    for shard in sorted(one_out.glob("model-*.safetensors")):
        one, many = load_file(str(shard)), load_file(str(many_out / shard.name))
        for name, tensor in one.items():
            largest = max(largest, float((tensor.float() - many[name].float()).abs().max()))
            same_zeros &= bool(((tensor == 0) == (many[name] == 0)).all())
    return largest, same_zeros


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint (default: the 8.5 M reference LLaMA)")
    parser.add_argument("--calib", default=None)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--method", default="wanda")
    # 128 windows of 512 tokens: real runs use 2048-token windows, at which the correction's work
    # per step that does not shrink with the batch (forming W + s·M⊙BA, the optimizer step) is
    # negligible; on this 8.5 M model at 128 tokens it is not (docs/distributed.md, "Measured").
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--fit-batch-size", type=int, default=8, help="global: windows per step on all ranks")
    parser.add_argument("--retrain-steps", type=int, default=12, help="retrain steps (0: prune only)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-distributed-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model, calib = (Path(args.model), Path(args.calib)) if args.model else build_reference(workdir)
    repository = Path(__file__).resolve().parent.parent
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(repository), os.environ.get("PYTHONPATH", "")])}

    def prune_args(out: Path) -> list[str]:
        return ["prune", str(model), "--out", str(out), "--method", args.method, "--correction", "masklora",
                "--steps", str(args.steps), "--fit-batch-size", str(args.fit_batch_size), "--calib", str(calib),
                "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", "cpu",
                "--overwrite", "--cache-dir", str(workdir / "tokens")]

    # Fill the token cache first, so that neither timed run pays for tokenising.
    subprocess.run([sys.executable, "-m", "reconstruct", *prune_args(workdir / "warm-up"), "--steps", "0"],
                   env=environment, check=True, capture_output=True)

    one_out, many_out = workdir / "one-rank", workdir / f"{args.ranks}-ranks"
    one_time, one_peaks, one_cpu = measure([sys.executable, "-m", "reconstruct", *prune_args(one_out)], environment)
    many_time, many_peaks, many_cpu = measure([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node", str(args.ranks), "-m", "reconstruct",
                                        *prune_args(many_out)], environment)

    largest, same_zeros = compare(one_out, many_out)
    one_prune, one_fit = block_split(one_out)
    many_prune, many_fit = block_split(many_out)
    gib = 2**30
    print(f"model {model.name}, {args.method} + MaskLoRA, {args.nsamples} windows x {args.seqlen} tokens, "
          f"{args.steps} steps of {args.fit_batch_size} windows, 1 thread per process")
    print(f"1 process : {one_time:7.1f} s wall, {one_cpu[0]:.1f} CPU s; blocks: {one_prune:.1f} s outside "
          f"fitting, {one_fit:.1f} s fitting; peak RSS {one_peaks[0] / gib:.2f} GiB")
    print(f"{args.ranks} ranks   : {many_time:7.1f} s wall, CPU s per rank "
          + ", ".join(f"{c:.1f}" for c in many_cpu[:args.ranks])
          + f"; blocks: {many_prune:.1f} s outside fitting, {many_fit:.1f} s fitting; peak RSS per rank "
          + ", ".join(f"{p / gib:.2f}" for p in many_peaks[:args.ranks]) + " GiB")
    print(f"wall-time ratio {many_time / one_time:.2f}; busiest rank's CPU time / 1 process's "
          f"{many_cpu[0] / one_cpu[0]:.2f}; fitting ratio {many_fit / one_fit:.2f}; same zeros: {same_zeros}; "
          f"max |dw| = {largest:.3g}")
    if args.retrain_steps:
        bench_retrain(args, one_out, calib, workdir, environment)
    return 0


def bench_retrain(args, pruned: Path, calib: Path, workdir: Path, environment: dict) -> None:
    """The same `retrain` command (MaskLoRA) on 1 process and on N ranks: training tokens/s."""
    def retrain_args(out: Path) -> list[str]:
        return ["retrain", str(pruned), "--out", str(out), "--params", "masklora", "--data", str(calib),
                "--steps", str(args.retrain_steps), "--batch-size", str(args.fit_batch_size),
                "--seqlen", str(args.seqlen), "--eval-windows", "2", "--save-every", "0", "--device", "cpu",
                "--overwrite", "--cache-dir", str(workdir / "tokens")]

    subprocess.run([sys.executable, "-m", "reconstruct", *retrain_args(workdir / "retrain-warm-up"), "--steps", "1"],
                   env=environment, check=True, capture_output=True)  # fills the token cache
    one_out, many_out = workdir / "retrain-one-rank", workdir / f"retrain-{args.ranks}-ranks"
    one_time, one_peaks, _ = measure([sys.executable, "-m", "reconstruct", *retrain_args(one_out)], environment)
    many_time, many_peaks, _ = measure([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node", str(args.ranks), "-m", "reconstruct",
                                        *retrain_args(many_out)], environment)
    one_rate = json.loads((one_out / "report.json").read_text())["totals"]["tokens_per_s"]
    many_rate = json.loads((many_out / "report.json").read_text())["totals"]["tokens_per_s"]
    largest, same_zeros = compare(one_out, many_out)
    gib = 2**30
    print(f"retrain masklora, {args.retrain_steps} steps of {args.fit_batch_size} windows x {args.seqlen} tokens")
    print(f"1 process : {one_rate:8.0f} tokens/s ({one_time:.1f} s wall); peak RSS {one_peaks[0] / gib:.2f} GiB")
    print(f"{args.ranks} ranks   : {many_rate:8.0f} tokens/s ({many_time:.1f} s wall); peak RSS per rank "
          + ", ".join(f"{p / gib:.2f}" for p in many_peaks[:args.ranks]) + " GiB")
    print(f"tokens/s ratio {many_rate / one_rate:.2f}; same zeros: {same_zeros}; max |dw| = {largest:.3g}")


if __name__ == "__main__":
    sys.exit(main())
