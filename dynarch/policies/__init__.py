"""Policies decide when, where and how the architecture changes (see base.py for the contract).

when.py: triggers; where.py: target choosers; amount.py: how many channels; budget.py:
parameter/MAC budgets; grow_prune.py: Grow, Prune and their combinations; schedule.py: fixed
schedules; select.py: layers by role (``conv[1]``); signals.py: the layer measurements
(NORTH, GradMax singular values) they use.
"""

from dynarch.policies.amount import (
    Fixed,
    FractionOfCurrent,
    FractionOfInitial,
    GradientSVD,
    North,
)
from dynarch.policies.base import Mutation, Policy, PolicyError, TrainState, count_macs
from dynarch.policies.depth import Deepen
from dynarch.policies.grow_prune import Compose, Cycle, Grow, Prune
from dynarch.policies.schedule import Schedule, ScheduleError, Static
from dynarch.policies.when import AtFractions, AtSteps, EveryFraction, EveryNSteps, LossPlateau
from dynarch.policies.where import AllTargets, RoundRobin, TopScored

__all__ = [
    "AllTargets",
    "AtFractions",
    "AtSteps",
    "Compose",
    "Cycle",
    "Deepen",
    "EveryFraction",
    "EveryNSteps",
    "Fixed",
    "FractionOfCurrent",
    "FractionOfInitial",
    "GradientSVD",
    "Grow",
    "LossPlateau",
    "Mutation",
    "North",
    "Policy",
    "PolicyError",
    "Prune",
    "RoundRobin",
    "Schedule",
    "ScheduleError",
    "Static",
    "TopScored",
    "TrainState",
    "count_macs",
]
