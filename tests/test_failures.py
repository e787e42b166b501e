"""How the command line reports a failure: bad input in one line (exit 2), a full disk in one line
(exit 1), anything else as a bug with its traceback (exit 1); messages name the command's own flags."""
from __future__ import annotations

import json

import pytest

from reconstruct import cli
from reconstruct.cli import EXIT_BAD_INPUT


@pytest.fixture
def llama(tiny_checkpoint, capsys):
    model = tiny_checkpoint("llama")
    capsys.readouterr()  # what building it printed
    return model


def test_retrain_names_its_own_flag_for_a_correction_the_model_cannot_take(llama, sample_text, token_cache,
                                                                           tmp_path, capsys):
    code = cli.main(["retrain", str(llama), "--out", str(tmp_path / "out"), "--params", "bias",
                     "--data", str(sample_text), "--device", "cpu", "--cache-dir", str(token_cache)])
    assert code == EXIT_BAD_INPUT
    assert capsys.readouterr().err == ("reconstruct retrain: error: --params bias: this model's linear layers "
                                       "have no biases (e.g. the LLaMA family); choose norm or masklora instead\n")


def test_a_non_json_error_while_fitting_keeps_its_type(tiny_checkpoint, prune_tiny, monkeypatch, tmp_path):
    """The fit's errors were re-raised as type(error)(message), which fails for errors whose
    constructor takes more than a message, turning them into a TypeError."""
    import reconstruct.driver

    def fit_fails(*args, **kwargs):
        raise json.JSONDecodeError("Expecting value", "not json", 0)

    monkeypatch.setattr(reconstruct.driver, "fit_correction", fit_fails)
    with pytest.raises(json.JSONDecodeError):
        prune_tiny(tiny_checkpoint("llama"), tmp_path / "out", correction="masklora", steps=1)
