"""What can go wrong with a checkpoint: reading one (CheckpointError) or writing one (OutputError)."""


class CheckpointError(ValueError):
    """The checkpoint's files are missing, truncated, corrupted or incomplete."""


class OutputError(OSError):
    """The output directory cannot be written (exists, disk full, not writable)."""
