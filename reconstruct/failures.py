"""How a command that failed says so: bad input, a problem of the machine, or a bug.

* **Bad input**: an error we raise about what the user gave (settings, data, model, output
  directory), whose message says what to change. The message alone, exit code 2.
* **The machine**: the disk is full, a directory is not writable. The system's message alone,
  exit code 1: nothing to report, nothing in the input to change.
* **Anything else is a bug**, ours or a library's (a ValueError from deep inside torch is not the
  user's mistake): the traceback, a line asking for a report, exit code 1.
"""
from __future__ import annotations

import errno
import sys
import traceback

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

# Our error classes about the input, by module and name (subclasses count too, e.g. OutputLockedError
# is an OutputError). Named rather than imported: the modules that define them import torch and
# transformers, which a bad flag should not wait for. tests/test_failures.py checks that each name
# is a class and that every error class of the package is here or in NOT_BAD_INPUT.
BAD_INPUT_ERRORS = frozenset({
    "calib.errors.CalibrationError",
    "reconstruct.checkpoint.errors.CheckpointError",
    "reconstruct.checkpoint.errors.OutputError",
    "reconstruct.config.ConfigError",
    "reconstruct.corrections.base.CorrectionError",
    "reconstruct.eval.EvaluationError",
    "reconstruct.memory.DeviceMemoryError",
    "reconstruct.models.UnsupportedModelError",
    "reconstruct.plan.shapes.PlanError",
    "reconstruct.pruning.base.PruningError",
    "reconstruct.retraining.trainer.TrainingError",
})
# Error classes of the package that are not about the input: the command line reports them itself.
NOT_BAD_INPUT = frozenset({
    "reconstruct.distributed.DistributedError",  # another rank failed: one line, exit 1
    # Never reach the command line: the run directory and the layer-wise state turn them into an
    # OutputError or UnsupportedModelError that names the file or the model's argument
    "reconstruct.checkpoint.tree.DamagedTreeError",
    "reconstruct.checkpoint.tree.UnsavableValueError",
})
# OSErrors that the machine causes, not the input or the program.
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})

BUG_REPORT = ("this is a bug in reconstruct or a library it uses; please report it with the command line, "
              "the traceback above and the output of `pip list`")


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def is_bad_input(error: BaseException) -> bool:
    """True for the errors we raise about the input (see the module docstring)."""
    if type(error) is ImportError and error.name is None:
        # Ours: an optional extra is missing (lm-eval, matplotlib) and the message gives the pip
        # command. Python's own ImportErrors name the module, and a missing one is a bug or a
        # broken installation.
        return True
    return any(class_name(cls) in BAD_INPUT_ERRORS for cls in type(error).__mro__)


def is_device_out_of_memory(error: BaseException) -> bool:
    """torch's out-of-memory error (CUDA's and other accelerators'), named rather than imported."""
    return any(class_name(cls) == "torch.OutOfMemoryError" for cls in type(error).__mro__)


def message_of(error: BaseException) -> str:
    """The error's message. Our OSErrors carry (errno, message): the message alone, not
    "[Errno 17] message"; the system's keep the file they are about. An out-of-memory error that
    reached the command line unhandled: its first line, and what to change."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror + (f": {error.filename}" if error.filename else "")
    if is_device_out_of_memory(error):
        return (f"the device ran out of memory ({str(error).splitlines()[0] if str(error) else 'no details'}); "
                "lower --batch-size or --seqlen, use --dtype bf16, or a device with more free memory")
    return str(error)


def report_failure(command: str, error: Exception, verbose: bool = False) -> int:
    """Print what the user needs to know about `error` to stderr; return the exit code."""
    # A full disk is the machine's even when our message says so (and what to do about it).
    machine = isinstance(error, OSError) and error.errno in MACHINE_ERRNOS
    # Out of memory is the settings' size against the device's: the message says what to change
    if machine or is_bad_input(error) or is_device_out_of_memory(error):
        if verbose:
            traceback.print_exception(error)
        print(f"reconstruct {command}: error: {message_of(error)}", file=sys.stderr)
        return EXIT_FAILED if machine else EXIT_BAD_INPUT
    traceback.print_exception(error)
    print(f"reconstruct {command}: internal error: {type(error).__name__}: {error}\n{BUG_REPORT}",
          file=sys.stderr)
    return EXIT_FAILED
