"""Progress of a long loop: a tqdm bar on a terminal, a plain line now and then otherwise.

A bar redrawn in place suits a person watching a terminal. In a log (stderr redirected to a file,
a batch job, CI) its carriage returns make one unreadable line, and tqdm's ``disable=None`` prints
nothing at all, so a run that takes minutes says nothing until it ends. Off a terminal, `Progress`
prints a line such as

    eval wikitext2: 40/166 windows (24%), 1 min 02 s elapsed, about 3 min 15 s left; loss 2.31

after the first item, then at most once every `LOG_INTERVAL_S` seconds (or, with `every=N`, after
every N items: a prune's block, a retraining's tenth step), and after the last item.

    with Progress(total=len(blocks), description="prune", unit="block") as progress:
        for block in blocks:
            ...
            progress.update(summary=f"error {error:.3g}")
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

# Off a terminal: at most one line per this many seconds (besides the first and the last), so that a
# log of a run of hours stays readable.
LOG_INTERVAL_S = 30.0


def is_terminal(stream: TextIO) -> bool:
    """True when `stream` is an interactive terminal (a closed or unusual stream is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def format_duration(seconds: float) -> str:
    """'41 s', '3 min 05 s', '2 h 07 min': precise enough for a progress line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """`total` items, `initial` of them done before (a resumed run); see the module docstring.

    `enabled=False` shows nothing (e.g. every rank but the first under torchrun). `stream` is
    where it goes (stderr by default); whether it is a terminal decides between bar and lines.
    """

    def __init__(self, total: int, description: str, unit: str = "item", *, initial: int = 0,
                 enabled: bool = True, stream: TextIO | None = None,
                 interval_s: float = LOG_INTERVAL_S, every: int = 0,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.description, self.unit = total, description, unit
        self.every = every  # > 0: off a terminal, a line after every this many items instead of by time
        self.done = self.initial = initial
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s, self.clock = interval_s, clock
        self.started = self.last_line = clock()
        self.lines_printed = 0
        self.bar = None
        self.enabled = enabled and total > initial
        if self.enabled and is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=description, unit=unit, file=self.stream,
                            dynamic_ncols=True)

    def update(self, count: int = 1, summary: str = "") -> None:
        """`count` more items are done; `summary` (e.g. the last item's loss) goes with them."""
        if not self.enabled:
            return
        self.done += count
        if self.bar is not None:
            if summary:
                self.bar.set_postfix_str(summary, refresh=False)
            self.bar.update(count)
            return
        now = self.clock()
        due = self.done % self.every == 0 if self.every > 0 else now - self.last_line >= self.interval_s
        if self.lines_printed == 0 or self.done >= self.total or due:
            self.last_line = now
            self.lines_printed += 1
            print(self.line(now, summary), file=self.stream, flush=True)

    def line(self, now: float, summary: str = "") -> str:
        """The progress line at time `now`: count, share, time so far and, while unfinished, time left."""
        elapsed = now - self.started
        unit = self.unit if self.total == 1 else f"{self.unit}s"
        text = (f"{self.description}: {self.done}/{self.total} {unit} ({100 * self.done / self.total:.0f}%), "
                f"{format_duration(elapsed)} elapsed")
        done_here = self.done - self.initial  # a resumed run's rate is what this process did
        if 0 < done_here and self.done < self.total:
            text += f", about {format_duration(elapsed / done_here * (self.total - self.done))} left"
        return f"{text}; {summary}" if summary else text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
