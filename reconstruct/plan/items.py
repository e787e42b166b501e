"""The arithmetic of a memory plan: each item's bytes and the moments of a step it is held at.

Device items are per rank. `w` is the frozen weights' element size, `c` the compute dtype's under
autocast (the same: retrain autocasts to the weights' half precision, and runs fp32 weights in
fp32); trainable parameters, their gradients and AdamW's two moments are fp32.
"""
from __future__ import annotations

from .render import quantity, size
from .settings import (DEVICE_MOMENTS, DTYPE_BYTES, FIRST_BLOCK, FORWARD_BACKWARD, HOST_MOMENTS, LAST_BLOCK,
                       LOADING, LOSS, SAVING, STEP, TRAINING, WRITING, MemoryItem, PlanSettings)
from .shapes import WRAPPING, ModelShape

GATHERED_BLOCKS = 2          # FSDP2 gathers the block it computes and prefetches the next one
ALL_REDUCE_BUCKET = 2**26    # fp32 gradients all-reduced this many bytes at a time (distributed.py)
KL_TEMPORARIES = 4           # fp32 [chunk × vocabulary] tensors of one KL chunk: both log-softmaxes,
                             # the pointwise KL, the student's gradient
# Host memory of the process itself: Python, torch and transformers, measured on the CPU
# (docs/memory.md: 0.38 GiB); CUDA's libraries add about 2 GiB, an allowance not measured here.
RUNTIME_HOST_BYTES = {"cpu": int(0.4 * 2**30), "cuda": int(2.4 * 2**30)}


def transient_bytes_per_weight(compute_bytes: int) -> int:
    """Per weight of the largest wrapped linear while its backward recomputes the effective weight:
    an fp32 matrix (the sum being formed, or the weight's gradient upcast and masked), the bool
    keep-mask computed from the weight's zeros, a matrix in the compute dtype (the sum's cast, or the
    weight's gradient). Measured so on the CPU with a stand-in for corrections/effective.py."""
    return 4 + 1 + compute_bytes


LOSS_TEMPORARIES = 2         # fp32 [chunk × vocabulary] tensors of one next-token loss chunk: the
                             # logits' upcast and their (log-)softmax


def device_items(shape: ModelShape, teacher: ModelShape, s: PlanSettings, dtype: str,
                 trainable: dict[str, int]) -> list[MemoryItem]:
    items: list[MemoryItem] = []

    def add(name, count, moments, how):
        items.append(MemoryItem(name, int(count), "device", tuple(moments), how))

    w = c = DTYPE_BYTES[dtype]
    ranks, offload = s.world_size, s.offload == "cpu"
    shards = ranks if s.sharded else 1
    tokens = s.micro_batch * s.seqlen
    total = sum(trainable.values())
    per_block = shape.trainable_per_block(s.params, s.rank)
    divided = f" / {shards} ranks" if shards > 1 else ""

    # Weights: whole on each rank, or FSDP2's shard plus what it gathers for the pass
    if not s.sharded:
        add(f"frozen weights ({dtype})", shape.total_params * w, DEVICE_MOMENTS,
            f"{quantity(shape.total_params)} parameters × {w} B")
    else:
        if not offload:
            add("frozen weights: this rank's shard", shape.total_params * w / shards, DEVICE_MOMENTS,
                f"{quantity(shape.total_params)} × {w} B{divided}")
        if shape.head_params:  # untied: the head, gathered for its forward and backward (at the loss)
            add("gathered: the head (or the embeddings), final norm", shape.gathered_outside_params * w, (LOSS,),
                f"{quantity(shape.gathered_outside_params)} × {w} B, one vocabulary unit at a time")
        else:  # tied: the root's, whole from the forward to the end of the backward
            add("gathered: embeddings (the head's too), final norm (FSDP's root)", shape.outside_params * w,
                FORWARD_BACKWARD, f"{quantity(shape.outside_params)} × {w} B, whole from the forward to the "
                "end of the backward")
        add(f"gathered: {GATHERED_BLOCKS} blocks (the computed, the prefetched)",
            GATHERED_BLOCKS * (shape.block_params * w + per_block * 4), FORWARD_BACKWARD,
            f"{GATHERED_BLOCKS} × ({quantity(shape.block_params)} × {w} B + {quantity(per_block)} trainable × 4 B)")

    # Trainable parameters, gradients, AdamW: on the device unless offloaded
    accumulating = -(-s.windows_per_rank // s.micro_batch) > 1
    if not offload:
        add("trainable parameters (fp32)", 4 * total / shards, DEVICE_MOMENTS, f"{quantity(total)} × 4 B{divided}")
        add("gradients (fp32)", 4 * total / shards,
            (LOSS, LAST_BLOCK, FIRST_BLOCK, STEP) if accumulating else (FIRST_BLOCK, STEP),
            f"{quantity(total)} × 4 B{divided}" + (", kept between the passes of a step" if accumulating else ""))
        add("AdamW moments (fp32, two)", 8 * total / shards, DEVICE_MOMENTS, f"{quantity(total)} × 8 B{divided}")
        if s.device == "cpu":  # torch's AdamW runs its for-loop on CPU tensors (foreach on accelerators)
            largest = shape.largest_trainable(s.params, s.rank)
            add("AdamW step temporaries (one parameter at a time on the CPU)", 4 * largest, (STEP,),
                f"{quantity(largest)} × 4 B, the largest parameter")
        else:
            add("AdamW step temporaries (foreach)", 4 * total / shards, (STEP,), f"{quantity(total)} × 4 B{divided}")
    if s.sharded:
        add("a block's gradients before reduce-scatter", 4 * per_block, (LAST_BLOCK, FIRST_BLOCK),
            f"{quantity(per_block)} × 4 B")
    elif ranks > 1:
        add("gradient all-reduce bucket (fp32)", min(4 * total, ALL_REDUCE_BUCKET), (STEP,),
            f"at most {size(ALL_REDUCE_BUCKET)} at a time")

    # Activations saved for backward
    block, outside = shape.saved_bytes_per_token(s.params, c)
    per_tokens = f"B per token × {tokens} tokens"
    if s.gradient_checkpointing:
        add("block inputs kept by checkpointing", shape.layers * c * shape.hidden * tokens, (LOSS, LAST_BLOCK),
            f"{shape.layers} blocks × {c * shape.hidden} {per_tokens}")
        add("one block's activations, recomputed for its backward", (block + c * shape.hidden) * tokens,
            (LAST_BLOCK, FIRST_BLOCK), f"({block} + its input {c * shape.hidden}) {per_tokens}")
    else:
        add("activations saved for backward, every block", shape.layers * block * tokens, (LOSS, LAST_BLOCK),
            f"{shape.layers} blocks × {block} {per_tokens}")
        add("activations of the first block", block * tokens, (FIRST_BLOCK,), f"{block} {per_tokens}")
    add("activations outside the blocks", outside * tokens, (LOSS, LAST_BLOCK), f"{outside} {per_tokens}")
    add("gradients flowing through one block", shape.block_backward_bytes_per_token(c) * tokens,
        (LAST_BLOCK, FIRST_BLOCK), f"{shape.block_backward_bytes_per_token(c)} {per_tokens}")
    if any(part in WRAPPING for part in s.params.split("+")):
        add("one linear's effective weight, formed in its backward",
            shape.largest_linear * transient_bytes_per_weight(c), (LAST_BLOCK, FIRST_BLOCK),
            f"{quantity(shape.largest_linear)} weights × {transient_bytes_per_weight(c)} B")

    # The logits and the loss
    logits = tokens * shape.vocab
    add("logits and their gradient", logits * 2 * c, (LOSS,), f"{tokens} tokens × {shape.vocab} × 2 × {c} B")
    chunk = min(s.loss_chunk_tokens, s.seqlen)
    add("the next-token loss, in chunks of tokens", LOSS_TEMPORARIES * 4 * chunk * shape.vocab, (LOSS,),
        f"{LOSS_TEMPORARIES} × {chunk} tokens × {shape.vocab} × 4 B (fp32)")
    if s.teacher:
        items += teacher_device_items(teacher, s, w, tokens)
    return items


def teacher_device_items(teacher: ModelShape, s: PlanSettings, w: int, tokens: int) -> list[MemoryItem]:
    """Distillation: the teacher's weights (unless on another device), its forward one block at a time
    with nothing saved, its logits for the micro-batch and the KL term in chunks, at the loss."""
    items: list[MemoryItem] = []

    def add(name, count, moments, how):
        items.append(MemoryItem(name, int(count), "device", tuple(moments), how))

    c = w
    if s.teacher_on_device:
        if s.offload == "cpu":
            gathered = teacher.outside_params + GATHERED_BLOCKS * teacher.block_params
            add("teacher: gathered root and blocks", gathered * w, (LOSS,), f"{quantity(gathered)} × {w} B")
        else:
            add("teacher weights (frozen, whole)", teacher.total_params * w, DEVICE_MOMENTS,
                f"{quantity(teacher.total_params)} × {w} B")
        block, _ = teacher.saved_bytes_per_token("", c)
        add("teacher's forward, one block at a time", block * tokens, (LOSS,),
            f"{block} B per token × {tokens} tokens")
    logits = tokens * teacher.vocab
    add("teacher's logits for the micro-batch", logits * c, (LOSS,), f"{tokens} × {teacher.vocab} × {c} B")
    chunk = min(s.loss_chunk_tokens, s.seqlen)
    add("KL(teacher ‖ student), in chunks of tokens", KL_TEMPORARIES * 4 * chunk * teacher.vocab, (LOSS,),
        f"{KL_TEMPORARIES} × {chunk} tokens × {teacher.vocab} × 4 B")
    return items


def host_items(shape: ModelShape, teacher: ModelShape, s: PlanSettings, dtype: str, trainable: dict[str, int],
               device_peak: int) -> list[MemoryItem]:
    """One rank's host memory: the process, the token windows, and what loading, training, saving the
    training state and writing hold there. On the CPU the device's items are in host memory too."""
    items: list[MemoryItem] = []

    def add(name, count, moments, how):
        items.append(MemoryItem(name, int(count), "host", tuple(moments), how))

    w, total = DTYPE_BYTES[dtype], sum(trainable.values())
    shards = s.world_size if s.sharded else 1
    divided = f" / {shards} ranks" if shards > 1 else ""
    add("Python, torch, transformers", RUNTIME_HOST_BYTES[s.device], HOST_MOMENTS,
        "measured on the CPU" + (", plus an allowance for CUDA's libraries" if s.device == "cuda" else ""))
    windows = (s.steps * s.batch_size + s.eval_windows) * s.seqlen
    add("training and validation windows (int64)", windows * 8, HOST_MOMENTS,
        f"({s.steps} steps × {s.batch_size} + {s.eval_windows}) windows × {s.seqlen} × 8 B, on every rank")
    save = 12 * total / shards
    if s.device == "cpu":
        add("the step's memory (the CPU is the device)", device_peak, (TRAINING,), "the device's peak")
        if s.sharded:  # each rank holds its shards; rank 0 gathers one block at a time to write it
            add("frozen weights: this rank's shard", shape.total_params * w / shards, (LOADING, SAVING, WRITING),
                f"{quantity(shape.total_params)} × {w} B{divided}")
            add("trainable parameters and AdamW moments: this rank's shard", 12 * total / shards,
                (SAVING, WRITING), f"{quantity(total)} × 12 B{divided}")
            largest = max(shape.block_params, shape.outside_params)
            add("one gathered block (or the rest) on its way to the writer", largest * w, (WRITING,),
                f"{quantity(largest)} × {w} B, on rank 0")
        else:
            add("frozen weights, read in place", shape.total_params * w, (LOADING, SAVING, WRITING),
                f"{quantity(shape.total_params)} × {w} B")
            add("trainable parameters and AdamW moments", 12 * total, (SAVING, WRITING), f"{quantity(total)} × 12 B")
        if s.saves_state:
            add("the training state's copy, to save" + (" (its shard)" if shards > 1 else ""), save, (SAVING,),
                f"{quantity(total)} × 12 B{divided}")
        return items
    offload = s.offload == "cpu"
    largest_load = max(shape.total_params, teacher.total_params if s.teacher else 0)
    if not s.sharded:
        add("the checkpoint, read whole before moving to the device", largest_load * w, (LOADING,),
            f"{quantity(largest_load)} × {w} B (load_all; the teacher's first, if larger)")
    elif not offload:
        add("this rank's shards, read one block at a time", shape.block_params * w, (LOADING,),
            f"{quantity(shape.block_params)} × {w} B (design target)")
    else:
        resident = (LOADING, TRAINING, SAVING, WRITING)
        add("frozen weights: this rank's shard (pinned)", shape.total_params * w / shards, resident,
            f"{quantity(shape.total_params)} × {w} B{divided}")
        add("trainable parameters (fp32)", 4 * total / shards, (TRAINING, SAVING, WRITING),
            f"{quantity(total)} × 4 B{divided}")
        add("gradients (fp32)", 4 * total / shards, (TRAINING, SAVING), f"{quantity(total)} × 4 B{divided}")
        add("AdamW moments (fp32, two)", 8 * total / shards, (TRAINING, SAVING), f"{quantity(total)} × 8 B{divided}")
        add("AdamW step temporaries (the step runs on the CPU)", 4 * total / shards, (TRAINING,),
            f"{quantity(total)} × 4 B{divided}")
        if s.teacher and s.teacher_on_device:
            add("teacher weights: this rank's shard (pinned)", teacher.total_params * w / shards,
                (TRAINING, SAVING), f"{quantity(teacher.total_params)} × {w} B{divided}")
    if s.teacher and not offload and s.sharded:
        add("the teacher, read whole before moving to the device", teacher.total_params * w, (LOADING,),
            f"{quantity(teacher.total_params)} × {w} B (load_all)")
    if s.saves_state:
        add("the training state's copy, to save (rank 0" + (", its shard)" if shards > 1 else ")"), save, (SAVING,),
            f"{quantity(total)} × 12 B{divided}")
    add("one merged block on its way to the writer", shape.block_params * w, (WRITING,),
        f"{quantity(shape.block_params)} × {w} B (design target: block by block)")
    return items
