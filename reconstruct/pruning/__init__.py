"""Pruning methods behind one interface: `METHODS[name].prune(weight, stats, sparsity, pattern)`.

Adding a method: a new file here with a `PruningMethod` subclass (its `name` is the command line's
`--method`), and its class in the list below. The list is written out rather than filled by a
decorator in each file, so that the method files import only `base` and nothing imports back up.
"""
from .base import NMPattern, PruneResult, PruningError, PruningMethod
from .dsnot import DSnoT
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHODS: dict[str, PruningMethod] = {cls.name: cls() for cls in (DSnoT, Magnitude, SparseGPT, Wanda)}

__all__ = ["METHODS", "NMPattern", "PruneResult", "PruningError", "PruningMethod"]
