"""Fixed policies: a schedule of mutations given in advance, and no mutation at all."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dynarch.errors import DynarchError, close_matches
from dynarch.initializers import check_initializer
from dynarch.policies.base import Mutation, TrainState
from dynarch.surgery.deepen import check_choice, inserted_name
from dynarch.surgery.prune import check_importance

OPS = ("grow", "prune", "deepen")
_ENTRY_KEYS = {
    "grow": {"epoch", "step", "op", "target", "k", "init", "init_options"},
    "prune": {"epoch", "step", "op", "target", "k", "importance"},
    "deepen": {"epoch", "step", "op", "after", "kind", "init"},
}


class ScheduleError(DynarchError):
    """A schedule entry that cannot work; the message names the entry and the problem."""


@dataclass(frozen=True)
class _Entry:
    index: int
    when: float  # epoch (float) or step (int), see ``in_steps``
    in_steps: bool
    mutation: Mutation

    def step(self, state: TrainState) -> int:
        if self.in_steps:
            return int(self.when)
        return int(round(self.when * state.steps_per_epoch))


class Static:
    """Never changes the architecture: the static baselines of a study."""

    def decide(self, state: TrainState) -> list[Mutation]:
        return []


class Schedule:
    """Mutations at given epochs (``epoch: 2.0`` = before the first step after two full epochs)
    or steps, in listed order for equal times. Every entry is checked when the policy is built
    and against the real model (targets, widths through the whole schedule) before training."""

    def __init__(self, mutations: list[Mapping[str, Any]]) -> None:
        self.entries = _parse(mutations)
        self.done = 0  # how many entries, in order of their step, have been applied

    def check(self, state: TrainState) -> None:
        graph = state.graph
        widths = {g.name: g.width for g in graph.groups}
        modules = {name for name, _ in state.model.named_modules()}
        inserted: list[str] = []  # layers earlier deepen entries will have added
        for e in sorted(self.entries, key=lambda e: e.step(state)):
            where, m = f"schedule[{e.index}]", e.mutation
            if not 0 <= e.step(state) < state.total_steps:
                raise ScheduleError(
                    f"{where}: {'step' if e.in_steps else 'epoch'} {e.when:g} is outside the run "
                    f"({state.total_steps} steps, {state.total_steps / state.steps_per_epoch:g} "
                    "epochs)"
                )
            if m.op == "deepen":
                inserted.append(_check_deepen(where, m, modules, inserted))
            elif not any(m.target.startswith(f"{name}.") for name in inserted):
                _check_width(where, m, graph, widths)

    def decide(self, state: TrainState) -> list[Mutation]:
        # epochs become steps only now (steps per epoch are known), in listed order for ties
        order = sorted(self.entries, key=lambda e: (e.step(state), e.index))
        due = []
        while self.done < len(order) and order[self.done].step(state) <= state.step:
            e = order[self.done]
            unit = "step" if e.in_steps else "epoch"
            due.append(
                Mutation(**{**e.mutation.__dict__, "reason": f"schedule: {unit} {e.when:g}"})
            )
            self.done += 1
        return due

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = int(state["done"])


def _check_deepen(where: str, m: Mutation, modules: set[str], inserted: list[str]) -> str:
    """``m.target`` exists (now or after an earlier entry); the name the new layer will get."""
    known = modules | set(inserted)
    if m.target not in known and not any(m.target.startswith(f"{n}.") for n in inserted):
        raise ScheduleError(
            f"{where}: no module named {m.target!r} to deepen after"
            + close_matches(m.target, known)
        )
    return inserted_name(m.target, known)


def _check_width(where: str, m: Mutation, graph: Any, widths: dict[str, int]) -> None:
    """``m.target`` is a target and its group keeps at least one channel; ``widths`` follows."""
    targets = graph.targets()
    if m.target not in targets:
        known = graph.group_by_module.get(m.target)
        if known is not None and known.at_output:
            problem = f"{m.target!r} produces the model's output, whose width is fixed"
        elif known is not None and known.unsupported:
            problem = f"cannot change the channels of {m.target!r}: {known.unsupported}"
        else:
            problem = f"unknown target {m.target!r}"
        raise ScheduleError(
            f"{where}: {problem}; targets: {', '.join(targets)}" + close_matches(m.target, targets)
        )
    group = graph.group_of(m.target).name
    change = m.k if m.op == "grow" else -m.k
    if widths[group] + change < 1:
        raise ScheduleError(
            f"{where}: pruning {m.k} channels of {m.target!r} would leave "
            f"{widths[group] + change} (its width is {widths[group]} then)"
        )
    widths[group] += change


def _parse(entries: Any) -> list[_Entry]:
    if entries is None:
        return []
    if not isinstance(entries, (list, tuple)):
        raise ScheduleError(f"schedule must be a list of mutations, got {type(entries).__name__}")
    parsed = []
    for index, entry in enumerate(entries):
        where = f"schedule[{index}]"
        if not isinstance(entry, Mapping):
            raise ScheduleError(f"{where} must be a mapping like {{epoch, op, target, k}}")
        op = entry.get("op")
        if op not in OPS:
            raise ScheduleError(
                f"{where}: unknown op {op!r}; valid ops: {', '.join(OPS)}"
                + close_matches(str(op), OPS)
            )
        unknown = sorted(set(entry) - _ENTRY_KEYS[op])
        if unknown:
            raise ScheduleError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for op {op!r}; "
                f"allowed: {', '.join(sorted(_ENTRY_KEYS[op]))}"
            )
        if ("epoch" in entry) == ("step" in entry):
            raise ScheduleError(f"{where}: give exactly one of epoch or step")
        in_steps = "step" in entry
        when = entry["step" if in_steps else "epoch"]
        if isinstance(when, bool) or not isinstance(when, (int, float)) or math.isnan(when):
            raise ScheduleError(f"{where}: epoch/step must be a number, got {when!r}")
        if when < 0:
            raise ScheduleError(f"{where}: epoch/step must be >= 0, got {when!r}")
        parsed.append(_Entry(index, float(when), in_steps, _mutation(where, op, entry)))
    return parsed


def _mutation(where: str, op: str, entry: Mapping[str, Any]) -> Mutation:
    """The entry's mutation, its names and values checked (initializer options included)."""
    if op == "deepen":
        after, kind, init = (
            entry.get("after"),
            entry.get("kind", "conv"),
            entry.get("init", "random"),
        )
        if not isinstance(after, str) or not after:
            raise ScheduleError(f"{where}: after must be a module name, got {after!r}")
        try:
            check_choice(str(kind), str(init))
        except DynarchError as exc:
            raise ScheduleError(f"{where}: {exc}") from None
        return Mutation(op="deepen", target=after, kind=kind, init=init)
    missing = sorted({"target", "k"} - set(entry))
    if missing:
        raise ScheduleError(f"{where}: missing {', '.join(missing)}")
    target, k = entry["target"], entry["k"]
    if not isinstance(target, str) or not target:
        raise ScheduleError(f"{where}: target must be a module name, got {target!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ScheduleError(f"{where}: k must be a positive integer, got {k!r}")
    mutation = Mutation(op=op, target=target, k=k)
    try:
        if op == "grow":
            mutation.init = entry.get("init", "random")
            mutation.init_options = dict(entry.get("init_options") or {})
            check_initializer(mutation.init, mutation.init_options)
        else:
            mutation.importance = check_importance(entry.get("importance", "magnitude"))
    except DynarchError as exc:
        raise ScheduleError(f"{where}: {exc}") from None
    return mutation
