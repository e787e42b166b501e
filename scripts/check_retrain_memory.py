"""`reconstruct retrain` with and without `--offload cpu`: the memory plan's estimate (reconstruct.plan)
beside what the run measured (report.json: torch.cuda.max_memory_allocated, the host's peak RSS).

Each run is `python -m reconstruct retrain` in its own process (MaskLoRA, bf16 weights, one pass per
step: --grad-accum 1, no checkpointing, a state saved on the way so that the saving is measured too),
under a time limit; a run that fails is reported and the next one still runs. gpu_check.sh runs it on
the first blocks of a LLaMA-2-7B-shaped model. On the CPU both runs are made too (a check that the
commands work; --offload cpu has nothing to move there, and the plan does not estimate it):

    python scripts/check_retrain_memory.py MODEL --data TEXT --out-dir DIR --device cuda
    python scripts/check_retrain_memory.py MODEL --data TEXT --out-dir DIR --device cpu --seqlen 64
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def estimate(model: Path, args, offload: str):
    """The plan for these settings (a MemoryPlan), or the reason there is none."""
    import transformers

    from reconstruct.plan import PlanError, PlanSettings, estimate as plan_estimate

    settings = PlanSettings(params=args.params, rank=args.rank, seqlen=args.seqlen, batch_size=args.batch_size,
                            micro_batch=args.batch_size, gradient_checkpointing=False, dtype="bf16",
                            offload="cpu" if offload == "cpu" else None, steps=args.steps, eval_windows=2,
                            device="cuda" if args.device.startswith("cuda") else "cpu")
    try:
        return plan_estimate(transformers.AutoConfig.from_pretrained(model), settings)
    except PlanError as error:
        return str(error)


def run(model: Path, args, offload: str) -> dict | None:
    out = Path(args.out_dir) / f"retrain-offload-{offload}"
    command = [sys.executable, "-m", "reconstruct", "retrain", str(model), "--out", str(out), "--overwrite",
               "--device", args.device, "--dtype", "bf16", "--params", args.params, "--rank", str(args.rank),
               "--data", args.data, "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--eval-every", str(args.steps), "--eval-windows", "2",
               "--save-every", str(max(1, args.steps // 2)), "--offload", offload, "--allow-dense"]
    if args.cache_dir:
        command += ["--cache-dir", args.cache_dir]
    print("$ " + " ".join(command), flush=True)
    try:
        finished = subprocess.run(command, timeout=args.timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        print(f"  --offload {offload}: no result within {args.timeout} s")
        return None
    if finished.returncode != 0:
        print(f"  --offload {offload}: exit {finished.returncode}\n{finished.stderr[-2000:]}")
        return None
    return json.loads((out / "report.json").read_text())


def gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a checkpoint (pruned or, with --allow-dense, dense)")
    parser.add_argument("--data", required=True, help="training text")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--params", default="masklora")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--timeout", type=int, default=60, help="seconds per run")
    args = parser.parse_args()

    offloads = ["none", "cpu"]
    failed = False
    for offload in offloads:
        plan = estimate(args.model, args, offload)
        report = run(args.model, args, offload)
        if isinstance(plan, str):
            print(f"  --offload {offload}: no plan ({plan})")
        else:
            device_moment, device_peak = plan.peak()[0], plan.peak_bytes
            print(f"  --offload {offload}: plan: device {gib(device_peak)} (at {device_moment}), "
                  f"host {gib(plan.host_peak_bytes)}")
        if report is None:
            failed = True
            continue
        totals = report["totals"]
        measured_device, measured_host = totals["peak_device_bytes"], totals["peak_host_rss_bytes"]
        line = (f"  --offload {offload}: measured: device {gib(measured_device)} (max_memory_allocated), host "
                f"{gib(measured_host)} (peak RSS); {totals['wall_time_s']:.1f} s, held-out "
                f"{report['heldout_before']:.4f} -> {report['heldout_after']:.4f}")
        if not isinstance(plan, str) and measured_device:
            line += f"; plan / measured on the device {plan.peak_bytes / measured_device:.2f}"
        print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
