"""On-disk cache of tokenised data.

Loading a hub dataset and tokenising millions of characters takes tens of seconds to minutes, and
the result depends only on what went in. So every tokenised stream, document set or set of sampled
windows is computed once and kept as a safetensors file.

Where
    the ``cache_dir`` argument if given, else ``$RECONSTRUCT_CACHE/tokens`` if that variable is
    set, else ``~/.cache/reconstruct/tokens``.

Key
    the SHA-256 of a JSON *description* of everything the tokens depend on: the cache format
    version, the tokenizer's identity (`tokenizer_identity` of a loaded tokenizer, or
    `tokenizer_files_identity` of a tokenizer directory that is not loaded), the protocol name, the source (dataset
    id and file, or a local file's path, size and modification time), the text field, and any
    sampling parameters. A different tokenizer, protocol or file therefore never hits an old entry.
    The description is also stored inside the file, to make entries inspectable.

Writes
    atomic: a temporary file in the cache directory, then `os.replace`, so that an interrupted or
    concurrent run never leaves a truncated entry behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "RECONSTRUCT_CACHE"
DEFAULT_CACHE_ROOT = Path("~/.cache/reconstruct")
# Bump when the stored layout or a protocol's implementation changes, to orphan old entries.
FORMAT_VERSION = 1
# Tokenised as part of the tokenizer's identity: two tokenizers with the same vocabulary can still
# differ in normalisation, pre-tokenisation or the special tokens they add (e.g. add_bos_token).
PROBE_TEXT = "Probe: The quick brown fox -- 2048 tokens?\n\n  Ünïcode, tabs\tand  spaces."


def token_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory of the token cache: argument, else $RECONSTRUCT_CACHE/tokens, else the default."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get(CACHE_ENV_VAR)
    return (Path(root) if root else DEFAULT_CACHE_ROOT).expanduser() / "tokens"


def tokenizer_identity(tokenizer) -> dict:
    """What distinguishes one tokenizer's output from another's, as JSON-serialisable values."""
    vocab = sorted(tokenizer.get_vocab().items())
    vocab_hash = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    return {
        "name_or_path": str(tokenizer.name_or_path),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "vocab_sha256": vocab_hash,
        "probe_ids": list(tokenizer(PROBE_TEXT)["input_ids"]),
    }


# Files of a model or tokenizer directory that cannot change how text is tokenised: weights. Every
# other top-level file is hashed (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
# added_tokens.json, vocab and merges files, sentencepiece models, and config.json, from which
# transformers may pick the tokenizer class): a file that does not matter costs a cache miss at
# worst, a file left out could give a wrong hit.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


def tokenizer_files_identity(directory: str | os.PathLike) -> dict:
    """The identity of the tokenizer saved in a local directory, without loading it: the SHA-256 of
    each file it can be loaded from, and the versions of the libraries that turn those files into
    token ids (a new transformers or tokenizers can tokenise the same files differently).

    Hashing a large vocabulary's files takes tens of milliseconds; loading the tokenizer, seconds."""
    from importlib.metadata import PackageNotFoundError, version

    files = {}
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            files[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    versions = {}
    for package in ("transformers", "tokenizers", "sentencepiece", "tiktoken"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {"files_sha256": files, "versions": versions}


class TokenCache:
    """Tensors on disk, one safetensors file per description (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def path_for(self, description: dict) -> Path:
        canonical = json.dumps({"format": FORMAT_VERSION, **description}, sort_keys=True,
                               ensure_ascii=False)
        return self.directory / f"{hashlib.sha256(canonical.encode()).hexdigest()}.safetensors"

    def get_or_compute(self, description: dict,
                       compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The cached tensors for `description`, or `compute()`'s result, stored for next time."""
        path = self.path_for(description)
        cached = self._load(path)
        if cached is not None:
            logger.info("token cache hit: %s (%s)", path, description.get("protocol"))
            return cached
        tensors = compute()
        self._store(path, tensors, description)
        return tensors

    def _load(self, path: Path) -> dict[str, torch.Tensor] | None:
        if not path.exists():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:  # noqa: BLE001 -- a damaged entry is recomputed, never fatal
            logger.warning("token cache entry %s is unreadable (%s); recomputing it", path, exc)
            return None

    def _store(self, path: Path, tensors: dict[str, torch.Tensor], description: dict) -> None:
        from safetensors.torch import save_file

        temporary = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".tmp-", suffix=".safetensors",
                                             delete=False) as handle:
                temporary = Path(handle.name)
            metadata = {"description": json.dumps(description, sort_keys=True, ensure_ascii=False)}
            save_file({name: t.contiguous() for name, t in tensors.items()}, temporary, metadata=metadata)
            os.replace(temporary, path)
            logger.info("token cache: stored %s", path)
        except OSError as exc:
            # The tokens are already computed: a read-only or full disk costs time next run, not
            # this run's result.
            logger.warning("could not write token cache entry %s (%s); continuing without caching "
                           "(set --cache-dir or %s to a writable directory)", path, exc, CACHE_ENV_VAR)
            if temporary is not None:
                temporary.unlink(missing_ok=True)
