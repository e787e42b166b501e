"""reconstruct: prune large language models block by block and repair them with sparsity-preserving
corrections fitted on calibration data (PERP), on one accelerator, with the model on disk."""

from .versions import __version__


def __getattr__(name):
    """`reconstruct.prune(...)` and `reconstruct.retrain(...)`: `reconstruct.api`'s, imported on first
    use, so that `import reconstruct` (and the command line's start-up) stays light."""
    if name in ("prune", "retrain"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
