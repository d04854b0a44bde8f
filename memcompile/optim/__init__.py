"""Optimizers for memory-efficient training."""
from memcompile.optim.fira import Fira, fira_param_groups

__all__ = ["Fira", "fira_param_groups"]
