"""Depth as a policy: insert a layer when the trigger fires, at the next of a list of places.

``Deepen(when=EveryNSteps(200), after=["layer1.0", "layer2.0", "layer3.0"], kind="residual",
max_params=100_000)``: every 200 steps one residual block, after each stage's last block in
turn, never past the budget (tried on a copy, exact, as for growth).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dynarch.errors import DynarchError, close_matches
from dynarch.policies.base import Mutation, PolicyError, TrainState, next_decision
from dynarch.policies.budget import (
    absolute,
    check_limits,
    limits_from,
    trial_copy,
    within_limits,
)
from dynarch.policies.select import resolve
from dynarch.surgery.deepen import check_choice, deepen


class Deepen:
    """One new ``kind`` layer per trigger, after ``after[i]`` for i = 0, 1, ... round robin (a
    place deepened again gets its new layer right after it, before the earlier ones); skipped
    (the turn kept) while the model after it would exceed ``max_params``/``max_macs``.
    ``after`` takes module names or layer selectors (``conv[:]``: select.py), resolved
    against the model as the run starts."""

    def __init__(
        self,
        when: Any,
        after: Sequence[str],
        kind: str = "residual",
        init: str = "random",
        max_params: int | str | None = None,
        max_macs: int | str | None = None,
    ) -> None:
        if isinstance(after, str) or not after or not all(isinstance(a, str) for a in after):
            raise PolicyError(f"after must be a non-empty list of module names, got {after!r}")
        try:
            check_choice(kind, init)
        except DynarchError as exc:
            raise PolicyError(str(exc)) from None
        self.when, self.after, self.kind, self.init = when, list(after), kind, init
        self.limits = limits_from(max_params=max_params, max_macs=max_macs)
        self.turn = 0
        self.places: list[str] | None = None  # after, selectors resolved

    def check(self, state: TrainState) -> None:
        modules = {name for name, _ in state.model.named_modules()}
        for name in self._places(state):
            if name not in modules:
                raise PolicyError(f"after: no module named {name!r}" + close_matches(name, modules))
        check_limits(state, self.limits, "max")

    def next_step(self, state: TrainState) -> int | None:
        return next_decision(self.when, state)

    def decide(self, state: TrainState) -> list[Mutation]:
        fire, reason = self.when.should_act(state)
        if not fire:
            return []
        places = self._places(state)
        place = places[self.turn % len(places)]
        if self.limits:
            twin = trial_copy(state.model)
            deepen(twin, place, self.kind, norm=self.init != "gradmax")  # the same shapes
            if not within_limits(twin, absolute(state, self.limits)):
                return []
        self.turn += 1
        why = "; ".join(p for p in (reason, f"place {self.turn} of {len(places)}") if p)
        return [Mutation("deepen", place, kind=self.kind, init=self.init, reason=why)]

    def _places(self, state: TrainState) -> list[str]:
        if self.places is None:
            self.places = resolve(self.after, state)
        return self.places

    def state_dict(self) -> dict[str, Any]:
        when = self.when.state_dict() if hasattr(self.when, "state_dict") else {}
        return {"turn": self.turn, "when": when, "places": self.places}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.turn = int(state["turn"])
        self.places = state.get("places")
        if hasattr(self.when, "load_state_dict"):
            self.when.load_state_dict(state["when"])
