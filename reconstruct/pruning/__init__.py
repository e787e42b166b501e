"""Pruning methods behind one interface: `METHODS[name].prune(weight, stats, sparsity, pattern)`.

Adding a method: a new file here with a `PruningMethod` subclass decorated by `@register`, plus its
import below.
"""
from .base import NMPattern, PruneResult, PruningError, PruningMethod

METHODS: dict[str, PruningMethod] = {}


def register(cls):
    METHODS[cls.name] = cls()
    return cls


from . import dsnot, magnitude, sparsegpt, wanda  # noqa: E402,F401  (registers the methods)

__all__ = ["METHODS", "NMPattern", "PruneResult", "PruningError", "PruningMethod", "register"]
