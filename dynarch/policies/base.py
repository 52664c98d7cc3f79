"""What a policy sees and what it returns: the contract between the controller and policies.

A policy is any object with ``decide(state) -> list[Mutation]``. The session asks it before a
training step, applies the returned mutations in order (grow/prune through the same
optimizer), and records them with the policy's ``reason``. A policy that knows when it acts
next says so with ``next_step(state) -> int | None`` (the first step, at or after
``state.step``, at which ``decide`` may act; None: never again); it is asked only from then
on, so the steps between read nothing from the device (the losses it reads are gathered in
one transfer when it is asked). One without ``next_step`` is asked every step. Policies are
built from configs by Hydra's ``_target_``, so a user's own class needs no change to dynarch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from dynarch.errors import DynarchError
from dynarch.graph import ArchGraph, remember_example_inputs
from dynarch.layer_kinds import channel_blocks
from dynarch.probes import buffers_restored, modes_restored
from dynarch.scalars import as_number, as_positive
from dynarch.tp_adapter import count_ops_and_params


def in_blocks(k: int, blocks: int, up: bool = True) -> int:
    """``k`` channels as a whole number of ``blocks`` (a group with grouped convs changes by
    a multiple of their groups): rounded up (an amount), or down (a cap)."""
    return -(-k // blocks) * blocks if up else k // blocks * blocks


class PolicyError(DynarchError):
    """A policy argument that cannot work; the message names it."""


def check_positive(name: str, value: Any, allow_none: bool = False) -> int | None:
    """Policy arguments that count steps or channels must be positive integers (of any kind:
    ``np.int64``, a 0-d tensor); returned as an ``int``, so what the policy keeps (and its
    checkpointed state) is plain."""
    if value is None and allow_none:
        return None
    n = as_positive(value)
    if n is None:
        raise PolicyError(f"{name} must be a positive integer, got {value!r}")
    return n


def check_fraction(
    name: str, value: Any, allow_none: bool = False, below_one: bool = False
) -> float | None:
    """A fraction must be a number > 0 (and < 1 where it is a share of what exists); returned
    as a ``float``."""
    if value is None and allow_none:
        return None
    number = as_number(value)
    if number is None or not number > 0 or (below_one and number >= 1):
        bound = "in (0, 1)" if below_one else "> 0"
        raise PolicyError(f"{name} must be {bound}, got {value!r}")
    return number


@dataclass
class Mutation:
    """One grow, prune or deepen the controller should apply now."""

    op: str  # an op of dynarch/ops.py: "grow", "prune", "deepen" or a registered one
    target: str  # deepen: the module the new layer goes after
    k: int | None = None
    idxs: list[int] | None = None  # prune only: exact channels instead of k
    init: str = "random"  # grow only
    init_options: dict[str, Any] = field(default_factory=dict)
    importance: str = "magnitude"  # prune only
    kind: str = "conv"  # deepen only: "conv" | "residual"
    reason: str = ""


@dataclass
class TrainState:
    """The training run as a policy sees it at one step (before that step's update).

    Heavy things are computed on demand only: ``graph`` is traced once per architecture
    version, ``activations`` runs one extra forward with temporary hooks that are removed
    before it returns. Nothing here is on the training hot path unless a policy asks.
    """

    step: int
    epoch: float
    steps_per_epoch: int
    total_steps: int
    model: nn.Module
    batch: tuple[torch.Tensor, torch.Tensor]
    loss_fn: Callable
    metrics: list[dict[str, Any]]  # evaluation rows so far, oldest first (step, loss, ...)
    train_losses: list[float]  # training loss of every step so far
    initial_widths: dict[str, int]  # target -> width of its group at the start of the run
    params: int
    # the model's size as the run started ({"params": ..., "macs": ...}): budgets like "2x"
    initial_sizes: dict[str, int] = field(default_factory=dict)
    _graph: ArchGraph | None = field(default=None, repr=False)
    # measurements taken at this step (activations, gradient signals), shared by all policies
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def graph(self) -> ArchGraph:
        """The current architecture (traced lazily, once per version)."""
        if self._graph is None:
            self._graph = ArchGraph.from_module(self.model)
        return self._graph

    def macs(self) -> int:
        """Multiply-accumulates of one forward pass on one example input."""
        return count_macs(self.model)

    def width(self, target: str) -> int:
        """Current number of output channels of ``target``."""
        return int(self.model.get_submodule(target).weight.shape[0])

    def blocks(self, target: str) -> int:
        """Blocks ``target``'s channels come in (grouped convs: a change is a multiple)."""
        if not any(channel_blocks(m) > 1 for m in self.model.modules()):
            return 1  # no grouped conv: no trace needed
        return self.graph.group_of(target).blocks

    def targets(self) -> list[str]:
        """Growable layers, one per channel group (a residual stream's first producer stands
        for the whole stream, so all-layer policies change each group once)."""
        seen, chosen = set(), []
        for t in self.graph.targets():
            group = self.graph.group_of(t).name
            if group not in seen:
                seen.add(group)
                chosen.append(t)
        return chosen

    def activations(self, targets: list[str]) -> dict[str, torch.Tensor]:
        """Outputs of ``targets`` on the current batch (eval-free: the model's mode is kept,
        BatchNorm running statistics are restored, no gradient)."""
        captured: dict[str, torch.Tensor] = {}
        hooks = [
            self.model.get_submodule(t).register_forward_hook(
                lambda _m, _i, out, t=t: captured.__setitem__(t, out.detach())
            )
            for t in targets
        ]
        try:
            with buffers_restored(self.model), torch.no_grad():
                self.model(self.batch[0])
        finally:
            for h in hooks:
                h.remove()
        return captured


def train_state(
    step,
    steps_per_epoch,
    total_steps,
    model,
    batch,
    loss_fn,
    metrics,
    train_losses,
    initial_widths,
    params,
    graph,
    initial_sizes=None,
) -> TrainState:
    """A :class:`TrainState` from its parts, positional (the loops build one a step;
    ``benchmarks/perf.py`` times it)."""
    return TrainState(
        step=step,
        epoch=step / steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        model=model,
        batch=batch,
        loss_fn=loss_fn,
        metrics=metrics,
        train_losses=train_losses,
        initial_widths=initial_widths,
        params=params,
        initial_sizes=initial_sizes or {},
        _graph=graph,
    )


def count_macs(model: nn.Module) -> int:
    """MACs per sample (Torch-Pruning's counter, on the remembered example inputs)."""
    with modes_restored(model):
        macs, _ = count_ops_and_params(model, remember_example_inputs(model, None))
    return macs


def next_decision(part: Any, state: TrainState) -> int | None:
    """When a policy (or a trigger) may act next: its ``next_step(state)``, or ``state.step``
    (asked every step) for one without it, and for a subclass that overrides ``decide`` (or
    ``should_act``) below the class whose ``next_step`` it inherits: that one speaks for its
    own class's decisions only (a user's ``Schedule`` subclass with its own ``decide`` is
    asked every step). Asking earlier is harmless: before that step ``decide`` returns
    nothing and changes nothing."""
    ask = getattr(part, "next_step", None)
    if ask is None or _acts_below_next_step(type(part)):
        return state.step
    return ask(state)


def _acts_below_next_step(cls: type) -> bool:
    owner = _defined_in(cls, "next_step")
    for name in ("decide", "should_act"):
        acting = _defined_in(cls, name)
        if acting is not None and acting is not owner and issubclass(acting, owner):
            return True
    return False


def _defined_in(cls: type, name: str) -> type | None:
    return next((c for c in cls.__mro__ if name in vars(c)), None)


@runtime_checkable
class Policy(Protocol):
    def decide(self, state: TrainState) -> list[Mutation]: ...
