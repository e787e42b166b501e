#!/usr/bin/env python
"""llm-compressor's one-shot Wanda / SparseGPT on given token windows: the anchor of
`scripts/bench_prune.py --anchor PYTHON`.

It runs under llm-compressor's own interpreter (llm-compressor needs a different torch and
transformers than reconstruct, so it lives in its own virtual environment) and imports nothing of
reconstruct. It prunes every linear of the decoder blocks (not lm_head), unstructured, with the
windows the bench wrote (the same ones reconstruct calibrates on, in the same order), and saves the
model, as reconstruct does.

    python -m venv /work/venv-llmc && /work/venv-llmc/bin/pip install llmcompressor
    /work/venv-llmc/bin/python scripts/anchor_llmcompressor.py MODEL WINDOWS.safetensors OUT \
        --method wanda --sparsity 0.5 --batch-size 8
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint directory")
    parser.add_argument("windows", help="safetensors file with input_ids [nsamples, seqlen]")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--method", choices=["wanda", "sparsegpt"], default="wanda")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    args = parser.parse_args()

    started = time.perf_counter()
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    windows = load_file(args.windows)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": windows.tolist(),
                                 "attention_mask": torch.ones_like(windows).tolist()})
    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[args.method]
    recipe = modifier(sparsity=args.sparsity, mask_structure="0:0", targets=["Linear"], ignore=["re:.*lm_head"])
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(windows),
            max_seq_length=windows.shape[1], batch_size=args.batch_size, shuffle_calibration_samples=False)
    model.save_pretrained(args.out)
    print(json.dumps({"wall_s": time.perf_counter() - started, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
