"""Layer-wise pruning and repair: a model pruned and corrected one transformer block at a time.

driver.py is the loop (its docstring is the algorithm); pipeline.py the block's steps, state.py the
run directory's start, resume and resume point, report.py the errors and the report, and
preflight.py the checks before any work.
"""
from .driver import Driver, RunResult, run
from .pipeline import DENSE_TARGET_SHARE, blend_targets
from .report import LayerErrorMeter

__all__ = ["DENSE_TARGET_SHARE", "Driver", "LayerErrorMeter", "RunResult", "blend_targets", "run"]
