"""Optimiser factory (lr scaling, param groups) and the per-step warm-up cosine schedule."""
from mimlab.optim.factory import OptimizerFactory, weight_decay_groups
from mimlab.optim.schedule import WarmupCosine

__all__ = ["OptimizerFactory", "WarmupCosine", "weight_decay_groups"]
