"""Bad input fails with a clear message and leaves nothing half-written (neither OUT nor OUT.partial),
through the Python API (exception type and message) and through the CLI (exit code 2, message on
stderr)."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from calib import CalibrationError
from reconstruct.checkpoint import CheckpointError, OutputError
from reconstruct.config import ConfigError
from reconstruct.cli import main
from reconstruct.failures import EXIT_BAD_INPUT
from reconstruct.corrections import CorrectionError
from reconstruct.models import UnsupportedModelError
from reconstruct.pruning import PruningError


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def non_causal_model(tmp_path_factory):
    """A checkpoint directory whose config is a vision encoder: no causal LM class exists for it."""
    from transformers import ViTConfig

    directory = tmp_path_factory.mktemp("vit")
    ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              image_size=32, patch_size=16).save_pretrained(directory)
    save_file({"embeddings.cls_token": torch.zeros(1, 1, 32)}, str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="module")
def blockless_model(tmp_path_factory):
    """A causal LM with no decoder blocks at all (an empty ModuleList)."""
    from reconstruct.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("blockless") / "model", "llama", num_hidden_layers=0)


def _partial(out):
    return out.with_name(out.name + ".partial")


def _cli_args(model, out, sample_text, token_cache, *extra):
    return ["prune", str(model), "--out", str(out), "--device", "cpu", "--correction", "none",
            "--calib", str(sample_text), "--nsamples", "8", "--seqlen", "32", "--cache-dir", str(token_cache),
            *extra]


def _settings_to_cli(settings: dict) -> list[str]:
    args = []
    for key, value in settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


# (id, model fixture or a path relative to tmp_path, settings, exception type, message pattern)
CASES = [
    ("missing-model", "missing/model", {}, CheckpointError, r"model path .*missing.* does not exist"),
    ("non-causal", "non_causal_model", {}, UnsupportedModelError, r"model_type='vit' is not a causal language model"),
    ("no-blocks", "blockless_model", {}, UnsupportedModelError, r"could not find the decoder blocks"),
    ("sparsity-1", "llama", {"sparsity": 1.0}, ConfigError, r"sparsity 1\.0 is outside \[0, 1\)"),
    ("sparsity-negative", "llama", {"sparsity": -0.1}, ConfigError, r"sparsity -0\.1 is outside \[0, 1\)"),
    ("pattern-4:2", "llama", {"pattern": "4:2"}, ConfigError, r"'4:2' needs 0 < N < M"),
    ("pattern-2-4", "llama", {"pattern": "2-4"}, ConfigError, r"'2-4' is not of the form N:M"),
    ("pattern-0:4", "llama", {"pattern": "0:4"}, ConfigError, r"'0:4' needs 0 < N < M"),
    ("pattern-m-not-dividing", "llama", {"pattern": "3:6"}, PruningError,
     r"pattern 3:6: layer model\.layers\.0\.\S+ has (32|64) inputs, not a multiple of 6"),
    ("too-few-tokens", "llama", {"nsamples": 400, "seqlen": 128}, CalibrationError,
     r"has \d+ tokens, but 400 windows of 128 tokens need at least 51200"),
    ("bias-without-biases", "llama", {"correction": "bias"}, CorrectionError,
     r"--correction bias, block 0 unit block: this model's linear layers have no biases"),
    ("norm-unit-without-norms", "llama", {"correction": "norm", "granularity": "sublayer"}, CorrectionError,
     r"--correction norm, block 0 unit self_attn: this unit has no normalisation layers"),
]


def _model_path(spec, request, tmp_path):
    if "/" in spec:
        return tmp_path / spec
    return request.getfixturevalue(spec)


@pytest.mark.parametrize("spec, settings, error, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_api(spec, settings, error, message, request, prune_tiny, tmp_path):
    model = _model_path(spec, request, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        prune_tiny(model, out, **settings)
    assert not out.exists() and not _partial(out).exists()


@pytest.mark.parametrize("spec, settings, error, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_cli(spec, settings, error, message, request, sample_text, token_cache, tmp_path, capsys):
    model = _model_path(spec, request, tmp_path)
    out = tmp_path / "out"
    code = main(_cli_args(model, out, sample_text, token_cache, *_settings_to_cli(settings)))
    captured = capsys.readouterr()
    assert code == EXIT_BAD_INPUT
    assert captured.err.startswith("reconstruct prune: error: ")
    assert "Traceback" not in captured.err
    assert re.search(message, captured.err), captured.err
    assert not out.exists() and not _partial(out).exists()


# --------------------------------------------------------------------------------------------------
def _non_empty_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results\n")
    return out


def test_non_empty_output_refused_then_overwritten_api(llama, prune_tiny, tmp_path):
    out = _non_empty_output(tmp_path)
    with pytest.raises(OutputError, match=r"exists and is not empty; pass --overwrite"):
        prune_tiny(llama, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not _partial(out).exists()

    report = prune_tiny(llama, out, overwrite=True)
    assert report["totals"]["pruned_sparsity"] == pytest.approx(0.5)
    assert not (out / "keep.txt").exists() and not _partial(out).exists()
    assert json.loads((out / "report.json").read_text())["sparsity"] == 0.5
    assert (out / "model.safetensors.index.json").exists()


def test_non_empty_output_refused_then_overwritten_cli(llama, sample_text, token_cache, tmp_path, capsys):
    out = _non_empty_output(tmp_path)
    code = main(_cli_args(llama, out, sample_text, token_cache))
    captured = capsys.readouterr()
    assert code == EXIT_BAD_INPUT
    assert captured.err == (f"reconstruct prune: error: output directory {out} exists and is not empty; pass "
                            "--overwrite to replace it, or choose another --out\n")  # one line, no [Errno 17]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not _partial(out).exists()

    assert main(_cli_args(llama, out, sample_text, token_cache, "--overwrite")) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert (out / "report.json").exists() and not (out / "keep.txt").exists()


@pytest.mark.parametrize("command", ["prune", "retrain"])
def test_an_existing_output_is_refused_before_any_data_is_read(command, llama, token_cache, tmp_path,
                                                               monkeypatch):
    """The output check comes first, right after the lock: a calibration or training text that does
    not exist (or would take minutes to tokenize) is never reached."""
    import calib
    from reconstruct.api import prune, retrain

    def never(*args, **kwargs):
        raise AssertionError("the data was read before the output directory was checked")

    monkeypatch.setattr(calib, "calibration_windows", never)
    monkeypatch.setattr(calib, "training_windows", never)
    out, missing = _non_empty_output(tmp_path), str(tmp_path / "no-such-text.txt")
    with pytest.raises(OutputError, match=r"exists and is not empty; pass --overwrite"):
        if command == "prune":
            prune(str(llama), str(out), calib=missing, device="cpu", cache_dir=str(token_cache))
        else:
            retrain(str(llama), str(out), data=missing, allow_dense=True, device="cpu", cache_dir=str(token_cache))
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not _partial(out).exists()


def test_argparse_rejects_unknown_choices(llama, sample_text, token_cache, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(_cli_args(llama, tmp_path / "out", sample_text, token_cache, "--method", "random"))
    assert exit_info.value.code == EXIT_BAD_INPUT
    assert "invalid choice: 'random'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
