"""Checkpoints: finding one, reading its tensors in whatever format it was saved, writing the output.

Every reader answers the same questions: which tensor names exist (`file_of`), a tensor's dtype and
shape (`info`), the whole tensor (`get`, `read`) or a range of its rows (`get_rows`, `row_chunks`).
`open_checkpoint` picks the reader for a directory, so `prune`, `prune --masks-from` and `retrain`
read every format through one door:

* `safetensors`: the byte-range reader of safetensors shards (the usual case);
* `torchbin`: `pytorch_model*.bin` pickles, loaded tensors-only;
* `bitmask`: compressed-tensors' legacy sparse formats, decoded over either reader.

`writer` writes the output: safetensors shards a chunk at a time, and the run's work directory.
Nothing here knows about models; `models` builds on this package.
"""
from __future__ import annotations

import os
from pathlib import Path

from .bitmask import BitmaskDecoder, bitmask_format
from .errors import CheckpointError, OutputError
from .safetensors import READ_CHUNK_BYTES, SAFETENSORS_DTYPES, WEIGHT_FILES, CheckpointReader, read_into
from .torchbin import BIN_INDEX, BIN_SINGLE, TorchBinReader
from .writer import BackgroundWrite, RunDirectory, StreamedTensor, write_safetensors

__all__ = ["READ_CHUNK_BYTES", "SAFETENSORS_DTYPES", "WEIGHT_FILES", "BackgroundWrite", "BitmaskDecoder",
           "CheckpointError", "CheckpointReader", "OutputError", "RunDirectory", "StreamedTensor",
           "TorchBinReader", "open_checkpoint", "read_into", "resolve_checkpoint_dir", "write_safetensors"]

TOKENIZER_AND_CONFIG_PATTERNS = ["*.json", "*.model", "*.tiktoken", "*.txt", "*.py", "*.jinja"]


def resolve_checkpoint_dir(model: str | os.PathLike) -> Path:
    """A local directory as is; a hub id downloaded (config, tokenizer, safetensors) to the cache."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the checkpoint's directory instead")
        return path
    looks_local = str(model).startswith((".", "/", "~")) or str(model).count("/") > 1
    if looks_local:
        raise CheckpointError(f"model path {path} does not exist; check the path, or pass a hub id "
                              "such as meta-llama/Llama-2-7b-hf")
    from huggingface_hub import snapshot_download

    try:
        directory = Path(snapshot_download(str(model), allow_patterns=TOKENIZER_AND_CONFIG_PATTERNS
                                           + ["*.safetensors", "*.safetensors.index.json"]))
        if not any(directory.glob("*.safetensors")):
            # Older checkpoints (e.g. Wanda's and SparseGPT's outputs) have PyTorch .bin weights only.
            directory = Path(snapshot_download(str(model), allow_patterns=["pytorch_model*.bin",
                                                                           "pytorch_model.bin.index.json"]))
        return directory
    except Exception as error:  # offline, unknown repo, gated repo: all need the user's action
        raise CheckpointError(
            f"could not fetch {model!r} from the Hugging Face hub ({type(error).__name__}: {error}). "
            "Pass a local checkpoint directory, or check the name, your network and `hf auth login`."
        ) from error


def open_checkpoint(directory: Path):
    """The reader for a checkpoint directory: safetensors shards, else `.bin` pickles, decoded through
    the bitmask layer when the checkpoint holds compressed-tensors' legacy sparse formats."""
    has_safetensors = any((directory / name).exists()
                          for name in ("model.safetensors", "model.safetensors.index.json"))
    if not has_safetensors and ((directory / BIN_INDEX).exists() or (directory / BIN_SINGLE).exists()):
        reader = TorchBinReader(directory)
    else:
        reader = CheckpointReader(directory)  # its error names what is missing
    sparse_format = bitmask_format(directory)
    if sparse_format or any(name.endswith(".bitmask") for name in reader.file_of):
        return BitmaskDecoder(reader, sparse_format)
    return reader

