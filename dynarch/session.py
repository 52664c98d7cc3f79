"""A session: what makes any training loop a growing one.

::

    session = dynarch.Session(model, optimizer, policy="grow_then_prune", total_steps=N,
                              loss_fn=F.cross_entropy, run_dir="runs/mine")
    for x, y in batches:
        session.mutate(x, y)   # the policy may grow / prune / deepen, optimizer state carried
        loss = F.cross_entropy(session.net(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        session.log(loss=loss)
    session.close()

The session owns what the loop would otherwise write by hand: it counts the steps, shows the
policy the run (:class:`~dynarch.policies.base.TrainState`), applies its mutations through their
ops (dynarch/ops.py) with the loop's own optimizer, records each one and every architecture
version in the history (``run_dir/history.db``, which ``dynarch query`` reads), and saves what a
continuation needs (:meth:`Session.state_dict`; in a run dir, ``checkpoint.pt`` after each
mutation's step and at :meth:`Session.close`). ``dynarch run`` is one such loop.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn import functional as F

import dynarch.checkpoint as checkpoint
import dynarch.distributed as distributed
import dynarch.session_state as session_state
from dynarch.config import MAX_STEPS
from dynarch.errors import ConfigError, DynarchError, first_line
from dynarch.graph import ArchGraph
from dynarch.history_store import HistoryWriter, NoHistory
from dynarch.models import count_params
from dynarch.ops import op_named
from dynarch.policies.base import Mutation, TrainState, count_macs, next_decision, train_state
from dynarch.presets import build_policy
from dynarch.run_dir import CHECKPOINT, holds_run, owned
from dynarch.scalars import as_number, as_positive
from dynarch.surgery.record import MutationRecord

SessionError = session_state.SessionError
Batch = tuple[torch.Tensor, torch.Tensor]
# Under torchrun the processes meet (rank 0's decision and stop request broadcast) on the
# steps the policy is asked, and at least this often: a Ctrl-C waits at most this many steps.
MEET_EVERY = 25


class Session:
    """Policies, history and resume for a training loop: call :meth:`mutate` before each
    update and :meth:`log` after it; train through :attr:`net` (the model, or ``wrap(model)``
    such as DDP, built anew after every mutation). Two keywords serve other loops:
    ``continued``, a state whose weights the model and optimizer hold already (Lightning loads
    them itself), and ``processes``, torchrun's processes as ``dynarch run`` started them
    (default: from ``torch.distributed``, if the loop initialised it)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        policy: Any = "grow_then_prune",
        total_steps: int | None = None,
        loss_fn: Callable = F.cross_entropy,
        run_dir: str | Path | None = None,
        resume: bool = False,
        *,
        steps_per_epoch: int | None = None,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        continued: dict[str, Any] | None = None,
        processes: distributed.Processes | None = None,
    ) -> None:
        self.policy, self.policy_config = build_policy(policy)
        self.total_steps = _steps("total_steps", total_steps)
        self.steps_per_epoch = _steps("steps_per_epoch", steps_per_epoch or self.total_steps)
        session_state.check_owned(model, optimizer)
        self.model, self.optimizer, self.loss_fn, self.wrap = model, optimizer, loss_fn, wrap
        self.procs = processes or _processes()
        self.step = 0
        self.mutations: list[dict[str, Any]] = []  # what a continuation replays, in order
        self.events: list[dict[str, Any]] = []  # every mutation's record, with its step
        self.metrics: list[dict[str, Any]] = []  # test rows (session.log(test_...=...))
        self._train_losses: list[float] = []
        self.graph: ArchGraph | None = None  # traced on the first batch
        self.example: torch.Tensor | None = None  # one input sample, to trace and replay with
        self.initial_widths: dict[str, int] = {}
        self.initial_sizes: dict[str, int] = {}
        self.params = count_params(model)
        self.macs = 0
        self.net = self._wrapped()
        self.history: HistoryWriter | NoHistory = NoHistory()
        self.run_dir = Path(run_dir).resolve() if run_dir is not None else None
        self.closed, self._save_due, self._failed = False, False, False
        self._ask_at = 0  # the next step the policy is asked at (0: the first, also resumed)
        self._unread: list[tuple[int, dict[str, Any]]] = []  # logged rows, tensors not read
        self._held = ExitStack()
        if self.run_dir is not None:
            try:
                self._open_run_dir(resume, continued)
            except BaseException:
                self._held.close()
                raise
        elif continued is not None:
            session_state.continue_from(self, continued)
        elif resume:
            raise SessionError("resume=True needs the run_dir to resume from")

    # -- the loop's two calls -------------------------------------------------------------------
    def mutate(self, x: torch.Tensor, y: torch.Tensor) -> list[MutationRecord]:
        """Before this step's update: ask the policy and apply what it decides, in place, with
        the optimizer's state carried; returns the records (most steps: none). Counts the step."""
        self._check_open("mutate")
        if self._save_due:  # the last mutation's step has trained: what a resume starts from
            self.save()
        if self.graph is None:
            self.begin(x[:1], (x, y))
            self.history.log_architecture(self.step, self.graph.to_node_link())
        records = self.apply(self.decide(x, y), (x, y))
        self.step += 1
        return records

    # -- the lifecycle mutate is made of: begin (once), then decide and apply each step -------
    def begin(
        self,
        example: torch.Tensor,
        batch: Batch | None = None,
        graph: ArchGraph | None = None,
        initial: tuple[dict[str, int], dict[str, int]] | None = None,
    ) -> None:
        """Trace the model on ``example`` (one input sample) unless ``graph`` is given, and
        measure it; ``initial``: the widths and sizes (params, MACs) the run started with, if
        not now (a resumed run). With ``batch``, the policy checks its targets and budgets
        against the model (a schedule naming a layer the model lacks is one line now)."""
        self.example = example.detach()
        self.graph = graph or ArchGraph.from_module(self.model, self.example)
        self.params, self.macs = count_params(self.model), count_macs(self.model)
        if initial is not None:
            self.initial_widths, self.initial_sizes = dict(initial[0]), dict(initial[1])
        else:
            graph = self.graph
            self.initial_widths = {t: graph.group_of(t).width for t in graph.targets()}
            self.initial_sizes = {"params": self.params, "macs": self.macs}
        check = getattr(self.policy, "check", None)
        if check is not None and batch is not None:
            check(self._view(batch))

    @property
    def train_losses(self) -> list[float]:
        """Every logged training loss, in order (reading them reads the logged tensors)."""
        self._read_logged()
        return self._train_losses

    @train_losses.setter
    def train_losses(self, losses: list[float]) -> None:
        self._train_losses = losses

    @property
    def due(self) -> bool:
        """Whether this step asks the policy (and, under torchrun, meets the other processes):
        from the step its ``next_step`` named; the steps before read nothing from the device."""
        return self.step >= self._ask_at

    def decide(self, x: torch.Tensor, y: torch.Tensor, stop: bool = False) -> list[Mutation] | None:
        """The policy's mutations for this step, the same in every process (rank 0 decides);
        None, without asking the policy, when rank 0 says ``stop``. On a step that is not
        :attr:`due`: nothing (a stop waits for the next due step under torchrun, at most
        :data:`MEET_EVERY` steps away)."""
        if not self.due:
            return None if stop and self.procs.world == 1 else []
        self._read_logged()  # the losses the policy may read
        view = self._view((x, y))
        wanted, ask_at = None, None
        if self.procs.is_main and not stop:
            wanted = self.policy.decide(view)
            ask_at = next_decision(self.policy, replace(view, step=self.step + 1))
        decided, stop, ask_at = self.procs.broadcast((wanted, stop, ask_at))
        if stop:
            return None
        self._ask_at = self._next_meeting(ask_at)
        if view._graph is not None:  # traced by the policy
            self.graph = view._graph
        return decided

    def apply(self, decided: list[Mutation], batch: Batch) -> list[MutationRecord]:
        """Apply and record each mutation; :attr:`net` is built anew after a change."""
        records = [self._apply_and_record(m, batch) for m in decided]
        if records:
            self.net = self._wrapped()
            self._save_due = self.run_dir is not None
        return records

    def log(self, **metrics: Any) -> None:
        """Metrics of the step just taken: ``loss`` (what signal policies read) and any other
        training number; names starting ``test_`` are an evaluation row (``test_accuracy``,
        ``test_loss``: the accuracy and loss policies and ``dynarch query`` read). A tensor
        is read when something needs it (the policy's next step, a save, an evaluation row,
        the close), all of them at once: logging the loss every step costs no host sync."""
        self._check_open("log")
        values = {name: _metric(name, value) for name, value in metrics.items()}
        train = {k: v for k, v in values.items() if not k.startswith("test_")}
        if train:
            lr = self.optimizer.param_groups[0]["lr"]
            self._unread.append((self.step, {"lr": lr, **train, "params": self.params}))
        test = {k.removeprefix("test_"): v for k, v in values.items() if k.startswith("test_")}
        if test:
            self._read_logged()
            epoch = self.step / self.steps_per_epoch
            row = {**{k: float(v) for k, v in test.items()}, "params": self.params}
            row["macs"] = self.macs
            self.metrics.append({"step": self.step, "epoch": epoch, **row})
            self.history.log_metrics(self.step, epoch, "eval", row)

    def _read_logged(self) -> None:
        """The training rows logged since the last read: their tensors read, the losses
        appended to :attr:`train_losses`, the rows written to the history, in order."""
        unread, self._unread = self._unread, []
        for step, logged in unread:
            row = {k: float(v) for k, v in logged.items()}
            if "loss" in row:
                self._train_losses.append(row["loss"])
            self.history.log_metrics(step, step / self.steps_per_epoch, "train", row)

    def close(self) -> None:
        """End the run: the last checkpoint, the history marked completed (or interrupted
        before ``total_steps``), the final architecture; the run dir released. Again: nothing."""
        if self.closed:
            return
        try:
            if not self._failed:
                self._read_logged()
            if self.run_dir is not None and not self._failed:
                self.save()
                self._finish_run_dir()
        finally:
            self.closed = True
            marks = _marks_of(self.history)
            self.history.close()
            self.history = NoHistory(marks)  # a state_dict after the close names what it covers
            self._held.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, _tb: Any) -> None:
        if exc is not None and not self.closed:
            self._fail(exc)
        self.close()

    # -- continuing --------------------------------------------------------------------------
    def state_dict(self, weights: bool = True) -> dict[str, Any]:
        """All a continuation needs (tensors and plain values: a weights-only load reads it):
        the mutations, the policy's state, model, optimizer, the step, the random generators.
        Without ``weights``: all but the model and optimizer (for a loop that saves those)."""
        self._read_logged()
        return session_state.collect(self, weights)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` on a fresh session, its model and optimizer built as at the
        start: the mutations are replayed for the shapes, then the values are loaded. A state
        that does not fit is one line, and the model and optimizer stay as they were."""
        self._check_open("load_state_dict")
        if self.step or self.mutations:
            raise SessionError(
                f"load_state_dict needs a fresh session; this one is at step {self.step}"
            )
        session_state.restore(self, state)

    def save(self) -> None:
        """Write ``run_dir/checkpoint.pt`` (atomically) with :meth:`state_dict`."""
        self._save_due = False
        if self.run_dir is not None and self.procs.is_main:
            checkpoint.save(self.run_dir / CHECKPOINT, self.state_dict())

    # -- inside ------------------------------------------------------------------------------
    def _view(self, batch: Batch) -> TrainState:
        return train_state(
            self.step,
            self.steps_per_epoch,
            self.total_steps,
            self.model,
            batch,
            self.loss_fn,
            self.metrics,
            self.train_losses,
            self.initial_widths,
            self.params,
            self.graph,
            self.initial_sizes,
        )

    def _apply_and_record(self, m: Mutation, batch: Batch) -> MutationRecord:
        """Apply ``m`` with the loop's optimizer, then record it: the history's event and
        architecture version, the entry a continuation replays, one printed line."""
        macs_before, step = self.macs, self.step
        record = apply_everywhere(self.procs, m, self.model, self.optimizer, batch, self.loss_fn)
        self.graph = ArchGraph.from_module(self.model)
        self.params, self.macs = count_params(self.model), count_macs(self.model)
        done = record.to_dict()
        epoch = step / self.steps_per_epoch
        event = self.history.log_mutation(
            step, epoch, done, reason=m.reason, macs_before=macs_before, macs_after=self.macs
        )
        self.history.log_architecture(step, self.graph.to_node_link(), event_id=event)
        op = op_named(m.op)
        self.mutations.append(op.replay_entry(record))
        self.events.append({"step": step, "reason": m.reason, **done})
        return record

    def _next_meeting(self, ask_at: int | None) -> int:
        """The next due step: the policy's, or never (past the run) for one that is done;
        under torchrun at most MEET_EVERY steps on, where a stop request is shared."""
        never = max(self.total_steps, self.step + 1)
        ask_at = never if ask_at is None else max(ask_at, self.step + 1)
        if self.procs.world > 1:
            ask_at = min(ask_at, self.step + MEET_EVERY)
        return ask_at

    def _wrapped(self) -> nn.Module:
        if self.wrap is not None:
            return self.wrap(self.model)
        return self.procs.wrap(self.model, session_state.device_of(self.model))

    def _open_run_dir(self, resume: bool, continued: dict[str, Any] | None) -> None:
        """Hold the run dir; a new run's history, or a resumed one's checkpoint and history
        without what was logged after it."""
        run_dir = self.run_dir
        assert run_dir is not None
        if run_dir.exists() and not run_dir.is_dir():
            raise SessionError(f"run_dir {run_dir} is a file, not a directory")
        if not self.procs.is_main:
            return
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SessionError(f"run_dir {run_dir} cannot be created ({exc.strerror})") from None
        self._held.enter_context(owned(run_dir))
        if resume or continued is not None:
            self._resume(run_dir, continued)
        elif holds_run(run_dir):
            raise SessionError(
                f"{run_dir} holds a run already; continue it with resume=True "
                "(or choose another run_dir)"
            )
        else:
            self.history = HistoryWriter(run_dir / "history.db")
            self.history.write_run(self._config(), command=" ".join(sys.argv))

    def _resume(self, run_dir: Path, continued: dict[str, Any] | None) -> None:
        """Continue the run dir's run: from its checkpoint, or from ``continued``, a state
        whose shapes and values the model and optimizer hold already (Lightning's resume)."""
        if continued is not None:
            saved = continued
            session_state.continue_from(self, saved)
        else:
            saved = checkpoint.load(run_dir / CHECKPOINT, required=session_state.KEYS)
            self.load_state_dict(saved)
        self.history = HistoryWriter(run_dir / "history.db")
        self.history.rewind(saved["history"], self._config())

    def _config(self) -> dict[str, Any]:
        """What the history's run row records of a session's run."""
        return {
            "session": {
                "policy": self.policy_config or type(self.policy).__name__,
                "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch,
                "model": type(self.model).__name__,
                "optimizer": type(self.optimizer).__name__,
            }
        }

    def _finish_run_dir(self) -> None:
        if self.step >= self.total_steps:
            self.history.finish("completed")
        else:
            self.history.finish(
                "interrupted",
                f"closed at step {self.step} of {self.total_steps}; continue with resume=True",
            )
        if self.graph is not None and self.procs.is_main:
            text = self.graph.to_json() + "\n"
            (self.run_dir / "architecture.json").write_text(text, encoding="utf-8")

    def _fail(self, exc: BaseException) -> None:
        try:
            self.history.finish("failed", first_line(exc))
        except Exception:  # a full disk must not hide the error that ended the loop
            pass
        self._failed = True  # the last checkpoint stays the last good state

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise SessionError(f"{what} after close: the session has ended (start a new one)")


def apply_mutation(
    m: Mutation,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    loss_fn: Callable,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> MutationRecord:
    """Apply ``m`` through its op (dynarch/ops.py); an op no one registered is one line."""
    try:
        op = op_named(m.op)
    except DynarchError as exc:
        raise ConfigError(f"policy returned a mutation with {exc}") from None
    return op.apply(m, model, optimizer, batch, loss_fn, reduce_sum)


def apply_everywhere(
    procs: distributed.Processes,
    m: Mutation,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    loss_fn: Callable,
) -> MutationRecord:
    """Apply ``m`` identically in every process: GradMax statistics are summed over all
    processes' batches; the channels a prune removes are chosen by rank 0 alone (an importance
    like Taylor depends on the local batch) and sent to the others."""
    if procs.world == 1:
        return apply_mutation(m, model, optimizer, batch, loss_fn)
    if op_named(m.op).chosen_on_rank0 and m.idxs is None:
        record = apply_mutation(m, model, optimizer, batch, loss_fn) if procs.is_main else None
        idxs = procs.broadcast(record.indices if record is not None else None)
        if record is None:
            same = Mutation(**{**m.__dict__, "k": None, "idxs": idxs})
            record = apply_mutation(same, model, optimizer, batch, loss_fn)
        return record
    return apply_mutation(m, model, optimizer, batch, loss_fn, reduce_sum=procs.sum)


def _processes() -> distributed.Processes:
    """This process's place in a process group the loop started (torchrun), else alone."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return distributed.Processes(rank=torch_dist.get_rank(), world=torch_dist.get_world_size())
    return distributed.Processes()


def _steps(name: str, value: Any) -> int:
    n = as_positive(value)
    if n is None or n > MAX_STEPS:
        raise SessionError(f"{name} must be a positive number of steps, got {value!r}")
    return n


def _marks_of(history: HistoryWriter | NoHistory) -> dict[str, int]:
    """The history's marks, or none where it cannot be read (a full disk): closing must go on
    and release the run dir, the error that stopped the run reported, not this one."""
    try:
        return history.marks()
    except sqlite3.Error:
        return {}


def _metric(name: str, value: Any) -> float | torch.Tensor:
    """A logged metric: a float, or a one-element tensor (detached, read later)."""
    if torch.is_tensor(value) and value.numel() == 1:
        return value.detach().reshape(())
    number = as_number(value)
    if number is None:
        raise SessionError(f"log: {name} must be a number or a one-element tensor, got {value!r}")
    return number
