"""Evaluation token streams for perplexity.

`eval_tokens(source, tokenizer, seqlen)` returns the held-out text as a LongTensor [1, N];
`reconstruct.eval.perplexity` cuts it into non-overlapping windows of seqlen and drops the tail.

Protocols
---------
``wikitext2`` (SparseGPT, Wanda and most pruning papers)
    ``wikitext-2-raw-v1`` test split, lines joined with "\\n\\n", tokenised once.
``c4`` (SparseGPT's C4 perplexity)
    ``allenai/c4`` data file ``en/c4-validation.00000-of-00008.json.gz``: the first 1100 documents
    joined with " ", tokenised once, cut to the first 256 x seqlen tokens (256 windows).
``*.txt``
    the whole file, tokenised once.
``*.jsonl`` / ``*.parquet``
    the documents in field ``text_field`` joined with "\\n\\n", tokenised once.

Tokenisation uses the tokenizer's defaults (one BOS at the very start for LLaMA), see `calib.tokens`.
"""
from __future__ import annotations

import os

import torch

from calib import corpora, sources
from calib.corpora import CachedTokenizer
from calib.errors import CalibrationError, require_positive

# SparseGPT evaluates C4 on 256 windows.
C4_EVAL_WINDOWS = 256


def eval_tokens(source: str, tokenizer, seqlen: int, text_field: str = "text",
                cache_dir: str | os.PathLike | None = None) -> torch.LongTensor:
    """The evaluation text of `source` as token ids of shape [1, N] (see the module docstring)."""
    require_positive(seqlen=seqlen)
    cached_tokenizer = CachedTokenizer.create(tokenizer, cache_dir)
    stream = _evaluation_stream(source, cached_tokenizer, seqlen, text_field)
    if len(stream) < seqlen:
        raise CalibrationError(
            f"evaluation data {source!r} has {len(stream)} tokens, fewer than one window of "
            f"seqlen={seqlen}; lower --seqlen or give more text."
        )
    return stream.unsqueeze(0)


def _evaluation_stream(source: str, tokenizer: CachedTokenizer, seqlen: int,
                       text_field: str) -> torch.LongTensor:
    if source == "wikitext2":
        return corpora.wikitext2_stream(tokenizer, "test")
    if source == "c4":
        return corpora.c4_validation_stream(tokenizer)[:C4_EVAL_WINDOWS * seqlen]
    path = sources.local_file(source)
    if path.suffix.lower() in sources.TEXT_EXTENSIONS:
        return corpora.text_file_stream(tokenizer, path)
    return corpora.joined_documents_stream(tokenizer, path, text_field)
