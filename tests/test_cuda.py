"""The engine on a CUDA device (marked `cuda`: skipped without one; scripts/gpu_check.sh runs them).

* Wanda on CUDA: exact per-row sparsity, survivors are the original weights, zeros are +0.0, and
  the masks are the CPU run's (the statistics differ only in the last bits between devices, so a few
  masks may differ where two scores are within rounding of each other: at most a handful);
* MaskLoRA on a bf16 model: every pruned weight stays exactly +0.0 after the merge;
* SparseGPT and N:M on CUDA: the pattern holds;
* the report's device peak and per-phase times are filled in.
"""
from __future__ import annotations

import pytest
import torch

from conftest import is_block_tensor, saved_tensors

pytestmark = pytest.mark.cuda


def _block_matrices(directory) -> dict[str, torch.Tensor]:
    return {name: t for name, t in saved_tensors(directory).items() if is_block_tensor(name) and t.dim() == 2}


def _all_zeros_positive(tensor: torch.Tensor) -> bool:
    zeros = tensor[tensor == 0]
    return not torch.signbit(zeros).any()


def test_wanda_on_cuda_matches_the_cpu_run(tiny_checkpoint, prune_tiny, tmp_path):
    model = tiny_checkpoint("llama", hidden_size=64, intermediate_size=128)
    cuda = prune_tiny(model, tmp_path / "cuda", method="wanda", device="cuda")
    prune_tiny(model, tmp_path / "cpu", method="wanda", device="cpu")
    totals = cuda["totals"]
    assert totals["peak_device_bytes"] > 0
    assert totals["pruned_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert sum(totals["phases_s"].values()) == pytest.approx(totals["wall_time_s"], rel=0.05)
    original, on_cuda, on_cpu = (_block_matrices(d) for d in (model, tmp_path / "cuda", tmp_path / "cpu"))
    differing = 0
    for name, weight in on_cuda.items():
        kept = weight != 0
        assert ((~kept).sum(dim=1) == weight.shape[1] // 2).all(), name
        assert torch.equal(weight, torch.where(kept, original[name], torch.zeros_like(weight))), name
        assert _all_zeros_positive(weight), name
        differing += int((kept != (on_cpu[name] != 0)).sum())
    assert differing <= 8, f"{differing} mask entries differ between CUDA and CPU"


def test_masklora_bf16_on_cuda_keeps_exact_zeros(tiny_checkpoint, prune_tiny, tmp_path):
    model = tiny_checkpoint("llama", hidden_size=64, intermediate_size=128)
    report = prune_tiny(model, tmp_path / "out", method="wanda", device="cuda", dtype="bf16",
                        correction="masklora", steps=10, rank=4)
    assert all("fit" in block["phases_s"] for block in report["blocks"])
    for name, weight in _block_matrices(tmp_path / "out").items():
        assert weight.dtype == torch.bfloat16
        assert ((weight == 0).sum(dim=1) >= weight.shape[1] // 2).all(), name
        assert _all_zeros_positive(weight), name


@pytest.mark.parametrize("pattern", [None, "2:4"], ids=["unstructured", "2of4"])
def test_sparsegpt_on_cuda(pattern, tiny_checkpoint, prune_tiny, tmp_path):
    model = tiny_checkpoint("llama", hidden_size=64, intermediate_size=128)
    settings = {"pattern": pattern} if pattern else {"sparsity": 0.5}
    report = prune_tiny(model, tmp_path / "out", method="sparsegpt", device="cuda", **settings)
    assert report["totals"]["pruned_sparsity"] == pytest.approx(0.5, abs=1e-3)
    for name, weight in _block_matrices(tmp_path / "out").items():
        assert _all_zeros_positive(weight), name
        if pattern:
            groups = (weight == 0).reshape(weight.shape[0], -1, 4).sum(dim=2)
            assert (groups >= 2).all(), name
