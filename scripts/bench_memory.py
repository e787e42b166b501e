"""Peak host memory of a streamed prune of a ~1B-parameter model, against the checkpoint's size.

    python scripts/bench_memory.py [--workdir /tmp/reconstruct-bench] [--masklora-steps 0]

1. Generates, once, a random LLaMA of ~1B parameters in bf16 (hidden 2048, 16 layers, intermediate
   5632, vocab 32000: 0.95 B parameters, 1.9 GB) as sharded safetensors in WORKDIR/model. Nothing of
   the model is held in memory: the skeleton is built on the `meta` device for the tensors' names and
   shapes, and each shard (one per block, plus embeddings and head) is filled with random values
   and written before the next one is made. The tokenizer is `reconstruct.tiny.tiny_tokenizer()`, a
   byte-level BPE trained on a paragraph: it uses the first few hundred ids of the model's 32000-row
   vocabulary (a padded vocabulary, as many checkpoints have). The model keeps the realistic 32000
   rows so that embeddings and head, which the engine treats specially, have their real size.
2. Prunes it with Wanda at 50 % (16 calibration windows of 128 tokens, correction none) in a child
   process `python -m reconstruct prune ...`, once per --batch-sizes value (default 1 and 8),
   sampling the child's resident memory with psutil every 20 ms; with --masklora-steps N > 0 also
   a run with a MaskLoRA correction fitted N steps.
3. Prints, per run: wall time, peak RSS (sampled, and the child's own high-water mark from
   report.json), the checkpoint's size and the ratio peak RSS / checkpoint size (target <= 0.30),
   and the peak resident memory of a process that only imports the engine and builds the model's
   weightless skeleton (torch, transformers and its model code), which no run can go below. Exits
   with 0 when a Wanda run meets the target. Results are also written to WORKDIR/results-MODEL.json.

Memory does not grow with depth (one block at a time), so the peak of a wide model can be measured
on a few of its blocks: `--layers 4 --full-layers 16` measures 4 blocks and also states the ratio
for the 16-block checkpoint.

`--mode retrain` measures `reconstruct retrain` instead, which holds the whole model:

    python scripts/bench_memory.py --mode retrain                       # masklora, 1 step of 1 x 256 tokens
    python scripts/bench_memory.py --mode retrain --params masklora,norm,full --checkpointing off,on

The model is magnitude-pruned to 50 % once (`reconstruct prune --correction none`, kept in WORKDIR),
then each run retrains it for --retrain-steps steps of one window of --retrain-seqlen tokens on the
CPU (one held-out window, no training state saved) in a child process, sampled as above. Prints, per
run, the peak RSS against the checkpoint's size (target for masklora <= --retrain-target, 1.5) and
against the memory plan's estimate of the host's peak (report.json's memory_plan; target within 15 %).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 2**30

MODEL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048,
             tie_word_embeddings=False, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)


# --------------------------------------------------------------------------------------------------
# The model, written shard by shard
def make_model(directory: Path, seed: int = 0, **shape) -> Path:
    """Write the random bf16 LLaMA (MODEL, updated by `shape`) to `directory` unless a complete one
    is already there."""
    done = directory / ".complete"
    if done.exists():
        return directory
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from reconstruct.tiny import tiny_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**{**MODEL, **shape}, dtype="bfloat16")
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    specs = {name: (tuple(t.shape), t.dtype) for name, t in skeleton.state_dict().items()}
    del skeleton

    groups: dict[str, list[str]] = {}
    for name in specs:  # one shard per block, then one per other tensor (embeddings, norm, head)
        parts = name.split(".")
        key = f"layer{int(parts[2]):03d}" if name.startswith("model.layers.") else f"other-{name}"
        groups.setdefault(key, []).append(name)
    keys = sorted(groups)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for number, key in enumerate(keys, 1):
        shard = f"model-{number:05d}-of-{len(keys):05d}.safetensors"
        tensors = {}
        for name in groups[key]:
            shape, dtype = specs[name]
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=dtype)
            else:
                tensors[name] = random_matrix(shape, dtype, generator)
            weight_map[name] = shard
            total += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {shard}", flush=True)
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    done.write_text("ok\n")
    return directory


def random_matrix(shape, dtype, generator, rows: int = 1024):
    """N(0, 0.02²) values, drawn in fp32 a slice of rows at a time (no full-size fp32 copy)."""
    import torch

    out = torch.empty(shape, dtype=dtype)
    for start in range(0, shape[0], rows):
        chunk = out[start:start + rows]
        chunk.copy_(torch.randn(chunk.shape, generator=generator).mul_(0.02))
    return out


def checkpoint_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


# --------------------------------------------------------------------------------------------------
# Measuring a child process
class RssSampler:
    """Samples the resident memory of a process and its children until stopped; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.02):
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.series: list[tuple[float, int]] = []
        self.child_peaks: dict[int, int] = {}  # each direct child's own peak (torchrun's ranks)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.perf_counter()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                rss = self.process.memory_info().rss + sum(
                    c.memory_info().rss for c in self.process.children(recursive=True))
                for child in self.process.children(recursive=False):
                    self.child_peaks[child.pid] = max(self.child_peaks.get(child.pid, 0), child.memory_info().rss)
            except psutil.Error:
                break
            self.peak = max(self.peak, rss)
            self.series.append((time.perf_counter() - self.started, rss))
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure(command: list[str], log_path: Path) -> dict:
    started = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        with RssSampler(child.pid) as sampler:
            rc = child.wait()
    wall = time.perf_counter() - started
    if rc != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {rc}); see {log_path}:\n{log_path.read_text()[-3000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_sampled": sampler.peak, "series": sampler.series,
            "child_peaks": sorted(sampler.child_peaks.values(), reverse=True)}


def baseline_rss(model: Path) -> int:
    """Peak resident memory of a process that imports the engine and builds the model's weightless
    skeleton (torch, transformers and the model's code): the floor under any run, whatever it prunes."""
    code = ("import sys, reconstruct.layerwise, reconstruct.cli; from reconstruct.models import open_model; "
            "open_model(sys.argv[1]); print(reconstruct.memory.peak_rss_bytes())")
    return int(subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True,
                              check=True).stdout)


def prune_command(model: Path, out: Path, calib: Path, cache: Path, args, correction: str, steps: int,
                  batch_size: int):
    return [sys.executable, "-m", "reconstruct", "prune", str(model), "--out", str(out),
            "--method", "wanda", "--sparsity", "0.5", "--correction", correction, "--steps", str(steps),
            "--calib", str(calib), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
            "--batch-size", str(batch_size), "--device", "cpu", "--overwrite", "--cache-dir", str(cache)]


def prune_for_retraining(model: Path, workdir: Path, calib: Path, name: str) -> Path:
    """The model magnitude-pruned to 50 % (no correction), made once."""
    out = workdir / f"pruned-{name}"
    if not (out / "report.json").exists():
        command = [sys.executable, "-m", "reconstruct", "prune", str(model), "--out", str(out), "--method",
                   "magnitude", "--sparsity", "0.5", "--correction", "none", "--calib", str(calib),
                   "--nsamples", "2", "--seqlen", "128", "--batch-size", "1", "--device", "cpu",
                   "--error-windows", "0", "--overwrite", "--cache-dir", str(workdir / "cache")]
        print(f"pruning once: {' '.join(command)}", flush=True)
        subprocess.run(command, check=True)
    return out


def retrain_runs(args, workdir: Path, model: Path, calib: Path, name: str) -> int:
    pruned = prune_for_retraining(model, workdir, calib, name)
    size = checkpoint_bytes(pruned)
    runs = {}
    for params in args.params.split(","):
        for checkpointing in args.checkpointing.split(","):
            run = f"{params} checkpointing {checkpointing}"
            out = workdir / f"retrained-{name}-{params}-{checkpointing}-ranks{args.fsdp_ranks}"
            ranks = args.fsdp_ranks
            # Under torchrun each rank a process of its own, one window each, the weights sharded
            launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                         str(ranks)] if ranks > 1 else [sys.executable])
            command = [*launcher, "-m", "reconstruct", "retrain", str(pruned), "--out", str(out),
                       *(["--fsdp"] if ranks > 1 else []),
                       "--params", params, "--steps", str(args.retrain_steps), "--batch-size", str(ranks),
                       "--grad-accum", "1", "--seqlen", str(args.retrain_seqlen), "--eval-windows", "1",
                       "--save-every", "0", "--data", str(calib), "--device", "cpu", "--overwrite",
                       "--cache-dir", str(workdir / "cache"),
                       "--gradient-checkpointing" if checkpointing == "on" else "--no-gradient-checkpointing"]
            print(f"running: {' '.join(command)}", flush=True)
            result = measure(command, workdir / f"log-retrain-{name}-{params}-{checkpointing}.txt")
            report = json.loads((out / "report.json").read_text())
            plan = report["memory_plan"]
            result.update(command=" ".join(command), peak_rss_self=report["totals"]["peak_host_rss_bytes"],
                          plan_host_peak=plan["host_peak_bytes"], plan_host_moment=plan["host_peak_moment"],
                          plan_host_moments=plan["host_moments"])
            # Under torchrun the peak that counts is one rank's (its own process), not the sum of all:
            # the largest rank's sampled peak, or rank 0's own high-water mark (a peak between samples)
            result["peak"] = max(result["child_peaks"][0] if args.fsdp_ranks > 1 else result["peak_rss_sampled"],
                                 result["peak_rss_self"])
            peak_at = max(result["series"], key=lambda point: point[1])[0] if result["series"] else None
            result["peak_at_s"] = peak_at
            runs[run] = result
    print()
    print(f"checkpoint: {size / GIB:.2f} GiB ({size:,} bytes), 50 % pruned; {args.retrain_steps} step(s) of "
          f"1 x {args.retrain_seqlen} tokens on the CPU")
    print(f"{'run':28} {'wall s':>7} {'peak RSS':>10} {'/ ckpt':>7} {'plan':>10} {'plan/peak':>9}  plan's peak moment")
    met = any(run.startswith("masklora ") for run in runs)  # the target is masklora's
    for run, r in runs.items():
        ratio, accuracy = r["peak"] / size, r["plan_host_peak"] / r["peak"]
        if run.startswith("masklora ") and ratio > args.retrain_target:
            met = False
        print(f"{run:28} {r['wall_s']:7.1f} {r['peak'] / GIB:6.2f} GiB {ratio:7.2f} {r['plan_host_peak'] / GIB:6.2f} GiB "
              f"{accuracy:9.2f}  {r['plan_host_moment']}")
    (workdir / f"results-retrain-{name}.json").write_text(json.dumps(
        {"model": str(pruned), "checkpoint_bytes": size,
         "runs": {k: {**v, "series": v["series"][::10]} for k, v in runs.items()}}, indent=1))
    print(f"target (masklora peak RSS <= {args.retrain_target} x the checkpoint): "
          + ("met" if met else "MISSED" if any(run.startswith("masklora ") for run in runs) else "no masklora run"))
    return 0 if met else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["prune", "retrain"], default="prune",
                        help="measure `reconstruct prune` (default) or `reconstruct retrain`")
    parser.add_argument("--workdir", default="/tmp/reconstruct-bench", help="model cache and outputs")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,8",
                        help="comma-separated --batch-size values, one Wanda run each (8 is the default of "
                        "`reconstruct prune`; 1 holds one window's activations at a time)")
    parser.add_argument("--masklora-steps", type=int, default=0,
                        help="also run with a MaskLoRA correction fitted this many steps (0: skip)")
    parser.add_argument("--target", type=float, default=0.30, help="peak RSS / checkpoint size to meet")
    retraining = parser.add_argument_group("--mode retrain")
    retraining.add_argument("--params", default="masklora", help="comma-separated --params values")
    retraining.add_argument("--checkpointing", default="off", help="comma-separated: off, on")
    retraining.add_argument("--retrain-steps", type=int, default=1)
    retraining.add_argument("--retrain-seqlen", type=int, default=256)
    retraining.add_argument("--retrain-target", type=float, default=1.5,
                            help="masklora's peak RSS / checkpoint size to meet (per rank with --fsdp-ranks)")
    retraining.add_argument("--fsdp-ranks", type=int, default=1,
                            help="run `retrain --fsdp` under torchrun on this many local processes and report "
                            "the largest rank's own peak (default: 1, one process without --fsdp)")
    shape = parser.add_argument_group("model shape (default: the ~1B model above)")
    shape.add_argument("--hidden", type=int, default=MODEL["hidden_size"])
    shape.add_argument("--intermediate", type=int, default=MODEL["intermediate_size"])
    shape.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"])
    shape.add_argument("--heads", type=int, default=MODEL["num_attention_heads"])
    shape.add_argument("--full-layers", type=int, default=None,
                       help="also report the ratio for a model of this many layers of the same shape, "
                       "with the measured peak (memory does not grow with depth: one block at a time)")
    args = parser.parse_args(argv)

    from reconstruct.tiny import write_sample_text

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    shape = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                 num_attention_heads=args.heads, num_key_value_heads=args.heads)
    name = "model" if all(MODEL[k] == v for k, v in shape.items()) else \
        f"model-h{args.hidden}-i{args.intermediate}-l{args.layers}-a{args.heads}"
    print(f"model in {workdir / name} (generated once)", flush=True)
    model = make_model(workdir / name, **shape)
    calib = write_sample_text(workdir / "calib.txt")
    if args.mode == "retrain":
        return retrain_runs(args, workdir, model, calib, name)
    size = checkpoint_bytes(model)
    base = baseline_rss(model)

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    runs = [(f"wanda bs{b}", "none", 0, b) for b in batch_sizes]
    if args.masklora_steps > 0:
        runs.append((f"masklora bs{batch_sizes[0]}", "masklora", args.masklora_steps, batch_sizes[0]))
    results = {"model": str(model), "checkpoint_bytes": size, "import_baseline_rss": base, "runs": {}}
    for run_name, correction, steps, batch_size in runs:
        out = workdir / f"out-{name}-{correction}-bs{batch_size}"
        command = prune_command(model, out, calib, workdir / "cache", args, correction, steps, batch_size)
        print(f"running: {' '.join(command)}", flush=True)
        result = measure(command, workdir / f"log-{name}-{correction}-bs{batch_size}.txt")
        report = json.loads((out / "report.json").read_text())
        result["peak_rss_self"] = report["totals"]["peak_host_rss_bytes"]
        result["peak"] = max(result["peak_rss_sampled"], result["peak_rss_self"])
        result["ratio"] = result["peak"] / size
        result["command"] = " ".join(command)
        results["runs"][run_name] = result

    print()
    print(f"checkpoint: {size / GIB:.2f} GiB ({size:,} bytes) of safetensors, {args.layers} blocks; "
          f"floor (engine imported, model skeleton built) {base / GIB:.2f} GiB = {base / size:.3f}")
    print(f"{'run':18} {'wall s':>7} {'peak RSS sampled':>17} {'peak RSS (report)':>21} {'ratio':>6}  target")
    met = []
    full = None
    if args.full_layers:  # a few blocks of a deeper model: judged against the deeper model's size
        block = 2 * (4 * args.hidden ** 2 + 3 * args.hidden * args.intermediate + 2 * args.hidden)  # bf16
        full = size + (args.full_layers - args.layers) * block
    for run_name, r in results["runs"].items():
        ok = r["peak"] / (full or size) <= args.target
        if ok and run_name.startswith("wanda"):
            met.append(run_name)
        print(f"{run_name:18} {r['wall_s']:7.1f} {r['peak_rss_sampled'] / GIB:13.2f} GiB "
              f"{r['peak_rss_self'] / GIB:17.2f} GiB {r['ratio']:6.3f}  {'met' if ok else 'MISSED'} "
              f"(<= {args.target:.2f})")
    if full:
        results["full_layers"] = {"layers": args.full_layers, "checkpoint_bytes": full,
                                  "ratios": {k: r["peak"] / full for k, r in results["runs"].items()}}
        for run_name, r in results["runs"].items():
            print(f"{run_name}: with {args.full_layers} blocks the checkpoint would be {full / GIB:.2f} GiB and the "
                  f"ratio {r['peak'] / full:.3f} (same peak: memory is flat from block to block)")
    (workdir / f"results-{name}.json").write_text(json.dumps(
        {**results, "runs": {k: {**v, "series": v["series"][::10]} for k, v in results["runs"].items()}}, indent=1))
    print(f"target (Wanda, peak RSS <= {args.target:.2f} of the checkpoint): "
          + (f"met by {', '.join(met)}" if met else "MISSED by every batch size"))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
