"""Global retraining (`reconstruct retrain`): every --params keeps the checkpoint's zero set exactly (and
+0.0), the merged model computes what the trained one did, every input format gives the same model,
a killed run resumes to the same bytes, a NaN stops cleanly, and bad input fails before any work.

Offline, on tiny LLaMA- and OPT-style models pruned by our own `prune` (magnitude, 60%).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import saved_tensors, wait_until_locked
from reconstruct.api import retrain
from reconstruct.config import RETRAIN_PARAMS, ConfigError
from reconstruct.corrections import CorrectionError, CorrectionOptions, make_correction
from reconstruct.checkpoint import CheckpointError
from reconstruct.models import UnsupportedModelError, open_model
from reconstruct.retraining import TrainingError
from reconstruct.retraining.inputs import prunable_linears_by_name

SEQLEN = 32


@pytest.fixture(scope="module")
def pruned_models(tiny_checkpoint, prune_tiny, tmp_path_factory):
    """{"llama": (dense, pruned), "opt": (dense, pruned)}: magnitude 60%, no correction."""
    root = tmp_path_factory.mktemp("retrain-inputs")
    models = {}
    for family in ("llama", "opt"):
        dense = tiny_checkpoint(family, hidden_size=64, intermediate_size=128, ffn_dim=128,  # a tied head,
                                word_embed_proj_dim=64, tie_word_embeddings=True) if family == "opt" else \
            tiny_checkpoint(family, hidden_size=64, intermediate_size=128)
        prune_tiny(dense, root / family, method="magnitude", sparsity=0.6)
        models[family] = (dense, root / family)
    return models


def settings(sample_text, token_cache, **overrides) -> dict:
    return {"data": str(sample_text), "steps": 4, "batch_size": 2, "seqlen": SEQLEN, "eval_every": 2,
            "eval_windows": 2, "save_every": 2, "device": "cpu", "cache_dir": str(token_cache), "rank": 4,
            **overrides}


def block_linears(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t for n, t in tensors.items() if ".layers." in n and t.dim() == 2}


def assert_same_zero_set(before: dict, after: dict) -> None:
    for name, tensor in block_linears(before).items():
        assert torch.equal(tensor == 0, after[name] == 0), name
        assert not torch.signbit(after[name][after[name] == 0]).any(), f"{name}: -0.0"


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, params", [(f, p) for f in ("llama", "opt") for p in RETRAIN_PARAMS
                                            if not (f == "llama" and p.startswith("bias"))])
def test_every_params_keeps_the_zero_set(family, params, pruned_models, sample_text, token_cache, tmp_path):
    _, pruned = pruned_models[family]
    report = retrain(pruned, tmp_path / "out", params=params,
                     **settings(sample_text, token_cache, lr=1e-3 if params != "full" else 1e-4))
    before, after = saved_tensors(pruned), saved_tensors(tmp_path / "out")
    assert before.keys() == after.keys()
    assert_same_zero_set(before, after)
    assert report["trainable_params"] > 0 and 0 < report["trainable_fraction"] < 1
    assert report["totals"]["sparsity_before"] == report["totals"]["sparsity_after"] > 0.55
    changed = [n for n in after if not torch.equal(before[n], after[n])]
    if report["merged"]:
        assert changed, "a merged correction changed nothing"
    else:
        assert not changed
    frozen = [n for n in after if "embed" in n or n.startswith("lm_head")]  # OPT's head is tied: not stored
    assert frozen and not set(frozen) & set(changed)  # embeddings and head are frozen


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_frozen_weights(dtype, pruned_models, sample_text, token_cache, tmp_path):
    """bf16 under autocast, fp16 with a gradient scaler: the zero set is kept, the output in that dtype."""
    _, pruned = pruned_models["llama"]
    report = retrain(pruned, tmp_path / "out", params="masklora+norm", dtype=dtype,
                     **settings(sample_text, token_cache, lr=3e-3))
    after = saved_tensors(tmp_path / "out")
    assert after["model.layers.0.mlp.up_proj.weight"].dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert_same_zero_set(saved_tensors(pruned), after)
    assert report["merged"]


def test_bias_on_a_model_without_biases_fails_before_any_work(pruned_models, sample_text, token_cache,
                                                              tmp_path):
    with pytest.raises(CorrectionError, match="^--params bias: this model's linear layers have no biases"):
        retrain(pruned_models["llama"][1], tmp_path / "out", params="bias", **settings(sample_text, token_cache))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_merged_model_computes_what_the_trained_one_did(pruned_models):
    """For every sparsity-preserving subset, logits after merge() equal the wrapped model's."""
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    for params in [p for p in RETRAIN_PARAMS if p != "lora-prune"]:
        adapter = open_model(pruned_models["opt"][1])
        model = adapter.load_all()
        attachment = make_correction(params).attach(model, prunable_linears_by_name(adapter), CorrectionOptions(rank=4),
                                                    torch.Generator().manual_seed(0))
        with torch.no_grad():
            for parameter in attachment.trainable:  # away from the identity initialisation
                parameter.mul_(1.05).add_(0.01)
            trained = model(input_ids=ids).logits
            attachment.merge()
            merged = model(input_ids=ids).logits
        torch.testing.assert_close(merged, trained, rtol=1e-4, atol=1e-4, msg=params)


def test_written_model_scores_the_reported_heldout_loss(pruned_models, sample_text, token_cache, tmp_path):
    """The report's final held-out loss is that of the checkpoint on disk, loaded by transformers."""
    import calib
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, pruned = pruned_models["llama"]
    report = retrain(pruned, tmp_path / "out", params="masklora+norm",
                     **settings(sample_text, token_cache, steps=6, lr=3e-3))
    assert report["merged"] and report["heldout_after"] < report["heldout_before"]
    _, validation = calib.training_windows(str(sample_text), AutoTokenizer.from_pretrained(pruned), 6 * 2, 2,
                                           SEQLEN, seed=0, cache_dir=token_cache)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        loss = model(input_ids=validation, labels=validation).loss.item()
    assert loss == pytest.approx(report["heldout_after"], rel=1e-5)
    assert (tmp_path / "out" / "loss.png").stat().st_size > 1000
    assert [step for step, _ in report["heldout_loss"]] == [0, 2, 4, 6]
    assert len(report["loss_curve"]["loss"]) == 6


@pytest.mark.parametrize("params", ["masklora+norm", "norm"])
def test_the_guard_judges_the_input_as_read_and_the_output_as_written(params, pruned_models, sample_text,
                                                                      token_cache, tmp_path):
    """bf16 weights: the held-out loss reported before training is the input checkpoint's own, and
    the one after is the written checkpoint's, reloaded, to the last bit (the same windows, the same
    autocast forward). Before, B·A was rounded to bf16 inside autocast for the judgement and computed
    in fp32 for the merge (outputs up to 0.008 apart), and the "before" loss was measured with fp32
    copies of the norms attached."""
    import calib
    from transformers import AutoTokenizer

    from reconstruct.fit import autocast_for
    from reconstruct.retraining.losses import next_token_loss_sum

    _, pruned = pruned_models["llama"]
    report = retrain(pruned, tmp_path / "out", params=params, dtype="bf16",
                     **settings(sample_text, token_cache, lr=3e-2))
    _, validation = calib.training_windows(str(sample_text), AutoTokenizer.from_pretrained(pruned), 4 * 2, 2,
                                           SEQLEN, seed=0, cache_dir=token_cache)

    def heldout_loss(checkpoint) -> float:
        model = open_model(checkpoint, torch.bfloat16).load_all().eval()
        with torch.no_grad(), autocast_for(torch.device("cpu"), torch.bfloat16):
            logits = model(input_ids=validation, use_cache=False).logits
        return float(next_token_loss_sum(logits, validation)) / validation[:, 1:].numel()

    assert report["merged"] and report["heldout_after"] != report["heldout_before"]
    assert report["heldout_before"] == heldout_loss(pruned)
    assert report["heldout_after"] == heldout_loss(tmp_path / "out")


@pytest.mark.parametrize("family, final_norm", [("llama", "model.norm.weight"),
                                                ("opt", "model.decoder.final_layer_norm.weight")])
def test_a_retrained_final_norm_is_written_as_trained(family, final_norm, pruned_models, sample_text, token_cache,
                                                      tmp_path):
    """--params norm trains the final norm, which lies outside the blocks: the checkpoint holds the
    trained values, not the input's copy."""
    from reconstruct.config import RetrainConfig
    from reconstruct.retraining import Retrainer

    _, pruned = pruned_models[family]
    config = RetrainConfig(model=str(pruned), out=str(tmp_path / "out"), params="norm",
                           **settings(sample_text, token_cache, lr=3e-2)).validate()
    retrainer = Retrainer(config)
    assert retrainer.run().report["merged"]
    trained = retrainer.model.get_parameter(final_norm).detach()
    before, after = saved_tensors(pruned), saved_tensors(tmp_path / "out")
    name = retrainer.adapter.checkpoint_name(final_norm)
    assert not torch.equal(after[name], before[name])
    assert torch.equal(after[name], trained)


def test_a_trained_tensor_without_a_checkpoint_name_is_an_error_not_the_inputs_copy(pruned_models, monkeypatch):
    from reconstruct.models import ModelAdapter

    adapter = open_model(pruned_models["llama"][1])
    adapter.load_all()
    known = ModelAdapter.checkpoint_name

    def unknown_final_norm(self, model_name):
        if model_name == "model.norm.weight":
            raise CheckpointError(f"tensor {model_name!r} is missing")
        return known(self, model_name)

    monkeypatch.setattr(ModelAdapter, "checkpoint_name", unknown_final_norm)
    with pytest.raises(CheckpointError, match=r"^cannot write model.norm.weight: the checkpoint in .* has no "
                                              r"tensor of that name, so the output would keep the input's copy"):
        adapter.non_block_tensors()


def test_reproducible(pruned_models, sample_text, token_cache, tmp_path):
    _, pruned = pruned_models["opt"]
    for name in ("a", "b"):
        retrain(pruned, tmp_path / name, params="masklora+norm", **settings(sample_text, token_cache))
    for shard in sorted((tmp_path / "a").glob("*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()


def test_never_worse_keeps_the_input_when_training_hurts(pruned_models, sample_text, token_cache, tmp_path):
    _, pruned = pruned_models["llama"]
    report = retrain(pruned, tmp_path / "out", params="norm", **settings(sample_text, token_cache, lr=50.0,
                                                                            warmup=0.0))
    assert report["merged"] is False
    before, after = saved_tensors(pruned), saved_tensors(tmp_path / "out")
    assert all(torch.equal(before[n], after[n]) for n in before)


# --------------------------------------------------------------------------------------------------
# Inputs from elsewhere
def test_every_input_format_gives_the_same_model(pruned_models, sample_text, token_cache, tmp_path):
    """Our safetensors, a Wanda/SparseGPT-style fp .bin, both legacy bitmask layouts, and an lm_head
    pruned as well (llm-compressor 0.14): the same tensors in, the same model out; the head's zeros stay."""
    from test_checkpoint import _compress

    from safetensors.torch import save_file

    _, pruned = pruned_models["llama"]
    base = tmp_path / "safetensors"
    shutil.copytree(pruned, base)
    tensors = saved_tensors(base)
    head = tensors["lm_head.weight"]
    head[head.abs() < head.abs().median()] = 0.0  # a pruned head, frozen while retraining
    for shard in base.glob("*.safetensors"):
        shard.unlink()
    (base / "model.safetensors.index.json").unlink()
    for name in ("report.json",):
        (base / name).unlink(missing_ok=True)
    save_file(tensors, str(base / "model.safetensors"))

    variants = {"safetensors": base}
    variants["bin"] = tmp_path / "bin"
    shutil.copytree(base, variants["bin"])
    (variants["bin"] / "model.safetensors").unlink()
    torch.save(tensors, variants["bin"] / "pytorch_model.bin")
    variants["bitmask"] = tmp_path / "bitmask"
    shutil.copytree(base, variants["bitmask"])
    save_file(_compress(tensors, "sparse-bitmask"), str(variants["bitmask"] / "model.safetensors"))
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors",
                                     "sparsity_config": {"format": "sparse-bitmask"}}
    (variants["bitmask"] / "config.json").write_text(json.dumps(config))

    outputs = {}
    for name, directory in variants.items():
        retrain(directory, tmp_path / f"out-{name}", params="masklora", **settings(sample_text, token_cache))
        outputs[name] = saved_tensors(tmp_path / f"out-{name}")
        assert "quantization_config" not in json.loads((tmp_path / f"out-{name}" / "config.json").read_text())
    for name, output in outputs.items():
        assert output.keys() == outputs["safetensors"].keys(), name
        for tensor_name, tensor in output.items():
            assert torch.equal(tensor, outputs["safetensors"][tensor_name]), (name, tensor_name)
    assert_same_zero_set(tensors, outputs["safetensors"])
    assert torch.equal(outputs["safetensors"]["lm_head.weight"] == 0, head == 0)


def test_sparse_24_bitmask_input(pruned_models, sample_text, token_cache, tmp_path, tiny_checkpoint, prune_tiny):
    from test_checkpoint import _compress

    from safetensors.torch import save_file

    pruned = tmp_path / "24"
    prune_tiny(pruned_models["llama"][0], pruned, method="wanda", pattern="2:4")
    tensors = saved_tensors(pruned)
    compressed = tmp_path / "24-compressed"
    shutil.copytree(pruned, compressed)
    for shard in compressed.glob("*.safetensors"):
        shard.unlink()
    (compressed / "model.safetensors.index.json").unlink()
    save_file(_compress(tensors, "sparse-24-bitmask"), str(compressed / "model.safetensors"))
    retrain(compressed, tmp_path / "out", params="masklora", **settings(sample_text, token_cache))
    after = saved_tensors(tmp_path / "out")
    assert_same_zero_set(tensors, after)
    for name, tensor in block_linears(after).items():
        assert ((tensor.reshape(-1, 4) != 0).sum(dim=1) <= 2).all(), name


# --------------------------------------------------------------------------------------------------
# Bad input
def test_a_dense_model_is_refused_unless_allowed(pruned_models, sample_text, token_cache, tmp_path):
    dense, _ = pruned_models["llama"]
    with pytest.raises(UnsupportedModelError, match="not pruned.*--allow-dense"):
        retrain(dense, tmp_path / "out", **settings(sample_text, token_cache))
    assert not (tmp_path / "out.partial").exists()
    report = retrain(dense, tmp_path / "out", allow_dense=True, **settings(sample_text, token_cache))
    assert report["totals"]["sparsity_before"] == 0


def test_weights_of_another_architecture_are_named(pruned_models, sample_text, token_cache, tmp_path):
    _, pruned = pruned_models["llama"]
    wrong = tmp_path / "wrong"
    shutil.copytree(pruned, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["intermediate_size"] = 96
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config and the weights belong to different models"):
        retrain(wrong, tmp_path / "out", **settings(sample_text, token_cache))
    assert not (tmp_path / "out.partial").exists()


def test_teacher_with_another_vocabulary_is_refused(pruned_models, tiny_checkpoint, sample_text, token_cache,
                                                    tmp_path):
    other = tiny_checkpoint("llama", hidden_size=64, intermediate_size=128, vocab_size=400)
    with pytest.raises(UnsupportedModelError, match="vocabulary of 400 tokens"):
        retrain(pruned_models["llama"][1], tmp_path / "out", teacher=str(other),
                **settings(sample_text, token_cache))


def test_distillation_from_the_dense_teacher(pruned_models, sample_text, token_cache, tmp_path):
    dense, pruned = pruned_models["llama"]
    plain = retrain(pruned, tmp_path / "plain", **settings(sample_text, token_cache, lr=3e-3))
    distilled = retrain(pruned, tmp_path / "kd", teacher=str(dense), distill=1.0,
                        **settings(sample_text, token_cache, lr=3e-3))
    # The KL term is added to the same cross-entropy: the training loss is larger, the mask the same.
    assert distilled["loss_curve"]["loss"][0] > plain["loss_curve"]["loss"][0]
    assert_same_zero_set(saved_tensors(pruned), saved_tensors(tmp_path / "kd"))


@pytest.mark.parametrize("bad, message", [({"params": "dora"}, "unknown --params"),
                                          ({"batch_size": 3, "grad_accum": 2}, "not divisible"),
                                          ({"steps": 0}, "steps must be at least 1"),
                                          ({"alpha": 0.0}, "^--alpha must be positive .* leave it out for 2·rank$")])
def test_bad_settings(bad, message, pruned_models, sample_text, token_cache, tmp_path):
    with pytest.raises(ConfigError, match=message):
        retrain(pruned_models["llama"][1], tmp_path / "out", **{**settings(sample_text, token_cache), **bad})


def test_one_alpha_rule_for_both_commands(capsys):
    """alpha = 2·rank unless given, for prune and retrain alike (32 at retrain's default rank 16, the
    old fixed default, so a run started before resumes), and both commands' --help say so."""
    from reconstruct.cli import main
    from reconstruct.config import RetrainConfig, RunConfig
    from reconstruct.retraining import Retrainer

    assert RunConfig("m", "o").lora_alpha == 128.0 and RetrainConfig("m", "o").lora_alpha == 32.0
    assert RetrainConfig("m", "o", rank=8).lora_alpha == 16.0 == RunConfig("m", "o", rank=8).lora_alpha
    assert RetrainConfig("m", "o", rank=8, alpha=4.0).lora_alpha == 4.0
    assert Retrainer(RetrainConfig("m", "o", rank=8, device="cpu")).options.alpha == 16.0
    assert RetrainConfig("m", "o").fingerprint() == RetrainConfig("m", "o", alpha=32.0).fingerprint()
    for command in ("prune", "retrain"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        shown = " ".join(capsys.readouterr().out.split())
        assert "LoRA alpha; scale s = alpha/r (default: 2·rank, so s = 2 whatever the rank" in shown, command


# --------------------------------------------------------------------------------------------------
# Stopping and resuming: real processes
def command(model: Path, out: Path, sample_text, token_cache, *extra) -> list[str]:
    return [sys.executable, "-m", "reconstruct", "retrain", str(model), "--out", str(out), "--params",
            "masklora+norm", "--data", str(sample_text), "--seqlen", str(SEQLEN), "--batch-size", "4",
            "--eval-every", "50", "--eval-windows", "2", "--rank", "4", "--device", "cpu",
            "--cache-dir", str(token_cache), "--lr", "1e-3", *extra]


def environment() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS="1")


def saved_step(out: Path) -> int:
    try:
        return json.loads((out.with_name(out.name + ".partial") / "state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def start_and_stop(cmd: list[str], out: Path, after_step: int, how: int, timeout: float = 120.0):
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment())
    deadline = time.monotonic() + timeout
    try:
        while saved_step(out) < after_step:
            if child.poll() is not None:
                pytest.fail(f"the run ended (exit {child.returncode}) before it could be stopped: "
                            f"{child.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the run saved no state in time")
            time.sleep(0.002)
        child.send_signal(how)
        _, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    return child.returncode, stderr.decode()


STOP_STEPS = ["--steps", "60", "--save-every", "2"]


@pytest.fixture(scope="module")
def uninterrupted(pruned_models, sample_text, token_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "whole"
    whole = subprocess.run(command(pruned_models["opt"][1], out, sample_text, token_cache, *STOP_STEPS),
                           capture_output=True, text=True, env=environment(), timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    return out


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_a_stopped_run_resumes_to_the_same_bytes(how, uninterrupted, pruned_models, sample_text, token_cache,
                                                 tmp_path):
    out = tmp_path / "stopped"
    cmd = command(pruned_models["opt"][1], out, sample_text, token_cache, *STOP_STEPS)
    returncode, stderr = start_and_stop(cmd, out, after_step=6, how=how)
    assert not out.exists()
    if how == signal.SIGINT:  # Ctrl-C: a clean stop that saved the step it was in
        assert returncode == 130 and "--resume" in stderr, stderr[-2000:]
    stopped_at = saved_step(out)
    assert 6 <= stopped_at < 60
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=environment(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for shard in sorted(uninterrupted.glob("*.safetensors")):
        assert shard.read_bytes() == (out / shard.name).read_bytes(), shard.name
    report = json.loads((out / "report.json").read_text())
    assert len(report["loss_curve"]["loss"]) == 60


def test_a_non_finite_loss_stops_with_the_step_named(pruned_models, sample_text, token_cache, tmp_path,
                                                     monkeypatch):
    """The loss turns NaN at step 3 (as an overflow would make it): the run stops with the step named,
    applies nothing of that step, and keeps the last saved state for inspection; no OUT appears."""
    from reconstruct.retraining import trainer

    real_loss, calls = trainer.next_token_loss_sum, []

    def loss_that_overflows(logits, ids):
        calls.append(1)
        loss = real_loss(logits, ids)
        # Calls: held-out loss at step 0, steps 1 and 2, held-out loss at step 2, then step 3.
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(trainer, "next_token_loss_sum", loss_that_overflows)
    with pytest.raises(TrainingError, match=r"not finite at step 3 .*last good state \(step 2\).*Lower --lr"):
        retrain(pruned_models["llama"][1], tmp_path / "out", **settings(sample_text, token_cache, steps=10))
    assert not (tmp_path / "out").exists()
    assert json.loads((tmp_path / "out.partial" / "state.json").read_text())["step"] == 2


def test_random_state_files_are_named_by_step_and_an_older_versions_counts_as_oldest():
    from reconstruct.retraining.state import rng_file, rng_step

    assert rng_file(12, 3) == "rng-00000012-00003.pt" and rng_step(rng_file(12, 3)) == 12
    assert rng_step("rng-00001.pt") == -1  # an older version's rng-RANK.pt: deleted at the next save


def test_a_damaged_training_state_is_a_clear_error_and_is_kept(pruned_models, sample_text, token_cache,
                                                               tmp_path, monkeypatch):
    from reconstruct.checkpoint import OutputError
    from reconstruct.retraining import trainer

    class Stopped(Exception):
        pass

    reached = []

    def stop_after_step_2(name):
        reached.append(name)
        if len(reached) == 2:  # after step 2's save
            raise Stopped

    options = settings(sample_text, token_cache, steps=4)
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "fault_point", stop_after_step_2)
        with pytest.raises(Stopped):
            retrain(pruned_models["llama"][1], tmp_path / "out", **options)
    work = tmp_path / "out.partial"
    assert sorted(p.name for p in work.glob("rng-*.pt")) == ["rng-00000002-00000.pt"]  # older ones gone
    saved = work / "train_state.pt"
    saved.write_bytes(saved.read_bytes()[:1000])
    with pytest.raises(OutputError, match=f"cannot read the training state {saved} .*; rerun without --resume "
                                          "to start over$"):
        retrain(pruned_models["llama"][1], tmp_path / "out", resume=True, **options)
    assert saved.stat().st_size == 1000 and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Layer-wise repair of a checkpoint pruned elsewhere
def test_masks_from_repairs_layer_wise_with_exactly_the_pruned_zeros(pruned_models, prune_tiny, tmp_path):
    """SparseGPT's output (updated weights, zeros) saved as a reference-code .bin with −0.0 zeros, then
    `prune DENSE --masks-from PRUNED`: exactly PRUNED's zeros, +0.0, and the blocks repaired."""
    dense, _ = pruned_models["llama"]
    sparsegpt = tmp_path / "sparsegpt"
    prune_tiny(dense, sparsegpt, method="sparsegpt", sparsity=0.6)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(sparsegpt, elsewhere)
    tensors = saved_tensors(sparsegpt)
    as_saved = {n: (t.masked_fill(t == 0, -0.0) if ".layers." in n else t) for n, t in tensors.items()}
    for shard in elsewhere.glob("*.safetensors*"):
        shard.unlink()
    (elsewhere / "model.safetensors.index.json").unlink(missing_ok=True)
    torch.save(as_saved, elsewhere / "pytorch_model.bin")

    report = prune_tiny(dense, tmp_path / "repaired", masks_from=str(elsewhere), correction="masklora",
                        steps=50, lr=3e-3, rank=8, nsamples=16)
    assert report["method"] == f"masks-from {elsewhere}"
    repaired = saved_tensors(tmp_path / "repaired")
    assert_same_zero_set(tensors, repaired)
    assert any(block["merged"] for block in report["blocks"]), report["blocks"]
    unchanged = prune_tiny(dense, tmp_path / "taken", masks_from=str(elsewhere))  # no correction: the weights
    taken = saved_tensors(tmp_path / "taken")
    assert all(torch.equal(taken[n], tensors[n]) for n in tensors)
    assert unchanged["totals"]["pruned_sparsity"] == pytest.approx(report["totals"]["pruned_sparsity"])


def test_masks_from_another_model_is_refused(pruned_models, tiny_checkpoint, prune_tiny, tmp_path):
    other = tiny_checkpoint("llama", hidden_size=64, intermediate_size=96)
    with pytest.raises(UnsupportedModelError, match="does not match the dense model"):
        prune_tiny(pruned_models["llama"][0], tmp_path / "out", masks_from=str(other))
    with pytest.raises(ConfigError, match="drop --sparsity"):
        prune_tiny(pruned_models["llama"][0], tmp_path / "out", masks_from=str(other), sparsity=0.5)


def test_a_second_retrain_into_the_same_out_fails_at_once(uninterrupted, pruned_models, sample_text, token_cache,
                                                        tmp_path):
    """Launched twice by mistake: the second fails at once naming the holder, touches nothing, and the
    first finishes with the output of a lone run."""
    from reconstruct.lock import OutputLockedError

    out = tmp_path / "contested"
    first = subprocess.Popen(command(pruned_models["opt"][1], out, sample_text, token_cache, *STOP_STEPS),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment())
    try:
        wait_until_locked(first, out)
        started = time.monotonic()
        with pytest.raises(OutputLockedError, match=rf"pid {first.pid}"):
            retrain(pruned_models["opt"][1], out, **settings(sample_text, token_cache, overwrite=True))
        assert time.monotonic() - started < 2
        _, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 0, stderr.decode()[-2000:]
    for shard in sorted(uninterrupted.glob("*.safetensors")):
        assert shard.read_bytes() == (out / shard.name).read_bytes(), shard.name


@pytest.mark.parametrize("sharded", [False, True])
def test_a_rank_without_validation_windows_runs_no_empty_pass(sharded, monkeypatch):
    """--eval-windows 1 on 2 ranks: rank 0's share is empty. It used to run a pass on an empty batch
    (the model failed reshaping 0 elements); it runs none, or under --fsdp only the uncounted passes
    that keep its collectives in step with the busiest rank."""
    from types import SimpleNamespace

    from reconstruct import distributed
    from reconstruct.retraining.trainer import Retrainer

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    trainer = SimpleNamespace(config=SimpleNamespace(micro_batch_size=1), sharded=sharded, device="cpu")
    windows = torch.arange(8).reshape(1, 8)
    passes = Retrainer.passes(trainer, windows)
    assert all(len(ids) for ids, _ in passes)
    assert [counted for _, counted in passes] == ([False] if sharded else [])


def test_on_the_cpu_a_retrain_maps_its_activations(monkeypatch):
    """On the CPU the host is the device: glibc is told to map allocations from the size of a
    step's activations (memory.ACTIVATION_MMAP_THRESHOLD_BYTES), so that freed ones go back to the
    system rather than fragmenting its heap (docs/memory.md: 1B masklora 2.73 -> 2.53 GiB)."""
    import reconstruct.retraining as retraining
    from reconstruct.config import RetrainConfig
    from reconstruct.memory import ACTIVATION_MMAP_THRESHOLD_BYTES

    thresholds = []
    monkeypatch.setattr(retraining, "limit_heap_fragmentation", thresholds.append)
    monkeypatch.setattr(retraining.Retrainer, "run", lambda self: "ran")
    assert retraining.run(RetrainConfig(model="unused", out="unused", device="cpu")) == "ran"
    assert thresholds == [ACTIVATION_MMAP_THRESHOLD_BYTES]
