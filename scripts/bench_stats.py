"""Time one batch of input statistics: the fp64 token path (`add_tokens`, what every linear used
before) against the per-window fp32 partials (`add_windows`), at one thread.

    python scripts/bench_stats.py                    # 8 windows x 256 tokens x 2048 features
    python scripts/bench_stats.py --features 5632    # a 1B model's MLP down_proj input
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from reconstruct.stats import InputStatistics


def seconds(add, batch, features: int, with_hessian: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms the allocator and the kernels up
        stats = InputStatistics(features, "cpu", with_hessian)
        started = time.perf_counter()
        add(stats, batch)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{args.windows} windows x {args.tokens} tokens x {args.features} features, 1 thread, "
          f"median of {args.repeats} (ms)")
    print("dtype     statistics  add_tokens (fp64)  add_windows (fp32 partials)  speed-up")
    for dtype in (torch.float32, torch.bfloat16):
        batch = torch.randn(args.windows, args.tokens, args.features).to(dtype)
        for label, with_hessian in (("wanda", False), ("sparsegpt", True)):
            old = seconds(InputStatistics.add_tokens, batch, args.features, with_hessian, args.repeats)
            new = seconds(InputStatistics.add_windows, batch, args.features, with_hessian, args.repeats)
            print(f"{str(dtype).removeprefix('torch.'):9} {label:11} {old * 1e3:17.1f}  {new * 1e3:27.1f}"
                  f"  {old / new:8.1f}x")


if __name__ == "__main__":
    main()
