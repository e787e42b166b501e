"""The versions a run's report records, so that a result can be traced to the code that made it."""
from __future__ import annotations

import platform

import torch

from . import __version__


def package_versions() -> dict:
    import transformers  # slow to import: the package imports it only where it is used

    return {"reconstruct": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
