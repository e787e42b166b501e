"""Calibration windows: the token sequences that pruning statistics and corrections are fitted on.

`calibration_windows(source, tokenizer, nsamples, seqlen, seed)` returns a LongTensor of shape
[nsamples, seqlen]. Randomness comes only from ``random.Random(seed)``, private to the call, so the
windows depend on nothing but the arguments (not on global RNG state or on what ran before).

Protocols
---------
``c4`` (the papers' default; SparseGPT's and Wanda's ``get_c4``)
    hub dataset ``allenai/c4``, data file ``en/c4-train.00000-of-01024.json.gz``. For each window:
    draw a document ``rng.randint(0, n_documents - 1)`` and tokenise it alone; redraw until it has
    *more* than seqlen tokens; then draw the start ``rng.randint(0, n_tokens - seqlen - 1)``. The
    random calls are the reference code's, in its order, so seed 0 reproduces the papers'
    calibration set for the same tokenizer.
``wikitext2`` (SparseGPT's and Wanda's ``get_wikitext2``)
    ``wikitext-2-raw-v1`` train split, lines joined with a single space (as that code does),
    tokenised once; each window starts at ``rng.randint(0, n_tokens - seqlen - 1)``.
``*.txt``
    the whole file is one text, tokenised once; windows as for wikitext2.
``*.jsonl`` / ``*.parquet``
    documents in field ``text_field``, each tokenised alone; windows drawn as for c4. If no
    document has more than seqlen tokens, the documents are joined with blank lines into one text
    and windows are drawn as for wikitext2 -- with a logged warning, since that mixes documents.

Windows may overlap (the protocols draw starts independently). All protocols except c4 check
that the data holds at least nsamples x seqlen tokens and raise `CalibrationError` otherwise: a
calibration set made of the same few tokens over and over is almost certainly a mistake.
"""
from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable

import torch

from calib import corpora, sources, tokens
from calib.corpora import CachedTokenizer
from calib.errors import CalibrationError, require_positive
from calib.tokens import split_documents

logger = logging.getLogger(__name__)

# A document longer than seqlen is drawn in ~1 of 30 tries from C4 at seqlen 2048. After this
# many misses in a row, documents that long are too rare in the data and a larger seqlen than the
# data supports was asked for: fail instead of looping for hours.
MAX_CONSECUTIVE_SHORT_DOCUMENTS = 20_000


def calibration_windows(source: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0,
                        text_field: str = "text",
                        cache_dir: str | os.PathLike | None = None) -> torch.LongTensor:
    """`nsamples` windows of `seqlen` token ids drawn from `source` (see the module docstring)."""
    require_positive(nsamples=nsamples, seqlen=seqlen)
    cached_tokenizer = CachedTokenizer.create(tokenizer, cache_dir)
    if source == "c4":
        return _c4_windows(cached_tokenizer, nsamples, seqlen, seed)
    if source == "wikitext2":
        stream = corpora.wikitext2_stream(cached_tokenizer, "train")
        return sample_stream_windows(stream, nsamples, seqlen, random.Random(seed), source)
    path = sources.local_file(source)
    if path.suffix.lower() in sources.TEXT_EXTENSIONS:
        stream = corpora.text_file_stream(cached_tokenizer, path)
        return sample_stream_windows(stream, nsamples, seqlen, random.Random(seed), source)
    return _document_file_windows(cached_tokenizer, path, text_field, nsamples, seqlen, seed)


def sample_stream_windows(stream: torch.LongTensor, nsamples: int, seqlen: int,
                          rng: random.Random, source: str) -> torch.LongTensor:
    """Windows starting at uniformly drawn positions of one token stream (wikitext2 protocol)."""
    require_enough_tokens(len(stream), nsamples, seqlen, source)
    # The reference code draws randint(0, N - seqlen - 1): the last possible start, N - seqlen,
    # is never drawn. Kept, so that the same seed gives the same windows.
    starts = [rng.randint(0, len(stream) - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream[start:start + seqlen] for start in starts])


def sample_document_windows(num_documents: int, document_ids: Callable[[int], torch.LongTensor],
                            nsamples: int, seqlen: int, rng: random.Random) -> torch.LongTensor:
    """Windows from random documents longer than seqlen, one window per draw (C4 protocol).

    `document_ids(i)` returns the token ids of document i; it is called only for drawn documents,
    so a huge corpus is never tokenised as a whole.
    """
    windows = []
    for _ in range(nsamples):
        ids = _draw_long_document(num_documents, document_ids, seqlen, rng)
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start:start + seqlen])
    return torch.stack(windows)


def _draw_long_document(num_documents: int, document_ids: Callable[[int], torch.LongTensor],
                        seqlen: int, rng: random.Random) -> torch.LongTensor:
    for _ in range(MAX_CONSECUTIVE_SHORT_DOCUMENTS):
        ids = document_ids(rng.randint(0, num_documents - 1))
        if len(ids) > seqlen:
            return ids
    raise CalibrationError(
        f"drew {MAX_CONSECUTIVE_SHORT_DOCUMENTS} documents in a row with at most {seqlen} tokens; "
        f"documents longer than seqlen are too rare in this data: lower --seqlen."
    )


def require_enough_tokens(available: int, nsamples: int, seqlen: int, source: str) -> None:
    """Raise CalibrationError unless the data holds nsamples x seqlen tokens (and one more window start)."""
    # nsamples * seqlen is what the windows hold together; seqlen + 1 is what the reference
    # sampler needs for even one window (see sample_stream_windows).
    needed = max(nsamples * seqlen, seqlen + 1)
    if available < needed:
        raise CalibrationError(
            f"calibration data {source!r} has {available} tokens, but {nsamples} windows of "
            f"{seqlen} tokens need at least {needed}; lower --nsamples or --seqlen, or give more text."
        )


def _c4_windows(tokenizer: CachedTokenizer, nsamples: int, seqlen: int, seed: int) -> torch.LongTensor:
    """The papers' C4 calibration set; the windows themselves are cached (see calib.corpora)."""
    source = {"dataset": sources.C4_DATASET, "data_file": sources.C4_TRAIN_FILE, "split": "train"}

    def sample() -> dict[str, torch.Tensor]:
        documents = sources.load_hub_split(sources.C4_DATASET, "train", data_file=sources.C4_TRAIN_FILE)
        windows = sample_document_windows(
            len(documents), lambda index: tokens.tokenize(tokenizer.tokenizer, documents[index]["text"]),
            nsamples, seqlen, random.Random(seed))
        return {"windows": windows}

    return tokenizer.cached("c4-train-windows", source, "text", sample,
                            nsamples=nsamples, seqlen=seqlen, seed=seed)["windows"]


def _document_file_windows(tokenizer: CachedTokenizer, path, text_field: str, nsamples: int,
                           seqlen: int, seed: int) -> torch.LongTensor:
    """C4-style windows from a local document file, or joined-stream windows if all documents are short."""
    ids, lengths = corpora.document_set(tokenizer, path, text_field)
    require_enough_tokens(len(ids), nsamples, seqlen, str(path))
    if int(lengths.max()) > seqlen:
        documents = split_documents(ids, lengths)
        return sample_document_windows(len(documents), documents.__getitem__, nsamples, seqlen,
                                       random.Random(seed))
    logger.warning(
        "no document in %s has more than seqlen=%d tokens (the longest has %d); drawing windows "
        "from all %d documents joined with blank lines instead, so windows may span documents",
        path, seqlen, int(lengths.max()), len(lengths))
    stream = corpora.joined_documents_stream(tokenizer, path, text_field)
    return sample_stream_windows(stream, nsamples, seqlen, random.Random(seed), str(path))
