"""reconstruct: prune large language models block by block and repair them with sparsity-preserving
corrections fitted on calibration data (PERP), on one accelerator, with the model on disk."""

__version__ = "0.1.0"


def prune(model, out, **settings):
    """See `reconstruct.api.prune`."""
    from .api import prune as _prune

    return _prune(model, out, **settings)
