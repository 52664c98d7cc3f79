"""``dynarch run``'s loop state: its :class:`~dynarch.session.Session` and what only that loop
carries (LR multiplier, AMP scaler, random generators, FLOPs, the last evaluation).

:meth:`RunState.state_dict` is the payload :func:`dynarch.checkpoint.save` writes (its keys,
:data:`CHECKPOINT_KEYS`, are what a checkpoint must hold to be resumed; the session's part is
read through properties), :meth:`RunState.load_state_dict` continues from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dynarch import checkpoint
from dynarch.history_store import HistoryWriter, NoHistory
from dynarch.run_logs import TensorBoardLog
from dynarch.session import Session


class RandomGenerators:
    """This process's random generators (torch, Python, NumPy, CUDA), saved and restored as
    one: the data order and random initializers continue after a resume as if uninterrupted."""

    def state_dict(self) -> dict[str, Any]:
        return checkpoint.rng_states()

    def load_state_dict(self, states: dict[str, Any]) -> None:
        checkpoint.set_rng_states(states)


def _session_holds(name: str, doc: str) -> property:
    """A part of the run the :class:`~dynarch.session.Session` keeps (read and set there)."""
    return property(
        lambda state: getattr(state.session, name),
        lambda state, value: setattr(state.session, name, value),
        doc=doc,
    )


# What a checkpoint holds and resuming reads, in its order: a payload without one of these is
# not a dynarch checkpoint. The session's part (step, model, optimizer, policy, mutations,
# metrics, train_losses, history) is read through RunState's properties.
CHECKPOINT_KEYS = (
    "step",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "policy",
    "rng",
    "mutations",
    "metrics",
    "train_losses",
    "lr_scale",
    "train_flops",
    "history",
)


@dataclass(kw_only=True, eq=False)
class RunState:
    """What ``dynarch run``'s loop carries from step to step: its :class:`Session` (model,
    optimizer, policy, step, mutations, metrics, history, graph) and what only that loop
    has: the LR multiplier (``schedule(step) * lr_scale`` times the base LR, on
    ``param_groups``' lr, so it continues across mutations), the AMP scaler, the random
    generators, the FLOP count and the last evaluation."""

    session: Session
    scheduler: torch.optim.lr_scheduler.LambdaLR = field(init=False)
    scaler: torch.amp.GradScaler
    rng: RandomGenerators = field(default_factory=RandomGenerators)
    lr_scale: float = 1.0  # lowered by trainer.on_nonfinite=skip
    train_flops: int = 0
    schedule: InitVar[Callable[[int], float]]
    path: Path  # where the checkpoint is written
    last_checkpoint: int | None = None  # its step, for error messages
    test_loss: float = float("nan")  # of the last evaluation
    test_accuracy: float = float("nan")
    board: TensorBoardLog | None = None  # trainer.tensorboard
    # the losses (on the device) of the steps since they were last read: read together when
    # something needs them, so that an ordinary step makes no device-to-host transfer
    unread_losses: list[torch.Tensor] = field(default_factory=list)

    step = _session_holds("step", "steps taken")
    model = _session_holds("model", "the model as it is now")
    optimizer = _session_holds("optimizer", "the run's optimizer, state carried")
    policy = _session_holds("policy", "what decides the mutations")
    mutations = _session_holds("mutations", "what replay needs, in order")
    metrics = _session_holds("metrics", "evaluation rows")
    train_losses = _session_holds("train_losses", "of every finite step")
    history = _session_holds("history", "rank 0's history.db (saved: its marks)")
    graph = _session_holds("graph", "the current architecture")
    params = _session_holds("params", "of the current architecture")
    macs = _session_holds("macs", "of the current architecture")
    net = _session_holds("net", "what trains: DDP around model, or model")

    def __post_init__(self, schedule: Callable[[int], float]) -> None:
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: schedule(step) * self.lr_scale
        )

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
