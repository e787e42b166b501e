"""Training windows for global retraining: packed, non-overlapping, with a held-out validation slice.

`training_windows(source, tokenizer, ntrain, nvalidation, seqlen, seed)` returns two LongTensors,
[ntrain, seqlen] and [nvalidation, seqlen]. Unlike calibration windows (random starts that may
overlap), these are cut end to end from a packed token stream, the way language models are trained:

``c4`` and ``.jsonl`` / ``.parquet`` (document sources)
    documents in a seeded random order, each tokenised alone and followed by the tokenizer's EOS
    token (if it has one), packed into one stream. The first documents make the validation slice,
    the following ones the training windows, so no document is in both. For C4 (356k documents in
    the train shard) only as many documents are tokenised as the windows need.
``wikitext2`` and ``.txt`` (one text)
    the text's token stream; its last `nvalidation` windows are the validation slice, the windows
    before them, in a seeded random order, the training windows.

When the data holds fewer training windows than asked for, the windows are repeated in a fresh
seeded order each pass (an epoch), with a logged warning. Randomness comes only from
``random.Random(seed)``: the same arguments give the same windows.
"""
from __future__ import annotations

import logging
import os
import random

import torch

from calib import corpora, sources, tokens
from calib.corpora import CachedTokenizer
from calib.errors import CalibrationError, require_positive

logger = logging.getLogger(__name__)


def training_windows(source: str, tokenizer, ntrain: int, nvalidation: int, seqlen: int, seed: int = 0,
                     text_field: str = "text", cache_dir: str | os.PathLike | None = None
                     ) -> tuple[torch.LongTensor, torch.LongTensor]:
    """(training windows [ntrain, seqlen], validation windows [nvalidation, seqlen])."""
    require_positive(ntrain=ntrain, seqlen=seqlen)
    if nvalidation < 0:
        raise CalibrationError(f"nvalidation must be 0 or more, not {nvalidation}")
    cached_tokenizer = CachedTokenizer.create(tokenizer, cache_dir)
    rng = random.Random(seed)
    if source == "wikitext2":
        stream = corpora.wikitext2_stream(cached_tokenizer, "train")
        return _stream_windows(stream, ntrain, nvalidation, seqlen, rng, source)
    if source == "c4":
        description = {"dataset": sources.C4_DATASET, "data_file": sources.C4_TRAIN_FILE, "split": "train"}

        def read():
            documents = sources.load_hub_split(sources.C4_DATASET, "train", data_file=sources.C4_TRAIN_FILE)
            return len(documents), lambda index: documents[index]["text"]  # read only when drawn
    else:
        path = sources.local_file(source)
        if path.suffix.lower() in sources.TEXT_EXTENSIONS:
            stream = corpora.text_file_stream(cached_tokenizer, path)
            return _stream_windows(stream, ntrain, nvalidation, seqlen, rng, source)
        description = sources.local_file_fingerprint(path)

        def read():
            texts = sources.read_documents(path, text_field)
            return len(texts), texts.__getitem__

    def pack() -> dict[str, torch.Tensor]:
        count, text_of = read()
        train, validation = _document_windows(count, text_of, tokenizer, ntrain, nvalidation, seqlen, rng,
                                              source)
        return {"train": train, "validation": validation}

    # Packing tokenises tens of thousands of documents for a long run: done once, then cached.
    packed = cached_tokenizer.cached("packed-training-windows", description, text_field, pack, ntrain=ntrain,
                                     nvalidation=nvalidation, seqlen=seqlen, seed=seed)
    return packed["train"], packed["validation"]


def _stream_windows(stream, ntrain, nvalidation, seqlen, rng, source):
    available = len(stream) // seqlen
    if available < nvalidation + 1:
        raise CalibrationError(f"{source!r} has {len(stream)} tokens: not enough for {nvalidation} "
                               f"validation windows and one training window of {seqlen} tokens; give "
                               "more text, or lower --seqlen or --eval-windows")
    windows = stream[:available * seqlen].reshape(available, seqlen)
    validation = windows[available - nvalidation:]
    return _repeat_in_epochs(windows[:available - nvalidation], ntrain, rng, source), validation


def _document_windows(count, text_of, tokenizer, ntrain, nvalidation, seqlen, rng, source):
    order = list(range(count))
    rng.shuffle(order)
    eos = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    position = 0

    def packed(nwindows: int) -> torch.LongTensor:
        """The next documents in `order`, packed until `nwindows` windows are full (or data ends)."""
        nonlocal position
        needed, pieces, total = nwindows * seqlen, [], 0
        while total < needed and position < count:
            ids = tokens.tokenize(tokenizer, text_of(order[position])).tolist() + eos
            position += 1
            pieces.append(torch.tensor(ids, dtype=torch.long))
            total += len(ids)
        stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
        full = len(stream) // seqlen
        return stream[:full * seqlen].reshape(full, seqlen)

    # The validation documents' surplus tokens are dropped, not trained on: no document is in both.
    validation = packed(nvalidation)[:nvalidation] if nvalidation else torch.zeros(0, seqlen, dtype=torch.long)
    if len(validation) < nvalidation:
        raise CalibrationError(f"{source!r} holds only {len(validation)} windows of {seqlen} tokens; "
                               f"{nvalidation} validation windows and training windows need more text")
    train = packed(ntrain)
    if len(train) == 0:
        raise CalibrationError(f"{source!r}: no training window of {seqlen} tokens is left after the "
                               f"{nvalidation} validation windows; give more text or lower --seqlen")
    return _repeat_in_epochs(train, ntrain, rng, source), validation


def _repeat_in_epochs(windows: torch.LongTensor, wanted: int, rng: random.Random, source: str):
    """`wanted` windows: all of `windows` in a seeded order, again in a new order, … as needed."""
    if len(windows) < wanted:
        logger.warning("%s holds %d training windows; %d are needed, so each is used about %.1f times "
                       "(give more data for fewer repeats)", source, len(windows), wanted,
                       wanted / len(windows))
    chosen: list[int] = []
    while len(chosen) < wanted:
        epoch = list(range(len(windows)))
        rng.shuffle(epoch)
        chosen.extend(epoch)
    return windows[torch.tensor(chosen[:wanted])]
