"""Run by tests/test_distributed_sharded.py under `torchrun --nproc_per_node 2` (not collected by
pytest): a `retrain --fsdp` run's loading and writing alone, each rank printing how much its peak
resident memory rose in each (a JSON line).

    torchrun --nproc_per_node 2 tests/sharded_worker.py MODEL OUT
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def resident() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) * 1024
    return values


def reset_peak() -> int:
    """Reset VmHWM to the current resident memory (Linux: clear_refs 5); return that memory."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return resident()["VmRSS"]


def main(model: str, out: str) -> None:
    from reconstruct import distributed
    from reconstruct.checkpoint import RunDirectory
    from reconstruct.config import RetrainConfig
    from reconstruct.retraining.sharded_model import write_blocks
    from reconstruct.models import open_model
    from reconstruct.retraining.trainer import Retrainer

    open_model(model)  # transformers' model code imported: the process's floor, not the loading
    with distributed.process_group("cpu") as device:
        config = RetrainConfig(model=model, out=out, params="norm", device=device, fsdp=True).validate()
        retrainer = Retrainer(config)
        before = reset_peak()
        retrainer.open()
        retrainer.prepare_training()
        loading = resident()["VmHWM"] - before
        run_dir = RunDirectory(Path(out))
        distributed.on_main(lambda: run_dir.prepare(True, False), "preparing the output directory")
        before = reset_peak()
        write_blocks(retrainer.model, retrainer.adapter, run_dir, True, list(retrainer.shapes))
        writing = resident()["VmHWM"] - before
        print(json.dumps({"rank": distributed.rank(), "loading": loading, "writing": writing}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
