"""Out of memory is never a crash with a traceback.

* `prune`: a CUDA out-of-memory while fitting leaves the block without its correction's wrappers
  (so the block reloads from the checkpoint as usual), and the block is done again with half the
  fitting batch; the output is then the output of a run given that batch from the start. With one
  window per fitting batch already, a one-line error names the settings to change.
* `retrain`: a one-line error with the settings the memory plan would choose.

No GPU here: torch.cuda.OutOfMemoryError is raised by monkeypatching the fit and the training step.
"""
from __future__ import annotations

import logging

import torch
import transformers

from reconstruct import cli, fit
from reconstruct.retraining import trainer
from reconstruct.retraining.out_of_memory import out_of_memory_message
from reconstruct.config import RetrainConfig

MASKLORA = dict(method="wanda", correction="masklora", rank=4, steps=6, lr=1e-3)


def out_of_memory_at_fits(monkeypatch, failing_calls: set[int]) -> list[int]:
    """Make the fit's optimisation (after the correction is attached) run out of memory at the given
    calls (counted from 0); return the list of the batch counts each call trained on."""
    original, calls = fit._optimise, []

    def optimise(trainable, run, target, train_batches, *args, **kwargs):
        calls.append(len(train_batches))
        if len(calls) - 1 in failing_calls:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(trainable, run, target, train_batches, *args, **kwargs)

    monkeypatch.setattr(fit, "_optimise", optimise)
    return calls


def test_out_of_memory_while_fitting_halves_the_fitting_batch(tiny_checkpoint, prune_tiny, tmp_path,
                                                               monkeypatch, caplog):
    from conftest import saved_tensors

    model = tiny_checkpoint("llama")
    reference = prune_tiny(model, tmp_path / "batch-1", fit_batch_size=1, **MASKLORA)
    calls = out_of_memory_at_fits(monkeypatch, {0})
    with caplog.at_level(logging.WARNING):
        report = prune_tiny(model, tmp_path / "batch-2", fit_batch_size=2, **MASKLORA)
    assert "CUDA out of memory while fitting block 0's correction: retrying the block with --fit-batch-size 1" \
        in caplog.text
    # The first call had batches of 2 windows, every later one batches of 1 (about twice as many)
    assert calls[0] == -(-calls[1] // 2) and calls[1] > calls[0] and len(set(calls[1:])) == 1
    assert [b["merged"] for b in report["blocks"]] == [b["merged"] for b in reference["blocks"]]
    mine, theirs = saved_tensors(tmp_path / "batch-2"), saved_tensors(tmp_path / "batch-1")
    assert mine.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(mine[name], theirs[name]), name


def test_out_of_memory_with_one_window_per_fitting_batch_names_the_settings(tiny_checkpoint, sample_text,
                                                                           token_cache, tmp_path, monkeypatch,
                                                                           capsys):
    out_of_memory_at_fits(monkeypatch, set(range(100)))
    code = cli.main(["prune", str(tiny_checkpoint("llama")), "--out", str(tmp_path / "out"), "--calib",
                     str(sample_text), "--nsamples", "8", "--seqlen", "32", "--device", "cpu", "--cache-dir",
                     str(token_cache), "--correction", "masklora", "--steps", "4", "--fit-batch-size", "2"])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert "Traceback" not in stderr and "missing from the checkpoint" not in stderr
    assert ("reconstruct prune: error: the device ran out of memory while fitting block 0's correction with "
            "--fit-batch-size 1 (rank 0 of 1); lower --seqlen (now 32) or --rank (now 64), fit smaller units "
            "(--granularity sublayer or linear)") in stderr, stderr


def test_out_of_memory_in_retrain_names_the_settings(tiny_checkpoint, prune_tiny, sample_text, token_cache,
                                                     tmp_path, monkeypatch, capsys):
    pruned = tmp_path / "pruned"
    prune_tiny(tiny_checkpoint("llama"), pruned, method="magnitude", sparsity=0.6)
    capsys.readouterr()  # the prune's progress lines

    def train_step(self, step):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(trainer.Retrainer, "train_step", train_step)
    code = cli.main(["retrain", str(pruned), "--out", str(tmp_path / "out"), "--data", str(sample_text),
                     "--steps", "2", "--batch-size", "2", "--seqlen", "32", "--eval-windows", "2", "--device", "cpu",
                     "--cache-dir", str(token_cache)])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert stderr.startswith("reconstruct retrain: error: the device ran out of memory (CUDA out of memory. Tried "
                             "to allocate 1.00 GiB) with --batch-size 2 --grad-accum 1 --seqlen 32. The memory "
                             "plan expected these settings to fit"), stderr
    assert "--gradient-checkpointing" in stderr and "--offload cpu" in stderr


def llama2_7b():
    return transformers.LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                                    num_attention_heads=32, vocab_size=32000, torch_dtype="bfloat16")


def test_the_message_gives_the_plans_choice_for_the_device(monkeypatch):
    """LLaMA-2-7B on a 24 GB GPU at the defaults: the plan (docs/memory.md) chooses 2 passes of 4
    windows with checkpointing; on a 10 GB one it names what would fit instead."""
    from reconstruct.retraining import out_of_memory

    monkeypatch.setattr(out_of_memory, "device_memory_bytes", lambda device: 22 * 2**30)
    config = RetrainConfig(model="m", out="o", dtype="bf16")
    error = torch.cuda.OutOfMemoryError("CUDA out of memory.")
    message = out_of_memory_message(config, llama2_7b(), torch.device("cuda"), 1, error)
    assert "For this device the memory plan chooses --grad-accum 2 --gradient-checkpointing" in message, message
    monkeypatch.setattr(out_of_memory, "device_memory_bytes", lambda device: 10 * 2**30)
    message = out_of_memory_message(config, llama2_7b(), torch.device("cuda"), 1, error)
    assert "The memory plan: --params masklora needs" in message and "These would fit: --fsdp over" in message
