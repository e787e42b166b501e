"""reconstruct.progress: a bar on a terminal, a line now and then in a log, nothing when disabled."""
from __future__ import annotations

import io

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
