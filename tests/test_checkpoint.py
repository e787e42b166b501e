"""Checkpoints pruned elsewhere read as the same tensors: safetensors, PyTorch .bin (weights_only),
the legacy compressed-tensors sparse-bitmask and sparse-24-bitmask layouts (both namings), and a
checkpoint whose lm_head was pruned as well (llm-compressor 0.14 does that). Then the safetensors
reader and the streaming writer on their own: every dtype, short reads, a shard written in a thread."""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import saved_tensors
from reconstruct.checkpoint import BitmaskDecoder, CheckpointError, TorchBinReader, open_checkpoint
from reconstruct.models import open_model


def _pruned_copy(source, directory, pattern=None, prune_head=False):
    """A copy of `source` with every block linear (and optionally lm_head) pruned by magnitude."""
    shutil.copytree(source, directory)
    tensors = saved_tensors(directory)
    for name, tensor in tensors.items():
        if tensor.dim() == 2 and (".layers." in name or (prune_head and name.startswith("lm_head"))):
            if pattern == "2:4":
                groups = tensor.reshape(-1, 4)
                keep = torch.zeros_like(groups, dtype=torch.bool)
                keep.scatter_(1, groups.abs().topk(2, dim=1).indices, True)
                tensor.mul_(keep.reshape(tensor.shape))
            else:
                threshold = tensor.abs().flatten().kthvalue(tensor.numel() // 2).values
                tensor[tensor.abs() <= threshold] = 0.0
    for shard in directory.glob("*.safetensors"):
        shard.unlink()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory, tensors


def _compress(tensors, fmt, old_names=False):
    """compressed-tensors' legacy layouts, written from their description (REFERENCE.md)."""
    out = {}
    for name, tensor in tensors.items():
        if not (tensor.dim() == 2 and ".layers." in name):
            out[name] = tensor
            continue
        prefix = name if old_names else name[:-len(".weight")]
        keep = tensor != 0
        if fmt == "sparse-24-bitmask":  # exactly 2 kept per group of 4 (a kept value may be 0)
            groups = tensor.reshape(-1, 4)
            keep = torch.zeros_like(groups, dtype=torch.bool)
            keep.scatter_(1, groups.abs().topk(2, dim=1).indices, True)
            keep = keep.reshape(tensor.shape)
            out[f"{prefix}.compressed"] = tensor[keep].reshape(tensor.shape[0], tensor.shape[1] // 2)
            out[f"{prefix}.shape"] = torch.tensor(list(tensor.shape)).reshape(2, 1)
        else:
            out[f"{prefix}.compressed"] = tensor[keep]
            out[f"{prefix}.shape"] = torch.tensor(list(tensor.shape))
            out[f"{prefix}.row_offsets"] = torch.cat([torch.zeros(1, dtype=torch.long),
                                                      keep.sum(dim=1).cumsum(0)[:-1]])
        out[f"{prefix}.bitmask"] = torch.from_numpy(np.packbits(keep.numpy(), axis=1, bitorder="little"))
    return out


@pytest.fixture(scope="module")
def pruned(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    return _pruned_copy(tiny_checkpoint("llama", hidden_size=64, intermediate_size=128), root / "pruned")


def _read_all(directory):
    reader = open_checkpoint(directory)
    return reader, {name: reader.get(name) for name in reader.file_of}


def _assert_same(read, expected):
    assert read.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(read[name], tensor), name
        assert not torch.signbit(read[name][read[name] == 0]).any(), name


def test_pytorch_bin_reads_as_safetensors(pruned, tmp_path):
    source, tensors = pruned
    directory = tmp_path / "bin"
    shutil.copytree(source, directory)
    (directory / "model.safetensors").unlink()
    torch.save(tensors, directory / "pytorch_model.bin")
    reader, read = _read_all(directory)
    assert isinstance(reader, TorchBinReader)
    _assert_same(read, tensors)
    name = next(n for n in tensors if n.endswith("up_proj.weight"))
    assert torch.equal(reader.get_rows(name, 3, 9), tensors[name][3:9])
    open_model(directory)  # the skeleton's every tensor is found


def test_sharded_pytorch_bin_with_index(pruned, tmp_path):
    source, tensors = pruned
    directory = tmp_path / "bin-sharded"
    shutil.copytree(source, directory)
    (directory / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"pytorch_model-00001-of-00002.bin": names[:len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, part in halves.items():
        torch.save({n: tensors[n] for n in part}, directory / file)
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, part in halves.items() for n in part}}))
    _assert_same(_read_all(directory)[1], tensors)


def test_pickle_with_code_is_refused(pruned, tmp_path):
    directory = tmp_path / "evil"
    shutil.copytree(pruned[0], directory)
    (directory / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    with open(directory / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"x": Payload()}, handle)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        open_checkpoint(directory)


@pytest.mark.parametrize("fmt, old_names", [("sparse-bitmask", False), ("sparse-bitmask", True),
                                            ("sparse-24-bitmask", False)])
def test_legacy_bitmask_checkpoints_decode_to_the_dense_tensors(fmt, old_names, tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("llama", hidden_size=64, intermediate_size=128)
    source, tensors = _pruned_copy(base, tmp_path / "pruned", pattern="2:4" if fmt.endswith("24-bitmask") else None)
    directory = tmp_path / "compressed"
    shutil.copytree(source, directory)
    save_file(_compress(tensors, fmt, old_names), str(directory / "model.safetensors"))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": fmt,
                                     "sparsity_config": {"format": fmt, "global_sparsity": 0.5,
                                                         "targets": ["Linear"], "ignore": ["lm_head"]}}
    (directory / "config.json").write_text(json.dumps(config))

    reader, read = _read_all(directory)
    assert isinstance(reader, BitmaskDecoder)
    _assert_same(read, tensors)
    name = next(n for n in tensors if n.endswith("down_proj.weight"))
    for start, stop in [(0, 1), (5, 17), (60, 64)]:
        assert torch.equal(reader.get_rows(name, start, stop), tensors[name][start:stop])
    assert reader.info(name) == (tensors[name].dtype, tuple(tensors[name].shape))
    adapter = open_model(directory)
    assert not hasattr(adapter.config, "quantization_config")  # the output carries no sparsity_config


def test_unknown_sparsity_format_is_named(pruned, tmp_path):
    directory = tmp_path / "unknown"
    shutil.copytree(pruned[0], directory)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"sparsity_config": {"format": "sparse-cutlass-24"}}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="sparse-cutlass-24"):
        open_checkpoint(directory)


# --------------------------------------------------------------------------------------------------
# The safetensors reader and writer on their own
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.bool])
def test_safetensors_writer_round_trip(dtype, tmp_path):
    """The streaming writer's files read back with the safetensors library, tensor for tensor."""
    from safetensors.torch import load_file

    from reconstruct.checkpoint import StreamedTensor, write_safetensors

    g = torch.Generator().manual_seed(0)
    big = (torch.randn(7, 5, generator=g) * 10).to(dtype)
    tensors = {"whole": (torch.randn(3, 4, generator=g) * 10).to(dtype),
               "scalar": torch.tensor(3).to(dtype), "empty": torch.zeros(0, 4, dtype=dtype),
               "streamed": StreamedTensor(dtype, (7, 5), lambda: iter([big[:3], big[3:6], big[6:]]))}
    write_safetensors(tmp_path / "a.safetensors", tensors)
    loaded = load_file(tmp_path / "a.safetensors")
    assert set(loaded) == set(tensors)
    for name in ("whole", "scalar", "empty"):
        assert loaded[name].dtype == dtype and torch.equal(loaded[name], tensors[name])
    assert torch.equal(loaded["streamed"], big)
    with open(tmp_path / "a.safetensors", "rb") as handle:  # the format's 8-byte header alignment
        assert int.from_bytes(handle.read(8), "little") % 8 == 0

    short = StreamedTensor(dtype, (7, 5), lambda: iter([big[:3]]))
    with pytest.raises(ValueError, match="'short': wrote .* bytes, its shape and dtype need"):
        write_safetensors(tmp_path / "b.safetensors", {"short": short})


def test_read_gives_the_stored_bytes_in_memory_of_its_own(tmp_path):
    """CheckpointReader.read (a block's weights) reads each tensor at the offsets of the shard's
    header: the bytes `get`'s memory-mapped view shows, for every dtype and shape, and writing into
    the result leaves the file untouched."""
    from safetensors.torch import save_file

    from reconstruct.checkpoint import CheckpointReader

    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(5, 7, generator=g), "b.weight": torch.randn(3, 4, generator=g).bfloat16(),
               "c.bias": torch.randn(6, generator=g).half(), "d.ids": torch.arange(9),
               "e.flag": torch.tensor([True, False]), "f.scalar": torch.tensor(2.5), "g.empty": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    before = (tmp_path / "model.safetensors").read_bytes()
    reader = CheckpointReader(tmp_path)
    for name, tensor in tensors.items():
        read = reader.read(name)
        assert read.dtype == tensor.dtype and read.shape == tensor.shape, name
        assert torch.equal(read.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
        assert torch.equal(read, reader.get(name)), name
        read.zero_()
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_read_into_continues_after_short_reads():
    """One readinto may return fewer bytes than asked (Linux caps one read at about 2 GiB): the
    reader keeps reading until the tensor is full, and stops at the end of the file."""
    import io

    from reconstruct.checkpoint import read_into

    class ShortReads(io.BytesIO):
        def readinto(self, buffer):
            return super().readinto(memoryview(buffer)[:3])  # at most 3 bytes per call

    data = bytes(range(20))
    target = bytearray(11)
    handle = ShortReads(data)
    handle.seek(4)
    assert read_into(handle, memoryview(target)) == 11
    assert bytes(target) == data[4:15]
    assert read_into(ShortReads(data[:5]), memoryview(bytearray(8))) == 5  # a truncated file


def test_background_write_raises_in_the_caller_and_is_waited_for():
    """A shard written in a thread during the replay: its error is raised by result(), in the
    caller's thread; leaving the `with` by an exception waits for the thread first."""
    import threading
    import time

    from reconstruct.checkpoint import BackgroundWrite

    def fail():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    failing = BackgroundWrite(fail)
    with pytest.raises(OSError) as caught:
        failing.result()
    assert caught.value.errno == errno.ENOSPC

    finished = threading.Event()

    def slow():
        time.sleep(0.2)
        finished.set()

    with pytest.raises(KeyError):
        with BackgroundWrite(slow):
            raise KeyError("the replay failed")
    assert finished.is_set()  # not still writing behind the caller

    called = []
    BackgroundWrite(lambda: called.append(1), enabled=False).result()
    assert called == []


# --------------------------------------------------------------------------------------------------
# Nested values with tensors, saved without pickle (the blocks' arguments for resuming)
def test_tree_round_trip_keeps_types_and_shared_tensors(tmp_path):
    from reconstruct.checkpoint import RunDirectory

    rotary = (torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    calls = [((), {"attention_mask": None, "position_embeddings": rotary, "use_cache": False, "scale": 0.5,
                   "layer": 3, "kind": "full", "ids": [torch.arange(4)]}),
             ((torch.ones(2, dtype=torch.bool),), {"position_embeddings": rotary})]
    run_dir = RunDirectory(tmp_path / "out")
    run_dir.work.mkdir()
    run_dir.save_tree("calls", calls)
    loaded = run_dir.load_tree("calls")
    assert type(loaded) is list and type(loaded[0]) is tuple and type(loaded[0][1]["ids"]) is list
    assert loaded[0][1]["use_cache"] is False and loaded[0][1]["attention_mask"] is None
    assert loaded[0][1]["scale"] == 0.5 and loaded[0][1]["layer"] == 3 and loaded[0][1]["kind"] == "full"
    assert torch.equal(loaded[1][0][0], calls[1][0][0]) and loaded[1][0][0].dtype == torch.bool
    assert all(torch.equal(a, b) for a, b in zip(loaded[0][1]["position_embeddings"], rotary))
    # The same tensor object in several places is saved once and read back as one object
    assert loaded[0][1]["position_embeddings"][0] is loaded[1][1]["position_embeddings"][0]
    from safetensors import safe_open

    with safe_open(str(run_dir.work / "calls.safetensors"), "pt") as handle:
        assert len(list(handle.keys())) == 4  # two rotary tensors, the bool mask, the ids


def test_tree_refuses_what_it_cannot_save_naming_where_it_is(tmp_path):
    from reconstruct.checkpoint import RunDirectory
    from reconstruct.checkpoint.tree import UnsavableValueError

    run_dir = RunDirectory(tmp_path / "out")
    run_dir.work.mkdir()
    with pytest.raises(UnsavableValueError, match=r"^block_calls\[1\]\[1\]\['dtype'\] is a torch.dtype$"):
        run_dir.save_tree("block_calls", [((), {}), ((), {"dtype": torch.float16})])
    with pytest.raises(UnsavableValueError, match=r"has a key 3 of type int"):
        run_dir.save_tree("block_calls", [{3: None}])
    assert not list(run_dir.work.iterdir())  # refused before writing anything
