"""Pruning methods against their definitions.

* Wanda's masks in a saved checkpoint equal masks computed here from the definition
  (|W_ij|·‖X_j‖₂, the int(in·s) lowest per row removed) on inputs caught from the dense model run by
  transformers -- not through the engine's statistics;
* SparseGPT reconstructs a layer's output better than Wanda, and Wanda better than magnitude, on
  inputs with correlated, heterogeneous features; SparseGPT's per-layer errors in the report are the
  lowest on a tiny model too;
* the methods' masks and N:M patterns, directly.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import calib
from conftest import NSAMPLES, SEQLEN, load_causal_lm
from reconstruct.pruning import METHODS, NMPattern, PruningError
from reconstruct.stats import InputStatistics


def _dense_block0_inputs(model_dir, sample_text, token_cache):
    """Each linear of block 0 -> all its inputs [tokens, in] from a plain transformers forward pass."""
    from transformers import AutoTokenizer

    windows = calib.calibration_windows(str(sample_text), AutoTokenizer.from_pretrained(model_dir),
                                        NSAMPLES, SEQLEN, seed=0, cache_dir=token_cache)
    dense = load_causal_lm(model_dir)
    block0 = next(m for m in dense.modules() if isinstance(m, nn.ModuleList))[0]
    inputs, handles = {}, []
    for name, module in block0.named_modules():
        if isinstance(module, nn.Linear):
            def hook(module, args, _name=name):
                inputs.setdefault(_name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        dense(input_ids=windows)
    for handle in handles:
        handle.remove()
    return block0, {name: torch.cat(x) for name, x in inputs.items()}


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_wanda_mask_matches_definition(model_type, tiny_checkpoint, prune_tiny, sample_text, token_cache,
                                       tmp_path):
    sparsity = 0.6  # int(32·0.6) = 19, int(64·0.6) = 38: the count is truncated, not rounded
    model_dir = tiny_checkpoint(model_type)
    out = tmp_path / "wanda"
    prune_tiny(model_dir, out, method="wanda", sparsity=sparsity)

    dense_block0, inputs = _dense_block0_inputs(model_dir, sample_text, token_cache)
    pruned = load_causal_lm(out)
    pruned_block0 = next(m for m in pruned.modules() if isinstance(m, nn.ModuleList))[0]
    assert len(inputs) >= 4
    for name, x in inputs.items():
        assert x.shape[0] == NSAMPLES * SEQLEN
        weight = dense_block0.get_submodule(name).weight.detach().double()
        scores = weight.abs() * x.pow(2).sum(dim=0).sqrt()[None, :]
        count = int(weight.shape[1] * sparsity)
        expected_zero = torch.zeros_like(weight, dtype=torch.bool)
        expected_zero.scatter_(1, scores.topk(count, dim=1, largest=False).indices, True)
        actual_zero = pruned_block0.get_submodule(name).weight.detach() == 0
        assert torch.equal(actual_zero, expected_zero), (
            f"{name}: {int((actual_zero != expected_zero).sum())} mask entries differ from the definition")


# --------------------------------------------------------------------------------------------------
def _realistic_layer(seed=0, tokens=2048, in_features=128, out_features=96):
    """Inputs from a few latent factors (correlated features) with log-normal feature scales and two
    outlier features, as in real LLM activations; a weight of the usual scale."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, 16, generator=g)
    x = latent @ torch.randn(16, in_features, generator=g) + 0.3 * torch.randn(tokens, in_features, generator=g)
    x = x * torch.exp(torch.randn(in_features, generator=g))
    x[:, :2] *= 20
    weight = torch.randn(out_features, in_features, generator=g) / in_features ** 0.5
    return x, weight


def _output_error(x, dense, pruned):
    return float((x @ (dense - pruned).T).pow(2).sum() / (x @ dense.T).pow(2).sum())


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)], ids=["unstructured", "2of4"])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern):
    x, weight = _realistic_layer()
    stats = InputStatistics(x.shape[1], "cpu", with_hessian=True)
    for start in range(0, len(x), 256):  # accumulated over batches, as the engine does
        stats.add_tokens(x[start:start + 256])
    errors = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        result = METHODS[name].prune(weight.clone(), stats, 0.5, pattern, layer="test")
        zero = result.weight == 0
        assert torch.equal(zero, ~result.mask)
        assert zero.float().mean().item() == pytest.approx(0.5)
        errors[name] = _output_error(x, weight, result.weight)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
    assert errors["sparsegpt"] < 0.5 * errors["wanda"], errors


def test_sparsegpt_has_lowest_layer_errors_in_report(tiny_checkpoint, prune_tiny, tmp_path):
    model_dir = tiny_checkpoint("llama", hidden_size=64, intermediate_size=128)
    layer_errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        report = prune_tiny(model_dir, tmp_path / method, method=method, sparsity=0.5)
        assert report["totals"]["pruned_sparsity"] == pytest.approx(0.5)
        # Block 0 sees the same inputs whatever the method: its layers compare like with like.
        layer_errors[method] = {e["name"]: e["rel_error"] for e in report["layers"] if e["block"] == 0}
    names = list(layer_errors["wanda"])
    assert len(names) == 7
    for name in names:
        assert 0 < layer_errors["sparsegpt"][name] < min(layer_errors["wanda"][name],
                                                         layer_errors["magnitude"][name]), name


# --------------------------------------------------------------------------------------------------
def test_wanda_and_magnitude_masks_directly():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 16, generator=g)
    x = torch.randn(100, 16, generator=g) * torch.linspace(0.1, 3, 16)
    stats = InputStatistics(16, "cpu", with_hessian=False)
    stats.add_tokens(x)
    wanda = METHODS["wanda"].prune(weight.clone(), stats, 0.3, None)
    assert ((wanda.weight == 0).sum(dim=1) == int(16 * 0.3)).all()
    scores = weight.abs() * x.pow(2).sum(0).sqrt()
    assert torch.equal(~wanda.mask, scores <= scores.kthvalue(int(16 * 0.3), dim=1, keepdim=True).values)
    magnitude = METHODS["magnitude"].prune(weight.clone(), None, 0.3, None)
    threshold = weight.abs().flatten().kthvalue(int(weight.numel() * 0.3)).values
    assert torch.equal(~magnitude.mask, weight.abs() <= threshold)
    assert torch.equal(magnitude.weight, weight * magnitude.mask)
    nm = METHODS["magnitude"].prune(weight.clone(), None, 0.5, NMPattern(2, 4))
    assert ((nm.weight == 0).reshape(6, 4, 4).sum(dim=2) == 2).all()


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)], ids=["unstructured", "2of4"])
def test_wanda_selects_the_same_in_row_chunks(pattern, monkeypatch):
    """Wanda scores a few rows at a time (bounded scratch memory): the mask is the one made at once."""
    from reconstruct import tensors
    from reconstruct.pruning import base

    g = torch.Generator().manual_seed(2)
    weight = torch.randn(37, 64, generator=g).to(torch.bfloat16)
    stats = InputStatistics(64, "cpu", with_hessian=False)
    stats.add_tokens(torch.randn(50, 64, generator=g) * torch.linspace(0.1, 3, 64))
    whole = base.row_mask(weight.abs().float() * stats.column_norms[None, :], 0.5, pattern)
    monkeypatch.setattr(tensors, "ROW_CHUNK_ELEMENTS", 5 * 64)  # 8 chunks, the last one short
    assert len(tensors.row_chunks(weight)) == 8
    pruned = weight.clone()
    result = METHODS["wanda"].prune(pruned, stats, 0.5, pattern)
    assert torch.equal(result.mask, whole)
    assert result.weight is pruned and result.weight.dtype == torch.bfloat16  # pruned in place
    assert torch.equal(result.weight, weight * whole)


def _many_ties(g):
    """Score matrices where selections are decided by ties: few distinct values, zero (dead or
    already pruned) inputs, half-precision magnitudes, NaN."""
    small_integers = torch.randint(0, 4, (40, 64), generator=g).float()
    zeros = torch.rand(40, 64, generator=g) * (torch.rand(40, 64, generator=g) > 0.6)
    half = torch.randn(40, 64, generator=g).to(torch.bfloat16).abs().float()
    nan = torch.rand(40, 64, generator=g)
    nan[0, 5], nan[1] = float("nan"), float("nan")
    return [small_integers, zeros, half, nan, torch.rand(40, 64, generator=g)]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_row_selection_is_the_same_on_several_threads(threads):
    """The rows of a chunk are split across threads for numpy's selection: the same masks and counts."""
    from reconstruct.pruning import base

    scores = torch.rand(37, 64, generator=torch.Generator().manual_seed(threads))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        keep, kept = base.keep_above_kth_lowest(scores, 20)
    finally:
        torch.set_num_threads(previous)
    reference = scores > torch.kthvalue(scores, 20, dim=1, keepdim=True).values
    assert torch.equal(keep, reference)
    assert torch.equal(kept, reference.sum(dim=1))


@pytest.mark.parametrize("count", [0, 1, 13, 32, 63])
def test_threshold_selection_equals_topk_with_ties(count):
    """The kthvalue threshold picks exactly the masks top-k picked (the rule masks always followed),
    also where scores tie at the threshold: the same checkpoints as before the faster selection."""
    from reconstruct.pruning import base

    for scores in _many_ties(torch.Generator().manual_seed(count)):
        reference = torch.ones_like(scores, dtype=torch.bool)
        if count:
            reference.scatter_(1, torch.topk(scores, count, dim=1, largest=False).indices, False)
        assert torch.equal(base.keep_all_but_lowest(scores, count), reference)
        for pattern in (NMPattern(2, 4), NMPattern(1, 4), NMPattern(5, 8)):
            groups = scores.reshape(-1, pattern.m)
            reference = torch.ones_like(groups, dtype=torch.bool)
            reference.scatter_(1, torch.topk(groups, pattern.m - pattern.n, dim=1, largest=False).indices, False)
            assert torch.equal(base.lowest_per_group(scores, pattern), reference.reshape(scores.shape))


@pytest.mark.parametrize("text", ["4:2", "2-4", "0:4", "2:2", "a:b", "2:4:8"])
def test_nm_pattern_parse_rejects(text):
    with pytest.raises(PruningError, match="N:M|0 < N < M"):
        NMPattern.parse(text)


def test_nm_pattern_divisibility():
    pattern = NMPattern.parse("4:8")
    assert (pattern.n, pattern.m, pattern.sparsity) == (4, 8, 0.5)
    pattern.check_divides(64, "ok")
    with pytest.raises(PruningError, match="layer mlp.down_proj has 36 inputs"):
        pattern.check_divides(36, "mlp.down_proj")


# --------------------------------------------------------------------------------------------------
def _inputs_with_a_mean(rows=64, features=128, tokens=2000, seed=3):
    """Inputs whose features have non-zero means and different spreads (as LLM activations do)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=g) * torch.linspace(0.2, 2.0, features) \
        + torch.randn(features, generator=g)
    weight = torch.randn(rows, features, generator=g)
    return x, weight


def test_dsnot_keeps_each_rows_sparsity_and_shrinks_its_expected_error():
    x, weight = _inputs_with_a_mean()
    stats = InputStatistics(x.shape[1], "cpu", with_hessian=False, with_sums=True)
    for start in range(0, len(x), 500):
        stats.add_tokens(x[start:start + 500])
    assert torch.allclose(stats.means, x.mean(0), atol=1e-5)
    assert torch.allclose(stats.variances, x.var(0, unbiased=False), rtol=1e-4, atol=1e-5)
    wanda = METHODS["wanda"].prune(weight.clone(), stats, 0.7, None)
    dsnot = METHODS["dsnot"].prune(weight.clone(), stats, 0.7, None)
    assert ((dsnot.weight == 0).sum(dim=1) == int(128 * 0.7)).all()  # the same zeros per row
    assert torch.equal(dsnot.weight == 0, ~dsnot.mask)
    assert torch.equal(dsnot.weight[dsnot.mask], weight[dsnot.mask])  # no weight changes value
    assert not torch.equal(dsnot.mask, wanda.mask)

    def expected_error(mask):  # |E[dense output − pruned output]| per row
        return ((weight * ~mask) @ x.mean(0)).abs()

    assert (expected_error(dsnot.mask) <= expected_error(wanda.mask) + 1e-4).all()
    assert expected_error(dsnot.mask).mean() < 0.5 * expected_error(wanda.mask).mean()
    # ...and it is the output error on the calibration tokens that this lowers
    assert _output_error(x, weight, dsnot.weight) < _output_error(x, weight, wanda.weight)


def test_dsnot_refuses_nm_patterns():
    x, weight = _inputs_with_a_mean()
    stats = InputStatistics(x.shape[1], "cpu", with_hessian=False, with_sums=True)
    stats.add_tokens(x)
    with pytest.raises(PruningError, match="unstructured"):
        METHODS["dsnot"].prune(weight, stats, 0.5, NMPattern(2, 4))
