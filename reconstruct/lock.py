"""One writer per output directory: an exclusive lock held for a whole run.

Two runs launched by mistake with the same `--out` would otherwise share `OUT.partial/` and
overwrite each other's files. `exclusive_lock(OUT)` holds an flock on the file `OUT.lock`, next to
`OUT` and `OUT.partial` (not inside: the work directory is deleted on a fresh start and renamed to
`OUT` at the end, and the lock must outlive both). A second run fails at once with
`OutputLockedError`, naming the holder (pid, host, start time), before it reads or writes anything.

The kernel releases an flock when its process dies, however it dies, so a lock left by a killed run
never blocks `--resume`; the file it leaves behind is reused. Take the lock before anything under
`OUT.partial` is deleted or written.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from . import distributed
from .checkpoint import OutputError


class OutputLockedError(OutputError):
    """Another live process holds the output directory's lock."""


def lock_path(directory: Path) -> Path:
    directory = Path(directory)
    return directory.with_name(directory.name + ".lock")


@contextmanager
def exclusive_lock(directory: Path | str):
    """Hold `<directory>.lock` exclusively for the duration of the `with` block.

    Raises OutputLockedError at once (never waits) when another process holds it."""
    path = lock_path(Path(directory))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = _acquire(path, Path(directory))
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "directory": str(directory)}
        handle.truncate(0)
        handle.write(json.dumps(holder) + "\n")
        handle.flush()
        yield path
    finally:
        # Unlinked while still held, so a run that opens the path from now on gets a fresh file; one
        # that opened the old file before the unlink notices the stale inode in _acquire.
        path.unlink(missing_ok=True)
        handle.close()


@contextmanager
def run_lock(directory: Path | str):
    """The lock of a run of one or several processes: rank 0 holds `exclusive_lock(directory)` for all
    of them, and every rank fails with the same error when another run holds it. Take it first of
    all, before anything is read or written."""
    with ExitStack() as held:
        distributed.on_main(lambda: held.enter_context(exclusive_lock(directory)), "locking the output directory")
        yield


def _acquire(path: Path, directory: Path):
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(error.errno, f"cannot lock {path}: {error.strerror}") from error
            raise OutputLockedError(errno.EBUSY, f"{directory} is being written by another run "
                                    f"({_describe(holder)}); wait for it to finish or stop it, or choose "
                                    "another --out. (A run that was killed holds no lock: --resume works "
                                    "after it.)") from None
        try:
            same_file = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            return handle
        handle.close()  # the holder released and removed the file between our open and flock: retry


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that is just starting"
