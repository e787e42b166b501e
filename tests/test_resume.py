"""Resuming a killed run: `reconstruct prune` in a child process, SIGKILLed after a block, then rerun
with --resume, must write the same checkpoint, byte for byte, as a run that was never interrupted.

Offline: a 4-block tiny LLaMA from reconstruct.tiny and the sample text; each child is a real
`python -m reconstruct.cli prune` process, so nothing of the first run survives in memory.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import model_and_text

BLOCKS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return model_and_text(tmp_path_factory.mktemp("resume"), BLOCKS)


def command(setup, out: Path, *extra: str) -> list[str]:
    root, model, text = setup
    # MaskLoRA fitted for 20 steps: most of a second per block, so that the parent, polling
    # state.json every few milliseconds, kills the run between blocks with time to spare; at this
    # learning rate the corrections help and are merged, so resuming must reproduce fitted weights.
    return [sys.executable, "-m", "reconstruct.cli", "prune", str(model), "--out", str(out),
            "--method", "wanda", "--sparsity", "0.5", "--correction", "masklora", "--rank", "4",
            "--steps", "20", "--lr", "3e-4", "--calib", str(text), "--nsamples", "16", "--seqlen", "32",
            "--device", "cpu", "--cache-dir", str(root / "token-cache"), *extra]


def environment() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=environment(), timeout=300)


def output_files(directory: Path) -> list[str]:
    names = sorted(p.name for p in directory.glob("model-*.safetensors"))
    assert names, f"no shards in {directory}"
    return names + ["model.safetensors.index.json", "config.json"]


def assert_same_checkpoint(a: Path, b: Path) -> None:
    assert output_files(a) == output_files(b)
    for name in output_files(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between {a} and {b}"


def next_block(work: Path) -> int:
    try:
        return json.loads((work / "state.json").read_text())["next_block"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def kill_after_block(cmd: list[str], out: Path, block: int, timeout: float = 240.0) -> int:
    """Start `cmd`, SIGKILL it as soon as OUT.partial/state.json says block `block` is done; return
    the next block recorded in the state the killed run left behind."""
    work = out.with_name(out.name + ".partial")
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment())
    deadline = time.monotonic() + timeout
    try:
        while next_block(work) <= block:
            if child.poll() is not None:
                pytest.fail(f"the run ended (exit {child.returncode}) before it could be killed after "
                            f"block {block}: {child.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"block {block} did not finish within {timeout} s")
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()  # no-op when already dead
        child.wait()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    return next_block(work)


@pytest.fixture(scope="module")
def reference(setup):
    """The checkpoint of an uninterrupted run of the same command."""
    out = setup[0] / "reference"
    result = run(command(setup, out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert all(block["merged"] for block in report["blocks"])
    return out


def test_python_m_reconstruct_cli_runs():
    result = subprocess.run([sys.executable, "-m", "reconstruct.cli", "prune", "--help"],
                            capture_output=True, text=True, env=environment(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--resume" in result.stdout


def test_killed_run_resumes_to_the_same_checkpoint(setup, reference):
    out = setup[0] / "killed"
    resumed_at = kill_after_block(command(setup, out), out, block=1)

    # Killed between blocks 2 and 3 of 4: the finished blocks are in OUT.partial; OUT does not exist.
    work = out.with_name(out.name + ".partial")
    assert 2 <= resumed_at < BLOCKS, resumed_at
    assert not out.exists()
    assert (work / "model-00001-of-00005.safetensors").exists()  # block 0's shard, kept

    # Other settings are refused, with the reason and what to do; the unfinished run is left intact.
    refused = run(command(setup, out, "--resume", "--sparsity", "0.6"))
    assert refused.returncode == 2
    assert "different settings" in refused.stderr and "without --resume" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not out.exists() and next_block(work) == resumed_at

    resumed = run(command(setup, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert not work.exists()
    report = json.loads((out / "report.json").read_text())
    assert [b["index"] for b in report["blocks"]] == list(range(BLOCKS))  # earlier blocks' entries kept
    assert_same_checkpoint(out, reference)


def test_resume_without_a_saved_state_starts_over(setup, reference):
    """Killed before its first state was saved, a run leaves files but nothing to resume from:
    --resume then starts from scratch (and still gives the same checkpoint)."""
    out = setup[0] / "early"
    work = out.with_name(out.name + ".partial")
    (work / "activations").mkdir(parents=True)
    (work / "model-00005-of-00005.safetensors.tmp").write_bytes(b"\0" * 64)  # a write cut short
    (work / "activations" / "inputs-00000.bin").write_bytes(b"\0" * 64)

    from reconstruct.cli import main  # in this process: the same command, without a new interpreter

    assert main(command(setup, out, "--resume")[3:]) == 0
    assert not work.exists()
    assert_same_checkpoint(out, reference)


def test_finished_output_is_not_replaced(setup, reference):
    """A complete OUT is never touched by --resume (only --overwrite replaces it)."""
    from reconstruct.api import prune
    from reconstruct.checkpoint import OutputError

    root, model, text = setup
    before = {p.name: p.read_bytes() for p in reference.iterdir()}
    with pytest.raises(OutputError, match="exists.*--overwrite"):
        prune(str(model), str(reference), calib=str(text), nsamples=16, seqlen=32, device="cpu",
              correction="masklora", rank=4, steps=20, lr=3e-4, resume=True,
              cache_dir=str(root / "token-cache"))
    assert {p.name: p.read_bytes() for p in reference.iterdir()} == before
