"""What a memory plan needs to know about a model, read from its transformers config alone: no weight
is read and no model is built (not even on `meta`), so a plan costs nothing before loading.

Three families are described, each by the modules transformers builds for it:

    llama    LLaMA, Mistral, Qwen2/3 and other decoders of the same form: RMSNorm, attention with
             rotary positions (grouped key/value heads), a gated MLP (gate, up, down)
    mixtral  the same attention, and a mixture of experts: a router (never pruned) and, per expert, a
             gated MLP; `models.unfuse_experts` makes each expert's matrices ordinary linears
    opt      LayerNorm, biases, learned positions, a ReLU MLP (fc1, fc2), tied embeddings

A config of another model type is read as the LLaMA form when it has its fields, and the shape says
so in `assumption`.

Saved activations (`saved_bytes_per_token`) were read from the modelling code and checked against
what autograd saves for a small LLaMA (tests/test_plan.py counts the saved tensors' storages).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Model types whose shape is exactly the LLaMA form's (Gemma 2 and 3 add norms, OLMo's have no weights)
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma")
# Corrections that wrap each prunable linear (their forward saves the linear's input for backward)
WRAPPING = ("masklora", "scalelora", "lora-prune", "full")
LOW_RANK = ("masklora", "scalelora", "lora-prune")
KNOWN_PARTS = ("bias", "norm", *WRAPPING)


class PlanError(ValueError):
    """A plan that cannot be made: a config the planner cannot read, settings that make no sense."""


@dataclass(frozen=True)
class LinearShape:
    """A prunable linear of a block (`count` of them: one per expert)."""
    name: str
    in_features: int
    out_features: int
    bias: bool
    count: int = 1

    @property
    def weights(self) -> int:
        return self.in_features * self.out_features * self.count

    @property
    def biases(self) -> int:
        return self.out_features * self.count if self.bias else 0


@dataclass(frozen=True)
class ModelShape:
    family: str                      # "llama", "mixtral" or "opt"
    model_type: str
    hidden: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int                # MLP width (per expert for mixtral; ffn_dim for opt)
    linears: tuple[LinearShape, ...]  # one block's prunable linears
    norms_per_block: int             # norm parameters of one block (weights and biases)
    router_per_block: int            # router parameters of one block (never pruned, never trained)
    embedding_params: int            # token embeddings, learned positions, projections
    head_params: int                 # the output head; 0 when tied to the embeddings
    final_norm_params: int
    experts: int = 0
    experts_per_token: int = 0
    dropout: float = 0.0
    qk_norm: bool = False            # Qwen3: an RMSNorm on each head's queries and keys
    config_dtype: torch.dtype | None = None
    assumption: str = ""

    # -- parameter counts ------------------------------------------------------------------------
    @property
    def prunable_per_block(self) -> int:
        return sum(linear.weights for linear in self.linears)

    @property
    def biases_per_block(self) -> int:
        return sum(linear.biases for linear in self.linears)

    @property
    def block_params(self) -> int:
        return self.prunable_per_block + self.biases_per_block + self.norms_per_block + self.router_per_block

    @property
    def outside_params(self) -> int:
        """Embeddings, positions, final norm and head: everything outside the blocks."""
        return self.embedding_params + self.head_params + self.final_norm_params

    @property
    def gathered_outside_params(self) -> int:
        """What FSDP2 holds gathered outside the blocks at most: an untied head and the embeddings
        are units of their own, gathered one at a time (retraining/sharding.vocabulary_units), beside
        the root's final norm; a tied pair is the root's, with everything else outside the blocks."""
        if not self.head_params:
            return self.outside_params
        return max(self.embedding_params, self.head_params) + self.final_norm_params

    @property
    def total_params(self) -> int:
        return self.layers * self.block_params + self.outside_params

    @property
    def largest_linear(self) -> int:
        """Weights of the largest single matrix (one expert's, for mixtral)."""
        return max(linear.in_features * linear.out_features for linear in self.linears)

    def trainable_params(self, params: str, rank: int) -> dict[str, int]:
        """Trainable parameters of `--params` (parts joined by "+"), per part: what
        `corrections.make_correction(params).attach(model, ...)` makes trainable when the unit is the
        whole model (retrain's case): biases and norms of every block and of the final norm too."""
        counts = {}
        for part in params.split("+"):
            if part not in KNOWN_PARTS:
                raise PlanError(f"unknown --params part {part!r}; the planner knows {', '.join(KNOWN_PARTS)}")
            if part == "bias":
                counts[part] = self.layers * self.biases_per_block
                if not counts[part]:
                    raise PlanError(f"--params bias: this model's linears ({self.model_type}) have no biases; "
                                    "use norm or masklora instead")
            elif part == "norm":
                counts[part] = self.layers * self.norms_per_block + self.final_norm_params
            elif part in LOW_RANK:
                counts[part] = self.layers * sum(rank * (lin.in_features + lin.out_features) * lin.count
                                                 for lin in self.linears)
            else:  # full: an fp32 master of every prunable weight
                counts[part] = self.layers * self.prunable_per_block
        return counts

    def largest_trainable(self, params: str, rank: int) -> int:
        """Elements of the largest single trainable tensor of `--params`."""
        sizes = []
        for part in params.split("+"):
            if part == "bias":
                sizes.append(max(linear.out_features for linear in self.linears))
            elif part == "norm":
                sizes.append(max(self.hidden, 2 * self.head_dim if self.qk_norm else 0))
            elif part in LOW_RANK:
                sizes.append(rank * max(max(linear.in_features, linear.out_features) for linear in self.linears))
            else:
                sizes.append(self.largest_linear)
        return max(sizes)

    def trainable_per_block(self, params: str, rank: int) -> int:
        """The trainable parameters that live inside one block (FSDP gathers them with it)."""
        counts = self.trainable_params(params, rank)
        inside = sum(counts.values()) - (self.final_norm_params if "norm" in counts else 0)
        return inside // self.layers

    # -- activations -----------------------------------------------------------------------------
    def saved_bytes_per_token(self, params: str, compute_bytes: int) -> tuple[int, int]:
        """What autograd keeps for backward, per token: (one block, outside the blocks).

        `compute_bytes` is the element size under autocast (2 for bf16/fp16 weights, 4 for fp32).
        A wrapping correction's linear saves its input (corrections/effective.py: the effective
        weight W + s·M⊙(BA) is formed again in backward, its mask from the weight's zeros, so only the
        input is saved); a frozen linear saves nothing (its input gradient needs only its weight).
        With `norm` a norm's weight multiplies a saved normalised input."""
        c, parts = compute_bytes, params.split("+")
        wraps, norms = any(p in WRAPPING for p in parts), "norm" in parts
        h, q_dim, kv_dim = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.family == "opt":
            # LayerNorm runs in fp32 under CUDA autocast: its fp32 input copy, mean and rstd
            norm_saved = 2 * (4 * h + 8)
            linear_inputs = 2 * c * h if wraps else 0       # the fp32 norm outputs cast for the linears
            normalised = 0                                    # layer_norm saves the same with or without
        else:
            norm_saved = 2 * (4 * h + 4)                      # RMSNorm: its fp32 input copy and rsqrt
            linear_inputs = 2 * c * h if wraps else 0         # the norms' outputs (q/k/v's and gate/up's input)
            normalised = 2 * c * h if norms else 0
        # q and k after rotation, v, the output (o_proj's input: the same storage), log-sum-exp per head
        attention = c * (2 * q_dim + 2 * kv_dim) + 4 * self.heads
        if self.qk_norm:
            attention += 4 * (q_dim + kv_dim)                 # their fp32 input copies
        if self.family == "opt":
            dropout_masks = 2 * h if self.dropout > 0 else 0   # bool masks after attention and fc2
            mlp = c * self.intermediate + dropout_masks         # ReLU's output, which is fc2's input
        elif self.family == "mixtral":
            # Per routed (token, expert): gate out, SiLU out, up out, the expert's output (kept for
            # the routing weights' gradient); with a wrapping correction also the gathered input and
            # the product (down_proj's input). Per token, the router's fp32 softmax and its top-k.
            per_route = c * (3 * self.intermediate + h) + (c * (self.intermediate + h) if wraps else 0)
            mlp = self.experts_per_token * per_route + 4 * self.experts + 16 * self.experts_per_token
        else:
            # gate out (SiLU's input), SiLU out, up out; their product is down_proj's input
            mlp = c * 3 * self.intermediate + (c * self.intermediate if wraps else 0)
        block = norm_saved + linear_inputs + normalised + attention + mlp
        # The final norm's saved tensors (and its normalised input with `norm`); rotary cos and sin
        # (LLaMA-like) or the learned positions' ids (OPT)
        final_norm = norm_saved // 2 + (c * h if norms and self.family != "opt" else 0)
        positions = 8 if self.family == "opt" else 2 * c * self.head_dim
        return block, final_norm + positions

    def block_backward_bytes_per_token(self, compute_bytes: int) -> int:
        """The gradients alive while one block's backward runs: the one arriving at its output, the
        widest one inside it (the MLP's, or the routed experts'), the one of its input being formed
        (compute dtype), and a norm's fp32 one."""
        width = self.intermediate * max(1, self.experts_per_token)
        return compute_bytes * (2 * self.hidden + width) + 4 * self.hidden


# --------------------------------------------------------------------------------------------------
def read_config(model_config) -> object:
    """A transformers config from a config object or its dict (as config.json holds it)."""
    if not isinstance(model_config, dict):
        return model_config
    if "model_type" not in model_config:
        raise PlanError("the model's config has no model_type; pass the checkpoint's config.json")
    from transformers import AutoConfig

    fields = {k: v for k, v in model_config.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(model_config["model_type"], **fields)
    except ValueError as error:
        raise PlanError(f"transformers does not know model_type {model_config['model_type']!r}: {error}") from error


def model_shape(model_config) -> ModelShape:
    config = read_config(model_config)
    model_type = getattr(config, "model_type", "")
    if model_type == "opt":
        return _opt_shape(config)
    if getattr(config, "num_local_experts", None):
        if model_type != "mixtral":
            raise PlanError(f"model_type {model_type!r}: a mixture of experts the planner does not describe "
                            "(it knows mixtral)")
        return _llama_shape(config, model_type)
    needed = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")
    missing = [name for name in needed if getattr(config, name, None) is None]
    if missing:
        raise PlanError(f"model_type {model_type!r}: the planner cannot read its shape (no {', '.join(missing)})")
    return _llama_shape(config, model_type)


def _config_dtype(config) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _llama_shape(config, model_type: str) -> ModelShape:
    h, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    i = config.intermediate_size
    qkv_bias = bool(getattr(config, "attention_bias", False)) or model_type == "qwen2"
    out_bias = bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    experts = getattr(config, "num_local_experts", 0) or 0
    linears = [LinearShape("self_attn.q_proj", h, heads * head_dim, qkv_bias),
               LinearShape("self_attn.k_proj", h, kv_heads * head_dim, qkv_bias),
               LinearShape("self_attn.v_proj", h, kv_heads * head_dim, qkv_bias),
               LinearShape("self_attn.o_proj", heads * head_dim, h, out_bias)]
    mlp = "mlp.experts.*." if experts else "mlp."
    linears += [LinearShape(mlp + "gate_proj", h, i, mlp_bias, max(1, experts)),
                LinearShape(mlp + "up_proj", h, i, mlp_bias, max(1, experts)),
                LinearShape(mlp + "down_proj", i, h, mlp_bias, max(1, experts))]
    qk_norms = 2 * head_dim if model_type == "qwen3" else 0
    vocab = config.vocab_size
    tied = bool(getattr(config, "tie_word_embeddings", False))
    known = model_type in LLAMA_LIKE or model_type == "mixtral"
    return ModelShape(
        family="mixtral" if experts else "llama", model_type=model_type, hidden=h,
        layers=config.num_hidden_layers, vocab=vocab, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=i, linears=tuple(linears), norms_per_block=2 * h + qk_norms,
        router_per_block=h * experts, embedding_params=vocab * h, head_params=0 if tied else vocab * h,
        final_norm_params=h, experts=experts, experts_per_token=getattr(config, "num_experts_per_tok", 0) or 0,
        qk_norm=model_type == "qwen3", config_dtype=_config_dtype(config),
        assumption="" if known else f"model_type {model_type!r} read as a LLaMA-like decoder")


def _opt_shape(config) -> ModelShape:
    h, ffn, bias = config.hidden_size, config.ffn_dim, bool(getattr(config, "enable_bias", True))
    affine = bool(getattr(config, "layer_norm_elementwise_affine", True))
    norm = 2 * h if affine else 0
    projection = getattr(config, "word_embed_proj_dim", h) or h
    vocab = config.vocab_size
    embeddings = vocab * projection + (config.max_position_embeddings + 2) * h  # OPT's positions start at 2
    if projection != h:
        embeddings += 2 * projection * h  # project_in and project_out, bias-free
    final_norm = norm if config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False) else 0
    tied = bool(getattr(config, "tie_word_embeddings", True))
    linears = (LinearShape("self_attn.q_proj", h, h, bias), LinearShape("self_attn.k_proj", h, h, bias),
               LinearShape("self_attn.v_proj", h, h, bias), LinearShape("self_attn.out_proj", h, h, bias),
               LinearShape("fc1", h, ffn, bias), LinearShape("fc2", ffn, h, bias))
    heads = config.num_attention_heads
    return ModelShape(
        family="opt", model_type="opt", hidden=h, layers=config.num_hidden_layers, vocab=vocab, heads=heads,
        kv_heads=heads, head_dim=h // heads, intermediate=ffn, linears=linears, norms_per_block=2 * norm,
        router_per_block=0, embedding_params=embeddings, head_params=0 if tied else vocab * projection,
        final_norm_params=final_norm, dropout=float(getattr(config, "dropout", 0.0) or 0.0),
        config_dtype=_config_dtype(config))
