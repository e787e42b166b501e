"""Programs the distributed tests run in separate processes (not collected by pytest).

    torchrun --nproc_per_node 2 tests/distributed_worker.py prune MODEL CALIB CACHE OUT_PREFIX
        one process group, several `reconstruct.prune` runs in a row (one launch: it saves the
        seconds each torchrun start costs): OUT_PREFIX-wanda and OUT_PREFIX-sparsegpt
    python tests/distributed_worker.py dead-peer PORT | stuck-peer PORT
        two processes started by hand (no torchrun, which would stop the survivor itself): rank 1
        dies (or hangs) and rank 0's next collective must fail with DistributedError, in bounded
        time; rank 0 prints what it got and exits 0 when that happened
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time

# The settings of every distributed test run: uneven shares (15 windows on 2 ranks) on purpose.
NSAMPLES, SEQLEN = 15, 32
PRUNE_RUNS = {"wanda": dict(method="wanda", correction="none"),
              "sparsegpt": dict(method="sparsegpt", correction="none")}


def prune_runs(model: str, calib: str, cache: str, prefix: str) -> None:
    from reconstruct import distributed
    from reconstruct.api import prune

    with distributed.process_group("cpu"):  # joined once: the runs below find it and leave it be
        for name, settings in PRUNE_RUNS.items():
            report = prune(model, f"{prefix}-{name}", calib=calib, nsamples=NSAMPLES, seqlen=SEQLEN, device="cpu",
                           cache_dir=cache, **settings)
            assert report["world_size"] == 2, report["world_size"]


def _peer(rank: int, port: int, mode: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), RECONSTRUCT_DIST_TIMEOUT_S="3")
    from reconstruct import distributed

    with distributed.process_group("cpu"):
        distributed.barrier("starting")
        if rank == 1:
            if mode == "dead-peer":
                os._exit(3)  # dies without a word, as under SIGKILL or an out-of-memory kill
            time.sleep(60)  # hangs
            os._exit(0)
        started = time.monotonic()
        try:
            distributed.sum_floats([1.0], "summing after the peer is gone")
            outcome = "no error"
        except distributed.DistributedError as error:
            outcome = str(error)
        results.put((time.monotonic() - started, outcome))
        results.close()
        results.join_thread()  # flushed before the abrupt exit below
        os._exit(0)  # not through the process group's teardown, which would wait for the peer


def peers(mode: str, port: int) -> int:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_peer, args=(rank, port, mode, results)) for rank in (0, 1)]
    for process in processes:
        process.start()
    seconds, message = results.get(timeout=90)
    print(f"{seconds:.1f} s: {message}")
    for process in processes:
        process.kill()
        process.join()
    return 0 if message != "no error" else 1


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "prune":
        prune_runs(*sys.argv[2:6])
    else:
        sys.exit(peers(command, int(sys.argv[2])))
