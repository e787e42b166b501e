"""Several processes, one result: `torchrun --nproc_per_node 2` on the CPU (gloo) gives the model one
process gives, and one output directory has one writer.

* Wanda and SparseGPT without a correction: 2-rank shards byte-identical to 1-rank shards (uneven
  shares: 15 windows on 2 ranks);
* MaskLoRA (global --fit-batch-size 2): a rank killed mid-run makes the run fail; a 1-process
  --resume is refused; the 2-rank --resume finishes with the 1-rank zeros and weights within float
  tolerance;
* a peer that dies or hangs makes a collective fail within bounded time;
* two runs with the same --out: the second fails at once naming the holder, the first is unharmed.

Every child process runs under a timeout, so that a hang fails the test instead of stalling it. The
1-rank references run at one thread, like each torchrun process (OMP_NUM_THREADS=1): on the CPU,
SparseGPT's fp32 arithmetic depends on the thread count, not on the number of ranks.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import model_and_text, saved_tensors, wait_until_locked
from distributed_worker import NSAMPLES, PRUNE_RUNS, SEQLEN

BLOCKS = 3
TESTS = Path(__file__).parent
MASKLORA = ["--method", "wanda", "--correction", "masklora", "--rank", "4", "--steps", "30", "--lr", "3e-4",
            "--fit-batch-size", "2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return model_and_text(tmp_path_factory.mktemp("distributed"), BLOCKS)


def environment(**extra) -> dict:
    pythonpath = os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", RECONSTRUCT_DIST_TIMEOUT_S="60", **extra)


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--monitor-interval", "0.2", *args]


def prune_args(setup, out: Path, *extra: str) -> list[str]:
    root, model, text = setup
    return ["prune", str(model), "--out", str(out), "--calib", str(text), "--nsamples", str(NSAMPLES),
            "--seqlen", str(SEQLEN), "--device", "cpu", "--cache-dir", str(root / "cache"), *extra]


@contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_rank(setup, out: Path, *extra: str) -> Path:
    """The reference: the same command on one process (in this one), at one thread."""
    from reconstruct.cli import main

    with one_thread():
        assert main(prune_args(setup, out, *extra)) == 0
    return out


def shards(directory: Path) -> list[Path]:
    found = sorted(directory.glob("model-*.safetensors"))
    assert len(found) == BLOCKS + 1, found
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------------------------------
def test_shares_are_contiguous_and_cover_everything(monkeypatch):
    from reconstruct import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    shares = []
    for rank in range(4):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shares.append(distributed.shard(15))
    assert [len(s) for s in shares] == [3, 4, 4, 4]
    assert [w for s in shares for w in s] == list(range(15))


def test_work_is_shared_out_costliest_first_to_the_least_loaded_rank(monkeypatch):
    from reconstruct import distributed

    assert distributed.owners([5, 1, 3]) == [0, 0, 0]  # one process does everything
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    # q, k, v, o (1 each), gate, up (3 each), down (10): down alone on one rank, the rest on the other
    assert distributed.owners([1, 1, 1, 1, 3, 3, 10]) == [1, 1, 1, 1, 1, 1, 0]
    assert distributed.owners([2, 2, 2]) == [0, 1, 0]  # ties go to the lower rank


def test_without_torchrun_every_helper_is_a_no_op():
    from reconstruct import distributed

    tensor = torch.arange(3.0)
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert distributed.all_reduce_sum(tensor, "x") is tensor and tensor.tolist() == [0.0, 1.0, 2.0]
    assert distributed.sum_floats([1.5], "x") == [1.5]
    assert distributed.broadcast_object({"a": 1}, "x") == {"a": 1}
    assert distributed.broadcast_(tensor, 0, "x") is tensor
    assert distributed.on_main(lambda: 7, "x") == 7
    distributed.check_identical({"t": [tensor]}, "x")
    distributed.barrier("x")
    assert list(distributed.shard(5)) == list(range(5))


def test_checksum_sees_a_changed_byte():
    from reconstruct.distributed import checksum

    a = torch.randn(1000)
    b = a.clone()
    b[517] = torch.nextafter(b[517], torch.tensor(1e9))
    assert checksum([a]) == checksum([a.clone()]) and checksum([a]) != checksum([b])
    assert checksum([a[:500], a[500:]]) != checksum([a[500:], a[:500]])


@pytest.mark.parametrize("mode", ["dead-peer", "stuck-peer"])
def test_a_dead_or_stuck_peer_fails_the_others_in_bounded_time(mode):
    """Rank 1 exits abruptly (or hangs) after a barrier; rank 0's next collective raises
    DistributedError: at once for a dead peer (its connection closes), after the process group's
    timeout (3 s here) for a hung one."""
    result = subprocess.run([sys.executable, str(TESTS / "distributed_worker.py"), mode, str(free_port())],
                            capture_output=True, text=True, env=environment(), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    seconds = float(result.stdout.split(" s:")[0])
    assert "another rank failed, stopped or timed out" in result.stdout and "--resume" in result.stdout
    assert seconds < (2 if mode == "dead-peer" else 20), result.stdout


def test_two_ranks_give_one_rank_bytes_wanda_and_sparsegpt(setup):
    root, model, text = setup
    prefix = root / "two-ranks"
    launched = subprocess.run(torchrun(str(TESTS / "distributed_worker.py"), "prune", str(model), str(text),
                                       str(root / "cache"), str(prefix)),
                              capture_output=True, text=True, env=environment(), timeout=150)
    assert launched.returncode == 0, launched.stderr[-3000:]
    for name, settings in PRUNE_RUNS.items():
        reference = one_rank(setup, root / f"one-rank-{name}", "--method", settings["method"],
                             "--correction", settings["correction"])
        two = Path(f"{prefix}-{name}")
        for mine, theirs in zip(shards(two), shards(reference)):
            assert mine.read_bytes() == theirs.read_bytes(), f"{name}: {mine.name} differs from 1 rank"
        report = json.loads((two / "report.json").read_text())
        assert report["world_size"] == 2
        # Per-layer errors are sums over the first windows, wherever they are: equal up to rounding.
        one = json.loads((reference / "report.json").read_text())
        assert [l["rel_error"] for l in report["layers"]] == pytest.approx([l["rel_error"] for l in one["layers"]],
                                                                           rel=1e-5)


def _rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """LOCAL_RANK -> pid of torchrun's worker processes."""
    pids = {}
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for entry in environ:
            if entry.startswith(b"LOCAL_RANK="):
                pids[int(entry.split(b"=")[1])] = pid
    return pids


def _next_block(work: Path) -> int:
    try:
        return json.loads((work / "state.json").read_text())["next_block"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


@pytest.fixture(scope="module")
def masklora_reference(setup) -> Path:
    return one_rank(setup, setup[0] / "one-rank-masklora", *MASKLORA)


def test_killed_rank_fails_the_run_and_resume_gives_the_one_rank_model(setup, masklora_reference, capsys):
    root = setup[0]
    out = root / "killed"
    work = out.with_name(out.name + ".partial")
    launcher = subprocess.Popen(torchrun("-m", "reconstruct", *prune_args(setup, out, *MASKLORA)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment(), text=True)
    try:
        deadline = time.monotonic() + 240
        while _next_block(work) < 1:  # block 0 is written: kill rank 1 in the middle of the run
            assert launcher.poll() is None, f"the run ended before it could be killed: {launcher.stderr.read()}"
            assert time.monotonic() < deadline, "block 0 did not finish in time"
            time.sleep(0.01)
        os.kill(_rank_pids(launcher)[1], signal.SIGKILL)
        started = time.monotonic()
        _, stderr = launcher.communicate(timeout=120)
        failed_after = time.monotonic() - started
    finally:
        launcher.kill()
        launcher.wait()
    assert launcher.returncode != 0 and failed_after < 60, (launcher.returncode, failed_after)
    assert "Signal 9" in stderr or "SIGKILL" in stderr or "another rank failed" in stderr, stderr[-3000:]
    assert not out.exists() and 1 <= _next_block(work) < BLOCKS

    # One process cannot take over the two ranks' activations: a clear refusal, nothing touched.
    from reconstruct.cli import main

    state = (work / "state.json").read_bytes()
    capsys.readouterr()
    assert main(prune_args(setup, out, *MASKLORA, "--resume")) == 2
    message = capsys.readouterr().err
    assert "started with 2 process(es)" in message and "--nproc_per_node 2" in message, message
    assert (work / "state.json").read_bytes() == state

    resumed = subprocess.run(torchrun("-m", "reconstruct", *prune_args(setup, out, *MASKLORA, "--resume")),
                             capture_output=True, text=True, env=environment(), timeout=150)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not work.exists()

    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and [b["index"] for b in report["blocks"]] == list(range(BLOCKS))
    reference = saved_tensors(masklora_reference)
    two = saved_tensors(out)
    assert two.keys() == reference.keys()
    largest = max(float((two[k].float() - reference[k].float()).abs().max()) for k in two)
    print(f"MaskLoRA, 2 ranks vs 1: max |dw| = {largest:.3g}")
    for name in two:
        assert torch.equal(two[name] == 0, reference[name] == 0), f"{name}: zeros differ from 1 rank"
    assert largest < 1e-5


# --------------------------------------------------------------------------------------------------
def test_lock_is_exclusive_names_its_holder_and_survives_a_killed_holder(tmp_path):
    from reconstruct.lock import OutputLockedError, exclusive_lock, lock_path

    out = tmp_path / "out"
    with exclusive_lock(out):
        with pytest.raises(OutputLockedError, match=rf"pid {os.getpid()} on {socket.gethostname()}, started"):
            with exclusive_lock(out):
                pass
    assert not lock_path(out).exists()  # released and removed

    # A killed holder leaves the file but no lock (the kernel drops it): the next run goes ahead.
    lock_path(out).write_text('{"pid": 1, "host": "gone", "started": "earlier"}\n')
    with exclusive_lock(out):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()


def test_second_run_with_the_same_out_fails_at_once_and_the_first_is_unharmed(setup, masklora_reference):
    from reconstruct.api import prune
    from reconstruct.lock import OutputLockedError, lock_path

    root, model, text = setup
    out = root / "contested"
    first = subprocess.Popen([sys.executable, "-m", "reconstruct", *prune_args(setup, out, *MASKLORA)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment(), text=True)
    try:
        wait_until_locked(first, out)
        started = time.monotonic()
        with pytest.raises(OutputLockedError, match=rf"being written by another run \(pid {first.pid} on"):
            prune(str(model), str(out), calib=str(text), nsamples=NSAMPLES, seqlen=SEQLEN, device="cpu",
                  cache_dir=str(root / "cache"), correction="none", overwrite=True)
        assert time.monotonic() - started < 2  # at once: before opening the model or reading data
        assert first.poll() is None  # the second attempt ended while the first was still running
        _, stderr = first.communicate(timeout=240)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 0, stderr[-3000:]
    for mine, theirs in zip(shards(out), shards(masklora_reference)):
        assert mine.read_bytes() == theirs.read_bytes(), mine.name
    assert not lock_path(out).exists()


# --------------------------------------------------------------------------------------------------
# Global retraining on two ranks: data parallel, the same command gives the same model
RETRAIN = ["--params", "masklora+norm", "--steps", "8", "--batch-size", "4", "--seqlen", "32", "--eval-every", "4",
           "--eval-windows", "3", "--save-every", "4", "--rank", "4", "--lr", "3e-3"]


def retrain_args(setup, pruned: Path, out: Path) -> list[str]:
    root, _, text = setup
    return ["retrain", str(pruned), "--out", str(out), "--data", str(text), "--device", "cpu",
            "--cache-dir", str(root / "cache"), *RETRAIN]


@pytest.fixture(scope="module")
def retrain_input(setup) -> Path:
    return one_rank(setup, setup[0] / "retrain-input", "--method", "magnitude", "--sparsity", "0.6",
                    "--correction", "none")


def compare_to_one_rank(two: Path, one: Path, what: str) -> float:
    """Assert the same zeros (+0.0) and weights within float tolerance; return max |dw|."""
    one, two = saved_tensors(one), saved_tensors(two)
    assert two.keys() == one.keys()
    largest = max(float((two[k].float() - one[k].float()).abs().max()) for k in two)
    print(f"{what}: max |dw| = {largest:.3g}")
    for name in two:
        assert torch.equal(two[name] == 0, one[name] == 0), f"{name}: zeros differ from 1 rank"
        assert not torch.signbit(two[name][two[name] == 0]).any(), f"{name}: a -0.0"
    return largest


def test_retrain_on_two_ranks_gives_the_one_rank_model(setup, retrain_input):
    from reconstruct.cli import main

    root = setup[0]
    with one_thread():
        assert main(retrain_args(setup, retrain_input, root / "retrain-one")) == 0
    launched = subprocess.run(torchrun("-m", "reconstruct", *retrain_args(setup, retrain_input, root / "retrain-two")),
                              capture_output=True, text=True, env=environment(), timeout=240)
    assert launched.returncode == 0, launched.stderr[-3000:]
    report = json.loads((root / "retrain-two" / "report.json").read_text())
    assert report["world_size"] == 2 and report["merged"] and not report["fsdp"]
    largest = compare_to_one_rank(root / "retrain-two", root / "retrain-one", "retrain masklora+norm, 2 ranks vs 1")
    assert 0 < largest < 1e-5  # float rounding only (the sums are taken in another order)


def _saved_step(out: Path) -> int:
    try:
        return json.loads((out.with_name(out.name + ".partial") / "state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


# 5 windows per step in passes of 1 and 3 held-out windows: 2 and 3 windows on the two ranks, so
# rank 0 runs uncounted passes to keep FSDP's collectives in step; 40 steps leave time to stop it.
FSDP_RETRAIN = ["--steps", "40", "--save-every", "2", "--batch-size", "5", "--grad-accum", "5"]


def test_retrain_fsdp_on_two_ranks_gives_the_one_rank_model_and_resumes(setup, retrain_input):
    """--fsdp: the weights sharded across 2 gloo ranks (FSDP2). Ctrl-C on rank 1 stops both after the
    same step with a saved state (sharded optimiser moments saved whole); --resume on 2 ranks with
    --fsdp finishes with the 1-rank zeros and weights within float tolerance."""
    from reconstruct.cli import main

    root = setup[0]
    one, out = root / "fsdp-one", root / "fsdp-two"
    with one_thread():
        assert main(retrain_args(setup, retrain_input, one) + FSDP_RETRAIN) == 0
    command = torchrun("-m", "reconstruct", *retrain_args(setup, retrain_input, out), *FSDP_RETRAIN, "--fsdp")
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment(), text=True)
    try:
        deadline = time.monotonic() + 240
        while _saved_step(out) < 4:
            assert launcher.poll() is None, f"the run ended before it could be stopped: {launcher.stderr.read()}"
            assert time.monotonic() < deadline, "no training state was saved in time"
            time.sleep(0.01)
        os.kill(_rank_pids(launcher)[1], signal.SIGINT)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
        launcher.wait()
    assert launcher.returncode != 0 and not out.exists(), stderr[-3000:]
    stopped_at = _saved_step(out)
    assert 4 <= stopped_at < 40, stopped_at

    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, env=environment(), timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["fsdp"] and report["merged"]
    assert len(report["loss_curve"]["loss"]) == 40
    largest = compare_to_one_rank(out, one, f"retrain --fsdp, 2 ranks (stopped at step {stopped_at}) vs 1")
    assert largest < 1e-5  # float rounding only


def test_gradients_are_summed_in_buckets_of_bounded_size(monkeypatch):
    """sum_gradients never copies every gradient at once: consecutive parameters in fp32 buckets of
    at most GRADIENT_BUCKET_BYTES, a larger parameter alone, the order kept."""
    from reconstruct import distributed

    monkeypatch.setattr(distributed, "GRADIENT_BUCKET_BYTES", 64)
    sizes = [4, 8, 30, 2, 2, 16, 1]
    parameters = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    buckets = distributed._gradient_buckets(parameters)
    assert [[p.numel() for p in bucket] for bucket in buckets] == [[4, 8], [30], [2, 2], [16], [1]]
    assert all(4 * sum(p.numel() for p in b) <= 64 for b in buckets if len(b) > 1)
