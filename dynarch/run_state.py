"""The run as one object: everything the training loop carries from one step to the next.

:class:`RunState`'s saved fields are the checkpoint: :meth:`RunState.state_dict` is the payload
:func:`dynarch.checkpoint.save` writes, :meth:`RunState.load_state_dict` continues from it, and
:data:`CHECKPOINT_KEYS`, what a checkpoint must hold to be resumed, are those fields' names. The
layout is spelled once, in the field list. The other fields (the architecture graph, its size,
the DDP wrapper, the last evaluation) are rebuilt from the saved ones or only shown.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import InitVar, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynarch import checkpoint
from dynarch.graph import ArchGraph
from dynarch.history_store import HistoryWriter, NoHistory
from dynarch.models import count_params
from dynarch.policies.base import Policy, count_macs
from dynarch.run_logs import TensorBoardLog


class RandomGenerators:
    """This process's random generators (torch, Python, NumPy, CUDA), saved and restored as
    one: the data order and random initializers continue after a resume as if uninterrupted."""

    def state_dict(self) -> dict[str, Any]:
        return checkpoint.rng_states()

    def load_state_dict(self, states: dict[str, Any]) -> None:
        checkpoint.set_rng_states(states)


def _carried(**kwargs: Any) -> Any:
    """A field the loop carries but the checkpoint does not hold."""
    return field(metadata={"checkpoint": False}, **kwargs)


@dataclass(kw_only=True, eq=False)
class RunState:
    """What the training loop carries from step to step. The fields before the carried ones
    are the checkpoint, in its order; the LR is ``schedule(step) * lr_scale`` times the base LR,
    a multiplier on ``param_groups``' lr, so it continues across mutations."""

    step: int = 0
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR = field(init=False)
    scaler: torch.amp.GradScaler
    policy: Policy
    rng: RandomGenerators = field(default_factory=RandomGenerators)
    mutations: list[dict[str, Any]] = field(default_factory=list)  # what replay needs, in order
    metrics: list[dict[str, Any]] = field(default_factory=list)  # evaluation rows
    train_losses: list[float] = field(default_factory=list)  # of every finite step
    lr_scale: float = 1.0  # lowered by trainer.on_nonfinite=skip
    train_flops: int = 0
    history: HistoryWriter | NoHistory = field(default_factory=NoHistory)  # saved: its marks

    schedule: InitVar[Callable[[int], float]]
    path: Path = _carried()  # where the checkpoint is written
    graph: ArchGraph = _carried()  # the current architecture
    params: int = _carried(init=False)  # of the current architecture: counted once per version
    macs: int = _carried(init=False)
    net: nn.Module | None = _carried(default=None)  # what trains: DDP around model, or model
    last_checkpoint: int | None = _carried(default=None)  # its step, for error messages
    test_loss: float = _carried(default=float("nan"))  # of the last evaluation
    test_accuracy: float = _carried(default=float("nan"))
    board: TensorBoardLog | None = _carried(default=None)  # trainer.tensorboard

    def __post_init__(self, schedule: Callable[[int], float]) -> None:
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: schedule(step) * self.lr_scale
        )
        self.measure()

    def measure(self) -> None:
        """Count the current architecture (after each mutation, not every step)."""
        self.params, self.macs = count_params(self.model), count_macs(self.model)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint payload: every saved field, in order (see :func:`_saved`)."""
        return {name: _saved(getattr(self, name)) for name in CHECKPOINT_KEYS}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Continue from ``saved`` (a :func:`read_checkpoint` payload); a training state that
        does not fit is one line naming the file. Two keys are restored elsewhere: ``model``
        with its architecture before the optimizer is built on its parameters
        (:func:`checkpoint.restore_model`), ``history`` by the caller once the rest fits
        (``HistoryWriter.rewind``), so that a checkpoint that does not fit changes nothing."""
        checkpoint.restore_training_state(
            self.path, saved, self.optimizer, self.scheduler, self.scaler, self.policy
        )
        self.step = self.last_checkpoint = saved["step"]
        self.mutations, self.metrics = saved["mutations"], saved["metrics"]
        self.train_losses = saved["train_losses"]
        self.lr_scale, self.train_flops = saved["lr_scale"], saved["train_flops"]
        self.rng.load_state_dict(saved["rng"])
        if self.metrics:
            self.test_loss = self.metrics[-1]["loss"]
            self.test_accuracy = self.metrics[-1]["accuracy"]

    def save(self) -> None:
        """Write the checkpoint (atomically: the old one or the new one, never a torn file)."""
        checkpoint.save(self.path, self.state_dict())


# What a checkpoint holds and resuming reads: a payload without one is not a dynarch checkpoint.
CHECKPOINT_KEYS = tuple(f.name for f in fields(RunState) if f.metadata.get("checkpoint", True))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``, with every key of :data:`CHECKPOINT_KEYS` (else one line)."""
    return checkpoint.load(path, required=CHECKPOINT_KEYS)


def _saved(value: Any) -> Any:
    """A field as the checkpoint holds it: numbers and lists as they are, the history as its
    marks, objects as their ``state_dict()`` (None for a policy without state)."""
    if isinstance(value, (int, float, list)):
        return value
    if isinstance(value, (HistoryWriter, NoHistory)):
        return value.marks()
    return value.state_dict() if hasattr(value, "state_dict") else None
