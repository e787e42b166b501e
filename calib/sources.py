"""Where text comes from: the hub datasets the papers use, or a local file.

A *source* is a string. Two names are reserved for the papers' datasets on the Hugging Face hub:

* ``"c4"``        -- ``allenai/c4``, one shard of the English train split (calibration) or of the
                    validation split (evaluation);
* ``"wikitext2"`` -- ``wikitext-2-raw-v1`` (train split for calibration, test split for evaluation).

Anything else must be the path of a local file:

* ``.txt``      -- the whole file is one text;
* ``.jsonl``    -- one JSON object per line, the document's text in field ``text_field``;
* ``.parquet``  -- one row per document, the text in column ``text_field``.

This module only reads text. Tokenising it is `calib.tokens`' job, and choosing windows is the job
of `calib.calibration` and `calib.evaluation`.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from calib.errors import CalibrationError

# The papers' datasets. "Salesforce/wikitext" is the hub's current id of the dataset that
# SparseGPT's and Wanda's code load by its legacy alias "wikitext"; the files are the same.
C4_DATASET = "allenai/c4"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
WIKITEXT_DATASET = "Salesforce/wikitext"
WIKITEXT2_CONFIG = "wikitext-2-raw-v1"

HUB_SOURCES = ("c4", "wikitext2")
TEXT_EXTENSIONS = (".txt",)
DOCUMENT_EXTENSIONS = (".jsonl", ".parquet")
LOCAL_EXTENSIONS = TEXT_EXTENSIONS + DOCUMENT_EXTENSIONS

LOCAL_FILE_HINT = "pass a local .txt, .jsonl or .parquet file instead"
# The local copy of each hub split that gives the same windows, named in the error when the hub
# cannot be used; docs/evaluation.md ("Working offline") shows how each is made.
OFFLINE_COPIES = {
    (WIKITEXT_DATASET, "train"): "wikitext2_train.txt",
    (WIKITEXT_DATASET, "test"): "wikitext2_test.txt",
    (C4_DATASET, "train"): "c4-train.00000-of-01024.jsonl",
    (C4_DATASET, "validation"): "c4_validation.txt",
}


def is_hub_source(source: str) -> bool:
    """True for the reserved names of the papers' hub datasets (checked before any path)."""
    return source in HUB_SOURCES


def load_hub_split(dataset: str, split: str, *, config: str | None = None,
                   data_file: str | None = None):
    """Load one split of a hub dataset with `datasets`, or explain why it cannot be had.

    When the hub is offline or unreachable (`calib.hub`), only the local `datasets` cache is looked
    in, so that the answer comes at once instead of after a minute of retries. Any failure (no
    network and nothing cached, a renamed dataset, missing authentication) ends the same way for
    the user: use a local file, and the message names one. The original exception is chained.
    """
    from datasets import load_dataset

    from calib import hub

    data_files = {split: data_file} if data_file else None
    what = dataset + (f" ({config})" if config else "") + (f", file {data_file}" if data_file else "")
    unavailable = hub.offline_reason()
    try:
        with hub.offline_mode() if unavailable else contextlib.nullcontext():
            return load_dataset(dataset, config, data_files=data_files, split=split)
    except Exception as exc:  # noqa: BLE001 -- every failure mode gets the same advice
        why = (f"{unavailable}, and it is not in the local `datasets` cache" if unavailable
               else f"loading it failed ({type(exc).__name__}: {exc})")
        raise CalibrationError(
            f"the {split} split of hub dataset {what} cannot be used: {why}; {LOCAL_FILE_HINT}, "
            f"e.g. {OFFLINE_COPIES.get((dataset, split), 'an export of it')} made once on a machine "
            f"with network as docs/evaluation.md (\"Working offline\") shows."
        ) from exc


def local_file(source: str) -> Path:
    """The path of a local source, after checking that it exists and has a supported extension."""
    path = Path(source).expanduser()
    if not path.exists():
        raise CalibrationError(
            f"data source {source!r} is neither a known dataset name ({', '.join(HUB_SOURCES)}) "
            f"nor an existing file; check the path, or {LOCAL_FILE_HINT}."
        )
    if not path.is_file():
        raise CalibrationError(f"data source {source!r} is not a regular file; {LOCAL_FILE_HINT}.")
    if path.suffix.lower() not in LOCAL_EXTENSIONS:
        raise CalibrationError(
            f"unsupported file type {path.suffix or '(no extension)'!r} for {source!r}: supported "
            f"are .txt (the whole file is one text), .jsonl and .parquet (one document per "
            f"record); convert the file to one of these or rename it if it already is one."
        )
    return path


def local_file_fingerprint(path: Path) -> dict:
    """What identifies a local file's content for the token cache: path, size and mtime.

    Hashing the content would be exact but reads the whole file on every run; a changed file
    almost always changes its size or modification time.
    """
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def read_text_file(path: Path) -> str:
    """The whole of a .txt file, which must contain some non-blank text."""
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise CalibrationError(f"{path} is empty; give a file that contains text.")
    return text


def read_documents(path: Path, text_field: str) -> list[str]:
    """The documents of a .jsonl or .parquet file: the string in `text_field` of each record."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        documents = _read_jsonl_documents(path, text_field)
    elif suffix == ".parquet":
        documents = _read_parquet_documents(path, text_field)
    else:
        raise CalibrationError(f"{path} is not a .jsonl or .parquet file of documents.")
    if not any(document.strip() for document in documents):
        raise CalibrationError(
            f"{path} has no text: {len(documents)} records, all with an empty {text_field!r} field; "
            f"give a file that contains text."
        )
    return documents


def _read_jsonl_documents(path: Path, text_field: str) -> list[str]:
    documents = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue  # a blank line (often the last one) is not a record
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(
                    f"{path}, line {line_number}, is not valid JSON ({exc.msg}); a .jsonl file "
                    f"needs one JSON object per line."
                ) from exc
            if not isinstance(record, dict) or text_field not in record:
                fields = sorted(record) if isinstance(record, dict) else []
                raise CalibrationError(
                    f"{path}, line {line_number}, has no field {text_field!r} (fields present: "
                    f"{fields}); pass the field that holds the text with --text-field."
                )
            documents.append(_as_text(record[text_field], path, f"line {line_number}", text_field))
    if not documents:
        raise CalibrationError(f"{path} is empty; give a file with one JSON document per line.")
    return documents


def _read_parquet_documents(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    fields = pq.read_schema(path).names
    if text_field not in fields:
        raise CalibrationError(
            f"{path} has no column {text_field!r} (columns present: {fields}); pass the column "
            f"that holds the text with --text-field."
        )
    values = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    if not values:
        raise CalibrationError(f"{path} is empty; give a file with at least one document.")
    return [_as_text(value, path, f"row {row}", text_field) for row, value in enumerate(values)]


def _as_text(value, path: Path, where: str, text_field: str) -> str:
    if not isinstance(value, str):
        raise CalibrationError(
            f"{path}, {where}: field {text_field!r} holds a {type(value).__name__}, not text; "
            f"pass the field that holds the text with --text-field."
        )
    return value
