"""Optimiser factory (lr scaling, param groups) and the per-step lr schedules (warm-up + cosine or multi-step)."""
from mimlab.optim.factory import OptimizerFactory, weight_decay_groups
from mimlab.optim.schedule import WarmupCosine, WarmupMultiStep

__all__ = ["OptimizerFactory", "WarmupCosine", "WarmupMultiStep", "weight_decay_groups"]
