"""Text to token ids, with one convention everywhere: the tokenizer's defaults.

SparseGPT's and Wanda's data code call ``tokenizer(text, return_tensors="pt")``: special tokens are
added the way the model's tokenizer adds them by default. For LLaMA that is one BOS at the start of
each call, so

* a joined text (wikitext2, a .txt file, the C4 evaluation text, joined documents) gets one BOS at
  its very start and none in the middle;
* each C4 (or .jsonl/.parquet) document sampled for calibration is tokenised on its own and so
  starts with BOS, and a calibration window taken from inside it usually does not contain it.

We keep exactly that, for comparability with the published numbers: never ``add_special_tokens=False``
and never a BOS added by hand.
"""
from __future__ import annotations

import torch


def tokenize(tokenizer, text: str) -> torch.LongTensor:
    """Token ids of one text, shape [N], with the tokenizer's default special tokens."""
    # verbose=False: a text longer than the model's context is the normal case here (it is cut
    # into windows afterwards), so the tokenizer's "sequence too long" warning would only mislead.
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def tokenize_documents(tokenizer, documents: list[str]) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Every document tokenised on its own; returns (all ids concatenated, length of each document).

    One flat tensor plus lengths is how the token cache stores a list of ragged sequences.
    """
    ids = tokenizer(documents, verbose=False)["input_ids"]
    lengths = torch.tensor([len(document_ids) for document_ids in ids], dtype=torch.long)
    flat = torch.tensor([token for document_ids in ids for token in document_ids], dtype=torch.long)
    return flat, lengths


def split_documents(flat: torch.LongTensor, lengths: torch.LongTensor) -> list[torch.LongTensor]:
    """Undo the flattening of `tokenize_documents`: one tensor per document."""
    return list(torch.split(flat, lengths.tolist()))
