"""Policies decide when, where and how the architecture changes (see base.py for the contract)."""

from dynarch.policies.base import Mutation, Policy, TrainState, count_macs
from dynarch.policies.grow_prune import (
    AllTargets,
    AtSteps,
    Compose,
    Cycle,
    EveryNSteps,
    Grow,
    LossPlateau,
    PolicyError,
    Prune,
    RoundRobin,
)
from dynarch.policies.schedule import Schedule, ScheduleError, Static

__all__ = [
    "AllTargets",
    "AtSteps",
    "Compose",
    "Cycle",
    "EveryNSteps",
    "Grow",
    "LossPlateau",
    "Mutation",
    "Policy",
    "PolicyError",
    "Prune",
    "RoundRobin",
    "Schedule",
    "ScheduleError",
    "Static",
    "TrainState",
    "count_macs",
]
