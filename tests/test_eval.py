"""reconstruct.eval: the perplexity protocol, zero-shot through lm-eval, and `evaluate`.

Offline: a tiny LLaMA from reconstruct.tiny, the fixture text, and a 10-question local lm-eval task.
"""
from __future__ import annotations

import importlib
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from calib import eval_tokens
from reconstruct import eval as evaluation
from reconstruct.eval import evaluate, perplexity, zero_shot
from reconstruct.tiny import build_tiny_model, save_tiny_model, tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
EVAL_TEXT = FIXTURES / "eval_text.txt"
TASKS_DIR = FIXTURES / "lm_eval_tasks"
SEQLEN = 32


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No hub access from these tests, and no caches outside tmp_path."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # The libraries read the variables at import: set the values they consult as well, so that
    # lm-eval's lookup of a model's hub revision fails at once instead of retrying for seconds.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setenv("RECONSTRUCT_CACHE", str(tmp_path / "reconstruct-cache"))


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return eval_tokens(str(EVAL_TEXT), tiny_tokenizer(), SEQLEN,
                       cache_dir=tmp_path_factory.mktemp("token-cache"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


def direct_perplexity(model, tokens: torch.Tensor, seqlen: int) -> float:
    """The protocol spelled out: each full window alone, -log p of every token after the first."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, tokens.shape[1] - seqlen + 1, seqlen):
            window = tokens[:, start:start + seqlen]
            log_probs = torch.log_softmax(model(window).logits[0].double(), dim=-1)
            for position in range(seqlen - 1):
                total -= log_probs[position, window[0, position + 1]].item()
                count += 1
    return math.exp(total / count)


# --------------------------------------------------------------------------------------------------
# Perplexity


def test_fixture_text_has_a_tail_to_drop(tokens):
    assert tokens.shape[1] // SEQLEN >= 4 and tokens.shape[1] % SEQLEN != 0


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_equals_the_direct_computation(model, tokens, batch_size):
    expected = direct_perplexity(model, tokens, SEQLEN)
    assert perplexity(model, tokens, SEQLEN, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)


def test_perplexity_ignores_the_tail_shorter_than_a_window(model, tokens):
    full_windows = tokens[:, :(tokens.shape[1] // SEQLEN) * SEQLEN]
    assert perplexity(model, tokens, SEQLEN) == pytest.approx(perplexity(model, full_windows, SEQLEN))


def test_perplexity_needs_one_full_window(model, tokens):
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tokens[:, :SEQLEN - 1], SEQLEN)


def test_perplexity_restores_the_training_mode(model, tokens):
    model.train()
    perplexity(model, tokens, SEQLEN)
    assert model.training
    model.eval()


# --------------------------------------------------------------------------------------------------
# Zero-shot


def test_zero_shot_on_a_local_task(model_dir, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install reconstruct[eval])")
    # The task's data_files path is relative: lm-eval hands it to `datasets` unchanged.
    monkeypatch.chdir(TASKS_DIR)
    result = zero_shot(str(model_dir), ["tiny_mc"], batch_size=4, include_path=TASKS_DIR)
    accuracy = result["acc"]["tiny_mc"]
    assert 0.0 <= accuracy <= 1.0
    assert accuracy * 10 == pytest.approx(round(accuracy * 10))  # a share of the 10 questions
    assert result["mean_acc"] == pytest.approx(accuracy)
    assert result["num_fewshot"] == 0


def test_zero_shot_without_lm_eval_names_the_install_command(monkeypatch):
    real_import = importlib.import_module

    def import_without_lm_eval(name, *args, **kwargs):
        if name == "lm_eval":
            raise ModuleNotFoundError("No module named 'lm_eval'", name="lm_eval")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(evaluation.importlib, "import_module", import_without_lm_eval)
    with pytest.raises(ImportError, match=r"pip install reconstruct\[eval\]"):
        zero_shot("unused", ["boolq"])


# --------------------------------------------------------------------------------------------------
# evaluate: what `reconstruct eval` runs


def test_evaluate_prints_a_table_writes_json_and_matches_perplexity(model_dir, tokens, tmp_path, capsys):
    output = tmp_path / "out" / "results.json"
    results = evaluate(str(model_dir), data=[str(EVAL_TEXT)], seqlen=SEQLEN,
                       cache_dir=tmp_path / "cache", output_json=output)
    model = build_tiny_model("llama")  # the same seed and config as the saved checkpoint
    assert results["perplexity"][str(EVAL_TEXT)] == pytest.approx(perplexity(model, tokens, SEQLEN),
                                                                   rel=1e-5)
    assert results["eval_windows"][str(EVAL_TEXT)] == tokens.shape[1] // SEQLEN
    assert results["zero_shot"] is None
    assert json.loads(output.read_text()) == results
    printed = capsys.readouterr().out
    assert "| metric | value |" in printed and f"ppl (seqlen {SEQLEN})" in printed


def test_evaluate_shows_progress_over_windows_and_sources_in_a_log(model_dir, tokens, tmp_path, capsys):
    copy = tmp_path / "eval_copy.txt"
    copy.write_text(EVAL_TEXT.read_text())
    sources, windows = [str(EVAL_TEXT), str(copy)], tokens.shape[1] // SEQLEN
    evaluate(str(model_dir), data=sources, seqlen=SEQLEN, cache_dir=tmp_path / "cache")
    log = capsys.readouterr().err  # captured: not a terminal, so plain lines, not bars
    for number, source in enumerate(sources, start=1):
        shown = rf"^eval {re.escape(source)} \({number}/2\): "
        assert re.search(shown + rf"1/{windows} windows .*; ppl so far \d", log, re.M), log
        assert re.search(shown + rf"{windows}/{windows} windows \(100%\), .* elapsed; ppl so far", log, re.M), log


def test_evaluate_says_when_zero_shot_starts_and_ends(model_dir, monkeypatch, capsys):
    def fake_zero_shot(model, tasks, **settings):
        print("lm-eval's own progress", file=sys.stderr)
        return {"acc": {task: 0.5 for task in tasks}, "mean_acc": 0.5}

    monkeypatch.setattr(evaluation, "zero_shot", fake_zero_shot)
    evaluate(str(model_dir), data=[], tasks=["boolq", "rte"])
    assert re.fullmatch(r"eval zero-shot: 2 task\(s\) with lm-eval: boolq, rte\nlm-eval's own progress\n"
                        r"eval zero-shot: done in \d+ s\n", capsys.readouterr().err)


def test_evaluate_rejects_a_missing_local_model_directory(tmp_path):
    with pytest.raises(evaluation.EvaluationError, match="does not exist"):
        evaluate(str(tmp_path / "no-such-model"), data=[str(EVAL_TEXT)], seqlen=SEQLEN)


def test_evaluate_rejects_a_directory_without_a_checkpoint(tmp_path):
    with pytest.raises(evaluation.EvaluationError, match="has no config.json"):
        evaluate(str(tmp_path), data=[str(EVAL_TEXT)], seqlen=SEQLEN)


def test_evaluate_with_an_unreachable_hub_id_says_to_use_a_local_directory():
    with pytest.raises(evaluation.EvaluationError, match="pass the path of a local checkpoint directory"):
        evaluate("nobody/no-such-model", data=[str(EVAL_TEXT)], seqlen=SEQLEN)


def test_evaluate_checks_every_data_source_before_loading_the_model(model_dir, tmp_path, monkeypatch):
    from calib import CalibrationError

    def no_model_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(evaluation, "load_model", no_model_load)
    with pytest.raises(CalibrationError, match="nor an existing file"):
        evaluate(str(model_dir), data=[str(EVAL_TEXT), str(tmp_path / "missing.txt")], seqlen=SEQLEN,
                 cache_dir=tmp_path / "cache")


def test_evaluate_rejects_an_unknown_dtype(model_dir):
    with pytest.raises(evaluation.EvaluationError, match="unknown dtype 'fp13'"):
        evaluate(str(model_dir), data=[str(EVAL_TEXT)], seqlen=SEQLEN, dtype="fp13")
