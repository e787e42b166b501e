"""Tiny, randomly initialised causal LMs and a tokenizer, built offline.

Used by the README's example run, the tests and the benchmarks: nothing is downloaded. Every
architecture the engine claims to support has an entry in `TINY_CONFIGS`, sized so that a whole
prune-and-reload cycle takes well under a second on a CPU.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

# Sample text to train the tokenizer on and to use as example calibration data. Deliberately plain
# English so that a byte-level BPE learns a few hundred useful merges.
SAMPLE_TEXT = """\
Pruning removes weights from a neural network. Magnitude pruning removes the smallest weights.
Wanda scores each weight by its magnitude times the norm of the input feature it multiplies.
SparseGPT solves a layer-wise reconstruction problem and updates the weights that remain.
A correction fitted on calibration data can recover much of the quality that pruning loses.
The model is processed one transformer block at a time, so that only one block is on the device.
Each block receives the hidden states produced by the block before it, together with the attention
mask and the rotary position embeddings. The dense block's output is the target of the correction.
Language models predict the next token from the tokens before it. Perplexity measures how surprised
a model is by held-out text: lower is better. Calibration text is drawn at random with a fixed seed,
so that the same command gives the same model. The output is an ordinary checkpoint whose zeros are
exactly the pruning mask. Low-rank adapters add a small product of two matrices to a frozen weight.
"""

_COMMON = dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256, tie_word_embeddings=False,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)

# model_type -> config overrides. Small but structurally complete: GQA where the family has it,
# biases and LayerNorm for OPT and GPT-NeoX, a mixture of experts for Mixtral.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(intermediate_size=64, num_key_value_heads=2),
    "mistral": dict(intermediate_size=64, num_key_value_heads=2),
    "qwen2": dict(intermediate_size=64, num_key_value_heads=2),
    "qwen3": dict(intermediate_size=64, num_key_value_heads=2, head_dim=8),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32, enable_bias=True, do_layer_norm_before=True),
    "mixtral": dict(intermediate_size=48, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2),
    "gemma2": dict(intermediate_size=64, num_key_value_heads=2, head_dim=8),
    "gemma3_text": dict(intermediate_size=64, num_key_value_heads=2, head_dim=8),
    "phi3": dict(intermediate_size=64, num_key_value_heads=2),
    "gpt_neox": dict(intermediate_size=64),
}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    if model_type not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {model_type!r}; known: {sorted(TINY_CONFIGS)}")
    kwargs = {**_COMMON, **TINY_CONFIGS[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on SAMPLE_TEXT (deterministic, a few milliseconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([SAMPLE_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def build_tiny_model(model_type: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """A randomly initialised tiny causal LM of the given family."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=dtype)
    return model.eval()


def save_tiny_model(directory: str | os.PathLike, model_type: str = "llama", seed: int = 0,
                    dtype=torch.float32, max_shard_size: str | None = None, **overrides) -> Path:
    """Build a tiny model, save it with its tokenizer as a Hugging Face checkpoint; return the path."""
    directory = Path(directory)
    model = build_tiny_model(model_type, seed=seed, dtype=dtype, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def write_sample_text(path: str | os.PathLike, repeats: int = 40) -> Path:
    """Write SAMPLE_TEXT (repeated, shuffled by line with a fixed seed) as a calibration .txt file."""
    import random

    lines = SAMPLE_TEXT.strip().splitlines()
    rng = random.Random(0)
    out = []
    for _ in range(repeats):
        rng.shuffle(lines)
        out.extend(lines)
    path = Path(path)
    path.write_text("\n".join(out) + "\n")
    return path
