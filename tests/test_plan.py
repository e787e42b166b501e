"""The memory planner (reconstruct.plan): its arithmetic against numbers worked out by hand for
LLaMA-2-7B and LLaMA-2-70B configs, parameter counts of other families against the models
transformers builds, the activations against what autograd saves, and choose()'s decisions.

No weight is downloaded: the configs are built with transformers' config classes."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import nn
from torch.nn import functional as F

from reconstruct.plan import DoesNotFitError, PlanError, PlanSettings, choose, estimate, model_shape
from reconstruct.plan.settings import LAST_BLOCK, LOADING, LOSS, SAVING, STEP, TRAINING, WRITING

GiB = 2**30
RANK = 16


def llama2_7b():
    return transformers.LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                                    vocab_size=32000, num_attention_heads=32, num_key_value_heads=32)


def llama2_70b():
    return transformers.LlamaConfig(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                                    vocab_size=32000, num_attention_heads=64, num_key_value_heads=8)


def mixtral_8x7b():
    return transformers.MixtralConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                                      vocab_size=32000, num_attention_heads=32, num_key_value_heads=8,
                                      num_local_experts=8, num_experts_per_tok=2)


def item(plan, name: str) -> int:
    """The bytes of the one item whose name starts with `name`."""
    found = [i.bytes for i in plan.items if i.name.startswith(name)]
    assert len(found) == 1, (name, [i.name for i in plan.items])
    return found[0]


def settings(**changes) -> PlanSettings:
    """The docs' case: --params masklora rank 16, bf16, seqlen 2048, batch 8."""
    return PlanSettings(**{"params": "masklora", "rank": RANK, "dtype": "bf16", "seqlen": 2048, "batch_size": 8,
                           **changes})


# --------------------------------------------------------------------------------------------------
# Parameter counts
def test_llama2_parameter_counts():
    block_7b = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096          # q,k,v,o; gate,up,down; 2 RMSNorms
    assert block_7b == 202_383_360
    assert model_shape(llama2_7b()).total_params == 32 * block_7b + 2 * 32000 * 4096 + 4096 == 6_738_415_616
    block_70b = (2 * 8192 * 8192 + 2 * 8192 * 1024                       # q,o; k,v (8 heads of 128)
                 + 3 * 8192 * 28672 + 2 * 8192)
    assert block_70b == 855_654_400
    assert model_shape(llama2_70b()).total_params == 80 * block_70b + 2 * 32000 * 8192 + 8192 == 68_976_648_192


def test_trainable_parameters_for_each_params_choice():
    shape = model_shape(llama2_7b())
    low_rank = 32 * (4 * RANK * (4096 + 4096) + 3 * RANK * (4096 + 11008))  # A r×in, B out×r per linear
    assert low_rank == 39_976_960
    norms = 32 * 2 * 4096 + 4096                                            # every block's two, the final one
    full = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    for params, expected in [("masklora", {"masklora": low_rank}), ("scalelora", {"scalelora": low_rank}),
                             ("lora-prune", {"lora-prune": low_rank}), ("norm", {"norm": norms}),
                             ("full", {"full": full}), ("masklora+norm", {"masklora": low_rank, "norm": norms})]:
        assert shape.trainable_params(params, RANK) == expected, params
    with pytest.raises(PlanError, match="no biases"):
        shape.trainable_params("bias", RANK)
    with pytest.raises(PlanError, match="unknown --params part 'lora'"):
        shape.trainable_params("lora", RANK)
    per_block_70b = RANK * (2 * (8192 + 8192) + 2 * (8192 + 1024) + 3 * (8192 + 28672))
    assert model_shape(llama2_70b()).trainable_params("masklora", RANK) == {"masklora": 80 * per_block_70b}


def test_opt_parameters_biases_layernorms_learned_positions():
    shape = model_shape(transformers.OPTConfig())  # OPT-125m's shape
    block = 4 * (768 * 768 + 768) + (768 * 3072 + 3072) + (3072 * 768 + 768) + 2 * 2 * 768
    embeddings = 50272 * 768 + (2048 + 2) * 768     # tied head; positions offset by 2
    assert shape.total_params == 12 * block + embeddings + 2 * 768 == 125_239_296
    biases = 12 * (4 * 768 + 3072 + 768)
    norms = 12 * 2 * 2 * 768 + 2 * 768
    assert shape.trainable_params("bias+norm", RANK) == {"bias": biases, "norm": norms}
    assert shape.trainable_params("masklora", RANK) == {
        "masklora": 12 * RANK * (4 * (768 + 768) + (768 + 3072) + (3072 + 768))}


def test_mixtral_parameters_with_experts():
    shape = model_shape(mixtral_8x7b())
    block = (2 * 4096 * 4096 + 2 * 4096 * 1024      # attention
             + 8 * 3 * 4096 * 14336                  # 8 experts' gate, up, down
             + 4096 * 8 + 2 * 4096)                  # router, norms
    assert shape.total_params == 32 * block + 2 * 32000 * 4096 + 4096 == 46_702_792_704
    per_block = RANK * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 8 * 3 * (4096 + 14336))  # the router is not pruned
    assert shape.trainable_params("masklora", RANK) == {"masklora": 32 * per_block}
    assert shape.largest_linear == 4096 * 14336     # one expert's matrix, not the eight together


@pytest.mark.parametrize("config", [
    transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=300, attention_bias=True, mlp_bias=True),
    transformers.MistralConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=300),
    transformers.Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True),
    transformers.Qwen3Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=32, vocab_size=300),
    transformers.GemmaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=1, head_dim=32, vocab_size=300),
    transformers.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=300, num_local_experts=4, num_experts_per_tok=2),
    transformers.OPTConfig(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
                           max_position_embeddings=128, word_embed_proj_dim=32, do_layer_norm_before=False),
], ids=["llama-biases", "mistral", "qwen2-tied", "qwen3", "gemma", "mixtral", "opt-projected"])
def test_shape_matches_the_model_transformers_builds(config):
    """Parameters, and prunable weights and biases, as in the model transformers builds (on meta)."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    shape = model_shape(config)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    blocks = model.model.decoder.layers if config.model_type == "opt" else model.model.layers
    prunable = biases = 0
    for name, module in blocks[0].named_modules():
        if isinstance(module, nn.Linear) and not name.endswith(".gate"):  # a router is never pruned
            prunable += module.weight.numel()
            biases += module.bias.numel() if module.bias is not None else 0
        elif hasattr(module, "gate_up_proj"):                             # fused experts
            prunable += module.gate_up_proj.numel() + module.down_proj.numel()
    assert (shape.prunable_per_block, shape.biases_per_block) == (prunable, biases)


def test_a_config_dict_gives_the_same_plan():
    config = llama2_7b()
    assert estimate(config.to_dict(), settings()).as_dict() == estimate(config, settings()).as_dict()
    with pytest.raises(PlanError, match="no model_type"):
        estimate({"hidden_size": 64}, settings())


# --------------------------------------------------------------------------------------------------
# The plan's arithmetic, item by item
def llama_saved_per_token(h, kv_dim, heads, i, c=2):
    """One LLaMA block's saved activations per token with a wrapping correction (bf16)."""
    return (2 * (4 * h + 4)            # each RMSNorm's fp32 input copy and its rsqrt
            + 2 * c * h                # the norms' outputs, saved by q/k/v's and gate/up's wrappers
            + c * (h + 2 * kv_dim)     # q and k after rotation, v: saved by attention
            + c * h + 4 * heads        # attention's output (o_proj's input) and log-sum-exp
            + 4 * c * i)               # gate out, SiLU out, up out, their product (down_proj's input)


def test_llama2_7b_masklora_with_checkpointing_item_by_item():
    plan = estimate(llama2_7b(), settings(micro_batch=1, gradient_checkpointing=True))
    tokens, trainable = 2048, 39_976_960
    weights = 6_738_415_616 * 2
    saved = llama_saved_per_token(4096, 4096, 32, 11008)
    assert saved == 170_120
    expected = {
        "frozen weights (bf16)": weights,
        "trainable parameters (fp32)": 4 * trainable,
        "gradients (fp32)": 4 * trainable,
        "AdamW moments (fp32, two)": 8 * trainable,
        "AdamW step temporaries": 4 * trainable,
        "block inputs kept by checkpointing": 32 * 2 * 4096 * tokens,
        "one block's activations, recomputed": (saved + 2 * 4096) * tokens,
        "activations outside the blocks": ((4 * 4096 + 4) + 2 * 2 * 128) * tokens,  # final norm; rotary cos, sin
        "gradients flowing through one block": (2 * (2 * 4096 + 11008) + 4 * 4096) * tokens,
        "one linear's effective weight": 4096 * 11008 * (4 + 1 + 2),  # fp32 sum, bool mask, bf16 cast
        "logits and their gradient": tokens * 32000 * 2 * 2,
        "the next-token loss, in chunks of tokens": 2 * 1024 * 32000 * 4,  # fp32 upcast and softmax of a chunk
    }
    for name, value in expected.items():
        assert item(plan, name) == value, name
    moments = plan.moments()
    resident = weights + 16 * trainable                                # weights, trainable, grads (8 passes), AdamW
    assert moments[LOSS] == resident + sum(expected[n] for n in (
        "block inputs kept by checkpointing", "activations outside the blocks", "logits and their gradient",
        "the next-token loss, in chunks of tokens"))
    assert moments[LAST_BLOCK] == resident + sum(expected[n] for n in (
        "block inputs kept by checkpointing", "one block's activations, recomputed", "activations outside the blocks",
        "gradients flowing through one block", "one linear's effective weight"))
    assert moments[STEP] == resident + 4 * trainable
    assert plan.peak() == (LAST_BLOCK, moments[LAST_BLOCK])
    assert 14.4 * GiB < plan.peak_bytes < 14.5 * GiB
    assert plan.passes == 8


def test_llama2_7b_at_the_defaults_peaks_at_the_loss_with_every_activation():
    plan = estimate(llama2_7b(), settings())  # one pass of 8 windows, no checkpointing
    tokens, trainable = 8 * 2048, 39_976_960
    activations = 32 * llama_saved_per_token(4096, 4096, 32, 11008) * tokens
    assert item(plan, "activations saved for backward, every block") == activations
    outside = ((4 * 4096 + 4) + 2 * 2 * 128) * tokens
    gradients_absent = 6_738_415_616 * 2 + 12 * trainable  # one pass: no gradient exists before backward
    loss = tokens * 32000 * 2 * 2 + 2 * 1024 * 32000 * 4  # logits and their gradient; a chunk's fp32 temporaries
    assert plan.peak() == (LOSS, gradients_absent + activations + outside + loss)
    assert plan.peak_bytes > 80 * GiB  # more than any one GPU holds


def test_llama2_70b_offloaded_to_the_host():
    plan = estimate(llama2_70b(), settings(offload="cpu", micro_batch=1, gradient_checkpointing=True))
    tokens, trainable, per_block_trainable = 2048, 207_093_760, 207_093_760 // 80
    block = 855_654_400
    saved = llama_saved_per_token(8192, 1024, 64, 28672)
    assert "frozen weights (bf16)" not in [i.name for i in plan.items]  # nothing resident on the device
    device = {
        # untied: the head and the embeddings are FSDP units of their own, gathered one at a time
        "gathered: the head (or the embeddings), final norm": (32000 * 8192 + 8192) * 2,
        "gathered: 2 blocks": 2 * (block * 2 + per_block_trainable * 4),
        "a block's gradients before reduce-scatter": per_block_trainable * 4,
        "block inputs kept by checkpointing": 80 * 2 * 8192 * tokens,
        "one block's activations, recomputed": (saved + 2 * 8192) * tokens,
        "activations outside the blocks": ((4 * 8192 + 4) + 2 * 2 * 128) * tokens,
        "gradients flowing through one block": (2 * (2 * 8192 + 28672) + 4 * 8192) * tokens,
        "one linear's effective weight": 8192 * 28672 * 7,
    }
    for name, value in device.items():
        assert item(plan, name) == value, name
    # the head is gathered for its own forward and backward, at the loss; not while the blocks' run
    assert plan.peak() == (LAST_BLOCK, sum(v for n, v in device.items() if not n.startswith("gathered: the head")))
    assert plan.peak_bytes < 20 * GiB
    host = plan.moments("host")
    runtime_and_windows = int(2.4 * GiB) + (1000 * 8 + 16) * 2048 * 8
    shard = 68_976_648_192 * 2
    assert host[SAVING] == runtime_and_windows + shard + (4 + 4 + 8) * trainable + 12 * trainable
    assert plan.peak("host") == (SAVING, host[SAVING])


def test_a_tied_head_is_gathered_with_the_root_for_the_whole_pass():
    """A tied head shares the embeddings' parameter, which only one FSDP unit can hold: the root's,
    gathered from the forward to the end of the backward (retraining/sharding.vocabulary_units)."""
    tied = llama2_7b()
    tied.tie_word_embeddings = True
    plan = estimate(tied, settings(world_size=2, fsdp=True, gradient_checkpointing=True))
    assert item(plan, "gathered: embeddings (the head's too), final norm") == (32000 * 4096 + 4096) * 2
    assert LAST_BLOCK in next(i for i in plan.items if i.name.startswith("gathered: embeddings")).moments
    untied = estimate(llama2_7b(), settings(world_size=2, fsdp=True, gradient_checkpointing=True))
    head = next(i for i in untied.items if i.name.startswith("gathered: the head"))
    assert head.bytes == (32000 * 4096 + 4096) * 2 and head.moments == (LOSS,)


def test_on_the_cpu_under_fsdp_each_rank_holds_its_shards_not_the_model():
    """The CPU is the device: a rank's host holds its shards (loading, writing) and the step's memory,
    and rank 0 one gathered block, or the embeddings and head, on its way to the writer."""
    plan = estimate(llama2_7b(), settings(world_size=2, fsdp=True, gradient_checkpointing=True, device="cpu",
                                          saves_state=False))
    host = plan.moments("host")
    runtime_and_windows = int(0.4 * GiB) + (1000 * 8 + 16) * 2048 * 8
    shard, trainable = 6_738_415_616 * 2 // 2, 39_976_960
    assert host[LOADING] == runtime_and_windows + shard
    assert host[TRAINING] == runtime_and_windows + plan.peak_bytes
    assert host[WRITING] == runtime_and_windows + shard + 12 * trainable // 2 + (2 * 32000 * 4096 + 4096) * 2
    assert max(host.values()) < 6_738_415_616 * 2  # no moment holds the whole model


def test_llama2_70b_fsdp_over_8_devices_divides_parameters_gradients_and_optimizer_state():
    plan = estimate(llama2_70b(), settings(world_size=8, fsdp=True, gradient_checkpointing=True))
    trainable, per_block_trainable = 207_093_760, 207_093_760 // 80
    assert plan.settings.micro_batch == 1  # 8 windows over 8 ranks
    assert item(plan, "frozen weights: this rank's shard") == 68_976_648_192 * 2 // 8
    assert item(plan, "gathered: 2 blocks") == 2 * (855_654_400 * 2 + per_block_trainable * 4)
    for name, per_parameter in (("trainable parameters", 4), ("gradients (fp32)", 4), ("AdamW moments", 8)):
        assert item(plan, name) == per_parameter * trainable // 8, name
    assert item(plan, "this rank's shards, read one block at a time") == 855_654_400 * 2
    assert item(plan, "the training state's copy") == 12 * trainable // 8


def test_distillation_counts_the_teacher_and_the_kl_in_chunks():
    student = estimate(llama2_7b(), settings(micro_batch=1, gradient_checkpointing=True))
    plan = estimate(llama2_7b(), settings(micro_batch=1, gradient_checkpointing=True, teacher=True))
    assert item(plan, "teacher weights") == 6_738_415_616 * 2
    assert item(plan, "teacher's logits") == 2048 * 32000 * 2
    assert item(plan, "KL(teacher ‖ student)") == 4 * 4 * 1024 * 32000  # four fp32 [chunk × vocabulary]
    teacher_forward = (2 * (4 * 4096 + 4) + 2 * (2 * 4096 + 2 * 4096) + 4 * 32 + 2 * 3 * 11008) * 2048
    assert item(plan, "teacher's forward") == teacher_forward
    assert plan.moments()[LOSS] == student.moments()[LOSS] + 6_738_415_616 * 2 + sum(
        item(plan, n) for n in ("teacher's forward", "teacher's logits", "KL(teacher ‖ student)"))


def test_norm_and_full_change_what_is_trained_and_saved():
    norm = estimate(llama2_7b(), settings(params="norm", micro_batch=1))
    assert item(norm, "trainable parameters") == 4 * (32 * 2 * 4096 + 4096)
    assert "one linear's effective weight" not in " ".join(i.name for i in norm.items)
    full = estimate(llama2_7b(), settings(params="full", micro_batch=1, gradient_checkpointing=True))
    masters = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert item(full, "AdamW moments") == 8 * masters
    # The optimizer step holds every gradient, both moments and the step's temporaries: 20 B per weight
    assert full.moments()[STEP] == 6_738_415_616 * 2 + 20 * masters
    assert full.peak()[0] == STEP


# --------------------------------------------------------------------------------------------------
# choose()
def test_choose_fits_7b_on_24_gib_with_checkpointing_and_the_largest_micro_batch():
    """22 GiB: what a 24 GB card (an L4, an A10G) leaves free (docs/memory.md)."""
    plan = choose(llama2_7b(), settings(), 22 * GiB)
    usable = 0.9 * 22 * GiB
    assert plan.gradient_checkpointing and plan.micro_batch == 4 and plan.grad_accum == 2
    assert plan.memory.peak_bytes <= usable
    assert estimate(llama2_7b(), settings(micro_batch=8, gradient_checkpointing=True)).peak_bytes > usable
    assert estimate(llama2_7b(), settings(micro_batch=1, gradient_checkpointing=False)).peak_bytes > usable
    assert plan.chosen == ("micro_batch", "gradient_checkpointing")
    report = plan.as_dict()
    assert json.loads(json.dumps(report))["grad_accum"] == 2
    assert report["device_peak_moment"] == LAST_BLOCK and report["device_peak_bytes"] == plan.memory.peak_bytes


def test_choose_prefers_no_checkpointing_when_a_smaller_micro_batch_fits():
    plan = choose(llama2_7b(), settings(), 80 * GiB)
    assert not plan.gradient_checkpointing
    assert plan.micro_batch == 4
    assert estimate(llama2_7b(), settings(micro_batch=8, gradient_checkpointing=True)).peak_bytes < 0.9 * 80 * GiB
    assert estimate(llama2_7b(), settings(micro_batch=8, gradient_checkpointing=False)).peak_bytes > 0.9 * 80 * GiB


def test_choose_keeps_the_settings_the_user_gave():
    plan = choose(llama2_7b(), settings(micro_batch=2), 24 * GiB)
    assert plan.micro_batch == 2 and plan.gradient_checkpointing and plan.chosen == ("gradient_checkpointing",)
    with pytest.raises(DoesNotFitError) as raised:
        choose(llama2_7b(), settings(gradient_checkpointing=False), 24 * GiB)
    message = str(raised.value)
    assert "gradient checkpointing off as given" in message
    assert "leaving the micro-batch and checkpointing to the planner" in message
    assert raised.value.smallest.settings.gradient_checkpointing is False


def test_choose_names_what_would_fit_70b_on_one_80_gib_device():
    with pytest.raises(DoesNotFitError) as raised:
        choose(llama2_70b(), settings(), 80 * GiB)
    message, options = str(raised.value), raised.value.options
    assert "more than the 72 GiB usable of 80 GiB" in message
    assert any(o.startswith("--fsdp over 4 devices") for o in options), options  # the fewest
    assert estimate(llama2_70b(), settings(fsdp=True, world_size=2, gradient_checkpointing=True)).peak_bytes > 72 * GiB
    assert any(o.startswith("--offload cpu") for o in options), options
    assert not any(o.startswith("--seqlen") for o in options)  # the weights alone do not fit
    plan = choose(llama2_70b(), settings(offload="cpu"), 80 * GiB)
    assert plan.memory.peak_bytes <= 0.9 * 80 * GiB


def test_with_offload_choose_prefers_the_fewest_passes():
    """Each pass moves every block's weights from the host: one pass of 8 windows with checkpointing
    beats 8 passes of one window without it, though both fit."""
    plan = choose(llama2_70b(), settings(offload="cpu"), 80 * GiB)
    assert (plan.micro_batch, plan.gradient_checkpointing) == (8, True)
    assert estimate(llama2_70b(), settings(offload="cpu", micro_batch=1)).peak_bytes <= 0.9 * 80 * GiB
    assert estimate(llama2_70b(), settings(offload="cpu", micro_batch=8)).peak_bytes > 0.9 * 80 * GiB


def test_choose_suggests_a_shorter_seqlen_when_that_fits():
    at_2048 = estimate(llama2_7b(), settings(micro_batch=1, gradient_checkpointing=True)).peak_bytes
    at_1024 = estimate(llama2_7b(), settings(seqlen=1024, micro_batch=1, gradient_checkpointing=True)).peak_bytes
    budget = int((at_2048 + at_1024) / 2 / 0.9)
    with pytest.raises(DoesNotFitError) as raised:
        choose(llama2_7b(), settings(), budget)
    assert any(o.startswith("--seqlen 1024") for o in raised.value.options), raised.value.options


def test_on_the_cpu_the_budget_is_the_hosts_memory():
    plan = choose(llama2_7b(), settings(device="cpu"), 64 * GiB)
    assert plan.memory.host_peak_bytes <= 0.9 * 64 * GiB
    assert plan.memory.host_peak_bytes >= plan.memory.peak_bytes  # the device's items are in host memory


def test_settings_that_make_no_sense_are_refused():
    with pytest.raises(PlanError, match="micro-batch of 16 windows: the batch has 8"):
        estimate(llama2_7b(), settings(micro_batch=16))
    # --grad-accum 1 on 8 ranks: each rank's pass is its one window
    assert estimate(llama2_7b(), settings(micro_batch=8, world_size=8)).settings.micro_batch == 1
    with pytest.raises(PlanError, match="already in host memory"):
        estimate(llama2_7b(), settings(device="cpu", offload="cpu"))


def test_the_rendered_table_lists_every_item_and_the_peak():
    plan = choose(llama2_7b(), settings(), 24 * GiB)
    text = plan.render()
    for entry in plan.memory.items:
        assert entry.name in text
    assert "micro-batch 8 (--grad-accum 1): chosen" in text
    assert text.count("<- peak") == 2  # the device's and the host's


# --------------------------------------------------------------------------------------------------
# The activations against what autograd saves
class SavesItsInput(torch.autograd.Function):
    """As issue 18's MaskLoRA: y = x (W + B A)ᵀ saving only x (the weight is recomputed in backward)."""

    @staticmethod
    def forward(ctx, x, weight, A, B):
        ctx.save_for_backward(x, weight, A, B)
        with torch.autocast("cpu", enabled=False):
            return F.linear(x, (B @ A).add_(weight).to(x.dtype))

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - only the forward's saved tensors are counted
        raise NotImplementedError


class Wrapped(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.zeros(4, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, 4))

    def forward(self, x):
        return SavesItsInput.apply(x.to(torch.bfloat16), self.base.weight, self.A, self.B)


def saved_bytes(model, ids) -> int:
    """The bytes of the distinct storages autograd saves in a forward pass, the model's own excluded."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, use_cache=False)
    return sum(storages.values())


@pytest.mark.parametrize("params", ["masklora", "norm"])
def test_saved_activations_are_what_autograd_saves_for_a_small_llama(params):
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    model.requires_grad_(False)
    if params == "masklora":
        for block in model.model.layers:
            for name, module in list(block.named_modules()):
                if isinstance(module, nn.Linear):
                    parent, _, child = name.rpartition(".")
                    setattr(block.get_submodule(parent), child, Wrapped(module))
    else:  # as corrections.train_in_fp32 does: fp32 masters of the norms' weights
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                module.weight = nn.Parameter(module.weight.detach().float())
    model.train()
    seqlen = 64
    measured = saved_bytes(model, torch.randint(0, 256, (1, seqlen)))
    shape = model_shape(config)
    block, outside = shape.saved_bytes_per_token(params, 2)
    # The first norm's input (the embeddings, frozen) needs no gradient: its fp32 copy and rsqrt are
    # not saved. Everything else is as estimated, to the byte.
    assert measured == (config.num_hidden_layers * block + outside - (4 * 128 + 4)) * seqlen


def test_a_model_type_of_another_form_is_read_as_llama_and_the_plan_says_so():
    config = transformers.Gemma2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300)
    notes = estimate(config, settings(seqlen=64)).notes
    assert "model_type 'gemma2' read as a LLaMA-like decoder" in notes
    assert estimate(llama2_7b(), settings()).notes == []
