"""Policies decide when, where and how the architecture changes (see base.py for the contract)."""

from dynarch.policies.base import Mutation, Policy, TrainState, count_macs
from dynarch.policies.schedule import Schedule, ScheduleError, Static

__all__ = ["Mutation", "Policy", "Schedule", "ScheduleError", "Static", "TrainState", "count_macs"]
