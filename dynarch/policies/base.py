"""What a policy sees and what it returns: the contract between the controller and policies.

A policy is any object with ``decide(state) -> list[Mutation]``. The controller calls it once
per training step, applies the returned mutations in order (grow/prune through the same
optimizer), and records them with the policy's ``reason``. Policies are built from configs by
Hydra's ``_target_``, so a user's own class needs no change to dynarch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch_pruning as tp
from torch import nn

from dynarch.gradmax import buffers_restored
from dynarch.graph import ArchGraph, remember_example_inputs


@dataclass
class Mutation:
    """One grow or prune the controller should apply now."""

    op: str  # "grow" | "prune"
    target: str
    k: int | None = None
    idxs: list[int] | None = None  # prune only: exact channels instead of k
    init: str = "random"  # grow only
    init_options: dict[str, Any] = field(default_factory=dict)
    importance: str = "magnitude"  # prune only
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
    _graph: ArchGraph | None = field(default=None, repr=False)

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


def count_macs(model: nn.Module) -> int:
    """MACs per sample (Torch-Pruning's counter, on the remembered example inputs)."""
    modes = {m: m.training for m in model.modules()}
    try:
        macs, _ = tp.utils.count_ops_and_params(model, remember_example_inputs(model, None))
    finally:
        for m, mode in modes.items():
            m.training = mode
    return int(macs)


@runtime_checkable
class Policy(Protocol):
    def decide(self, state: TrainState) -> list[Mutation]: ...
