"""Fingerprint what the commands write, to show that a change of structure changed no output.

Runs a fixed set of real commands on the testbed models (`scripts/make_testbed.py`) and records the
SHA-256 of every file each output checkpoint holds except report.json and the model card (they carry
timings, paths and the command line). Run it on the code before a refactor and after, then compare:

    python scripts/behaviour_snapshot.py --testbed /work/testbed --work /tmp/before --json before.json
    python scripts/behaviour_snapshot.py --testbed /work/testbed --work /tmp/after --json after.json
    python scripts/behaviour_snapshot.py --compare before.json after.json

The set (issue 17): prune LLaMA with magnitude, Wanda, SparseGPT and Wanda 2:4, each with no
correction and with the default one; retrain the Wanda-pruned model with `norm` and with `masklora`
for 20 steps; a 2-rank prune (torchrun); and the same shapes on OPT for a few of them. Every process
runs at one thread, so the bytes do not depend on how many cores the machine has. The code under
test is the checkout this script sits in (its directory goes first on PYTHONPATH).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_COMPARED = {"report.json", "README.md", "loss.png"}
CALIB = ["--nsamples", "16", "--seqlen", "128"]
RETRAIN = ["--steps", "20", "--seqlen", "128", "--batch-size", "4", "--eval-windows", "4"]


def prune_runs(model: str) -> dict[str, list[str]]:
    runs = {}
    for method, pattern in (("magnitude", []), ("wanda", []), ("sparsegpt", []), ("wanda", ["--pattern", "2:4"])):
        label = method + ("-2of4" if pattern else "")
        for correction in ("none", "masklora"):
            runs[f"{model}-{label}-{correction}"] = ["prune", "--method", method, *pattern, "--correction", correction]
    return runs


def commands(testbed: Path, work: Path) -> list[tuple[str, list[str], list[str]]]:
    """(name, launcher, arguments) of every run, in order; retraining reads a prune run's output."""
    text = str(testbed / "train.txt")
    runs = []
    for model, selected in (("llama", None), ("opt", {"magnitude-none", "wanda-masklora", "sparsegpt-masklora"})):
        for name, args in prune_runs(model).items():
            if selected is None or name.split("-", 1)[1] in selected:
                runs.append((name, [], [*args[:1], str(testbed / model), "--out", str(work / name), *args[1:],
                                        "--calib", text, *CALIB, "--device", "cpu"]))
    for model, params in (("llama", "norm"), ("llama", "masklora"), ("opt", "norm")):
        source = work / (f"{model}-wanda-none" if model == "llama" else f"{model}-magnitude-none")
        name = f"{model}-retrain-{params}"
        runs.append((name, [], ["retrain", str(source), "--out", str(work / name), "--params", params,
                                "--data", text, *RETRAIN, "--device", "cpu"]))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs.append(("llama-wanda-masklora-2ranks", torchrun,
                 ["prune", str(testbed / "llama"), "--out", str(work / "llama-wanda-masklora-2ranks"),
                  "--method", "wanda", "--calib", text, *CALIB, "--device", "cpu"]))
    return runs


def fingerprint(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.iterdir()) if path.is_file() and path.name not in NOT_COMPARED}


def snapshot(testbed: Path, work: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    work.mkdir(parents=True, exist_ok=True)
    result = {}
    for name, launcher, args in commands(testbed, work):
        started = time.perf_counter()
        command = [*(launcher or [sys.executable]), "-m", "reconstruct", *args, "--overwrite"]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        result[name] = fingerprint(work / name)
        print(f"{name}: {len(result[name])} files, {time.perf_counter() - started:.1f} s", flush=True)
    return result


def compare(before: dict, after: dict) -> int:
    differences = [f"{run}: {'missing' if run not in after else 'differs'}" for run in before
                   if after.get(run) != before[run]]
    differences += [f"{run}: new run" for run in after if run not in before]
    for line in differences:
        print(line)
    files = sum(len(files) for files in before.values())
    print("identical" if not differences else f"{len(differences)} run(s) differ",
          f"({len(before)} runs, {files} files)")
    return 1 if differences else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed", type=Path, default=Path.home() / ".cache/reconstruct/testbed")
    parser.add_argument("--work", type=Path, help="where the runs' outputs go")
    parser.add_argument("--json", type=Path, help="write the fingerprints here")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(path.read_text()) for path in args.compare)
        return compare(before, after)
    if not args.work or not args.json:
        parser.error("--work and --json are needed to take a snapshot")
    args.json.write_text(json.dumps(snapshot(args.testbed, args.work), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
