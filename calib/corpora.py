"""Tokenised corpora, each computed once and then served from the token cache.

A corpus is either a *stream* (one text tokenised in one call: shape [N]) or a *document set*
(every document tokenised on its own: all ids concatenated plus each document's length). Each
function here names its protocol; the protocol name goes into the cache key together with the
tokenizer's identity, the source and the text field (see `calib.cache`).

The C4 calibration documents are not here: the C4 train shard has ~356k documents, of which the
sampler tokenises only the few hundred it draws, so `calib.calibration` caches the windows instead.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from calib import sources, tokens
from calib.cache import TokenCache, token_cache_dir, tokenizer_files_identity, tokenizer_identity

# SparseGPT's C4 evaluation text: the first 1100 validation documents joined with single spaces
# (then cut to 256 windows by calib.evaluation).
C4_EVAL_DOCUMENTS = 1100
# Separator of documents joined into one text: the blank line that separates wikitext2's lines in
# the papers' evaluation text.
DOCUMENT_SEPARATOR = "\n\n"


class TokenizerFiles:
    """A tokenizer saved in a local directory, loaded (by `load`) only if something has to be
    tokenised: its identity comes from its files (`calib.cache.tokenizer_files_identity`), so data
    tokenised before is served from the cache without loading it. Loading a large vocabulary's
    tokenizer takes seconds."""

    def __init__(self, directory: str | os.PathLike, load: Callable[[], object]):
        self.directory = Path(directory)
        self.load = load


class CachedTokenizer:
    """A tokenizer together with its identity (for cache keys) and the cache its output goes to."""

    def __init__(self, identity: dict, cache: TokenCache, load: Callable[[], object]):
        self.identity = identity
        self.cache = cache
        self._load = load
        self._tokenizer = None

    @classmethod
    def create(cls, tokenizer, cache_dir: str | os.PathLike | None = None) -> "CachedTokenizer":
        """`tokenizer`: a loaded tokenizer, or `TokenizerFiles` to load only on a cache miss."""
        cache = TokenCache(token_cache_dir(cache_dir))
        if isinstance(tokenizer, TokenizerFiles):
            return cls(tokenizer_files_identity(tokenizer.directory), cache, tokenizer.load)
        return cls(tokenizer_identity(tokenizer), cache, lambda: tokenizer)

    @property
    def tokenizer(self):
        """The tokenizer itself, loaded at the first use (only when something is tokenised)."""
        if self._tokenizer is None:
            self._tokenizer = self._load()
        return self._tokenizer

    def cached(self, protocol: str, source: dict, text_field: str,
               compute: Callable[[], dict[str, torch.Tensor]], **parameters) -> dict[str, torch.Tensor]:
        """`compute()`'s tensors, from the cache when this exact tokenisation was done before."""
        description = {"tokenizer": self.identity, "protocol": protocol, "source": source,
                       "text_field": text_field, **parameters}
        return self.cache.get_or_compute(description, compute)

    def stream(self, protocol: str, source: dict, text_field: str,
               make_text: Callable[[], str]) -> torch.LongTensor:
        """The ids of the text `make_text()` returns, tokenised in one call, cached."""
        return self.cached(protocol, source, text_field,
                           lambda: {"ids": tokens.tokenize(self.tokenizer, make_text())})["ids"]


def wikitext2_stream(tokenizer: CachedTokenizer, split: str) -> torch.LongTensor:
    """wikitext-2-raw-v1 `split` as one text, joined the way the papers' code joins it.

    The test split (perplexity) is joined with "\\n\\n"; the train split (calibration) with a
    single space -- SparseGPT's and Wanda's `get_wikitext2` do exactly this.
    """
    joiner = "\n\n" if split == "test" else " "
    source = {"dataset": sources.WIKITEXT_DATASET, "config": sources.WIKITEXT2_CONFIG,
              "split": split, "joiner": joiner}

    def joined_text() -> str:
        lines = sources.load_hub_split(sources.WIKITEXT_DATASET, split,
                                       config=sources.WIKITEXT2_CONFIG)["text"]
        return joiner.join(lines)

    return tokenizer.stream(f"wikitext2-{split}", source, "text", joined_text)


def c4_validation_stream(tokenizer: CachedTokenizer) -> torch.LongTensor:
    """The first 1100 documents of C4's first validation shard, joined with " ", tokenised once.

    Not yet cut to 256 x seqlen tokens: that cut depends on seqlen, the cached stream does not.
    """
    source = {"dataset": sources.C4_DATASET, "data_file": sources.C4_VALIDATION_FILE,
              "split": "validation", "documents": C4_EVAL_DOCUMENTS, "joiner": " "}

    def joined_text() -> str:
        documents = sources.load_hub_split(sources.C4_DATASET, "validation",
                                           data_file=sources.C4_VALIDATION_FILE)
        return " ".join(documents[:C4_EVAL_DOCUMENTS]["text"])

    return tokenizer.stream("c4-validation", source, "text", joined_text)


def text_file_stream(tokenizer: CachedTokenizer, path: Path) -> torch.LongTensor:
    """A .txt file as one text, tokenised once."""
    return tokenizer.stream("txt-file", sources.local_file_fingerprint(path), "",
                            lambda: sources.read_text_file(path))


def joined_documents_stream(tokenizer: CachedTokenizer, path: Path, text_field: str) -> torch.LongTensor:
    """The documents of a .jsonl/.parquet file joined with a blank line, tokenised once."""
    return tokenizer.stream(
        "joined-documents", {**sources.local_file_fingerprint(path), "joiner": DOCUMENT_SEPARATOR},
        text_field, lambda: DOCUMENT_SEPARATOR.join(sources.read_documents(path, text_field)))


def document_set(tokenizer: CachedTokenizer, path: Path,
                 text_field: str) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Every document of a .jsonl/.parquet file tokenised on its own: (concatenated ids, lengths)."""

    def tokenize_each() -> dict[str, torch.Tensor]:
        ids, lengths = tokens.tokenize_documents(tokenizer.tokenizer,
                                                 sources.read_documents(path, text_field))
        return {"ids": ids, "lengths": lengths}

    cached = tokenizer.cached("documents", sources.local_file_fingerprint(path), text_field,
                              tokenize_each)
    return cached["ids"], cached["lengths"]
