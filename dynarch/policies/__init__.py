"""Policies decide when, where and how the architecture changes (see base.py for the contract)."""

from dynarch.policies.base import Mutation, Policy, TrainState, count_macs

__all__ = ["Mutation", "Policy", "TrainState", "count_macs"]
