"""The memory plan wired into `reconstruct retrain` (issue 18): `--plan` prints it without reading a
weight, `--max-memory` is the budget, the planner chooses --grad-accum and --gradient-checkpointing
only where the user left them open, a run that cannot fit stops before loading and names what would
fit, and the plan is in report.json. Offline, on a tiny pruned LLaMA, on the CPU (where the budget is
the host's memory)."""
from __future__ import annotations

import json

import pytest
import torch

from reconstruct import cli
from reconstruct.api import plan_retrain, retrain
from reconstruct.config import RetrainConfig
from reconstruct.models import ModelAdapter, open_model
from reconstruct.plan import DoesNotFitError, PlanSettings, estimate
from reconstruct.plan.choose import HEADROOM, needed
from reconstruct.retraining.planning import plan_memory

SEQLEN = 64
GB = 10**9


@pytest.fixture(scope="module")
def pruned(tiny_checkpoint, prune_tiny, tmp_path_factory):
    dense = tiny_checkpoint("llama", hidden_size=64, intermediate_size=128)
    out = tmp_path_factory.mktemp("plan") / "pruned"
    prune_tiny(dense, out, method="magnitude", sparsity=0.5)
    return out


def settings(sample_text, token_cache, **overrides) -> dict:
    return {"data": str(sample_text), "steps": 2, "batch_size": 4, "seqlen": SEQLEN, "eval_every": 2,
            "eval_windows": 2, "save_every": 0, "device": "cpu", "cache_dir": str(token_cache), "rank": 4,
            "lr": 1e-3, **overrides}


@pytest.fixture
def no_weight_read(monkeypatch):
    """Any attempt to read the weights fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read")
    monkeypatch.setattr(ModelAdapter, "load_all", refuse)


def host_needed(model, micro_batch: int, checkpointing: bool, seqlen: int = SEQLEN) -> int:
    """The host memory the planner counts on the CPU for a micro-batch (steps 2, batch 4 as above)."""
    plan_settings = PlanSettings(params="masklora", rank=4, seqlen=seqlen, batch_size=4, micro_batch=micro_batch,
                                 gradient_checkpointing=checkpointing, steps=2, eval_windows=2, device="cpu")
    return needed(estimate(open_model(model).model.config, plan_settings))


def budget_between(fits: int, too_much: int) -> float:
    """--max-memory, in GB, for which a need of `fits` bytes fits and one of `too_much` does not."""
    assert fits < too_much
    return (fits + too_much) / 2 / (1 - HEADROOM) / GB


def test_plan_prints_and_exits_without_reading_a_weight(pruned, sample_text, token_cache, tmp_path, capsys,
                                                        no_weight_read):
    code = cli.main(["retrain", str(pruned), "--out", str(tmp_path / "out"), "--plan", "--device", "cpu",
                     "--seqlen", str(SEQLEN), "--batch-size", "4", "--max-memory", "2"])
    printed = capsys.readouterr().out
    assert code == 0
    assert printed.startswith("budget 1.86 GiB per host")
    assert "memory plan: llama" in printed and "<- peak" in printed
    assert "micro-batch 4 (--grad-accum 1): chosen; gradient checkpointing off: chosen" in printed
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_unset_settings_reach_the_planner_as_none():
    parser = cli.build_parser("retrain")
    args = parser.parse_args(["retrain", "m", "--out", "o"])
    values = cli._settings(args, RetrainConfig)
    assert values["grad_accum"] is None and values["gradient_checkpointing"] is None
    assert values["max_memory"] is None and "plan" not in values
    args = parser.parse_args(["retrain", "m", "--out", "o", "--grad-accum", "2", "--no-gradient-checkpointing",
                              "--max-memory", "3.5"])
    values = cli._settings(args, RetrainConfig)
    assert (values["grad_accum"], values["gradient_checkpointing"], values["max_memory"]) == (2, False, 3.5)


def test_the_planner_chooses_the_passes_and_the_result_is_the_same(pruned, sample_text, token_cache, tmp_path):
    """A budget between what two windows per pass and four need: two passes of two windows, chosen;
    the batch stays global, so the losses are those of one pass of four (up to float rounding)."""
    budget = budget_between(host_needed(pruned, 2, False), host_needed(pruned, 4, False))
    planned = retrain(pruned, tmp_path / "planned", **settings(sample_text, token_cache, max_memory=budget))
    plan = planned["memory_plan"]
    assert (plan["micro_batch"], plan["grad_accum"], plan["gradient_checkpointing"]) == (2, 2, False)
    assert plan["chosen"] == ["micro_batch", "gradient_checkpointing"]
    assert planned["config"]["grad_accum"] == 2 and planned["config"]["gradient_checkpointing"] is False
    assert plan["max_memory_bytes"] == int(budget * GB) and plan["host_peak_bytes"] <= plan["usable_bytes"]
    one_pass = retrain(pruned, tmp_path / "one-pass", **settings(sample_text, token_cache, grad_accum=1))
    assert one_pass["memory_plan"]["chosen"] == ["gradient_checkpointing"]
    assert planned["loss_curve"]["loss"] == pytest.approx(one_pass["loss_curve"]["loss"], rel=1e-5)
    on_disk = json.loads((tmp_path / "planned" / "report.json").read_text())
    assert on_disk["memory_plan"]["items"] and on_disk["memory_plan"]["micro_batch"] == 2


def test_checkpointing_is_turned_on_only_when_needed(pruned, sample_text, token_cache, tmp_path):
    with_checkpointing = host_needed(pruned, 1, True)
    without = host_needed(pruned, 1, False)
    budget = budget_between(with_checkpointing, without)
    plan = plan_retrain(pruned, tmp_path / "out", **settings(sample_text, token_cache, max_memory=budget))
    assert plan.micro_batch == 1 and plan.gradient_checkpointing and plan.grad_accum == 4


def test_a_given_setting_is_never_overridden_and_a_misfit_stops_before_loading(
        pruned, sample_text, token_cache, tmp_path, capsys, no_weight_read):
    """--grad-accum 1 given, a budget only two passes fit: the run stops before reading a weight,
    and the message names the settings that would fit (the shortest --seqlen it offers is 128)."""
    budget = budget_between(host_needed(pruned, 2, False, 256), host_needed(pruned, 4, False, 256))
    with pytest.raises(DoesNotFitError) as raised:
        retrain(pruned, tmp_path / "out", **settings(sample_text, token_cache, max_memory=budget, grad_accum=1,
                                                     gradient_checkpointing=False, seqlen=256))
    message = str(raised.value)
    assert "a micro-batch of 4 (--grad-accum 1) and gradient checkpointing off as given" in message
    assert "leaving the micro-batch and checkpointing to the planner" in message
    assert "--seqlen 128" in message and "--offload" not in message
    code = cli.main(["retrain", str(pruned), "--out", str(tmp_path / "cli"), "--device", "cpu", "--data",
                     str(sample_text), "--seqlen", "256", "--batch-size", "4", "--grad-accum", "1",
                     "--max-memory", str(budget), "--cache-dir", str(token_cache)])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("reconstruct retrain: error: --params masklora needs")
    assert len(error.strip().splitlines()) == 1


def test_on_an_accelerator_the_options_name_fsdp_and_offload():
    """LLaMA-2-7B's shape (a config, no weights) on a 16 GB budget: --fsdp over enough devices and
    --offload cpu are named (checked by the same estimator); on the CPU --offload is not offered."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         vocab_size=32000)
    adapter = SimpleNamespace(storage_dtype=torch.bfloat16, model=SimpleNamespace(config=config))
    settings_7b = RetrainConfig(model="7b", out="", seqlen=2048, batch_size=8, device="cpu", max_memory=16)
    with pytest.raises(DoesNotFitError) as raised:
        plan_memory(settings_7b, adapter, None, torch.device("cuda"))
    assert "These would fit: --fsdp over 2 devices" in str(raised.value)
    assert "--offload cpu (8.88 GiB on the device" in str(raised.value)
    with pytest.raises(DoesNotFitError) as raised:
        plan_memory(settings_7b, adapter, None, torch.device("cpu"))
    assert "--offload" not in str(raised.value)


def test_on_the_cpu_adamw_temporaries_are_one_parameter_and_no_save_is_counted_without_saving():
    """torch's AdamW loops over CPU tensors one at a time (foreach only on accelerators), and with
    --save-every 0 no copy of the training state is ever made: the plan counts neither."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=1000)
    base = dict(params="full", seqlen=64, batch_size=1, steps=1, eval_windows=1, device="cpu")
    saving = estimate(config, PlanSettings(**base))
    items = {item.name: item.bytes for item in saving.items}
    assert items["AdamW step temporaries (one parameter at a time on the CPU)"] == 4 * 256 * 688
    assert "the training state's copy, to save" in items
    not_saving = estimate(config, PlanSettings(**base, saves_state=False))
    assert "the training state's copy, to save" not in {item.name for item in not_saving.items}
    assert not_saving.host_peak_bytes < saving.host_peak_bytes
