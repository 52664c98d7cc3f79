"""Composable grow and prune policies: *when* (a trigger), *where* (targets), *how much*.

``Grow(when=EveryNSteps(100), where=RoundRobin(), fraction_of_initial=0.25, init="gradmax")``
reads as it runs. Triggers and target choosers keep their own state (counters, position), which
``state_dict``/``load_state_dict`` expose for a later resume.
"""

from __future__ import annotations

import math
from typing import Any

from dynarch.errors import DynarchError
from dynarch.policies.base import Mutation, TrainState


class PolicyError(DynarchError):
    """A policy argument that cannot work; the message names it."""


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PolicyError(f"{name} must be a positive integer, got {value!r}")


class EveryNSteps:
    """Fires at steps start, start + n, ... (before ``stop``, at most ``max_times`` times)."""

    def __init__(
        self, n: int, start: int = 0, stop: int | None = None, max_times: int | None = None
    ) -> None:
        _positive("n", n)
        _positive("max_times", max_times, allow_none=True)
        self.n, self.start, self.stop, self.max_times, self.fired = n, start, stop, max_times, 0

    def should_act(self, state: TrainState) -> tuple[bool, str]:
        s = state.step
        due = s >= self.start and (s - self.start) % self.n == 0
        due = due and (self.stop is None or s < self.stop)
        due = due and (self.max_times is None or self.fired < self.max_times)
        if due:
            self.fired += 1
        return due, f"every {self.n} steps: step {s}"

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


class LossPlateau:
    """Fires when the mean training loss of the last ``window`` steps has improved by less than
    ``min_delta`` (relative) over the best earlier window for ``patience`` steps; then waits
    ``patience`` steps before it can fire again."""

    def __init__(self, patience: int = 100, window: int = 20, min_delta: float = 0.01) -> None:
        _positive("patience", patience)
        _positive("window", window)
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


class AllTargets:
    """Every growable layer (or the given ones), except ``exclude``: the paper's all-at-once."""

    def __init__(self, targets: list[str] | None = None, exclude: list[str] | None = None) -> None:
        self.targets, self.exclude = targets, set(exclude or [])

    def choose(self, state: TrainState) -> list[str]:
        pool = self.targets if self.targets is not None else state.graph.targets()
        return [t for t in pool if t not in self.exclude]


class RoundRobin(AllTargets):
    """One target per firing, cycling through the list: the paper's round-robin."""

    def __init__(self, targets: list[str] | None = None, exclude: list[str] | None = None) -> None:
        super().__init__(targets, exclude)
        self.position = 0

    def choose(self, state: TrainState) -> list[str]:
        pool = super().choose(state)
        if not pool:
            return []
        target = pool[self.position % len(pool)]
        self.position += 1
        return [target]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


class Grow:
    """Grow the chosen targets when the trigger fires, by ``k`` or ⌈fraction x initial width⌉,
    never past ``max_width`` channels per layer nor ``max_params`` parameters in total."""

    def __init__(
        self,
        when: Any,
        where: Any,
        k: int | None = None,
        fraction_of_initial: float | None = None,
        init: str = "gradmax",
        init_options: dict[str, Any] | None = None,
        max_width: int | None = None,
        max_params: int | None = None,
    ) -> None:
        if (k is None) == (fraction_of_initial is None):
            raise PolicyError("Grow needs exactly one of k or fraction_of_initial")
        _positive("k", k, allow_none=True)
        if fraction_of_initial is not None and not fraction_of_initial > 0:
            raise PolicyError(f"fraction_of_initial must be > 0, got {fraction_of_initial!r}")
        _positive("max_width", max_width, allow_none=True)
        _positive("max_params", max_params, allow_none=True)
        self.when, self.where, self.k, self.fraction = when, where, k, fraction_of_initial
        self.init, self.init_options = init, dict(init_options or {})
        self.max_width, self.max_params = max_width, max_params

    def check(self, state: TrainState) -> None:
        if self.max_params is not None and self.max_params < state.params:
            raise PolicyError(
                f"max_params {self.max_params} is below the model's {state.params} parameters"
            )

    def decide(self, state: TrainState) -> list[Mutation]:
        fire, reason = self.when.should_act(state)
        if not fire:
            return []
        mutations: list[Mutation] = []
        budget = None if self.max_params is None else self.max_params - state.params
        for target in self.where.choose(state):
            width = state.width(target)
            k = self.k or math.ceil(self.fraction * state.initial_widths.get(target, width))
            if self.max_width is not None:
                k = min(k, self.max_width - width)
            if budget is not None:
                # one more channel costs its own rows/columns plus the weights that link it to
                # the channels this decision already adds to neighbouring layers
                per_channel = _params_per_channel(state, target) + sum(
                    m.k * _linking_params(state, target, m.target) for m in mutations
                )
                k = min(k, budget // max(1, per_channel))
            if k <= 0:
                continue
            if budget is not None:
                budget -= k * per_channel
            mutations.append(
                Mutation(
                    "grow",
                    target,
                    k,
                    init=self.init,
                    init_options=dict(self.init_options),
                    reason=reason,
                )
            )
        return mutations

    def state_dict(self) -> dict[str, Any]:
        return {"when": _state_of(self.when), "where": _state_of(self.where)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _load(self.when, state["when"])
        _load(self.where, state["where"])


class Prune:
    """Prune the chosen targets when the trigger fires: ``k`` channels or ``ratio`` of the
    current width, by a Torch-Pruning importance, never below ``min_width``."""

    def __init__(
        self,
        when: Any,
        where: Any,
        k: int | None = None,
        ratio: float | None = None,
        importance: str = "magnitude",
        min_width: int = 1,
    ) -> None:
        if (k is None) == (ratio is None):
            raise PolicyError("Prune needs exactly one of k or ratio")
        _positive("k", k, allow_none=True)
        if ratio is not None and not 0 < ratio < 1:
            raise PolicyError(f"ratio must be in (0, 1), got {ratio!r}")
        _positive("min_width", min_width)
        self.when, self.where, self.k, self.ratio = when, where, k, ratio
        self.importance, self.min_width = importance, min_width

    def decide(self, state: TrainState) -> list[Mutation]:
        fire, reason = self.when.should_act(state)
        if not fire:
            return []
        mutations = []
        for target in self.where.choose(state):
            width = state.width(target)
            k = self.k or int(self.ratio * width)
            k = min(k, width - self.min_width)
            if k > 0:
                mutations.append(
                    Mutation("prune", target, k, importance=self.importance, reason=reason)
                )
        return mutations

    state_dict = Grow.state_dict
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


class Cycle:
    """Phases of ``steps`` steps each, one policy per phase (grow, then prune, then regrow...),
    repeated while the run lasts when ``repeat``."""

    def __init__(self, phases: list[dict[str, Any]], repeat: bool = True) -> None:
        if not phases:
            raise PolicyError("Cycle needs at least one phase")
        for i, phase in enumerate(phases):
            _positive(f"phases[{i}].steps", phase.get("steps"))
        self.phases, self.repeat = phases, repeat

    def phase_at(self, step: int) -> int | None:
        period = sum(p["steps"] for p in self.phases)
        if step >= period and not self.repeat:
            return None
        offset = step % period
        for i, phase in enumerate(self.phases):
            if offset < phase["steps"]:
                return i
            offset -= phase["steps"]
        return None

    def decide(self, state: TrainState) -> list[Mutation]:
        phase = self.phase_at(state.step)
        if phase is None:
            return []
        decided = self.phases[phase]["policy"].decide(state)
        for m in decided:
            m.reason = f"phase {phase}: {m.reason}"
        return decided


def _params_per_channel(state: TrainState, target: str) -> int:
    """Parameters one more channel of ``target``'s group adds (its rows, columns, norms)."""
    group = state.graph.group_of(target)
    total = 0
    for m in group.members:
        module = state.model.get_submodule(m.module)
        for p in module.parameters(recurse=False):
            dim = 0 if m.role != "consumer" else 1
            if p.dim() > dim:
                total += p.numel() // p.shape[dim] * m.multiplicity
    return total


def _linking_params(state: TrainState, a: str, b: str) -> int:
    """Parameters joining one new channel of ``a``'s group to one new channel of ``b``'s group:
    a conv/linear that produces one group and consumes the other holds kernel-taps x
    multiplicity weights for every such pair."""
    ga, gb = state.graph.group_of(a), state.graph.group_of(b)
    total = 0
    for ma in ga.members:
        for mb in gb.members:
            if ma.module == mb.module and {ma.role, mb.role} == {"producer", "consumer"}:
                weight = state.model.get_submodule(ma.module).weight
                taps = weight[0, 0].numel() if weight.dim() > 2 else 1
                total += taps * (ma if ma.role == "consumer" else mb).multiplicity
    return total


def _state_of(obj: Any) -> dict[str, Any]:
    return obj.state_dict() if hasattr(obj, "state_dict") else {}


def _load(obj: Any, state: dict[str, Any]) -> None:
    if hasattr(obj, "load_state_dict"):
        obj.load_state_dict(state)
