"""The hub datasets (c4, wikitext2) without the hub: offline mode, or a hub that does not answer.

Either way the answer comes at once -- one message that names a local file to pass, no retries, no
warnings -- and a dataset already in the local `datasets` cache is still used. The unreachable hub
is an endpoint on a closed local port, so these tests behave the same with and without a network.
"""
from __future__ import annotations

import socket
import time

import pytest

import calib.hub
from calib import CalibrationError, calibration_windows, eval_tokens, training_windows
from reconstruct.cli import main
from reconstruct.failures import EXIT_BAD_INPUT
from reconstruct.tiny import tiny_tokenizer

SEQLEN = 16
# Without the fix a missing hub costs five retries with back-off, about 23 s; at once is well under.
AT_ONCE_S = 5.0
# The local copy each hub split's message names (docs/evaluation.md, "Working offline").
CALIBRATION_COPY = {"c4": "c4-train.00000-of-01024.jsonl", "wikitext2": "wikitext2_train.txt"}
EVALUATION_COPY = {"c4": "c4_validation.txt", "wikitext2": "wikitext2_test.txt"}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def empty_hub_caches(monkeypatch, tmp_path):
    """No dataset in the local caches, and no token cache entry: every source goes to the hub."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("RECONSTRUCT_CACHE", str(tmp_path / "reconstruct-cache"))


def set_offline_mode(monkeypatch, value: bool) -> None:
    """HF_HUB_OFFLINE as both libraries see it: they read the variable once, at import."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if value else "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1" if value else "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", value)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", value)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", value, raising=False)


@pytest.fixture
def offline_mode(monkeypatch, empty_hub_caches):
    set_offline_mode(monkeypatch, True)


@pytest.fixture
def unreachable_hub(monkeypatch, empty_hub_caches):
    """Offline mode off, and the hub's endpoint a local port that nothing listens on."""
    import datasets.config
    import huggingface_hub.constants

    with socket.socket() as probe:  # a port just freed: connecting to it is refused at once
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    set_offline_mode(monkeypatch, False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
    monkeypatch.setattr(datasets.config, "HUB_DATASETS_URL",
                        endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}")
    return endpoint


def fails_at_once(make, copy: str, reason: str) -> None:
    started = time.monotonic()
    with pytest.raises(CalibrationError) as caught:
        make()
    assert time.monotonic() - started < AT_ONCE_S
    message = str(caught.value)
    assert reason in message and "not in the local `datasets` cache" in message
    assert f"pass a local .txt, .jsonl or .parquet file instead, e.g. {copy} " in message
    assert "Working offline" in message


def every_use(source: str, tokenizer, tmp_path):
    """(what, local copy named) for each command's use of `source`: calibration, retraining, eval."""
    cache_dir = tmp_path / "token-cache"
    return [
        (lambda: calibration_windows(source, tokenizer, 2, SEQLEN, cache_dir=cache_dir), CALIBRATION_COPY[source]),
        (lambda: training_windows(source, tokenizer, 2, 1, SEQLEN, cache_dir=cache_dir), CALIBRATION_COPY[source]),
        (lambda: eval_tokens(source, tokenizer, SEQLEN, cache_dir=cache_dir), EVALUATION_COPY[source]),
    ]


@pytest.mark.parametrize("source", ["c4", "wikitext2"])
def test_offline_mode_fails_at_once_naming_a_local_file(tokenizer, offline_mode, tmp_path, source):
    for make, copy in every_use(source, tokenizer, tmp_path):
        fails_at_once(make, copy, "offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)")


@pytest.mark.parametrize("source", ["c4", "wikitext2"])
def test_unreachable_hub_fails_at_once_naming_a_local_file(tokenizer, unreachable_hub, tmp_path, source):
    import datasets.config
    import huggingface_hub.constants

    for make, copy in every_use(source, tokenizer, tmp_path):
        fails_at_once(make, copy, f"the hub at {unreachable_hub} cannot be reached (ConnectError")
    # The offline mode used for the cache lookup was this call's only: the next one asks the hub again.
    assert not datasets.config.HF_HUB_OFFLINE and not huggingface_hub.constants.HF_HUB_OFFLINE


def test_unreachable_hub_still_uses_a_cached_dataset(tokenizer, unreachable_hub, monkeypatch, tmp_path):
    import datasets

    text = ["Held-out text, as the `datasets` cache would hold it."] * 20
    seen_offline = []

    def load_from_cache(path, name=None, data_files=None, split=None):
        seen_offline.append((datasets.config.HF_HUB_OFFLINE, calib.hub.offline_reason() is not None))
        return datasets.Dataset.from_dict({"text": text})

    monkeypatch.setattr(datasets, "load_dataset", load_from_cache)
    tokens = eval_tokens("wikitext2", tokenizer, SEQLEN, cache_dir=tmp_path / "token-cache")
    assert tokens[0].tolist() == tokenizer("\n\n".join(text))["input_ids"]
    assert seen_offline == [(True, True)]  # looked up in offline mode: no request, no retry
    assert not datasets.config.HF_HUB_OFFLINE


def test_hub_that_answers_is_asked_in_online_mode(tokenizer, empty_hub_caches, monkeypatch, tmp_path):
    import datasets

    set_offline_mode(monkeypatch, False)
    monkeypatch.setattr(calib.hub, "offline_reason", lambda: None)
    seen_offline = []

    def load_from_hub(path, name=None, data_files=None, split=None):
        seen_offline.append(datasets.config.HF_HUB_OFFLINE)
        return datasets.Dataset.from_dict({"text": ["Text from the hub."] * 20})

    monkeypatch.setattr(datasets, "load_dataset", load_from_hub)
    eval_tokens("wikitext2", tokenizer, SEQLEN, cache_dir=tmp_path / "token-cache")
    assert seen_offline == [False]


def test_eval_command_without_the_hub_prints_one_line(tiny_checkpoint, unreachable_hub, tmp_path, capfd):
    model = tiny_checkpoint("llama")
    capfd.readouterr()  # what building the model printed
    started = time.monotonic()
    code = main(["eval", str(model), "--seqlen", str(SEQLEN), "--device", "cpu",
                 "--cache-dir", str(tmp_path / "token-cache")])  # --data: the default, wikitext2
    elapsed = time.monotonic() - started
    captured = capfd.readouterr()
    assert code == EXIT_BAD_INPUT
    assert captured.err.count("\n") == 1, captured.err  # no retry warnings, nothing twice
    assert captured.err.startswith("reconstruct eval: error: the test split of hub dataset Salesforce/wikitext")
    assert "e.g. wikitext2_test.txt " in captured.err
    assert elapsed < AT_ONCE_S


def test_eval_of_a_hub_model_without_the_hub_prints_one_line_at_once(unreachable_hub, capfd):
    started = time.monotonic()
    code = main(["eval", "nobody/no-such-model", "--seqlen", str(SEQLEN), "--device", "cpu"])
    elapsed = time.monotonic() - started
    captured = capfd.readouterr()
    assert code == EXIT_BAD_INPUT
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("reconstruct eval: error: could not load model 'nobody/no-such-model' from the "
                                   f"Hugging Face hub (the hub at {unreachable_hub} cannot be reached (ConnectError: ")
    assert captured.err.endswith("Connection refused), and it is not in the local cache); pass the path of a local "
                                 "checkpoint directory instead\n")
    assert elapsed < AT_ONCE_S
