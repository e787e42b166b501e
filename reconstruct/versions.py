"""The package's version, and the versions a run's report records, so that a result can be traced to
the code that made it. It lives here rather than in the package root so that the modules that record
it import down, never back up to `reconstruct/__init__.py`."""
from __future__ import annotations

import platform

__version__ = "0.1.0"  # keep equal to pyproject.toml's version


def package_versions() -> dict:
    import torch
    import transformers  # slow to import: the package imports it only where it is used

    return {"reconstruct": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
