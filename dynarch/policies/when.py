"""*When* to act: triggers that fire at some steps and say why.

A trigger is any object with ``should_act(state) -> (fire, reason)``. Triggers keep their own
counters, exposed by ``state_dict``/``load_state_dict`` for a resume.
"""

from __future__ import annotations

import math
from typing import Any

from dynarch.policies.base import PolicyError, TrainState, check_positive
from dynarch.scalars import as_number


class EveryNSteps:
    """Fires at steps start, start + n, ... (before ``stop``, at most ``max_times`` times)."""

    def __init__(
        self, n: int, start: int = 0, stop: int | None = None, max_times: int | None = None
    ) -> None:
        n, max_times = check_positive("n", n), check_positive("max_times", max_times, True)
        self.n, self.start, self.stop, self.max_times, self.fired = n, start, stop, max_times, 0

    def should_act(self, state: TrainState) -> tuple[bool, str]:
        s = state.step
        due = s >= self.start and (s - self.start) % self.n == 0
        due = due and (self.stop is None or s < self.stop)
        due = due and (self.max_times is None or self.fired < self.max_times)
        if due:
            self.fired += 1
        return due, f"every {self.n} steps: step {s}"

    def next_step(self, state: TrainState) -> int | None:
        if self.max_times is not None and self.fired >= self.max_times:
            return None
        s = max(state.step, self.start)
        s += -(s - self.start) % self.n
        return s if self.stop is None or s < self.stop else None

    def state_dict(self) -> dict[str, Any]:
        return {"fired": self.fired}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fired = int(state["fired"])


class AtSteps:
    """Fires at the listed steps."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = sorted(int(s) for s in steps)

    def should_act(self, state: TrainState) -> tuple[bool, str]:
        return state.step in self.steps, f"at step {state.step}"

    def next_step(self, state: TrainState) -> int | None:
        return next((s for s in self.steps if s >= state.step), None)


class EveryFraction:
    """:class:`EveryNSteps` in fractions of the run, so one preset fits any run length: fires
    every ``every`` of the run's steps from ``start`` (default: ``every``), before ``stop``,
    at most ``max_times`` times. ``EveryFraction(0.1, max_times=4)`` fires at 10, 20, 30 and
    40 % of the run."""

    def __init__(
        self,
        every: float,
        start: float | None = None,
        stop: float = 1.0,
        max_times: int | None = None,
    ) -> None:
        start = every if start is None else start
        for name, value in (("every", every), ("start", start), ("stop", stop)):
            if not _is_fraction(value, allow_zero=name == "start") or value > 1:
                raise PolicyError(f"{name} must be a fraction of the run in [0, 1], got {value!r}")
        max_times = check_positive("max_times", max_times, allow_none=True)
        self.every, self.start, self.stop = float(every), float(start), float(stop)
        self.steps = EveryNSteps(1, max_times=max_times)

    def should_act(self, state: TrainState) -> tuple[bool, str]:
        fire, _ = self._in_steps(state).should_act(state)
        return fire, f"every {self.every:g} of the run: step {state.step} of {state.total_steps}"

    def next_step(self, state: TrainState) -> int | None:
        return self._in_steps(state).next_step(state)

    def _in_steps(self, state: TrainState) -> EveryNSteps:
        total = state.total_steps
        self.steps.n = max(1, round(self.every * total))
        self.steps.start, self.steps.stop = round(self.start * total), round(self.stop * total)
        return self.steps

    def state_dict(self) -> dict[str, Any]:
        return self.steps.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps.load_state_dict(state)


class AtFractions:
    """Fires once at each listed fraction of the run (0.5: the first step of its second half)."""

    def __init__(self, at: list[float]) -> None:
        if not at or not all(_is_fraction(a, allow_zero=True) and a < 1 for a in at):
            raise PolicyError(f"at must be a list of fractions of the run in [0, 1), got {at!r}")
        self.at = sorted(float(a) for a in at)

    def should_act(self, state: TrainState) -> tuple[bool, str]:
        hit = [a for a in self.at if round(a * state.total_steps) == state.step]
        return bool(hit), f"at {hit[0] if hit else 0:g} of the run: step {state.step}"

    def next_step(self, state: TrainState) -> int | None:
        steps = (round(a * state.total_steps) for a in self.at)
        return min((s for s in steps if s >= state.step), default=None)


def _is_fraction(value: Any, allow_zero: bool = False) -> bool:
    number = as_number(value)
    if number is None or not math.isfinite(number):
        return False
    return number >= 0 if allow_zero else number > 0


class LossPlateau:
    """Fires when the mean training loss of the last ``window`` steps has improved by less than
    ``min_delta`` (relative) over the best earlier window for ``patience`` steps; then waits
    ``patience`` steps before it can fire again."""

    def __init__(self, patience: int = 100, window: int = 20, min_delta: float = 0.01) -> None:
        patience, window = check_positive("patience", patience), check_positive("window", window)
        if min_delta < 0:
            raise PolicyError(f"min_delta must be >= 0, got {min_delta!r}")
        self.patience, self.window, self.min_delta = patience, window, min_delta
        self.best, self.best_step = math.inf, 0

    def should_act(self, state: TrainState) -> tuple[bool, str]:
        losses = state.train_losses
        if len(losses) < self.window:
            return False, ""
        current = sum(losses[-self.window :]) / self.window
        if current < self.best * (1 - self.min_delta):
            self.best, self.best_step = current, state.step
            return False, ""
        if state.step - self.best_step >= self.patience:
            self.best, self.best_step = current, state.step  # restart the patience
            return True, f"loss plateau: {current:.4g} for {self.patience} steps"
        return False, ""

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = float(state["best"]), int(state["best_step"])
