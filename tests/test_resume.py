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


# --------------------------------------------------------------------------------------------------
# What --resume reads: never a pickle; a damaged file is a clear error, and nothing is deleted
class Stopped(Exception):
    """Raised where a fault point is, to leave an unfinished run in-process (no SIGKILL needed)."""


def quick_settings(setup) -> dict:
    root, model, text = setup
    return dict(method="wanda", sparsity=0.5, correction="none", calib=str(text), nsamples=8, seqlen=32,
                device="cpu", cache_dir=str(root / "token-cache"))


def quick_argv(setup, out: Path, *extra: str) -> list[str]:
    root, model, text = setup
    return ["prune", str(model), "--out", str(out), "--method", "wanda", "--sparsity", "0.5", "--correction",
            "none", "--calib", str(text), "--nsamples", "8", "--seqlen", "32", "--device", "cpu",
            "--cache-dir", str(root / "token-cache"), *extra]


def stopped_after_block_0(setup, out: Path, monkeypatch) -> Path:
    """Run the quick prune until block 0 is recorded, then stop it; return OUT.partial."""
    from reconstruct.api import prune
    from reconstruct.layerwise import driver

    def stop(name):
        if name == "block-write":
            raise Stopped

    with monkeypatch.context() as patch:
        patch.setattr(driver, "fault_point", stop)
        with pytest.raises(Stopped):
            prune(str(setup[1]), str(out), **quick_settings(setup))
    work = out.with_name(out.name + ".partial")
    assert next_block(work) == 1
    return work


class PlantedPickle:
    """Unpickled, it creates the file `marker` (as a malicious block_calls.pt could run any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_never_unpickles_the_blocks_arguments(setup, tmp_path, monkeypatch, capsys):
    import torch

    from reconstruct.api import prune
    from reconstruct.cli import main

    prune(str(setup[1]), str(tmp_path / "reference"), **quick_settings(setup))
    marker = tmp_path / "code-was-run"

    # The arguments are saved without pickle: a block_calls.pt planted beside them is never read.
    out = tmp_path / "out"
    work = stopped_after_block_0(setup, out, monkeypatch)
    assert {"block_calls.json", "block_calls.safetensors"} <= {p.name for p in work.iterdir()}
    torch.save(PlantedPickle(marker), work / "block_calls.pt")
    prune(str(setup[1]), str(out), resume=True, **quick_settings(setup))
    assert not marker.exists()
    assert_same_checkpoint(out, tmp_path / "reference")
    assert not list(out.glob("block_calls*"))  # work files, not shipped

    # A run left by an older version (its arguments pickled): refused without reading it, kept.
    out = tmp_path / "old"
    work = stopped_after_block_0(setup, out, monkeypatch)
    for name in ("block_calls.json", "block_calls.safetensors"):
        (work / name).unlink()
    torch.save(PlantedPickle(marker), work / "block_calls.pt")
    capsys.readouterr()
    assert main(quick_argv(setup, out, "--resume")) == 2
    assert capsys.readouterr().err == (f"reconstruct prune: error: the unfinished run in {work} was saved by an "
                                       "older version of reconstruct (no block_calls.json); rerun without "
                                       "--resume to start over\n")
    assert not marker.exists() and next_block(work) == 1

    torch.load(work / "block_calls.pt", weights_only=False)  # the planted file is live: it was never read
    assert marker.exists()


def test_a_damaged_resume_point_is_a_clear_error_and_nothing_is_deleted(setup, tmp_path, monkeypatch, capsys):
    from reconstruct.cli import main

    out = tmp_path / "out"
    work = stopped_after_block_0(setup, out, monkeypatch)
    state = (work / "state.json").read_bytes()

    def resume_fails(message: str) -> None:
        before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
        capsys.readouterr()
        assert main(quick_argv(setup, out, "--resume")) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"reconstruct prune: error: {message}") and error.count("\n") == 1, error
        assert error.endswith("; rerun without --resume to start over\n"), error
        assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before and not out.exists()

    (work / "state.json").write_bytes(state[:len(state) // 2])  # cut short
    resume_fails(f"the resume point {work / 'state.json'} is damaged (")
    (work / "state.json").write_bytes(state)
    arguments = work / "block_calls.safetensors"
    arguments.write_bytes(arguments.read_bytes()[:40])
    resume_fails(f"cannot read {work / 'block_calls'}.json/.safetensors, which the unfinished run saved (")


def test_an_argument_that_cannot_be_saved_fails_at_once_naming_it(setup, tmp_path, monkeypatch):
    import torch

    from reconstruct.api import prune
    from reconstruct.layerwise import state
    from reconstruct.models import UnsupportedModelError

    caught = state.catch_block_kwargs

    def with_a_dtype(*args):
        calls, first = caught(*args)
        calls[1][1]["dtype"] = torch.float16  # as a model might pass its blocks
        return calls, first

    monkeypatch.setattr(state, "catch_block_kwargs", with_a_dtype)
    with pytest.raises(UnsupportedModelError, match=r"cannot be saved for resuming: block_calls\[1\]\[1\]\['dtype'\] "
                                                    r"is a torch.dtype; only tensors"):
        prune(str(setup[1]), str(tmp_path / "out"), **quick_settings(setup))
    assert not (tmp_path / "out.partial" / "state.json").exists()


def test_a_directory_with_a_state_json_of_its_own_is_left_alone(setup, tmp_path):
    """Only an OUT of ours (our index, our state.json) killed while cleaning up is cleaned up."""
    from reconstruct.checkpoint import OutputError, RunDirectory

    out = tmp_path / "mine"
    out.mkdir()
    (out / "state.json").write_text('{"epoch": 3}')
    (out / "weights.pt").write_bytes(b"not ours")
    with pytest.raises(OutputError, match="exists and is not empty"):
        RunDirectory(out).prepare(overwrite=False, resume=True)
    assert sorted(p.name for p in out.iterdir()) == ["state.json", "weights.pt"]
