"""Budgets in parameters or MACs, kept exactly by trying a decision on a throwaway copy.

Counting what k more (or fewer) channels cost is exact only with every coupling accounted for
(the weights linking two layers grown in the same decision, flatten blocks, concatenations,
a layer that both feeds and consumes one group). Instead of a cost formula per layer type, the
decision is applied to a deep copy of the model with the real surgery and measured with the
same counters as the run's history. It runs only on steps where a budgeted policy fires.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from dynarch.graph import remember_example_inputs
from dynarch.models import count_params
from dynarch.policies.base import (
    PolicyError,
    TrainState,
    check_positive,
    count_macs,
    in_blocks,
)
from dynarch.surgery.grow import grow
from dynarch.surgery.prune import prune

COUNTERS: dict[str, Callable[[nn.Module], int]] = {"params": count_params, "macs": count_macs}

# Bisection steps over the shared pruning ratio: 2^-16 of a ratio is below one channel of any
# layer narrower than 65 536 channels.
_BISECTION_STEPS = 16


def trial_copy(model: nn.Module) -> nn.Module:
    """A deep copy that remembers the model's example inputs (to be mutated and measured)."""
    twin = copy.deepcopy(model)
    remember_example_inputs(twin, remember_example_inputs(model, None))
    return twin


def limits_from(**given: int | str | None) -> dict[str, int | str]:
    """``max_params=…, max_macs=…`` as ``{"params": …, "macs": …}``: a positive count, or a
    multiple of the model's size at the start of the run written ``"2x"`` (so that one preset
    fits every model)."""
    limits: dict[str, int | str] = {}
    for name, value in given.items():
        if isinstance(value, str):
            _multiple(name, value)
        else:
            value = check_positive(name, value, allow_none=True)
        if value is not None:
            limits[name.split("_", 1)[1]] = value
    return limits


def absolute(state: TrainState, limits: dict[str, int | str]) -> dict[str, int]:
    """The limits in parameters / MACs, multiples (``"2x"``) of the run's initial size
    (``state.initial_sizes``, which the controller fills) resolved."""
    resolved = {}
    for what, value in limits.items():
        if isinstance(value, str):
            if what not in state.initial_sizes:
                raise PolicyError(
                    f"a budget of {value} needs the {what} at the start of the run "
                    "(TrainState.initial_sizes)"
                )
            value = int(_multiple(what, value) * state.initial_sizes[what])
        resolved[what] = value
    return resolved


def _multiple(name: str, text: str) -> float:
    try:
        factor = float(text.strip().removesuffix("x")) if text.strip().endswith("x") else None
    except ValueError:
        factor = None
    if factor is None or not factor > 0 or factor == float("inf"):
        raise PolicyError(
            f"{name} must be a positive integer or a multiple of the initial size like '2x', "
            f"got {text!r}"
        )
    return factor


def check_limits(state: TrainState, limits: dict[str, int | str], prefix: str) -> None:
    """A budget below the model's size now cannot work: one line, before training."""
    for what, limit in absolute(state, limits).items():
        now = COUNTERS[what](state.model)
        if limit < now:
            raise PolicyError(f"{prefix}_{what} {limit} is below the model's {now} {what}")


def within_limits(model: nn.Module, limits: dict[str, int]) -> bool:
    return all(COUNTERS[what](model) <= limit for what, limit in limits.items())


def fit_growth(
    state: TrainState, wanted: list[tuple[str, int]], limits: dict[str, int | str]
) -> list[tuple[str, int]]:
    """The largest k <= wanted for each target in turn such that the model after the whole
    decision stays within ``limits`` (e.g. ``{"params": 50_000}``); k in steps of the
    target's blocks (one channel, or one per conv group of a grouped conv)."""
    if not limits:
        return wanted
    limits = absolute(state, limits)
    twin = trial_copy(state.model)
    fitted = []
    for target, k in wanted:
        step = state.blocks(target)
        before = {what: COUNTERS[what](twin) for what in limits}
        one = grow(twin, target, step)
        # cost is linear in one layer's width while the others stay fixed, except where a
        # layer consumes its own group; the check below catches that case
        fits = [
            (limit - before[what]) // max(1, COUNTERS[what](twin) - before[what])
            for what, limit in limits.items()
        ]
        prune(twin, target, idxs=one.indices)  # back as it was
        steps = max(0, min(k // step, *fits))
        while steps > 0:
            trial = trial_copy(twin)
            grow(trial, target, steps * step)
            if within_limits(trial, limits):
                twin = trial
                break
            steps -= 1
        fitted.append((target, steps * step))
    return fitted


def last_channels(width: int, blocks: int, k: int) -> list[int]:
    """The last ``k / blocks`` channels of each of ``blocks`` blocks of a ``width`` group
    (the last ``k`` for one block): a prune a group with grouped convs accepts."""
    size, per_block = width // blocks, k // blocks
    return [b * size + j for b in range(blocks) for j in range(size - per_block, size)]


def fit_pruning(
    state: TrainState, targets: list[str], limits: dict[str, int | str], min_width: int
) -> tuple[list[tuple[str, int]], bool]:
    """Prune the same share of every target's width, the smallest share that brings the model
    within ``limits`` (never below ``min_width`` channels). Returns (target, k) pairs and
    whether the limits are met (False: even pruning everything allowed is not enough)."""
    limits = absolute(state, limits)
    widths = {t: state.width(t) for t in targets}
    blocks = {t: state.blocks(t) for t in targets}

    def planned(target: str, share: float) -> int:  # whole blocks, min_width kept
        width, b = widths[target], blocks[target]
        return min(in_blocks(int(share * width), b), in_blocks(width - min_width, b, up=False))

    def plan(share: float) -> list[tuple[str, int]]:
        return [(t, planned(t, share)) for t in widths]

    def fits(share: float) -> bool:
        twin = trial_copy(state.model)
        for target, k in plan(share):
            if k > 0:
                prune(twin, target, idxs=last_channels(widths[target], blocks[target], k))
        return within_limits(twin, limits)

    if within_limits(state.model, limits):
        return [], True
    if not fits(1.0):
        return plan(1.0), False
    low, high = 0.0, 1.0  # fits(low) is False, fits(high) is True
    for _ in range(_BISECTION_STEPS):
        mid = (low + high) / 2
        if fits(mid):
            high = mid
        else:
            low = mid
    return plan(high), True
