"""calib: calibration windows, evaluation tokens, local formats, errors and the token cache.

Everything runs offline on the tiny tokenizer from reconstruct.tiny and files written here.
"""
from __future__ import annotations

import json
import logging
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import calib.hub
import calib.tokens
from calib import CalibrationError, calibration_windows, eval_tokens
from calib.calibration import sample_document_windows
from reconstruct.tiny import SAMPLE_TEXT, tiny_tokenizer, write_sample_text

SEQLEN = 16


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(autouse=True)
def private_cache_root(tmp_path, monkeypatch):
    # Never touch ~/.cache from tests, even where a test forgets cache_dir.
    monkeypatch.setenv("RECONSTRUCT_CACHE", str(tmp_path / "reconstruct-cache"))


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "token-cache"


@pytest.fixture
def sample_txt(tmp_path):
    return write_sample_text(tmp_path / "sample.txt", repeats=4)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def contains_window(haystack: list[int], window: list[int]) -> bool:
    return any(haystack[i:i + len(window)] == window for i in range(len(haystack) - len(window) + 1))


def long_documents(count: int) -> list[str]:
    """Distinct documents, each far longer than SEQLEN tokens."""
    lines = SAMPLE_TEXT.strip().splitlines()
    return [f"Document {index}. " + " ".join(lines[index % len(lines):] + lines[:index % len(lines)])
            for index in range(count)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def write_parquet(path, columns: dict):
    pq.write_table(pa.table(columns), path)
    return path


# --------------------------------------------------------------------------------------------------
# Windows from each kind of source


def test_txt_windows_have_the_requested_shape_and_come_from_the_text(tokenizer, sample_txt, cache_dir):
    windows = calibration_windows(str(sample_txt), tokenizer, nsamples=8, seqlen=SEQLEN,
                                  cache_dir=cache_dir)
    assert windows.shape == (8, SEQLEN)
    assert windows.dtype == torch.long
    stream = ids_of(tokenizer, sample_txt.read_text())
    assert all(contains_window(stream, window.tolist()) for window in windows)


def test_same_seed_gives_same_windows_whatever_the_global_rng(tokenizer, sample_txt, cache_dir):
    random.seed(1)
    torch.manual_seed(1)
    first = calibration_windows(str(sample_txt), tokenizer, 8, SEQLEN, seed=0, cache_dir=cache_dir)
    random.seed(2)
    torch.manual_seed(2)
    again = calibration_windows(str(sample_txt), tokenizer, 8, SEQLEN, seed=0, cache_dir=cache_dir)
    other_seed = calibration_windows(str(sample_txt), tokenizer, 8, SEQLEN, seed=1, cache_dir=cache_dir)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)


def test_jsonl_windows_each_come_from_one_long_document(tokenizer, tmp_path, cache_dir):
    documents = long_documents(5) + ["too short", ""]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"id": i, "text": d} for i, d in enumerate(documents)])
    windows = calibration_windows(str(path), tokenizer, 6, SEQLEN, cache_dir=cache_dir)
    assert windows.shape == (6, SEQLEN)
    tokenised = [ids_of(tokenizer, document) for document in documents[:5]]
    for window in windows.tolist():
        assert any(contains_window(ids, window) for ids in tokenised)


def test_parquet_gives_the_same_windows_as_jsonl_with_the_same_documents(tokenizer, tmp_path, cache_dir):
    documents = long_documents(4)
    jsonl = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in documents])
    parquet = write_parquet(tmp_path / "docs.parquet", {"body": documents, "n": list(range(4))})
    from_jsonl = calibration_windows(str(jsonl), tokenizer, 5, SEQLEN, seed=3, cache_dir=cache_dir)
    from_parquet = calibration_windows(str(parquet), tokenizer, 5, SEQLEN, seed=3, text_field="body",
                                       cache_dir=cache_dir)
    assert torch.equal(from_jsonl, from_parquet)


def test_short_documents_fall_back_to_the_joined_text_with_a_warning(tokenizer, tmp_path, cache_dir,
                                                                    caplog):
    documents = [line for line in SAMPLE_TEXT.splitlines() if line] * 3  # each well under 64 tokens
    path = write_jsonl(tmp_path / "short.jsonl", [{"text": d} for d in documents])
    with caplog.at_level(logging.WARNING, logger="calib"):
        windows = calibration_windows(str(path), tokenizer, 4, 64, cache_dir=cache_dir)
    assert windows.shape == (4, 64)
    assert "no document" in caplog.text and "joined" in caplog.text
    joined = ids_of(tokenizer, "\n\n".join(documents))
    assert all(contains_window(joined, window) for window in windows.tolist())


def test_document_sampler_draws_like_the_reference_code():
    # The reference (SparseGPT/Wanda get_c4) seeds the global `random` and, per window, redraws a
    # document index until the document has more than seqlen tokens, then draws the start.
    lengths = [5, 40, 12, 33, 8, 50, 17]
    documents = [torch.arange(100 * d, 100 * d + n) for d, n in enumerate(lengths)]
    seqlen, nsamples = 16, 10
    random.seed(7)
    expected = []
    for _ in range(nsamples):
        while True:
            document = documents[random.randint(0, len(documents) - 1)]
            if len(document) > seqlen:
                break
        start = random.randint(0, len(document) - seqlen - 1)
        expected.append(document[start:start + seqlen])
    windows = sample_document_windows(len(documents), documents.__getitem__, nsamples, seqlen,
                                      random.Random(7))
    assert torch.equal(windows, torch.stack(expected))


# --------------------------------------------------------------------------------------------------
# Evaluation token streams


def test_eval_tokens_of_a_txt_file_is_the_whole_file_tokenised_once(tokenizer, sample_txt, cache_dir):
    tokens = eval_tokens(str(sample_txt), tokenizer, SEQLEN, cache_dir=cache_dir)
    assert tokens.shape[0] == 1
    assert tokens[0].tolist() == ids_of(tokenizer, sample_txt.read_text())


def test_eval_tokens_of_documents_joins_them_with_blank_lines(tokenizer, tmp_path, cache_dir):
    documents = long_documents(3)
    path = write_parquet(tmp_path / "docs.parquet", {"text": documents})
    tokens = eval_tokens(str(path), tokenizer, SEQLEN, cache_dir=cache_dir)
    assert tokens[0].tolist() == ids_of(tokenizer, "\n\n".join(documents))


# --------------------------------------------------------------------------------------------------
# The hub protocols, on small stand-in datasets served by a fake `datasets.load_dataset`


@pytest.fixture
def fake_hub(monkeypatch):
    """Serve small in-memory datasets for the papers' hub ids and record what was asked for."""
    import datasets

    wikitext = {"train": [" = Train = \n", " Pruning removes weights . \n", ""] * 30,
                "test": [" = Test = \n", " Perplexity measures surprise . \n", ""] * 30}
    c4 = {"train": ["short"] * 5 + long_documents(3),
          "validation": [f"Validation document {i} ." for i in range(1200)]}
    requests = []

    def load_dataset(path, name=None, data_files=None, split=None):
        requests.append((path, name, data_files, split))
        if path == "Salesforce/wikitext" and name == "wikitext-2-raw-v1" and data_files is None:
            return datasets.Dataset.from_dict({"text": wikitext[split]})
        expected_file = {"train": "en/c4-train.00000-of-01024.json.gz",
                         "validation": "en/c4-validation.00000-of-00008.json.gz"}[split]
        if path == "allenai/c4" and data_files == {split: expected_file}:
            return datasets.Dataset.from_dict({"text": c4[split]})
        raise AssertionError(f"unexpected hub request {path, name, data_files, split}")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(calib.hub, "offline_reason", lambda: None)  # the fake hub is always there
    return {"wikitext": wikitext, "c4": c4, "requests": requests}


def test_wikitext2_joins_test_with_blank_lines_and_train_with_spaces(tokenizer, cache_dir, fake_hub):
    tokens = eval_tokens("wikitext2", tokenizer, SEQLEN, cache_dir=cache_dir)
    assert tokens[0].tolist() == ids_of(tokenizer, "\n\n".join(fake_hub["wikitext"]["test"]))
    windows = calibration_windows("wikitext2", tokenizer, 4, SEQLEN, cache_dir=cache_dir)
    train = ids_of(tokenizer, " ".join(fake_hub["wikitext"]["train"]))
    assert all(contains_window(train, window) for window in windows.tolist())


def test_c4_evaluation_is_1100_documents_cut_to_256_windows(tokenizer, cache_dir, fake_hub):
    joined = ids_of(tokenizer, " ".join(fake_hub["c4"]["validation"][:1100]))
    seqlen = 2
    assert len(joined) > 256 * seqlen
    tokens = eval_tokens("c4", tokenizer, seqlen, cache_dir=cache_dir)
    assert tokens[0].tolist() == joined[:256 * seqlen]
    seqlen = len(joined) // 200  # 256 windows would need more than the 1100 documents hold
    assert eval_tokens("c4", tokenizer, seqlen, cache_dir=cache_dir)[0].tolist() == joined


def test_c4_calibration_takes_each_window_from_one_long_document(tokenizer, cache_dir, fake_hub):
    windows = calibration_windows("c4", tokenizer, 6, SEQLEN, seed=0, cache_dir=cache_dir)
    assert windows.shape == (6, SEQLEN)
    long_ones = [ids_of(tokenizer, document) for document in fake_hub["c4"]["train"][5:]]
    assert all(any(contains_window(ids, w) for ids in long_ones) for w in windows.tolist())
    requests_before = len(fake_hub["requests"])
    assert torch.equal(windows, calibration_windows("c4", tokenizer, 6, SEQLEN, seed=0, cache_dir=cache_dir))
    assert len(fake_hub["requests"]) == requests_before  # served from the cache, no hub access
    other = calibration_windows("c4", tokenizer, 6, SEQLEN, seed=1, cache_dir=cache_dir)
    assert not torch.equal(windows, other)


# --------------------------------------------------------------------------------------------------
# Errors: each one a CalibrationError whose message says what is wrong and what to do


def test_missing_path(tokenizer, tmp_path, cache_dir):
    with pytest.raises(CalibrationError, match="neither a known dataset.*nor an existing file"):
        calibration_windows(str(tmp_path / "nope.txt"), tokenizer, 2, SEQLEN, cache_dir=cache_dir)


def test_unknown_extension(tokenizer, tmp_path, cache_dir):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(CalibrationError, match=r"unsupported file type '\.csv'.*\.txt.*\.jsonl.*\.parquet"):
        calibration_windows(str(path), tokenizer, 2, SEQLEN, cache_dir=cache_dir)


def test_empty_text_file(tokenizer, tmp_path, cache_dir):
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n")
    with pytest.raises(CalibrationError, match="empty"):
        calibration_windows(str(path), tokenizer, 2, SEQLEN, cache_dir=cache_dir)


def test_empty_documents(tokenizer, tmp_path, cache_dir):
    path = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "   "}])
    with pytest.raises(CalibrationError, match="no text"):
        calibration_windows(str(path), tokenizer, 2, SEQLEN, cache_dir=cache_dir)


def test_jsonl_without_the_text_field_names_the_fields_present(tokenizer, tmp_path, cache_dir):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"body": "hello", "id": 1}])
    with pytest.raises(CalibrationError, match=r"no field 'text' \(fields present: \['body', 'id'\]\).*--text-field"):
        calibration_windows(str(path), tokenizer, 2, SEQLEN, cache_dir=cache_dir)


def test_parquet_without_the_text_field_names_the_columns_present(tokenizer, tmp_path, cache_dir):
    path = write_parquet(tmp_path / "docs.parquet", {"content": ["hello"], "id": [1]})
    with pytest.raises(CalibrationError, match=r"no column 'text' \(columns present: \['content', 'id'\]\)"):
        eval_tokens(str(path), tokenizer, SEQLEN, cache_dir=cache_dir)


def test_invalid_jsonl_line(tokenizer, tmp_path, cache_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(CalibrationError, match="line 2, is not valid JSON"):
        calibration_windows(str(path), tokenizer, 2, SEQLEN, cache_dir=cache_dir)


def test_too_few_tokens_says_how_many_there_are_and_are_needed(tokenizer, tmp_path, cache_dir):
    path = tmp_path / "small.txt"
    path.write_text("Pruning removes weights from a neural network.")
    available = len(ids_of(tokenizer, path.read_text()))
    with pytest.raises(CalibrationError) as error:
        calibration_windows(str(path), tokenizer, 128, SEQLEN, cache_dir=cache_dir)
    message = str(error.value)
    assert f"has {available} tokens" in message
    assert f"need at least {128 * SEQLEN}" in message
    assert "--nsamples" in message and "--seqlen" in message and "more text" in message


def test_too_few_tokens_in_documents(tokenizer, tmp_path, cache_dir):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in long_documents(2)])
    with pytest.raises(CalibrationError, match="lower --nsamples or --seqlen"):
        calibration_windows(str(path), tokenizer, 1000, SEQLEN, cache_dir=cache_dir)


def test_eval_text_shorter_than_one_window(tokenizer, tmp_path, cache_dir):
    path = tmp_path / "small.txt"
    path.write_text("Too short.")
    with pytest.raises(CalibrationError, match="fewer than one window.*lower --seqlen"):
        eval_tokens(str(path), tokenizer, 512, cache_dir=cache_dir)


@pytest.mark.parametrize("nsamples, seqlen", [(0, 16), (4, -1), (4, 0)])
def test_sizes_must_be_positive(tokenizer, sample_txt, cache_dir, nsamples, seqlen):
    with pytest.raises(CalibrationError, match="must be a positive integer"):
        calibration_windows(str(sample_txt), tokenizer, nsamples, seqlen, cache_dir=cache_dir)


# --------------------------------------------------------------------------------------------------
# The token cache


def refuse_to_tokenize(*args, **kwargs):
    raise AssertionError("tokenised again although the result is cached")


def test_cache_is_hit_the_second_time_and_returns_identical_tokens(tokenizer, sample_txt, cache_dir,
                                                                  monkeypatch, caplog):
    first_windows = calibration_windows(str(sample_txt), tokenizer, 8, SEQLEN, cache_dir=cache_dir)
    first_tokens = eval_tokens(str(sample_txt), tokenizer, SEQLEN, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("*.safetensors"))) == 1  # one tokenised stream serves both
    monkeypatch.setattr(calib.tokens, "tokenize", refuse_to_tokenize)
    with caplog.at_level(logging.INFO, logger="calib"):
        second_windows = calibration_windows(str(sample_txt), tokenizer, 8, SEQLEN, cache_dir=cache_dir)
        second_tokens = eval_tokens(str(sample_txt), tokenizer, SEQLEN, cache_dir=cache_dir)
    assert "token cache hit" in caplog.text
    assert torch.equal(first_windows, second_windows)
    assert torch.equal(first_tokens, second_tokens)
    assert not list(cache_dir.glob(".tmp-*"))  # the atomic write left no temporary file


def test_cache_of_documents_is_hit_the_second_time(tokenizer, tmp_path, cache_dir, monkeypatch):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in long_documents(3)])
    first = calibration_windows(str(path), tokenizer, 4, SEQLEN, cache_dir=cache_dir)
    monkeypatch.setattr(calib.tokens, "tokenize_documents", refuse_to_tokenize)
    assert torch.equal(first, calibration_windows(str(path), tokenizer, 4, SEQLEN, cache_dir=cache_dir))


def test_cache_misses_when_the_file_or_the_tokenizer_changes(tokenizer, tmp_path, cache_dir):
    path = tmp_path / "text.txt"
    path.write_text(SAMPLE_TEXT)
    before = eval_tokens(str(path), tokenizer, SEQLEN, cache_dir=cache_dir)
    path.write_text(SAMPLE_TEXT + "One more sentence changes the size of the file.\n")
    after = eval_tokens(str(path), tokenizer, SEQLEN, cache_dir=cache_dir)
    assert after.shape[1] > before.shape[1]
    eval_tokens(str(path), tiny_tokenizer(vocab_size=300), SEQLEN, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("*.safetensors"))) == 3


class CountingLoads:
    """`TokenizerFiles`' loader for a saved tokenizer directory, counting its calls."""

    def __init__(self, directory):
        self.directory, self.calls = directory, 0

    def __call__(self):
        from transformers import AutoTokenizer

        self.calls += 1
        return AutoTokenizer.from_pretrained(self.directory)


def test_a_tokenizer_directory_is_loaded_only_on_a_cache_miss(tokenizer, tmp_path, sample_txt, cache_dir):
    from calib.corpora import TokenizerFiles

    directory = tmp_path / "tokenizer"
    tokenizer.save_pretrained(directory)
    load = CountingLoads(directory)
    first = calibration_windows(str(sample_txt), TokenizerFiles(directory, load), 8, SEQLEN, cache_dir=cache_dir)
    assert load.calls == 1
    # The windows are the loaded tokenizer's (its own cache entry is keyed differently).
    assert torch.equal(first, calibration_windows(str(sample_txt), tokenizer, 8, SEQLEN, cache_dir=cache_dir))
    again = calibration_windows(str(sample_txt), TokenizerFiles(directory, load), 8, SEQLEN, cache_dir=cache_dir)
    assert load.calls == 1 and torch.equal(first, again)  # a hit: not loaded


def test_a_changed_tokenizer_file_misses_the_cache(tmp_path, sample_txt, cache_dir):
    from calib.corpora import TokenizerFiles

    directory = tmp_path / "tokenizer"
    tiny_tokenizer().save_pretrained(directory)
    load = CountingLoads(directory)
    before = calibration_windows(str(sample_txt), TokenizerFiles(directory, load), 8, SEQLEN, cache_dir=cache_dir)
    # Another vocabulary, saved over the same directory: the same file names, other contents.
    tiny_tokenizer(vocab_size=300).save_pretrained(directory)
    after = calibration_windows(str(sample_txt), TokenizerFiles(directory, load), 8, SEQLEN, cache_dir=cache_dir)
    assert load.calls == 2
    assert not torch.equal(before, after)
    # Only the weights are left out of the identity: a changed config.json misses too.
    (directory / "config.json").write_text("{}")
    calibration_windows(str(sample_txt), TokenizerFiles(directory, load), 8, SEQLEN, cache_dir=cache_dir)
    assert load.calls == 3
    (directory / "model.safetensors").write_bytes(b"weights do not tokenise")
    calibration_windows(str(sample_txt), TokenizerFiles(directory, load), 8, SEQLEN, cache_dir=cache_dir)
    assert load.calls == 3


def test_cache_directory_comes_from_the_environment_by_default(tokenizer, sample_txt, tmp_path,
                                                               monkeypatch):
    monkeypatch.setenv("RECONSTRUCT_CACHE", str(tmp_path / "elsewhere"))
    eval_tokens(str(sample_txt), tokenizer, SEQLEN)
    assert len(list((tmp_path / "elsewhere" / "tokens").glob("*.safetensors"))) == 1


def test_an_unreadable_cache_entry_is_recomputed_with_a_warning(tokenizer, sample_txt, cache_dir, caplog):
    expected = eval_tokens(str(sample_txt), tokenizer, SEQLEN, cache_dir=cache_dir)
    (entry,) = cache_dir.glob("*.safetensors")
    entry.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="calib"):
        recomputed = eval_tokens(str(sample_txt), tokenizer, SEQLEN, cache_dir=cache_dir)
    assert "unreadable" in caplog.text
    assert torch.equal(expected, recomputed)
