"""reconstruct.progress: a bar on a terminal, a line now and then in a log, nothing when disabled; and
what prune and retrain print in a log."""
from __future__ import annotations

import io
import re

import pytest

from reconstruct.progress import Progress, format_duration


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_off_a_terminal_lines_come_first_then_at_most_every_interval_then_last():
    log, clock = io.StringIO(), Clock()
    progress = Progress(10, "prune", "block", stream=log, interval_s=30, clock=clock)
    for step in range(10):
        clock.now += 7  # an item every 7 s: 4-5 items per 30 s interval
        progress.update(summary=f"error {step}")
    lines = log.getvalue().splitlines()
    assert lines[0] == "prune: 1/10 blocks (10%), 7 s elapsed, about 1 min 03 s left; error 0"
    assert lines[1].startswith("prune: 6/10 blocks (60%), 42 s elapsed, about 28 s left")  # 35 s after the first
    assert lines[-1] == "prune: 10/10 blocks (100%), 1 min 10 s elapsed; error 9"
    assert len(lines) == 3
    assert "\r" not in log.getvalue()


def test_off_a_terminal_every_n_items_gives_a_line_after_every_nth_and_the_last():
    log, clock = io.StringIO(), Clock()
    progress = Progress(25, "retrain norm", "step", stream=log, every=10, clock=clock)
    for step in range(25):
        clock.now += 1
        progress.update(summary=f"loss {step}")
    assert [line.split(":")[1].split("(")[0].strip() for line in log.getvalue().splitlines()] == \
        ["1/25 steps", "10/25 steps", "20/25 steps", "25/25 steps"]


def test_prune_in_a_log_prints_one_line_per_block(tiny_checkpoint, prune_tiny, tmp_path, capsys):
    """stderr is not a terminal under capsys, as in a log: a line per block with its sparsity, error
    and what the correction did, the time so far and left."""
    prune_tiny(tiny_checkpoint("llama"), tmp_path / "out", correction="masklora", steps=2, rank=4)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prune: ")]
    assert [line.split(" (")[0] for line in lines] == ["prune: 1/2 blocks", "prune: 2/2 blocks"]
    assert "elapsed, about" in lines[0] and "left" not in lines[1]
    for line in lines:
        assert "; sparsity 0.500, mean layer error " in line and "held-out error" in line, line


def test_retrain_in_a_log_prints_a_line_every_ten_steps(tiny_checkpoint, prune_tiny, sample_text, token_cache,
                                                        tmp_path, capsys):
    from reconstruct.api import retrain

    pruned = tmp_path / "pruned"
    prune_tiny(tiny_checkpoint("llama"), pruned, method="magnitude")
    capsys.readouterr()
    retrain(str(pruned), str(tmp_path / "out"), params="norm", data=str(sample_text), steps=20, batch_size=1,
            seqlen=32, eval_every=10, eval_windows=1, save_every=0, device="cpu", cache_dir=str(token_cache))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("retrain norm: ")]
    assert [line.split(" (")[0] for line in lines] == ["retrain norm: 1/20 steps", "retrain norm: 10/20 steps",
                                                       "retrain norm: 20/20 steps"]
    assert all(re.search(r"; loss \d+\.\d{4}, [\d,]+ tokens/s", line) for line in lines)
    assert "about" in lines[1] and "held-out loss" in lines[1]


def test_a_resumed_run_counts_its_time_left_from_what_this_process_did():
    log, clock = io.StringIO(), Clock()
    progress = Progress(10, "retrain", "step", initial=6, stream=log, clock=clock)
    clock.now += 5
    progress.update()
    assert log.getvalue() == "retrain: 7/10 steps (70%), 5 s elapsed, about 15 s left\n"


def test_on_a_terminal_it_is_a_tqdm_bar_and_no_lines():
    terminal = Terminal()
    with Progress(4, "eval wikitext2", "window", stream=terminal) as progress:
        for _ in range(4):
            progress.update(summary="ppl so far 12.3")
    shown = terminal.getvalue()
    assert "\r" in shown and "4/4" in shown and "ppl so far 12.3" in shown
    assert "elapsed" not in shown


@pytest.mark.parametrize("stream", [io.StringIO(), Terminal()], ids=["log", "terminal"])
def test_disabled_or_already_done_shows_nothing(stream):
    for progress in (Progress(3, "rank 1", stream=stream, enabled=False),
                     Progress(3, "resumed at the end", initial=3, stream=stream)):
        progress.update()
        progress.close()
    assert stream.getvalue() == ""


@pytest.mark.parametrize("seconds, shown", [(0.4, "0 s"), (41, "41 s"), (185, "3 min 05 s"),
                                            (7620, "2 h 07 min")])
def test_durations_read_as_a_person_would_say_them(seconds, shown):
    assert format_duration(seconds) == shown
