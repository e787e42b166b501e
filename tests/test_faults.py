"""Killed anywhere, resumed, the same bytes: every fault point of reconstruct/faults.py, for `prune`
(no correction and MaskLoRA on one process, MaskLoRA on two) and `retrain`.

Each run is `reconstruct.cli.main` in a child forked from a server that has imported torch, the
package and transformers once (multiprocessing's forkserver): a child starts in a fraction of a
second where a new interpreter takes several, so the few hundred runs below fit in a minute or two.
Each child SIGKILLs itself at the point RECONSTRUCT_FAULT names; the same command is then run with
--resume, and every file of the output must be byte for byte that of an uninterrupted run
(report.json and README.md hold timings and are left out).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from conftest import model_and_text

BLOCKS, NSAMPLES, SEQLEN = 2, 8, 32  # the fewest windows where MaskLoRA helps both blocks
RETRAIN_SEQLEN = 16
TIMED_FILES = {"report.json", "README.md"}
# Imported once, by the server every run is forked from
PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama", "reconstruct.cli",
           "reconstruct.api", "reconstruct.layerwise.driver", "reconstruct.retraining.trainer", "reconstruct.retraining.report", "matplotlib.pyplot", "safetensors.torch",
           "test_faults"]
ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": "1", "RECONSTRUCT_DIST_TIMEOUT_S": "20"}
KILLED = -signal.SIGKILL

# prune, one process: after each phase of a block, inside the atomic writes (1: the embeddings' and
# head's shard, 3: the blocks' arguments, 4: the first state.json, 5: block 0's shard, written
# in the background, 6: the state.json after it) and at each step of finishing.
PRUNE_POINTS = ["block-calls-saved", "block-load@1", "block-observe@1", "block-prune@2", "block-replay@1",
                "block-write@1", "block-write@2", *(f"atomic-written@{k}" for k in (1, 3, 4, 5, 6)),
                "finish-written", "finish-renamed", "finish-cleaning@1", "finish-cleaning@4"]
MASKLORA_POINTS = ["block-fit@1", "block-fit@2", "block-observe@2", "block-replay@2", "atomic-written@5",
                   "finish-written"]
# Two processes: a point both ranks reach, one only rank 0 reaches (the other is then killed, as
# torchrun does), and one while finishing.
TWO_RANK_POINTS = ["block-fit@2", "atomic-written@4", "finish-renamed"]
# retrain, 3 steps saved after each (and again at the end): each save writes the random state, the
# training state, state.json (atomic writes 1-3 for step 1, ...); 13 is the first shard at the end.
RETRAIN_POINTS = ["retrain-step@1", "retrain-step@3", "retrain-random-state-saved@1",
                  "retrain-random-state-saved@3", "retrain-training-state-saved@2",
                  *(f"atomic-written@{k}" for k in (2, 6, 13)), "finish-written", "finish-renamed",
                  "finish-cleaning@3"]

PRUNE = ["--method", "wanda", "--sparsity", "0.5", "--batch-size", "2", "--correction", "none"]
MASKLORA = [*PRUNE, "--correction", "masklora", "--rank", "2", "--steps", "8", "--lr", "3e-4",
            "--fit-batch-size", "2"]


def _child(argv: list[str], fault: str | None, log: str, environment: dict) -> None:
    """A forked run: its output to `log`, SIGKILLed at `fault`, its exit code the command's."""
    handle = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    os.environ.update(environment)
    os.environ.pop("RECONSTRUCT_FAULT", None)
    if fault:
        os.environ["RECONSTRUCT_FAULT"] = fault
    import torch

    torch.set_num_threads(1)
    from reconstruct.cli import main

    os._exit(main(argv))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Runs:
    """Runs the command line in forked children; `root` holds the model, data and every output."""

    def __init__(self, root: Path, model: Path, text: Path):
        self.root, self.model, self.text = root, model, text
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        self.count = 0

    def prune_args(self, out: Path, settings: list[str]) -> list[str]:
        return ["prune", str(self.model), "--out", str(out), "--calib", str(self.text), "--nsamples",
                str(NSAMPLES), "--seqlen", str(SEQLEN), "--device", "cpu", "--cache-dir",
                str(self.root / "cache"), *settings]

    def retrain_args(self, pruned: Path, out: Path) -> list[str]:
        return ["retrain", str(pruned), "--out", str(out), "--params", "masklora+norm", "--data", str(self.text),
                "--seqlen", str(RETRAIN_SEQLEN), "--steps", "3", "--batch-size", "2", "--eval-every", "50",
                "--eval-windows", "2", "--rank", "2", "--lr", "1e-2", "--save-every", "1", "--device", "cpu",
                "--cache-dir", str(self.root / "cache")]

    def run(self, argv: list[str], fault: str | None = None, ranks: int = 1, timeout: float = 60.0) -> list[int]:
        """Each rank's exit code; when one is killed by the fault, the others are killed too (torchrun's way)."""
        self.count += 1
        log = str(self.root / f"run-{self.count}.log")
        environment = dict(ENVIRONMENT)
        if ranks > 1:
            environment.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(ranks))
        children = []
        for rank in range(ranks):
            rank_environment = dict(environment, RANK=str(rank), LOCAL_RANK=str(rank)) if ranks > 1 else environment
            child = self.context.Process(target=_child, args=(argv, fault, log, rank_environment))
            child.start()
            children.append(child)
        deadline = time.monotonic() + timeout
        while any(child.is_alive() for child in children):
            if any(child.exitcode == KILLED for child in children) or time.monotonic() > deadline:
                for child in children:
                    if child.is_alive():
                        os.kill(child.pid, signal.SIGKILL)
            time.sleep(0.01)
        for child in children:
            child.join()
        self.last_log = Path(log).read_text()
        return [child.exitcode for child in children]

    def succeed(self, argv: list[str], ranks: int = 1) -> None:
        codes = self.run(argv, ranks=ranks)
        assert codes == [0] * ranks, f"{codes}: {self.last_log[-3000:]}"


def output_bytes(directory: Path) -> dict[str, bytes]:
    return {path.relative_to(directory).as_posix(): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file() and path.name not in TIMED_FILES}


def assert_same_output(out: Path, reference: dict[str, bytes], what: str) -> None:
    assert not out.with_name(out.name + ".partial").exists(), what
    got = output_bytes(out)
    assert sorted(got) == sorted(reference), f"{what}: other files {sorted(set(got) ^ set(reference))}"
    for name, data in reference.items():
        assert got[name] == data, f"{what}: {name} differs from the uninterrupted run's"


def kill_and_resume(runs: Runs, argv: list[str], out: Path, fault: str, reference: dict[str, bytes],
                    ranks: int = 1) -> None:
    codes = runs.run(argv, fault, ranks)
    assert KILLED in codes, f"{fault} was never reached ({codes}): {runs.last_log[-3000:]}"
    # OUT, where there is one, is complete: OUT.partial is gone only once it is OUT. (Killed before
    # the first resume point, OUT.partial has no state.json and --resume starts over.)
    complete = out.exists() and not out.with_name(out.name + ".partial").exists()
    assert not out.exists() or complete, f"killed at {fault}: {out.name} and {out.name}.partial both exist"
    if not complete:
        runs.succeed(argv + ["--resume"], ranks)
    else:  # killed after the renames: the next run finishes the clean-up and leaves OUT alone
        codes = runs.run(argv + ["--resume"], ranks=ranks)
        assert codes[0] == 2 and "exists and is not empty" in runs.last_log, runs.last_log[-3000:]
    assert_same_output(out, reference, f"killed at {fault}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    for name, value in ENVIRONMENT.items():  # read at import by the server's libraries
        patch.setenv(name, value)
    runs = Runs(*model_and_text(tmp_path_factory.mktemp("faults"), BLOCKS))
    yield runs
    patch.undo()


@pytest.fixture(scope="module")
def references(runs) -> dict[str, Path]:
    """Uninterrupted runs: prune without a correction (also retrain's input), with MaskLoRA on one and
    two processes (their sums of fitting errors differ in rounding), retrain."""
    done = {}
    for name, settings, ranks in (("none", PRUNE, 1), ("masklora", MASKLORA, 1), ("masklora-2", MASKLORA, 2)):
        done[name] = runs.root / f"reference-{name}"
        runs.succeed(runs.prune_args(done[name], settings), ranks)
    # Retrain's input: the pruned model with attention dropout, so that training draws random numbers
    # and a resume with another step's random state would give other bytes
    done["retrain-input"] = runs.root / "retrain-input"
    shutil.copytree(done["none"], done["retrain-input"])
    config = json.loads((done["retrain-input"] / "config.json").read_text())
    (done["retrain-input"] / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.2}))
    done["retrain"] = runs.root / "reference-retrain"
    runs.succeed(runs.retrain_args(done["retrain-input"], done["retrain"]))
    # The corrections are merged: a resumed run must reproduce what was trained, not the input
    assert all(block["merged"] for block in json.loads((done["masklora"] / "report.json").read_text())["blocks"])
    assert "(merged)" in runs.last_log, runs.last_log
    return done


@pytest.mark.parametrize("fault", PRUNE_POINTS)
def test_prune_killed_anywhere_resumes_to_the_same_bytes(fault, runs, references, tmp_path):
    out = tmp_path / "out"
    kill_and_resume(runs, runs.prune_args(out, PRUNE), out, fault, output_bytes(references["none"]))


@pytest.mark.parametrize("fault", MASKLORA_POINTS)
def test_prune_with_masklora_killed_anywhere_resumes_to_the_same_bytes(fault, runs, references, tmp_path):
    out = tmp_path / "out"
    kill_and_resume(runs, runs.prune_args(out, MASKLORA), out, fault, output_bytes(references["masklora"]))


@pytest.mark.parametrize("fault", TWO_RANK_POINTS)
def test_prune_on_two_ranks_killed_anywhere_resumes_to_the_same_bytes(fault, runs, references, tmp_path):
    out = tmp_path / "out"
    kill_and_resume(runs, runs.prune_args(out, MASKLORA), out, fault, output_bytes(references["masklora-2"]),
                    ranks=2)


@pytest.mark.parametrize("fault", RETRAIN_POINTS)
def test_retrain_killed_anywhere_resumes_to_the_same_bytes(fault, runs, references, tmp_path):
    out = tmp_path / "out"
    kill_and_resume(runs, runs.retrain_args(references["retrain-input"], out), out, fault,
                    output_bytes(references["retrain"]))


@pytest.mark.parametrize("fault", ["finish-written", "finish-old-moved", "finish-renamed", "finish-cleaning@1"])
def test_overwrite_killed_while_finishing_loses_neither_output(fault, runs, references, tmp_path):
    """--overwrite over an existing OUT, killed while finishing: the old OUT stays until the new one is
    complete; then --resume (or --overwrite again) ends with the new OUT alone."""
    out = tmp_path / "out"
    shutil.copytree(references["masklora"], out)
    argv = runs.prune_args(out, [*PRUNE, "--overwrite"])
    assert KILLED in runs.run(argv, fault)
    work = out.with_name(out.name + ".partial")
    # A complete checkpoint on disk at every moment: the old OUT (in place, or moved into OUT.partial
    # until OUT.partial becomes OUT) or the new one
    assert (out / "config.json").exists() or (work / "replaced-output" / "config.json").exists(), fault
    runs.succeed(argv + ["--resume"])
    assert_same_output(out, output_bytes(references["none"]), f"--overwrite killed at {fault}")
