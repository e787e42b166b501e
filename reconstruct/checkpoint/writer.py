"""The output checkpoint and the run's work directory (resume state), written so nothing is lost.

Everything is written under `OUT.partial/`: one safetensors shard per block as soon as the block is
done, the inputs of the next block, and `state.json` naming the next block. Each file is written to a
temporary name, made durable, and renamed (and the directory made durable after the rename), and
`state.json` is replaced last, so a run killed at any instant resumes from the last finished block.

Finishing is renames first, clean-up last, so a kill at any point leaves a resumable `OUT.partial`
or a complete `OUT`:

    write the index, config, tokenizer, report into OUT.partial    (still resumable: state.json)
    an old OUT (under --overwrite) -> OUT.partial/replaced-output   (still resumable)
    OUT.partial -> OUT                                             (complete; work files inside)
    delete the work files from OUT, state.json last

A directory named `OUT` is always complete; one that still holds `state.json` was killed during the
clean-up, which the next run in that directory finishes (`prepare`).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..faults import fault_point
from . import tree
from .errors import OutputError
from .safetensors import SAFETENSORS_DTYPES

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja",
                "added_tokens.json")


REPLACED_OUTPUT = "replaced-output"  # an old OUT under --overwrite, moved into OUT.partial to be deleted
# The run's work files, not its output: deleted from OUT once it is in place, `state.json` last.
WORK_FILES = (REPLACED_OUTPUT, "activations", "block_calls.*", "*.pt", "*.tmp")


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable: without it a crash of the machine may undo the rename."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _atomic(path: Path, write) -> None:
    temporary = path.with_name(path.name + ".tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        fault_point("atomic-written")
        os.replace(temporary, path)
        fsync_directory(path.parent)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if error.errno == errno.ENOSPC:
            raise OutputError(errno.ENOSPC, f"no space left on the device while writing {path.name}; "
                              "free some space and rerun the same command with --resume: the blocks "
                              "already finished are kept") from error
        raise


# --------------------------------------------------------------------------------------------------
# Safetensors, written tensor by tensor and chunk by chunk
@dataclass
class StreamedTensor:
    """A tensor written in chunks along its first dimension, never whole in memory (embeddings and
    heads of large-vocabulary models are hundreds of MB to GBs)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[torch.Tensor]]  # contiguous pieces, in order, together the tensor


def write_safetensors(path: Path, tensors: dict[str, "torch.Tensor | StreamedTensor"]) -> None:
    """Write a safetensors file (the format's header, then each tensor's bytes in the header's order).

    safetensors' own `save_file` needs every tensor whole in memory at once; this writer needs one
    chunk at a time. The file is an ordinary safetensors file (8-byte header length, JSON header
    padded to 8 bytes, contiguous little-endian data with no gaps).
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"cannot write {name!r}: dtype {tensor.dtype} has no safetensors code")
        size = _numel(tensor.shape) * tensor.dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, tensor in tensors.items():
            pieces = tensor.chunks() if isinstance(tensor, StreamedTensor) else [tensor]
            written = 0
            for piece in pieces:
                if piece.dtype != tensor.dtype or piece.device.type != "cpu":
                    raise TypeError(f"chunk of {name!r} is {piece.dtype} on {piece.device}, "
                                    f"expected {tensor.dtype} on cpu")
                raw = piece.contiguous().reshape(-1).view(torch.uint8).numpy()
                handle.write(memoryview(raw))
                written += raw.nbytes
            expected = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if written != expected:
                raise ValueError(f"{name!r}: wrote {written} bytes, its shape and dtype need {expected}")


def write_json(path: Path, data) -> None:
    _atomic(path, lambda p: p.write_text(json.dumps(data, indent=2, default=str) + "\n"))


class BackgroundWrite:
    """Runs `write` in a thread while the caller computes (rank 0 writing a finished block's shard
    during the block's replay); `result()` waits for it and raises its error, if any.

    Used as a context manager: leaving the `with` by an exception also waits for the thread (without
    raising its error over the one in flight), so nothing goes on being written behind the caller.
    `enabled=False` does nothing (the ranks that do not write)."""

    def __init__(self, write: Callable[[], None], enabled: bool = True):
        self._error: BaseException | None = None
        self._thread = None
        if enabled:
            self._thread = threading.Thread(target=self._run, args=(write,), name="reconstruct-writer")
            self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as error:  # noqa: BLE001 - raised in the caller's thread by result()
            self._error = error

    def result(self) -> None:
        if self._thread:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error

    def __enter__(self) -> "BackgroundWrite":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self._thread:
            self._thread.join()


class RunDirectory:
    """`OUT.partial/` while the run is going, renamed to `OUT` when it is complete."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.work = self.out.with_name(self.out.name + ".partial")
        self.activations = self.work / "activations"

    # -- starting ------------------------------------------------------------------------------------
    def check_output(self, overwrite: bool) -> None:
        """Fail if OUT holds something this run may not replace. Called first, right after the lock is
        taken: before the model is opened or any data is read (calibration text can take minutes)."""
        if self.interrupted_clean_up():  # a finished output whose clean-up a kill interrupted
            self.delete_work_files(self.out)
        if self.out.exists() and any(self.out.iterdir()) and not overwrite:
            resumable = (f" (with --resume to continue the unfinished run in {self.work})"
                         if (self.work / "state.json").exists() else "")  # an interrupted --overwrite run
            raise OutputError(errno.EEXIST, f"output directory {self.out} exists and is not empty; pass "
                              f"--overwrite to replace it{resumable}, or choose another --out")

    def prepare(self, overwrite: bool, resume: bool) -> bool:
        """Create the work directory; return True when an earlier run's state is there to resume."""
        self.check_output(overwrite)
        if resume and (self.work / "state.json").exists():
            return True
        if self.work.exists():
            shutil.rmtree(self.work)
        try:
            self.activations.mkdir(parents=True)
        except OSError as error:
            raise OutputError(error.errno, f"cannot create {self.work}: {error.strerror}") from error
        return False

    def interrupted_clean_up(self) -> bool:
        """Whether OUT is a finished output whose work files were being deleted when the run was
        killed: our index beside our state.json (never a directory of the user's that has a state.json)."""
        try:
            state = json.loads((self.out / "state.json").read_text())
        except (OSError, ValueError):
            return False
        return (self.out / "model.safetensors.index.json").exists() and isinstance(state, dict) and \
            "fingerprint" in state

    # -- shards and state ----------------------------------------------------------------------------
    @staticmethod
    def shard_name(index: int, total: int) -> str:
        return f"model-{index + 1:05d}-of-{total:05d}.safetensors"

    def save_shard(self, name: str, tensors: dict[str, "torch.Tensor | StreamedTensor"]) -> None:
        _atomic(self.work / name, lambda p: write_safetensors(p, tensors))

    def save_torch(self, name: str, data) -> None:
        """A torch-serialisable object (a training state), atomically."""
        _atomic(self.work / name, lambda p: torch.save(data, p))

    def save_text(self, name: str, text: str) -> None:
        """A text file of the output (the model card), atomically."""
        _atomic(self.work / name, lambda p: p.write_text(text))

    def save_tree(self, name: str, value) -> None:
        """Nested tensors, lists, dicts and scalars as NAME.safetensors and NAME.json (checkpoint/tree.py:
        no pickle); raises tree.UnsavableValueError, naming the place in `value` as NAME[...], for
        anything else."""
        structure, tensors = tree.encode(value, root=name)
        from safetensors.torch import save_file

        _atomic(self.work / f"{name}.safetensors", lambda p: save_file(tensors, str(p)))
        _atomic(self.work / f"{name}.json", lambda p: p.write_text(tree.to_json(structure)))

    def load_tree(self, name: str):
        """What `save_tree(name, ...)` saved; a damaged or missing file is an OutputError saying so."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            structure = json.loads((self.work / f"{name}.json").read_text())
            return tree.decode(structure, load_file(str(self.work / f"{name}.safetensors")))
        except (OSError, ValueError, SafetensorError) as error:  # JSON's and tree's are ValueErrors
            raise OutputError(f"cannot read {self.work / name}.json/.safetensors, which the unfinished run "
                              f"saved ({error}); rerun without --resume to start over") from error

    def load_state(self) -> dict:
        """The resume point; a damaged one is an OutputError naming the file and what to do."""
        path = self.work / "state.json"
        try:
            state = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise OutputError(f"the resume point {path} is damaged ({error}); rerun without --resume to "
                              "start over") from error
        if not isinstance(state, dict) or "fingerprint" not in state:
            raise OutputError(f"the resume point {path} is damaged (no settings' fingerprint in it); rerun "
                              "without --resume to start over")
        return state

    def save_state(self, state: dict) -> None:
        write_json(self.work / "state.json", state)

    # -- finishing -----------------------------------------------------------------------------------
    def finish(self, source_dir: Path, config, shard_names: list[str], report: dict) -> Path:
        """Write the index, config, tokenizer and report; then make the directory visible as OUT."""
        from safetensors import safe_open

        weight_map, total_size = {}, 0
        for shard in shard_names:
            with safe_open(str(self.work / shard), "pt") as handle:
                for name in handle.keys():
                    weight_map[name] = shard
                    tensor = handle.get_slice(name)
                    total_size += _numel(tensor.get_shape()) * _itemsize(tensor.get_dtype())
        write_json(self.work / "model.safetensors.index.json",
                   {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})
        config.save_pretrained(self.work)
        for name in COPIED_FILES:
            if (source_dir / name).exists():
                shutil.copyfile(source_dir / name, self.work / name)
        write_json(self.work / "report.json", report)
        for path in self.work.iterdir():  # config and tokenizer were written in place: made durable now
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        self.publish()
        return self.out

    def publish(self) -> None:
        """OUT.partial becomes OUT by renames alone, then the work files go (the module docstring)."""
        fault_point("finish-written")
        if self.out.exists():
            os.replace(self.out, self.work / REPLACED_OUTPUT)  # same file system: a rename
            fsync_directory(self.work)
            fsync_directory(self.out.parent)
            fault_point("finish-old-moved")
        os.replace(self.work, self.out)
        fsync_directory(self.out.parent)
        fault_point("finish-renamed")
        self.delete_work_files(self.out)

    @staticmethod
    def delete_work_files(directory: Path) -> None:
        """Delete the run's work files from a finished `directory`, state.json last: while it is there,
        the clean-up is unfinished (and `prepare` finishes it)."""
        for pattern in WORK_FILES:
            for path in sorted(directory.glob(pattern)):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            fault_point("finish-cleaning")
        (directory / "state.json").unlink(missing_ok=True)
        fsync_directory(directory)


def _numel(shape) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1,
            "BOOL": 1}.get(dtype, 4)
