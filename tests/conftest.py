"""Shared fixtures: tiny offline checkpoints (built once per session), calibration text, and a quick
`prune` with settings small enough for a CPU (8 windows of 32 tokens, no correction by default).

Nothing here touches the network or ~/.cache.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

# Calibration settings for the engine tests: small, CPU, and a private token cache.
NSAMPLES, SEQLEN = 8, 32

# A decoder block's tensors, whatever the family calls its list of blocks.
BLOCK_TENSOR = re.compile(r"\.(layers|h|blocks)\.\d+\.")


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a CUDA device: skipped, with the reason, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _private_token_cache(tmp_path_factory):
    """Never write to ~/.cache from tests, even where a test forgets cache_dir."""
    patch = pytest.MonkeyPatch()
    patch.setenv("RECONSTRUCT_CACHE", str(tmp_path_factory.mktemp("reconstruct-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="session")
def sample_text(tmp_path_factory) -> Path:
    from reconstruct.tiny import write_sample_text

    return write_sample_text(tmp_path_factory.mktemp("calib") / "sample.txt")


def model_and_text(root: Path, blocks: int) -> tuple[Path, Path, Path]:
    """(root, a tiny LLaMA of `blocks` blocks saved under it, calibration text beside it): what the
    tests that launch `reconstruct` as a separate process start from."""
    from reconstruct.tiny import save_tiny_model, write_sample_text

    return root, save_tiny_model(root / "model", "llama", num_hidden_layers=blocks), write_sample_text(root / "calib.txt")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(model_type, **overrides)`: a saved tiny model directory, built once per key."""
    from reconstruct.tiny import save_tiny_model

    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("tiny-models")

    def make(model_type: str, seed: int = 0, **overrides) -> Path:
        key = json.dumps([model_type, seed, overrides], sort_keys=True, default=str)
        if key not in built:
            built[key] = save_tiny_model(root / f"{model_type}-{len(built)}", model_type, seed=seed, **overrides)
        return built[key]

    return make


@pytest.fixture(scope="session")
def prune_tiny(sample_text, token_cache):
    """`prune_tiny(model_dir, out, **settings)` -> report: `reconstruct.prune` with small CPU defaults."""
    from reconstruct.api import prune

    def run(model, out, **settings):
        return prune(str(model), str(out), **{**quick_settings(sample_text, token_cache), **settings})

    return run


@pytest.fixture(scope="session")
def run_tiny(sample_text, token_cache):
    """`run_tiny(model_dir, out, **settings)` -> RunResult (report, out, final_activations)."""
    from reconstruct.config import RunConfig
    from reconstruct.layerwise import run

    def go(model, out, **settings):
        config = RunConfig(model=str(model), out=str(out),
                           **{**quick_settings(sample_text, token_cache), **settings}).validate()
        return run(config)

    return go


def quick_settings(sample_text, token_cache) -> dict:
    return dict(calib=str(sample_text), nsamples=NSAMPLES, seqlen=SEQLEN, device="cpu", correction="none",
                cache_dir=str(token_cache))


# --------------------------------------------------------------------------------------------------
# Helpers for the test modules (plain functions: `from conftest import saved_tensors`)
def saved_tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's safetensors files, by checkpoint name."""
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def load_causal_lm(directory):
    """The checkpoint loaded the plain transformers way (fp32, eval), refusing any missing key."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def is_block_tensor(name: str) -> bool:
    return BLOCK_TENSOR.search(name) is not None


def is_router(name: str, tensor: torch.Tensor) -> bool:
    """A mixture-of-experts router: a small matrix named ...gate / ...router (never pruned)."""
    return bool(re.search(r"\.(gate|router)(\.weight)?$", name)) and tensor.dim() == 2 and tensor.shape[0] < 256


def pruned_matrices(model) -> dict[str, torch.Tensor]:
    """Every matrix the engine prunes, [out, in], from a model loaded with transformers.

    2-D weights inside the decoder blocks except routers; fused experts (3-D `gate_up_proj`
    [E, 2I, H] and `down_proj` [E, H, I]) give one matrix per expert, gate and up separately."""
    matrices = {}
    for name, parameter in model.named_parameters():
        if not is_block_tensor(name):
            continue
        tensor = parameter.detach()
        if tensor.dim() == 2 and not is_router(name, tensor):
            matrices[name] = tensor
        elif tensor.dim() == 3:
            for expert in range(tensor.shape[0]):
                if name.endswith("gate_up_proj"):
                    gate, up = tensor[expert].chunk(2, dim=0)
                    matrices[f"{name}[{expert}].gate"] = gate
                    matrices[f"{name}[{expert}].up"] = up
                else:
                    matrices[f"{name}[{expert}]"] = tensor[expert]
    return matrices


def wait_until_locked(process, out, timeout: float = 120.0) -> None:
    """Wait until `process` holds the lock of output directory `out` (its pid is in the lock file);
    fail if it ends first or takes longer than `timeout` seconds."""
    import time

    from reconstruct.lock import lock_path

    deadline = time.monotonic() + timeout
    while f'"pid": {process.pid}' not in (lock_path(out).read_text() if lock_path(out).exists() else ""):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the first run never took its lock"
        time.sleep(0.01)


class OneLinearUnit(nn.Module):
    """A fitting unit made of one linear, named `proj`: what the corrections' tests attach to."""

    def __init__(self, linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)
