#!/usr/bin/env python
"""The floor of any sequential pruner: two bare forward passes over every decoder block.

A pruner that works block by block runs each block at least twice: once dense (to collect its
statistics) and once pruned (to give the next block its inputs). This script does only that, with
nothing else: it imports torch and transformers, loads the model, computes block 0's inputs for the
windows, and runs every block twice on every batch (no statistics, no pruning, no writing). Its
process wall time is what `scripts/bench_prune.py` compares a run against.

    python scripts/floor_two_passes.py MODEL WINDOWS.safetensors --batch-size 8
"""
from __future__ import annotations

import argparse
import json
import time


class _Stop(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint directory")
    parser.add_argument("windows", help="safetensors file with input_ids [nsamples, seqlen]")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    started = time.perf_counter()
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    windows = load_file(args.windows)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").eval()
    blocks = model.model.layers
    loaded = time.perf_counter()

    # Block 0's inputs and keyword arguments (rotary embeddings, mask) per batch, caught by a hook.
    batches = []

    def catch(module, block_args, block_kwargs):
        batches.append((block_args[0], block_kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    with torch.inference_mode():
        for start in range(0, len(windows), args.batch_size):
            try:
                model(input_ids=windows[start:start + args.batch_size], use_cache=False)
            except _Stop:
                pass
        handle.remove()
        passes_started = time.perf_counter()
        for block in blocks:
            for index, (hidden, kwargs) in enumerate(batches):
                block(hidden, **kwargs)                           # the dense pass (statistics)
                output = block(hidden, **kwargs)                  # the pruned pass (next inputs)
                batches[index] = (output[0] if isinstance(output, tuple) else output, kwargs)
    done = time.perf_counter()
    print(json.dumps({"load_s": loaded - started, "capture_s": passes_started - loaded,
                      "two_passes_s": done - passes_started, "wall_s": done - started}))


if __name__ == "__main__":
    main()
