"""Composable grow and prune policies: *when* (a trigger), *where* (a chooser), *how much*.

``Grow(when=EveryNSteps(100), where=RoundRobin(), fraction_of_initial=0.25, init="gradmax")``
reads as it runs. Triggers (when.py), choosers (where.py) and amounts (amount.py) keep their
own state, which ``state_dict``/``load_state_dict`` expose for a later resume.
"""

from __future__ import annotations

from typing import Any

from dynarch.errors import DynarchError
from dynarch.initializers import check_grouped, check_initializer
from dynarch.policies.amount import amount_from
from dynarch.policies.base import (
    Mutation,
    PolicyError,
    TrainState,
    check_fraction,
    check_positive,
    in_blocks,
    next_decision,
)
from dynarch.policies.budget import (
    absolute,
    check_limits,
    fit_growth,
    fit_pruning,
    limits_from,
)
from dynarch.policies.where import AllTargets
from dynarch.surgery.prune import check_importance


class Grow:
    """Grow the chosen targets when the trigger fires, by one amount: ``k``,
    ``fraction_of_initial`` or ``fraction_of_current`` of the width, or a measuring ``amount``
    (``North``, ``GradientSVD``); never past ``max_width`` channels per layer nor
    ``max_params`` parameters / ``max_macs`` MACs for the whole model."""

    def __init__(
        self,
        when: Any,
        where: Any,
        k: int | None = None,
        fraction_of_initial: float | None = None,
        fraction_of_current: float | None = None,
        amount: Any = None,
        init: str = "gradmax",
        init_options: dict[str, Any] | None = None,
        max_width: int | None = None,
        max_params: int | str | None = None,
        max_macs: int | str | None = None,
    ) -> None:
        self.amount = amount_from(k, fraction_of_initial, fraction_of_current, amount)
        max_width = check_positive("max_width", max_width, allow_none=True)
        self.limits = limits_from(max_params=max_params, max_macs=max_macs)
        self.when, self.where, self.max_width = when, where, max_width
        try:  # a misspelt init or option fails here, not at the first growth mid-run
            check_initializer(init, init_options)
        except DynarchError as exc:
            raise PolicyError(f"init: {exc}") from None
        self.init, self.init_options = init, dict(init_options or {})

    def check(self, state: TrainState) -> None:
        check_limits(state, self.limits, "max")
        _check_parts(self, state)
        pool = AllTargets.choose(self.where, state) if isinstance(self.where, AllTargets) else None
        grouped = [t for t in pool or state.targets() if state.blocks(t) > 1]
        try:  # before training, not at the first growth of a grouped conv's group
            check_grouped(self.init, grouped)
        except DynarchError as exc:
            raise PolicyError(f"init: {exc}; or exclude those layers") from None

    def next_step(self, state: TrainState) -> int | None:
        return next_decision(self.when, state)

    def decide(self, state: TrainState) -> list[Mutation]:
        fire, reason = self.when.should_act(state)
        if not fire:
            return []
        wanted, reasons = [], {}
        for target in self.where.choose(state):
            k, why = self.amount.how_many(state, target)
            blocks = state.blocks(target) if k > 0 else 1
            k = in_blocks(k, blocks)
            if self.max_width is not None:
                k = min(k, in_blocks(self.max_width - state.width(target), blocks, up=False))
            if k > 0:
                wanted.append((target, k))
                reasons[target] = _join(reason, _describe(self.where, target), why)
        return [
            Mutation(
                "grow",
                target,
                k,
                init=self.init,
                init_options=dict(self.init_options),
                reason=reasons[target],
            )
            for target, k in fit_growth(state, wanted, self.limits)
            if k > 0
        ]

    def state_dict(self) -> dict[str, Any]:
        return _states(self, ("when", "where", "amount"))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for part, saved in state.items():
            _load(getattr(self, part), saved)


class Prune:
    """Prune the chosen targets when the trigger fires, by a Torch-Pruning importance
    (magnitude, l1, taylor, bn_scale, lamp, random), by one amount: ``k`` channels or
    ``ratio`` of the current width each, or down to ``to_params`` parameters / ``to_macs`` MACs
    in one go (the same share of every chosen layer, the smallest that fits); never below
    ``min_width`` channels per layer."""

    def __init__(
        self,
        when: Any,
        where: Any,
        k: int | None = None,
        ratio: float | None = None,
        to_params: int | str | None = None,
        to_macs: int | str | None = None,
        importance: str = "magnitude",
        min_width: int = 1,
    ) -> None:
        given = {"k": k, "ratio": ratio, "to_params": to_params, "to_macs": to_macs}
        named = [name for name, value in given.items() if value is not None]
        if len(named) != 1:
            raise PolicyError(
                "Prune needs exactly one of k, ratio, to_params or to_macs"
                + (f" (got {', '.join(named)})" if named else "")
            )
        k = check_positive("k", k, allow_none=True)
        ratio = check_fraction("ratio", ratio, allow_none=True, below_one=True)
        self.limits = limits_from(to_params=to_params, to_macs=to_macs)
        min_width = check_positive("min_width", min_width)
        try:
            check_importance(importance)
        except DynarchError as exc:
            raise PolicyError(str(exc)) from None
        self.when, self.where, self.k, self.ratio = when, where, k, ratio
        self.importance, self.min_width = importance, min_width

    def check(self, state: TrainState) -> None:
        _check_parts(self, state)

    def next_step(self, state: TrainState) -> int | None:
        return next_decision(self.when, state)

    def decide(self, state: TrainState) -> list[Mutation]:
        fire, reason = self.when.should_act(state)
        if not fire:
            return []
        targets = self.where.choose(state)
        if self.limits:
            planned, met = fit_pruning(state, targets, self.limits, self.min_width)
            limits = absolute(state, self.limits)
            goal = ", ".join(f"{what} <= {limit}" for what, limit in limits.items())
            reason = _join(reason, f"to {goal}" + ("" if met else " (not reachable)"))
        else:
            planned = [(t, self.k or int(self.ratio * state.width(t))) for t in targets]
        mutations = []
        for target, k in planned:
            blocks = state.blocks(target) if k > 0 else 1
            room = in_blocks(state.width(target) - self.min_width, blocks, up=False)
            k = min(in_blocks(k, blocks), room)
            if k > 0:
                why = _join(reason, _describe(self.where, target))
                mutations.append(
                    Mutation("prune", target, k, importance=self.importance, reason=why)
                )
        return mutations

    def state_dict(self) -> dict[str, Any]:
        return _states(self, ("when", "where"))

    load_state_dict = Grow.load_state_dict


class Compose:
    """All the policies' decisions, in order (e.g. grow one group, prune another)."""

    def __init__(self, policies: list[Any]) -> None:
        self.policies = list(policies)

    def check(self, state: TrainState) -> None:
        for p in self.policies:
            if hasattr(p, "check"):
                p.check(state)

    def decide(self, state: TrainState) -> list[Mutation]:
        return [m for p in self.policies for m in p.decide(state)]

    def next_step(self, state: TrainState) -> int | None:
        steps = (next_decision(p, state) for p in self.policies)
        return min((s for s in steps if s is not None), default=None)

    def state_dict(self) -> dict[str, Any]:
        return {str(i): _state_of(p) for i, p in enumerate(self.policies)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, p in enumerate(self.policies):
            _load(p, state[str(i)])


class Cycle:
    """Phases of ``steps`` steps (or a ``fraction`` of the run) each, one policy per phase
    (grow, then prune, then regrow...), repeated while the run lasts when ``repeat``."""

    def __init__(self, phases: list[dict[str, Any]], repeat: bool = True) -> None:
        if not phases:
            raise PolicyError("Cycle needs at least one phase")
        checked = []
        for i, phase in enumerate(phases):
            if ("steps" in phase) == ("fraction" in phase):
                raise PolicyError(f"phases[{i}] needs one of steps or fraction")
            if "steps" in phase:
                steps = check_positive(f"phases[{i}].steps", phase["steps"])
                checked.append({**phase, "steps": steps})
            else:
                fraction = check_fraction(f"phases[{i}].fraction", phase["fraction"])
                checked.append({**phase, "fraction": fraction})
        self.phases, self.repeat = checked, repeat

    def phase_at(self, step: int, total_steps: int) -> int | None:
        lengths = [
            p["steps"] if "steps" in p else max(1, round(p["fraction"] * total_steps))
            for p in self.phases
        ]
        period = sum(lengths)
        if step >= period and not self.repeat:
            return None
        offset = step % period
        for i, length in enumerate(lengths):
            if offset < length:
                return i
            offset -= length
        return None

    def check(self, state: TrainState) -> None:
        for phase in self.phases:
            if hasattr(phase["policy"], "check"):
                phase["policy"].check(state)

    def decide(self, state: TrainState) -> list[Mutation]:
        phase = self.phase_at(state.step, state.total_steps)
        if phase is None:
            return []
        decided = self.phases[phase]["policy"].decide(state)
        for m in decided:
            m.reason = f"phase {phase}: {m.reason}"
        return decided

    def state_dict(self) -> dict[str, Any]:
        return {str(i): _state_of(phase["policy"]) for i, phase in enumerate(self.phases)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, phase in enumerate(self.phases):
            _load(phase["policy"], state[str(i)])


def _check_parts(policy: Grow | Prune, state: TrainState) -> None:
    """The trigger's and chooser's own checks (e.g. layer selectors resolved as the run
    starts)."""
    for part in (policy.when, policy.where):
        if hasattr(part, "check"):
            part.check(state)


def _describe(chooser: Any, target: str) -> str:
    describe = getattr(chooser, "describe", None)
    return describe(target) if describe is not None else ""


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _states(policy: Any, parts: tuple[str, ...]) -> dict[str, Any]:
    """The state of the parts that keep any (counters, positions, running references)."""
    return {
        part: getattr(policy, part).state_dict()
        for part in parts
        if hasattr(getattr(policy, part), "state_dict")
    }


def _state_of(obj: Any) -> dict[str, Any]:
    return obj.state_dict() if hasattr(obj, "state_dict") else {}


def _load(obj: Any, state: dict[str, Any]) -> None:
    if hasattr(obj, "load_state_dict"):
        obj.load_state_dict(state)
