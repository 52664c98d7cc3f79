"""Fixed policies: a schedule of mutations given in advance, and no mutation at all."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from dynarch.errors import DynarchError, close_matches
from dynarch.initializers import check_grouped
from dynarch.ops import Op, op_named
from dynarch.policies.base import Mutation, TrainState, in_blocks
from dynarch.policies.select import resolve_one
from dynarch.scalars import as_number, as_positive
from dynarch.surgery.deepen import inserted_name
from dynarch.surgery.plan import check_memory

TIMES = ("epoch", "step", "at")  # at: a fraction of the run, so a preset fits any length
_CHANNEL_KEYS = ("target", "k", "fraction")  # an op that changes a layer's channels


def _entry_keys(op: Op) -> set[str]:
    """The keys a schedule entry of ``op`` may have (dynarch/ops.py's ``schedule_keys``)."""
    return {*TIMES, "op", *(() if op.adds_layer else _CHANNEL_KEYS), *op.schedule_keys}


class ScheduleError(DynarchError):
    """A schedule entry that cannot work; the message names the entry and the problem."""


@dataclass(frozen=True)
class _Entry:
    index: int
    when: float
    unit: str  # one of TIMES
    mutation: Mutation  # its target may be a selector (select.py), its k 0 with ``fraction``
    fraction: float | None = None  # k as a share of the group's width as the run starts

    def step(self, state: TrainState) -> int:
        if self.unit == "step":
            return int(self.when)
        scale = state.total_steps if self.unit == "at" else state.steps_per_epoch
        return int(round(self.when * scale))

    def resolved(self, state: TrainState) -> tuple[str, int | None]:
        """The layer and the channel count, selectors and fractions resolved."""
        where = f"schedule[{self.index}]"
        try:
            target = resolve_one(self.mutation.target, state)
        except DynarchError as exc:
            raise ScheduleError(f"{where}: {exc}") from None
        if self.fraction is None:
            return target, self.mutation.k
        width = state.initial_widths.get(target)
        if width is None:
            width = state.graph.group_of(target).width if target in state.graph.targets() else 0
        blocks = state.blocks(target) if target in state.graph.targets() else 1
        return target, in_blocks(max(1, round(self.fraction * width)), blocks)


class Static:
    """Never changes the architecture: the static baselines of a study."""

    def decide(self, state: TrainState) -> list[Mutation]:
        return []

    def next_step(self, state: TrainState) -> int | None:
        return None


class Schedule:
    """Mutations at given epochs (``epoch: 2.0`` = before the first step after two full epochs),
    steps, or fractions of the run (``at: 0.5``), in listed order for equal times. Layers are
    module names or selectors (``conv[1]``, select.py); ``fraction: 0.25`` instead of ``k``
    changes a quarter of the layer's width as the run starts. Every entry is checked when the
    policy is built and against the real model (targets, widths through the whole schedule)
    before training."""

    def __init__(self, mutations: list[Mapping[str, Any]]) -> None:
        self.entries = _parse(mutations)
        self.done = 0  # how many entries, in order of their step, have been applied
        self.resolved: list[tuple[str, int | None]] | None = None  # entry -> (target, k)

    def check(self, state: TrainState) -> None:
        entries = self._resolve(state)
        graph = state.graph
        widths = {g.name: g.width for g in graph.groups}
        modules = {name for name, _ in state.model.named_modules()}
        inserted: list[str] = []  # layers earlier deepen entries will have added
        for e in sorted(entries, key=lambda e: e.step(state)):
            where, m = f"schedule[{e.index}]", e.mutation
            if not 0 <= e.step(state) < state.total_steps:
                raise ScheduleError(
                    f"{where}: {e.unit} {e.when:g} is outside the run "
                    f"({state.total_steps} steps, {state.total_steps / state.steps_per_epoch:g} "
                    "epochs)"
                )
            op = op_named(m.op)
            if op.adds_layer:
                inserted.append(_check_deepen(where, m, modules, inserted))
            elif not any(m.target.startswith(f"{name}.") for name in inserted):
                _check_width(where, m, op.channels, graph, widths)
                if op.channels > 0:
                    _check_memory(where, m, graph, state.model)

    def decide(self, state: TrainState) -> list[Mutation]:
        # epochs become steps only now (steps per epoch are known), in listed order for ties
        order = sorted(self._resolve(state), key=lambda e: (e.step(state), e.index))
        due = []
        while self.done < len(order) and order[self.done].step(state) <= state.step:
            e = order[self.done]
            due.append(Mutation(**{**e.mutation.__dict__, "reason": f"schedule: {_when(e)}"}))
            self.done += 1
        return due

    def next_step(self, state: TrainState) -> int | None:
        order = sorted(e.step(state) for e in self.entries)
        return max(state.step, order[self.done]) if self.done < len(order) else None

    def _resolve(self, state: TrainState) -> list[_Entry]:
        """The entries with their layers and channel counts as the run started (kept in the
        state, so a resumed run uses the same ones)."""
        if self.resolved is None:
            self.resolved = [e.resolved(state) for e in self.entries]
        return [
            replace(e, mutation=replace(e.mutation, target=target, k=k))
            for e, (target, k) in zip(self.entries, self.resolved, strict=True)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "resolved": self.resolved}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = int(state["done"])
        resolved = state.get("resolved")
        if resolved is not None:
            self.resolved = [(t, None if k is None else int(k)) for t, k in resolved]


def _when(e: _Entry) -> str:
    return f"{e.when:g} of the run" if e.unit == "at" else f"{e.unit} {e.when:g}"


def _check_deepen(where: str, m: Mutation, modules: set[str], inserted: list[str]) -> str:
    """``m.target`` exists (now or after an earlier entry); the name the new layer will get."""
    known = modules | set(inserted)
    if m.target not in known and not any(m.target.startswith(f"{n}.") for n in inserted):
        raise ScheduleError(
            f"{where}: no module named {m.target!r} to deepen after"
            + close_matches(m.target, known)
        )
    return inserted_name(m.target, known)


def _check_width(where: str, m: Mutation, sign: int, graph: Any, widths: dict[str, int]) -> None:
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
    group = graph.group_of(m.target)
    if group.blocks > 1 and sign > 0:
        try:
            check_grouped(m.init, [m.target])
        except DynarchError as exc:
            raise ScheduleError(f"{where}: {exc}") from None
    if m.k % group.blocks:
        raise ScheduleError(
            f"{where}: {m.target!r}'s channels are in {group.blocks} blocks (grouped convs), "
            f"so k must be a multiple of {group.blocks}, got {m.k}"
        )
    change = sign * m.k
    if widths[group.name] + change < 1:
        raise ScheduleError(
            f"{where}: pruning {m.k} channels of {m.target!r} would leave "
            f"{widths[group.name] + change} (its width is {widths[group.name]} then)"
        )
    widths[group.name] += change


def _check_memory(where: str, m: Mutation, graph: Any, model: nn.Module) -> None:
    """A growth too large for the machine's memory is refused before training, not when it
    is due (``grow`` checks again, counting the optimizer's state too)."""
    group = graph.group_of(m.target)
    modules = {name: model.get_submodule(name) for name in group.member_modules()}
    try:
        check_memory(group, modules, m.k, f"growing {m.target!r}")
    except DynarchError as exc:
        raise ScheduleError(f"{where}: {exc}") from None


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
        op = _op(where, entry.get("op"))
        allowed = _entry_keys(op)
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise ScheduleError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for op {op.name!r}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )
        units = [unit for unit in TIMES if unit in entry]
        if len(units) != 1:
            raise ScheduleError(f"{where}: give exactly one of epoch, step or at")
        unit, when = units[0], entry[units[0]]
        number = as_number(when)
        if number is None or math.isnan(number):
            raise ScheduleError(f"{where}: {unit} must be a number, got {when!r}")
        if number < 0 or (unit == "at" and number >= 1):
            bound = "a fraction of the run in [0, 1)" if unit == "at" else ">= 0"
            raise ScheduleError(f"{where}: {unit} must be {bound}, got {when!r}")
        mutation, fraction = _mutation(where, op, entry)
        parsed.append(_Entry(index, number, unit, mutation, fraction))
    return parsed


def _op(where: str, name: Any) -> Op:
    try:
        return op_named(name)
    except DynarchError as exc:  # op_named's line: the known ops, the closest names
        raise ScheduleError(f"{where}: {exc}") from None


def _mutation(where: str, op: Op, entry: Mapping[str, Any]) -> tuple[Mutation, float | None]:
    """The entry's mutation, its names and values checked (by its op: initializer options,
    importance, the inserted layer's kind), and the share of the width it changes when given
    as ``fraction`` instead of ``k``."""
    mutation, fraction = Mutation(op=op.name, target=""), None
    if not op.adds_layer:
        mutation, fraction = _channels(where, op, entry)
    try:
        fields = op.schedule_fields(entry)
    except DynarchError as exc:
        raise ScheduleError(f"{where}: {exc}") from None
    return replace(mutation, **fields), fraction


def _channels(where: str, op: Op, entry: Mapping[str, Any]) -> tuple[Mutation, float | None]:
    """The target and the count (``k``, or ``fraction`` of the width) of a channel op."""
    if "target" not in entry or ("k" in entry) == ("fraction" in entry):
        raise ScheduleError(f"{where}: give a target and one of k or fraction")
    target, k, fraction = entry["target"], entry.get("k", 0), entry.get("fraction")
    if not isinstance(target, str) or not target:
        raise ScheduleError(f"{where}: target must be a module name, got {target!r}")
    if fraction is None:
        k, given = as_positive(k), k
        if k is None:
            raise ScheduleError(f"{where}: k must be a positive integer, got {given!r}")
    else:
        fraction, given = as_number(fraction), fraction
        if fraction is None or not fraction > 0:
            raise ScheduleError(f"{where}: fraction must be a number > 0, got {given!r}")
    return Mutation(op=op.name, target=target, k=k), fraction
