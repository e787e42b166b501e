"""A memory plan for `reconstruct retrain`, made from the model's config and the settings alone,
before any weight is read (issue 18).

    estimate(model_config, settings) -> MemoryPlan   the memory of those settings, item by item, and
                                                     the peak: which moment of a step, how much
    choose(model_config, settings, max_memory_bytes) -> Plan
                                                     the micro-batch and gradient checkpointing that
                                                     fit, never overriding a setting the user gave;
                                                     DoesNotFitError names what would fit instead
    plan.render() / plan.as_dict()                   the table `retrain --plan` prints, report.json's entry

It imports only the standard library, torch and transformers' config classes, so that the command
can print a plan before it opens the checkpoint.
"""
from .choose import DoesNotFitError, Plan, choose
from .estimate import MemoryPlan, estimate
from .settings import MemoryItem, PlanSettings
from .shapes import ModelShape, PlanError, model_shape

__all__ = ["DoesNotFitError", "MemoryItem", "MemoryPlan", "ModelShape", "Plan", "PlanError", "PlanSettings",
           "choose", "estimate", "model_shape"]
