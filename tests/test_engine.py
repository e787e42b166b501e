"""The sequential engine end to end on tiny checkpoints of every supported family.

* prune -> save -> reload with plain transformers: exact per-row sparsity (unstructured) or a valid
  N:M pattern in every pruned matrix, untouched embeddings/head/norms/routers, finite logits;
* capture and replay are exact: at sparsity 0 the carried activations are the dense model's;
* the same seed gives byte-identical checkpoints, a different seed different calibration and weights.
"""
from __future__ import annotations

import filecmp

import pytest
import torch

import calib
from conftest import NSAMPLES, SEQLEN, is_block_tensor, load_causal_lm, pruned_matrices, saved_tensors
from reconstruct.tiny import TINY_CONFIGS

SPARSITY = 0.5


def _check_against_original(original, pruned, pattern: str | None):
    """Every pruned matrix is the original times a keep-mask of the right shape; all else is equal."""
    original_matrices, matrices = pruned_matrices(original), pruned_matrices(pruned)
    assert matrices and original_matrices.keys() == matrices.keys()
    for name, weight in matrices.items():
        out_features, in_features = weight.shape
        zero = weight == 0
        if pattern is None:
            per_row = zero.sum(dim=1)
            assert (per_row == int(in_features * SPARSITY)).all(), (name, per_row.tolist())
        else:
            n, m = (int(p) for p in pattern.split(":"))
            groups = zero.reshape(out_features, in_features // m, m).sum(dim=2)
            assert (groups >= m - n).all(), (name, groups.min().item())
        # Wanda never updates weights: the survivors are exactly the original weights.
        torch.testing.assert_close(weight, original_matrices[name] * ~zero, rtol=0, atol=0, msg=name)

    pruned_state = dict(pruned.named_parameters())
    pruned_names = {name.split("[")[0] for name in matrices}
    for name, parameter in original.named_parameters():
        if name in pruned_names:
            continue
        # Embeddings, head, final norm, position embeddings, block norms, biases, routers: untouched.
        assert torch.equal(pruned_state[name], parameter), name


@pytest.mark.parametrize("pattern", [None, "2:4"], ids=["unstructured", "2of4"])
@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_prune_save_reload_every_family(model_type, pattern, tiny_checkpoint, prune_tiny, tmp_path):
    model_dir = tiny_checkpoint(model_type)
    out = tmp_path / "pruned"
    settings = {"pattern": pattern} if pattern else {"sparsity": SPARSITY}
    report = prune_tiny(model_dir, out, method="wanda", **settings)

    assert report["totals"]["pruned_sparsity"] == pytest.approx(SPARSITY, abs=1e-6)
    assert not out.with_name(out.name + ".partial").exists()
    original, pruned = load_causal_lm(model_dir), load_causal_lm(out)
    _check_against_original(original, pruned, pattern)

    # Non-block tensors (embeddings, lm_head, final norm) are bit-identical in the files, too.
    before, after = saved_tensors(model_dir), saved_tensors(out)
    outside = [name for name in before if not is_block_tensor(name)]
    assert outside
    for name in outside:
        assert torch.equal(after[name], before[name]), name

    ids = torch.randint(3, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = pruned(input_ids=ids).logits
    assert logits.shape == (2, 24, original.config.vocab_size)
    assert torch.isfinite(logits).all()


# --------------------------------------------------------------------------------------------------
def _last_block(model):
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == model.config.num_hidden_layers:
            return module[-1]
    raise AssertionError("no decoder block list found")


REPLAY_MODELS = {
    "llama": {},
    "opt": {},  # learned positions, biases, LayerNorm
    # A sliding window shorter than the calibration windows in layer 0, full attention in layer 1:
    # each block must be replayed with its own mask.
    "gemma3_text": {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
}


@pytest.mark.parametrize("model_type", sorted(REPLAY_MODELS))
def test_capture_and_replay_are_exact(model_type, tiny_checkpoint, run_tiny, sample_text, token_cache,
                                      tmp_path):
    from transformers import AutoTokenizer

    model_dir = tiny_checkpoint(model_type, **REPLAY_MODELS[model_type])
    result = run_tiny(model_dir, tmp_path / "out", sparsity=0.0, batch_size=3)
    carried = result.final_activations.data.float()
    assert carried.shape == (NSAMPLES, SEQLEN, 32)

    # The reference: the dense model run by transformers on the same windows, no engine code.
    windows = calib.calibration_windows(str(sample_text), AutoTokenizer.from_pretrained(model_dir),
                                        NSAMPLES, SEQLEN, seed=0, cache_dir=token_cache)
    dense = load_causal_lm(model_dir)
    last = _last_block(dense)
    seen = {}

    def catch(module, args, output):
        seen["out"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    handle = last.register_forward_hook(catch)
    with torch.no_grad():
        logits = dense(input_ids=windows).logits
    handle.remove()
    torch.testing.assert_close(carried, seen["out"], rtol=1e-6, atol=1e-6)

    def replace(module, args, output):
        return (carried, *output[1:]) if isinstance(output, tuple) else carried

    handle = last.register_forward_hook(replace)
    with torch.no_grad():
        replayed_logits = dense(input_ids=windows).logits
    handle.remove()
    torch.testing.assert_close(replayed_logits, logits, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
def _safetensors_files(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith((".safetensors", ".index.json")))


def test_same_seed_gives_identical_files_other_seed_differs(tiny_checkpoint, prune_tiny, sample_text,
                                                            token_cache, tmp_path):
    from transformers import AutoTokenizer

    model_dir = tiny_checkpoint("llama")
    settings = dict(correction="masklora", steps=4, rank=4)
    runs = {name: tmp_path / name for name in ("a", "b", "c")}
    prune_tiny(model_dir, runs["a"], seed=0, **settings)
    prune_tiny(model_dir, runs["b"], seed=0, **settings)
    prune_tiny(model_dir, runs["c"], seed=1, **settings)

    files = _safetensors_files(runs["a"])
    assert any(f.endswith(".safetensors") for f in files)
    assert files == _safetensors_files(runs["b"])
    match, mismatch, errors = filecmp.cmpfiles(runs["a"], runs["b"], files, shallow=False)
    assert match == files and not mismatch and not errors

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = [calib.calibration_windows(str(sample_text), tokenizer, NSAMPLES, SEQLEN, seed=seed,
                                         cache_dir=token_cache) for seed in (0, 1)]
    assert not torch.equal(*windows)
    a, c = saved_tensors(runs["a"]), saved_tensors(runs["c"])
    assert a.keys() == c.keys()
    changed = [name for name in a if is_block_tensor(name) and not torch.equal(a[name], c[name])]
    assert changed, "a different seed (other calibration windows) left every block weight unchanged"


def test_cached_calibration_tokens_need_no_tokenizer(tiny_checkpoint, prune_tiny, tmp_path, monkeypatch):
    """The second run of the same calibration finds its tokens in the cache by the tokenizer's files:
    it never loads the tokenizer, and writes the same checkpoint (with the tokenizer's files)."""
    from reconstruct import models

    model_dir = tiny_checkpoint("llama")
    loads = []
    load = models.load_tokenizer
    monkeypatch.setattr(models, "load_tokenizer", lambda source: loads.append(source) or load(source))
    first = prune_tiny(model_dir, tmp_path / "first", cache_dir=str(tmp_path / "cache"))
    assert len(loads) == 1  # a new cache: tokenised once

    def refuse(source):
        raise AssertionError("the tokenizer was loaded although the tokens are cached")

    monkeypatch.setattr(models, "load_tokenizer", refuse)
    second = prune_tiny(model_dir, tmp_path / "second", cache_dir=str(tmp_path / "cache"))
    files = _safetensors_files(tmp_path / "first") + ["tokenizer.json", "tokenizer_config.json"]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "first", tmp_path / "second", files, shallow=False)
    assert match == files and not mismatch and not errors
    assert first["totals"]["pruned_sparsity"] == second["totals"]["pruned_sparsity"]


# --------------------------------------------------------------------------------------------------
def test_report_has_time_per_phase_adding_up_to_the_wall_time(tiny_checkpoint, prune_tiny, tmp_path):
    """report.json says where the time went: start-up and each block's phases, in total and per
    block, adding up to the wall time (what is between phases is `other`). No speed is asserted."""
    from reconstruct.timing import BLOCK_PHASES, STARTUP_PHASES

    report = prune_tiny(tiny_checkpoint("llama"), tmp_path / "out", correction="masklora", steps=2, rank=4,
                        startup_s=0.25)
    totals = report["totals"]
    phases = totals["phases_s"]
    assert list(phases) == [*STARTUP_PHASES, *BLOCK_PHASES, "other"]
    assert all(seconds >= 0 for seconds in phases.values())
    assert phases["imports"] == 0.25  # what the caller spent before the run is part of it
    assert sum(phases.values()) == pytest.approx(totals["wall_time_s"], rel=0.05)
    assert phases["other"] <= 0.05 * totals["wall_time_s"]
    for block in report["blocks"]:
        assert list(block["phases_s"]) == list(BLOCK_PHASES)  # a correction: every phase ran
        assert sum(block["phases_s"].values()) == pytest.approx(block["time_s"], abs=0.01)
    for phase in BLOCK_PHASES:
        assert sum(b["phases_s"][phase] for b in report["blocks"]) == pytest.approx(phases[phase], abs=0.01)


def test_magnitude_without_correction_skips_the_dense_pass(tiny_checkpoint, prune_tiny, tmp_path):
    """Magnitude needs no statistics and no targets: each block is run once (replay), not twice."""
    report = prune_tiny(tiny_checkpoint("llama"), tmp_path / "out", method="magnitude", error_windows=0)
    assert all("observe" not in block["phases_s"] for block in report["blocks"])
    assert all(layer["rel_error"] is None and layer["sparsity"] == 0.5 for layer in report["layers"])


def test_a_dense_target_without_a_correction_changes_nothing(tiny_checkpoint, run_tiny, tmp_path, monkeypatch):
    """--target dense only matters to a correction: without one, the dense model's activations are not
    carried (two stores fewer) and the weights are those of the default target."""
    from reconstruct.store import StoreFactory

    created = []
    original = StoreFactory.create
    monkeypatch.setattr(StoreFactory, "create", lambda self, name, *a, **k: created.append(name) or
                        original(self, name, *a, **k))
    model = tiny_checkpoint("llama")
    plain = run_tiny(model, tmp_path / "plain", method="wanda", target="sparse-inputs")
    dense = run_tiny(model, tmp_path / "dense", method="wanda", target="dense")
    assert not any(name.startswith("dense-") for name in created)
    plain_tensors, dense_tensors = saved_tensors(plain.out), saved_tensors(dense.out)
    assert plain_tensors.keys() == dense_tensors.keys()
    assert all(torch.equal(plain_tensors[name], dense_tensors[name]) for name in plain_tensors)
