"""Layer-wise pruning and repair: a model pruned and corrected one transformer block at a time."""
from .driver import DENSE_TARGET_SHARE, Driver, LayerErrorMeter, RunResult, blend_targets, run, zero_count

__all__ = ["DENSE_TARGET_SHARE", "Driver", "LayerErrorMeter", "RunResult", "blend_targets", "run", "zero_count"]
