"""How the command line reports a failure: bad input in one line (exit 2), a full disk in one line
(exit 1), anything else as a bug with its traceback (exit 1); messages name the command's own flags."""
from __future__ import annotations

import ast
import errno
import importlib
import json
from pathlib import Path

import pytest

from reconstruct import cli
from reconstruct.config import ConfigError
from reconstruct.failures import BAD_INPUT_ERRORS, EXIT_BAD_INPUT, EXIT_FAILED, NOT_BAD_INPUT, class_name

ROOT = Path(__file__).resolve().parent.parent


def defined_error_classes() -> set[str]:
    """module.Class of every class named *Error defined in the package's sources."""
    found = set()
    for path in [*(ROOT / "reconstruct").rglob("*.py"), *(ROOT / "calib").rglob("*.py")]:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found |= {f"{module}.{node.name}" for node in ast.walk(ast.parse(path.read_text()))
                  if isinstance(node, ast.ClassDef) and node.name.endswith("Error")}
    return found


def _resolve(name: str) -> type:
    module, _, class_ = name.rpartition(".")
    return getattr(importlib.import_module(module), class_)


def test_every_error_class_of_the_package_is_classified_by_its_current_name():
    for name in BAD_INPUT_ERRORS | NOT_BAD_INPUT:
        cls = _resolve(name)
        assert issubclass(cls, Exception) and class_name(cls) == name
    # A class moved or added without updating failures.py would be reported as a bug.
    bad_input = tuple(map(_resolve, BAD_INPUT_ERRORS))
    unclassified = [name for name in sorted(defined_error_classes() - BAD_INPUT_ERRORS - NOT_BAD_INPUT)
                    if not issubclass(_resolve(name), bad_input)]
    assert not unclassified


def eval_failing_with(monkeypatch, error: BaseException):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "run_eval", fail)
    return cli.main(["eval", "some-model"])


@pytest.mark.parametrize("error", [ValueError("an unforeseen value"), TypeError("wrong type"),
                                   json.JSONDecodeError("Expecting value", "{", 1),
                                   ModuleNotFoundError("No module named 'pyarrow'", name="pyarrow"),
                                   OSError(errno.EIO, "Input/output error")],
                         ids=["ValueError", "TypeError", "JSONDecodeError", "ModuleNotFoundError", "EIO"])
def test_an_error_we_did_not_raise_about_the_input_is_a_bug_with_its_traceback(monkeypatch, capsys, error):
    code = eval_failing_with(monkeypatch, error)
    err = capsys.readouterr().err
    assert code == EXIT_FAILED
    assert err.startswith("Traceback (most recent call last):")
    assert f"reconstruct eval: internal error: {type(error).__name__}: {error}\n" in err
    assert err.endswith("please report it with the command line, the traceback above and the output of "
                        "`pip list`\n")


@pytest.mark.parametrize("error, shown", [
    (ConfigError("--sparsity 1.5 is outside [0, 1)"), "--sparsity 1.5 is outside [0, 1)"),
    (ImportError("zero-shot evaluation needs lm-evaluation-harness; install it with: pip install "
                 "reconstruct[eval]"), "zero-shot evaluation needs lm-evaluation-harness; install it with: "
                                       "pip install reconstruct[eval]"),
], ids=["ConfigError", "missing-extra"])
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, error, shown):
    assert eval_failing_with(monkeypatch, error) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == f"reconstruct eval: error: {shown}\n"


def test_a_full_disk_is_one_line_and_exit_1(monkeypatch, capsys):
    error = OSError(errno.ENOSPC, "No space left on device", "/data/out.partial/model-00001.safetensors")
    assert eval_failing_with(monkeypatch, error) == EXIT_FAILED
    assert capsys.readouterr().err == ("reconstruct eval: error: No space left on device: "
                                       "/data/out.partial/model-00001.safetensors\n")


@pytest.mark.parametrize("command, shown", [("eval", "interrupted\n"),
                                            ("retrain", "interrupted: rerun the same command with --resume "
                                                        "to continue\n")])
def test_an_interrupt_mentions_resume_only_where_the_command_has_it(monkeypatch, capsys, command, shown):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, f"run_{command}", interrupted)
    assert cli.main([command, "some-model", *(["--out", "x"] if command == "retrain" else [])]) == 130
    assert capsys.readouterr().err == shown


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
    import reconstruct.layerwise.pipeline

    def fit_fails(*args, **kwargs):
        raise json.JSONDecodeError("Expecting value", "not json", 0)

    monkeypatch.setattr(reconstruct.layerwise.pipeline, "fit_correction", fit_fails)
    with pytest.raises(json.JSONDecodeError):
        prune_tiny(tiny_checkpoint("llama"), tmp_path / "out", correction="masklora", steps=1)


def test_an_existing_output_with_an_unfinished_run_names_both_flags(llama, sample_text, token_cache, tmp_path,
                                                                    capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "state.json").write_text("{}")  # an --overwrite run, interrupted
    code = cli.main(["prune", str(llama), "--out", str(out), "--correction", "none",
                     "--calib", str(sample_text), "--nsamples", "8", "--seqlen", "32", "--device", "cpu",
                     "--cache-dir", str(token_cache), "--resume"])
    assert code == EXIT_BAD_INPUT
    assert capsys.readouterr().err == (
        f"reconstruct prune: error: output directory {out} exists and is not empty; pass --overwrite to "
        f"replace it (with --resume to continue the unfinished run in {tmp_path / 'out.partial'}), or choose "
        "another --out\n")
