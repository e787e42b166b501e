"""OUT/README.md, the model card: a YAML header the Hugging Face Hub reads, the command that made the
output, and numbers that are report.json's, for `prune` and for `retrain`; big models' per-layer
tables folded under a summary."""
from __future__ import annotations

import json
import math
import re

import pytest
import yaml

from reconstruct.cli import main
from reconstruct.model_card import FOLDED_LAYERS, prune_card


def card_of(out):
    """(the YAML header as parsed, the markdown after it, report.json)."""
    text = (out / "README.md").read_text()
    match = re.fullmatch(r"---\n(.*?)\n---\n(.*)", text, re.DOTALL)
    assert match, text[:300]
    return yaml.safe_load(match.group(1)), match.group(2), json.loads((out / "report.json").read_text())


def table_rows(body: str, first_column: str) -> dict[str, list[str]]:
    """The markdown table rows whose first cell starts with `first_column`, by that cell."""
    rows = {}
    for line in body.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith(first_column):
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def pruned_by_the_command(tiny_checkpoint, sample_text, token_cache, tmp_path_factory):
    model = tiny_checkpoint("llama")
    out = tmp_path_factory.mktemp("card") / "pruned"
    argv = ["prune", str(model), "--out", str(out), "--calib", str(sample_text), "--nsamples", "8", "--seqlen",
            "32", "--device", "cpu", "--sparsity", "0.6", "--steps", "3", "--rank", "4", "--cache-dir",
            str(token_cache)]
    assert main(argv) == 0
    return model, out, argv


def test_prune_card(pruned_by_the_command):
    model, out, argv = pruned_by_the_command
    header, body, report = card_of(out)
    assert header == {"base_model": str(model), "tags": ["pruned", "sparse", "reconstruct"],
                      "library_name": "transformers"}
    assert f"```\nreconstruct {' '.join(argv)}\n```" in body  # the command line, as typed
    assert report["invocation"] == f"reconstruct {' '.join(argv)}"
    assert "| pruning | wanda, sparsity 0.6 |" in body
    assert "masklora fitted per block towards the dense model's outputs: rank 4, alpha 8, 3 steps" in body
    assert f"Sparsity of the pruned linear layers: **{report['totals']['pruned_sparsity']:.4f}**" in body
    layers = table_rows(body, "model.layers.")
    assert list(layers) == [layer["name"] for layer in report["layers"]]
    for layer in report["layers"]:
        shape, sparsity, error = layers[layer["name"]]
        assert shape == "×".join(map(str, layer["shape"]))
        assert float(sparsity) == pytest.approx(layer["sparsity"], abs=5e-5)
        assert float(error) == pytest.approx(layer["rel_error"], rel=1e-5)
    blocks = {int(index): cells for index, cells in table_rows(body, "").items() if index.isdigit()}
    assert sorted(blocks) == [block["index"] for block in report["blocks"]]
    for block in report["blocks"]:
        before, after, merged = blocks[block["index"]]
        assert float(before) == pytest.approx(block["heldout_before"], rel=1e-5)
        assert float(after) == pytest.approx(block["heldout_after"], rel=1e-5)
        assert merged == ("yes" if block["merged"] else "no")


def test_retrain_card(pruned_by_the_command, sample_text, token_cache, tmp_path):
    from reconstruct.api import retrain

    _, pruned, _ = pruned_by_the_command
    retrain(str(pruned), str(tmp_path / "out"), params="masklora", data=str(sample_text), steps=4, batch_size=2,
            seqlen=32, eval_every=2, eval_windows=2, save_every=0, rank=8, device="cpu", cache_dir=str(token_cache))
    header, body, report = card_of(tmp_path / "out")
    assert header["base_model"] == str(pruned) and header["tags"] == ["pruned", "sparse", "reconstruct"]
    # From Python: the call, with the settings it was given
    assert report["invocation"] == (f"reconstruct.retrain({str(pruned)!r}, {str(tmp_path / 'out')!r}, "
                                    f"params='masklora', data={str(sample_text)!r}, steps=4, batch_size=2, "
                                    f"seqlen=32, eval_every=2, eval_windows=2, save_every=0, rank=8, device='cpu', "
                                    f"cache_dir={str(token_cache)!r})")
    assert f"```\n{report['invocation']}\n```" in body
    assert f"| trained | masklora (rank 8, alpha 16): {report['trainable_params']:,} parameters" in body
    assert (f"**{report['heldout_before']:.4f} → {report['heldout_after']:.4f}** (perplexity "
            f"{math.exp(report['heldout_before']):.2f} → {math.exp(report['heldout_after']):.2f})") in body
    steps = {int(step): cells for step, cells in table_rows(body, "").items() if step.isdigit()}
    assert sorted(steps) == [step for step, _ in report["heldout_loss"]] == [0, 2, 4]
    for step, loss in report["heldout_loss"]:
        assert float(steps[step][0]) == pytest.approx(loss, abs=5e-5)
    layers = table_rows(body, "model.layers.")
    assert list(layers) == [layer["name"] for layer in report["layers"]]
    for layer in report["layers"]:
        assert float(layers[layer["name"]][1]) == pytest.approx(layer["sparsity_before"], abs=5e-5)
        assert float(layers[layer["name"]][2]) == pytest.approx(layer["sparsity_after"], abs=5e-5)


def test_a_big_models_layers_are_folded_under_a_summary_by_kind():
    layers = [{"block": b, "name": f"model.layers.{b}.{kind}", "shape": [8, 8], "sparsity": 0.5 + b / 1000,
               "rel_error": 0.1} for b in range(FOLDED_LAYERS) for kind in ("self_attn.q_proj", "mlp.up_proj")]
    report = {"model": "org/big", "method": "wanda", "sparsity": 0.5, "pattern": None, "correction": "none",
              "invocation": "reconstruct prune org/big --out big", "versions": {"reconstruct": "0"},
              "config": {"calib": "c4", "nsamples": 128, "seqlen": 2048, "seed": 0, "error_windows": 4},
              "totals": {"pruned_sparsity": 0.55, "wall_time_s": 1.0, "reverted_blocks": []},
              "layers": layers, "blocks": [{"index": b} for b in range(FOLDED_LAYERS)]}
    card = prune_card(report)
    summary = table_rows(card, "self_attn.q_proj")["self_attn.q_proj"]
    assert summary == [str(FOLDED_LAYERS), "0.5000", f"{0.5 + (FOLDED_LAYERS - 1) / 2000:.4f}",
                       f"{0.5 + (FOLDED_LAYERS - 1) / 1000:.4f}"]
    assert "<details>" in card and len(table_rows(card, "model.layers.")) == 2 * FOLDED_LAYERS
