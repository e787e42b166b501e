"""Fault injection: kill the process at a named point, to prove that a run killed there resumes.

    RECONSTRUCT_FAULT=NAME       SIGKILL the process the first time it reaches `fault_point(NAME)`
    RECONSTRUCT_FAULT=NAME@K     ... the K-th time (1-based)

Unset (always, outside tests), `fault_point` is one dictionary lookup. The variable is read once per
process (a forked child reads its own). SIGKILL rather than an exception: nothing is flushed, no
`finally` runs, exactly as when the machine or the out-of-memory killer stops a run.

The points, by command (tests/test_faults.py kills at each and compares the resumed output):

    prune     block-load, block-observe, block-prune, block-fit, block-replay, block-write
              (after each phase of a block), block-calls-saved
    retrain   retrain-step (after each step), retrain-random-state-saved (between each rank's random
              state and the training state), retrain-training-state-saved (before state.json)
    both      atomic-written (a file fully written under its temporary name, not yet renamed),
              finish-written (every output file in OUT.partial), finish-old-moved (the old OUT moved
              aside), finish-renamed (OUT.partial is OUT), finish-cleaning (part of the work files gone)
"""
from __future__ import annotations

import os
import signal

ENVIRONMENT_VARIABLE = "RECONSTRUCT_FAULT"

_plan: tuple[int, str | None, int] | None = None  # (pid that read it, the point's name, which time)
_reached: dict[str, int] = {}


def _read_plan() -> tuple[str | None, int]:
    global _plan
    if _plan is None or _plan[0] != os.getpid():  # a forked child reads the variable again
        spec = os.environ.get(ENVIRONMENT_VARIABLE) or None
        name, _, times = (spec or "").partition("@")
        _plan = (os.getpid(), name or None, int(times) if times else 1)
        _reached.clear()
    return _plan[1], _plan[2]


def fault_point(name: str) -> None:
    """SIGKILL this process here if RECONSTRUCT_FAULT names this point (and this is the time)."""
    target, times = _read_plan()
    if target != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == times:
        os.kill(os.getpid(), signal.SIGKILL)
