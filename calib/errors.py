"""The one error type of the `calib` package.

Every bad input that `calib` detects (a missing file, too little text, an unreachable hub, ...)
raises `CalibrationError` with a message that names the problem and says how to fix it, so that
the command line can print the message alone, without a traceback.
"""


class CalibrationError(ValueError):
    """Calibration or evaluation data cannot be produced from the given input."""


def require_positive(**values: int) -> None:
    """Raise CalibrationError unless every named integer is positive (e.g. nsamples=128)."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CalibrationError(f"{name} must be a positive integer, got {value!r}; "
                                   f"pass e.g. --{name} 128.")
