"""The memory plan's estimate of one training pass against a measurement, on the CPU.

A small LLaMA in bf16 (built from a config, random weights, half of each linear's weights zeroed) with
a stand-in for issue 18's MaskLoRA design target on every linear: an autograd function that saves only
its input and recomputes W + s·M⊙(BA), M = (W != 0), in its backward. One window goes forward and
backward under bf16 autocast, with retrain's loss. Measured two ways, in a fresh process each:

  - live tensors: every storage an operator makes is followed until it is freed; the peak of their
    sum is what torch.cuda.max_memory_allocated would report on a GPU;
  - resident memory: the rise of the process's high-water mark (VmHWM, reset before the pass), with
    glibc returning large frees to the system at once.

Both are compared with the plan's step memory: its device peak less the weights and the trainable
parameters (there already) and AdamW's moments (not made here).

    python scripts/check_plan_cpu.py                       # both, with and without checkpointing
    python scripts/check_plan_cpu.py --seqlen 512 --layers 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def masked_low_rank_function():
    import torch
    from torch.nn import functional as F

    def effective(weight, A, B, scale, dtype):
        return (B @ A).mul_(weight != 0).mul_(scale).add_(weight).to(dtype)

    class MaskedLowRank(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, A, B, scale):
            ctx.save_for_backward(x, weight, A, B)
            ctx.scale = scale
            with torch.autocast("cpu", enabled=False):
                return F.linear(x, effective(weight, A, B, scale, x.dtype))

        @staticmethod
        def backward(ctx, grad):
            x, weight, A, B = ctx.saved_tensors
            with torch.autocast("cpu", enabled=False):
                grad_x = grad @ effective(weight, A, B, ctx.scale, grad.dtype)
                grad_weight = grad.flatten(0, -2).t() @ x.flatten(0, -2)
                grad_ba = grad_weight.float().mul_(weight != 0).mul_(ctx.scale)
                del grad_weight
                return grad_x, None, B.t() @ grad_ba, grad_ba @ A.t(), None

    return MaskedLowRank


def build(args):
    import torch
    import transformers
    from torch import nn

    config = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                      num_hidden_layers=args.layers, vocab_size=args.vocab)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    model.requires_grad_(False)
    function = masked_low_rank_function()

    class Wrapped(nn.Module):
        def __init__(self, base, rank=16):
            super().__init__()
            self.base = base
            with torch.no_grad():
                base.weight.masked_fill_(torch.rand(base.weight.shape) < 0.5, 0.0)
            self.A = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)
            self.B = nn.Parameter(torch.zeros(base.out_features, rank))

        def forward(self, x):
            return function.apply(x.to(torch.bfloat16), self.base.weight, self.A, self.B, 2.0)

    for block in model.model.layers:
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear):
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent), child, Wrapped(module))
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return config, model


def live_tensor_tracker(model):
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveTensors(TorchDispatchMode):
        """The bytes of the storages operators made that are still alive, and their peak."""

        def __init__(self):
            super().__init__()
            self.existing = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
            self.live, self.peak = {}, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    key = storage.data_ptr()
                    if key and key not in self.live and key not in self.existing:
                        self.live[key] = (StorageWeakRef(storage), storage.nbytes())
            self.live = {key: value for key, value in self.live.items() if not value[0].expired()}
            self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
            return out

    return LiveTensors()


def high_water_mark() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(args) -> dict:
    """In this process: one pass, measured the way `args.how` says."""
    import torch

    from reconstruct.retraining.losses import next_token_loss_sum

    config, model = build(args)
    ids = torch.randint(0, args.vocab, (1, args.seqlen))

    def one_pass():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, use_cache=False).logits
        next_token_loss_sum(logits, ids).backward()  # retrain's own loss

    if args.how == "live":
        tracker = live_tensor_tracker(model)
        with tracker:
            one_pass()
        return {"measured": tracker.peak}
    one_pass()  # the first pass pages in the kernels' code and the allocator's arenas
    model.zero_grad(set_to_none=True)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = high_water_mark()
    one_pass()
    return {"measured": high_water_mark() - before}


def planned(args) -> int:
    from reconstruct.plan import PlanSettings, estimate
    from reconstruct.plan.settings import DEVICE_MOMENTS

    config, _ = build(args)
    plan = estimate(config, PlanSettings(dtype="bf16", seqlen=args.seqlen, batch_size=1, device="cpu",
                                         gradient_checkpointing=args.checkpointing))
    there = sum(item.bytes for item in plan.items
                if item.where == "device" and set(item.moments) == set(DEVICE_MOMENTS))
    return plan.peak_bytes - there, plan.peak()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("hidden", 1024), ("intermediate", 2816), ("heads", 16), ("kv-heads", 16),
                          ("layers", 4), ("vocab", 32000), ("seqlen", 1024)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--how", choices=["live", "rss"], help=argparse.SUPPRESS)  # a child's measurement
    args = parser.parse_args()
    if args.how:
        print(json.dumps(measure(args)))
        return
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    for checkpointing in (False, True):
        args.checkpointing = checkpointing
        estimate, moment = planned(args)
        line = [f"checkpointing {'on ' if checkpointing else 'off'}: plan {estimate / 2**20:7.1f} MiB ({moment})"]
        for how in ("live", "rss"):
            command = [sys.executable, __file__, *sys.argv[1:], "--how", how] + (
                ["--checkpointing"] if checkpointing else [])
            result = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
            measured = json.loads(result.stdout.strip().splitlines()[-1])["measured"]
            line.append(f"{how} {measured / 2**20:7.1f} MiB (plan / measured {estimate / measured:.2f})")
        print("; ".join(line))


if __name__ == "__main__":
    main()
