"""Optimiser factory (lr scaling, schedule), the one param-group builder and the per-step schedules."""

from mimlab.optim.factory import OptimizerFactory
from mimlab.optim.param_groups import ParamGroups
from mimlab.optim.schedule import WarmupCosine, WarmupMultiStep, WarmupPoly

__all__ = ["OptimizerFactory", "ParamGroups", "WarmupCosine", "WarmupMultiStep", "WarmupPoly"]
