"""`retrain --offload cpu`: FSDP2's CPU offload on one process (a process group of one). On the CPU the
device is the host, so what is tested is that the offloaded run computes what the plain one does:
the same weights to float tolerance, the same zeros, +0.0 at every pruned entry.

Offline, on a tiny LLaMA pruned by our own `prune` (magnitude, 60%).
"""
from __future__ import annotations

import pytest
import torch

from conftest import saved_tensors
from reconstruct.api import retrain
from reconstruct.config import ConfigError

SEQLEN = 32


@pytest.fixture(scope="module")
def pruned_models(tiny_checkpoint, prune_tiny, tmp_path_factory):
    """{"llama": pruned, "opt": pruned (biases, a tied head)}: magnitude 60%, no correction."""
    root = tmp_path_factory.mktemp("offload-input")
    dense = {"llama": tiny_checkpoint("llama", hidden_size=64, intermediate_size=128),
             "opt": tiny_checkpoint("opt", hidden_size=64, ffn_dim=128, word_embed_proj_dim=64,
                                    tie_word_embeddings=True)}
    for family, model in dense.items():
        prune_tiny(model, root / family, method="magnitude", sparsity=0.6)
    return {family: root / family for family in dense}


@pytest.fixture(scope="module")
def pruned_llama(pruned_models):
    return pruned_models["llama"]


def settings(sample_text, token_cache, **overrides) -> dict:
    return {"data": str(sample_text), "steps": 4, "batch_size": 2, "seqlen": SEQLEN, "eval_every": 2,
            "eval_windows": 2, "save_every": 2, "device": "cpu", "cache_dir": str(token_cache), "rank": 4,
            "lr": 3e-3, **overrides}


def assert_same_model(offloaded: dict, plain: dict, tolerance: float) -> float:
    assert offloaded.keys() == plain.keys()
    largest = 0.0
    for name, tensor in plain.items():
        assert torch.equal(offloaded[name] == 0, tensor == 0), f"{name}: the zeros differ"
        assert not torch.signbit(offloaded[name][offloaded[name] == 0]).any(), f"{name}: a -0.0"
        largest = max(largest, float((offloaded[name].float() - tensor.float()).abs().max()))
    assert largest < tolerance
    return largest


@pytest.mark.parametrize("family, params", [("llama", "masklora+norm"), ("llama", "full"), ("opt", "bias+norm"),
                                            ("opt", "scalelora")])
def test_offload_cpu_gives_the_model_of_a_plain_run(family, params, pruned_models, sample_text, token_cache,
                                                    tmp_path):
    pruned_llama = pruned_models[family]
    plain = retrain(str(pruned_llama), str(tmp_path / "plain"), params=params,
                    **settings(sample_text, token_cache))
    offloaded = retrain(str(pruned_llama), str(tmp_path / "offloaded"), params=params, offload="cpu",
                        **settings(sample_text, token_cache))
    assert plain["merged"] and offloaded["merged"]
    assert offloaded["fsdp"] and not plain["fsdp"] and offloaded["config"]["offload"] == "cpu"
    assert abs(offloaded["heldout_after"] - plain["heldout_after"]) < 1e-5
    # It trained: the weights moved, and they moved the same way with and without offloading
    pruned, trained = saved_tensors(pruned_llama), saved_tensors(tmp_path / "plain")
    moved = max(float((t.float() - pruned[n].float()).abs().max()) for n, t in trained.items())
    largest = assert_same_model(saved_tensors(tmp_path / "offloaded"), saved_tensors(tmp_path / "plain"), 1e-5)
    assert largest < moved / 100, (largest, moved)
    # No process group is left behind: the next run in this process starts alone again
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("first, then", [("none", "cpu"), ("cpu", "none"), ("cpu", "cpu")])
def test_a_stopped_run_resumes_with_or_without_offload(first, then, pruned_llama, sample_text, token_cache,
                                                       tmp_path, monkeypatch):
    """A run stopped after its state of step 2 resumes with or without --offload cpu and finishes with
    the plain run's model. Offloaded, the state's tensors are written in each rank's shards (a
    directory of safetensors files named by the step); without, whole by rank 0."""
    from reconstruct.retraining import trainer

    plain = tmp_path / "plain"
    retrain(str(pruned_llama), str(plain), params="masklora+norm", **settings(sample_text, token_cache))
    out = tmp_path / "stopped"
    original = trainer.Retrainer.train_step

    def stop_at_step_3(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(trainer.Retrainer, "train_step", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        retrain(str(pruned_llama), str(out), params="masklora+norm", offload=first,
                **settings(sample_text, token_cache))
    monkeypatch.setattr(trainer.Retrainer, "train_step", original)
    assert not torch.distributed.is_initialized()
    work = tmp_path / "stopped.partial"
    assert [p.name for p in work.glob("train_state-*.shards")] == (["train_state-00000002.shards"] if first == "cpu"
                                                                else [])
    report = retrain(str(pruned_llama), str(out), params="masklora+norm", offload=then, resume=True,
                     **settings(sample_text, token_cache))
    assert len(report["loss_curve"]["loss"]) == 4
    assert_same_model(saved_tensors(out), saved_tensors(plain), 1e-5)
    assert not list(out.glob("train_state*")), "a training state left in the output"


def test_unknown_offload_is_refused(pruned_llama, sample_text, token_cache, tmp_path):
    with pytest.raises(ConfigError, match="--offload 'disk': choose none or cpu"):
        retrain(str(pruned_llama), str(tmp_path / "out"), offload="disk", **settings(sample_text, token_cache))


def test_offload_with_fp16_weights_is_refused(pruned_llama, sample_text, token_cache, tmp_path):
    from reconstruct.models import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="--offload cpu with fp16 weights is not supported"):
        retrain(str(pruned_llama), str(tmp_path / "out"), offload="cpu", dtype="fp16",
                **settings(sample_text, token_cache))
    assert not torch.distributed.is_initialized()


def test_offload_with_gradient_checkpointing(pruned_llama, sample_text, token_cache, tmp_path):
    """FSDP2's units recomputed in the backward pass, their weights copied in again: the same model."""
    common = dict(params="masklora", gradient_checkpointing=True, **settings(sample_text, token_cache))
    retrain(str(pruned_llama), str(tmp_path / "plain"), **common)
    retrain(str(pruned_llama), str(tmp_path / "offloaded"), offload="cpu", **common)
    assert_same_model(saved_tensors(tmp_path / "offloaded"), saved_tensors(tmp_path / "plain"), 1e-5)
