#!/usr/bin/env bash
# One prepared check of the engine on one CUDA GPU, at most 10 minutes (each step has a time limit;
# 120 + 90 + 2 x 120 + 130 s):
#   1. the CUDA-only tests (pytest -m cuda);
#   2. a random LLaMA-2-7B-shaped bf16 model (hidden 4096, MLP 11008, 32 heads, vocabulary 32000) with
#      its first GPU_CHECK_BLOCKS blocks (default 4) written once to $GPU_CHECK_DIR;
#   3. Wanda 50% without a correction, then Wanda 50% + MaskLoRA, on 128 windows of 2048 tokens
#      (GPU_CHECK_NSAMPLES, GPU_CHECK_SEQLEN), timed: per-phase seconds from report.json, peak
#      device memory and peak host memory;
#   4. `retrain` (MaskLoRA, bf16, GPU_CHECK_RETRAIN_SEQLEN tokens, default 1024, batch 4, 4 steps, a
#      state saved at step 2) on the pruned blocks of step 3 (the dense ones if it failed), without
#      and with --offload cpu: the memory plan's estimate (reconstruct.plan) beside
#      torch.cuda.max_memory_allocated and the peak host memory (scripts/check_retrain_memory.py).
# Each step has its own time limit; a failing step is reported and the next one still runs. The exit
# status is 0 only if every step passed.
#
#   bash scripts/gpu_check.sh                  # from the repository root, with the CUDA build of torch
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DIR=${GPU_CHECK_DIR:-/tmp/reconstruct-gpu-check}
BLOCKS=${GPU_CHECK_BLOCKS:-4}
NSAMPLES=${GPU_CHECK_NSAMPLES:-128}
SEQLEN=${GPU_CHECK_SEQLEN:-2048}
STEPS=${GPU_CHECK_STEPS:-50}
RETRAIN_SEQLEN=${GPU_CHECK_RETRAIN_SEQLEN:-1024}
mkdir -p "$DIR"
failed=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, remember a failure, go on
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s)"
    local started=$SECONDS
    timeout "$limit" "$@"
    local status=$?
    echo "=== $name: exit $status after $((SECONDS - started)) s"
    [ "$status" -eq 0 ] || failed+=("$name (exit $status)")
}

python3 - <<'PY' || { echo "no CUDA device: nothing to check"; exit 1; }
import torch
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv || true

step "CUDA tests" 120 python3 -m pytest -q -m cuda tests/ -p no:cacheprovider

step "7B-shaped model ($BLOCKS blocks)" 90 python3 - "$DIR" "$BLOCKS" "$NSAMPLES" "$SEQLEN" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "scripts")
import bench_memory
from reconstruct.tiny import write_sample_text

directory, blocks, nsamples, seqlen = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
bench_memory.make_model(directory / f"llama7b-{blocks}", hidden_size=4096, intermediate_size=11008,
                        num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=blocks,
                        max_position_embeddings=4096)
# The tiny tokenizer's sample text, repeated until it holds nsamples windows of seqlen tokens (~300
# tokens a repeat, with margin).
write_sample_text(directory / "calib.txt", repeats=nsamples * seqlen // 200 + 10)
PY

prune() {  # prune NAME EXTRA-ARGS...: one timed run, then its phases and peaks
    local name=$1; shift
    step "prune: $name" 120 python3 -m reconstruct prune "$DIR/llama7b-$BLOCKS" --out "$DIR/out-$name" --overwrite \
        --device cuda --method wanda --sparsity 0.5 --calib "$DIR/calib.txt" --nsamples "$NSAMPLES" \
        --seqlen "$SEQLEN" --cache-dir "$DIR/tokens" "$@"
    [ -f "$DIR/out-$name/report.json" ] && python3 - "$DIR/out-$name/report.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
totals = report["totals"]
print(f"  wall {totals['wall_time_s']:.1f} s, peak device {totals['peak_device_bytes'] / 2**30:.2f} GiB, "
      f"peak host {totals['peak_host_rss_bytes'] / 2**30:.2f} GiB, sparsity {totals['pruned_sparsity']:.4f}")
print("  phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in totals["phases_s"].items()))
for block in report["blocks"]:
    extra = (f", held-out {block['heldout_before']:.4f} -> {block['heldout_after']:.4f}"
             if "heldout_before" in block else "")
    print(f"  block {block['index']}: " + ", ".join(f"{k} {v:.2f}" for k, v in block["phases_s"].items()) + extra)
PY
}
prune "wanda" --correction none
prune "wanda-masklora" --correction masklora --steps "$STEPS"

RETRAIN_INPUT="$DIR/out-wanda"
[ -f "$RETRAIN_INPUT/model.safetensors.index.json" ] || RETRAIN_INPUT="$DIR/llama7b-$BLOCKS"
step "retrain: the plan against max_memory_allocated, without and with --offload cpu" 130 \
    python3 scripts/check_retrain_memory.py "$RETRAIN_INPUT" --data "$DIR/calib.txt" --out-dir "$DIR" \
    --device cuda --seqlen "$RETRAIN_SEQLEN" --batch-size 4 --steps 4 --cache-dir "$DIR/tokens" --timeout 60

nvidia-smi --query-gpu=memory.used,memory.total --format=csv || true
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "gpu_check: every step passed"
