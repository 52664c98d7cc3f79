"""``dynarch run``'s loop: data, a :class:`~dynarch.session.Session`, evaluation, checkpoints.

:func:`run` sets up what stays fixed (:class:`~dynarch.run_setup.RunSetup`: data, model,
lengths, processes), starts a :class:`~dynarch.run_state.RunState` around a session (new, or
from the checkpoint) and repeats one step: mutate (the session asks the policy and applies its
mutations through the op table with the run's optimizer, recording each in the history), update
(forward, backward, optimizer and LR steps), then evaluate and checkpoint when due. The LR
schedule is a multiplier on ``param_groups``' lr, so it continues across mutations.
"""

from __future__ import annotations

import math
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from dynarch import checkpoint, distributed
from dynarch.config import run_config
from dynarch.data import augment
from dynarch.errors import ConfigError, DynarchError, first_line
from dynarch.factories import lr_multiplier, make_optimizer, resolve_device
from dynarch.graph import ArchGraph
from dynarch.history_store import HistoryWriter
from dynarch.models import count_params, model_name
from dynarch.ops import op_named
from dynarch.policies.base import Mutation, Policy
from dynarch.run_logs import TensorBoardLog, write_metrics_csv
from dynarch.run_setup import RunSetup, set_up
from dynarch.run_state import RunState, read_checkpoint
from dynarch.session import Session
from dynarch.stopping import RunInterrupted
from dynarch.surgery.record import MutationRecord
from dynarch.trained import save_version_weights, write_model_spec


@dataclass
class RunSummary:
    params_before: int
    params_after: int
    test_loss: float
    test_accuracy: float
    mutations: int
    steps: int
    seconds: float


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on ``loader``, in eval mode (BatchNorm running stats)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            count += len(y)
    finally:
        model.train(was_training)
    return loss_sum / max(1, count), correct / max(1, count)


class NumericalError(DynarchError):
    """The loss became NaN or infinite; the message names the step and the last checkpoint."""


def run(
    cfg: dict[str, Any],
    policy: Policy,
    run_dir: Path,
    log: Callable[[str], None] = print,
    resume: bool = False,
) -> RunSummary:
    """Train ``cfg`` (the resolved config, merged with the schema) under ``policy``; history
    and checkpoints in ``run_dir``. With ``resume``, continue from ``run_dir``'s checkpoint:
    the history logged after it is dropped and logged again, so the run ends as if it had
    never stopped."""
    start = time.perf_counter()
    config = run_config(cfg)
    trainer = config.trainer
    procs, device = distributed.start(resolve_device(trainer.device), run_dir)
    if not procs.is_main:  # one voice: rank 0 prints, logs and writes
        log = _silent
    if trainer.threads is not None:
        torch.set_num_threads(trainer.threads)
    torch.manual_seed(trainer.seed)
    with distributed.lost_peers_in_one_line(procs):
        setup, model, graph = set_up(config, cfg, run_dir, procs, device, log)
        with setup.stop:
            state = _starting_state(setup, policy, model, graph, resume)
            if trainer.tensorboard and procs.is_main:
                state.board = TensorBoardLog(run_dir, state.step)
            shown = trainer.progress and procs.is_main
            progress = _progress(setup.total_steps - state.step, shown)
            _train_to_the_end(setup, state, progress)
    if procs.is_main:
        (run_dir / "architecture.json").write_text(state.graph.to_json() + "\n", encoding="utf-8")
    return RunSummary(
        setup.params_before,
        count_params(state.model),
        state.test_loss,
        state.test_accuracy,
        len(state.mutations),
        state.step,
        time.perf_counter() - start,
    )


def _starting_state(
    setup: RunSetup, policy: Policy, model: nn.Module, graph: ArchGraph, resume: bool
) -> RunState:
    """The state the loop starts from: step 0, checked by the policy and checkpointed, or a
    resumed run's checkpoint. The history is opened only once that checkpoint has been found
    to fit this run, so that one which does not changes nothing."""
    path = setup.run_dir / checkpoint.FILENAME
    saved = read_checkpoint(path) if resume else None
    if saved is not None and saved["step"] > setup.total_steps:
        raise ConfigError(
            f"the run is at step {saved['step']} already; trainer.epochs/steps give "
            f"{setup.total_steps} steps (extend it with more)"
        )
    if saved is not None:
        checkpoint.restore_model(path, model, saved, setup.example)
        graph = ArchGraph.from_module(model, setup.example)
    config = setup.config
    backend = setup.trainer.compile_backend if setup.trainer.compile else None
    session = Session(
        model,
        make_optimizer(model, config.optimizer),
        policy,
        setup.total_steps,
        setup.loss_fn,
        steps_per_epoch=setup.steps_per_epoch,
        wrap=compiled_wrap(setup.procs, setup.device, backend) if backend else None,
        processes=setup.procs,
    )
    initial = (setup.initial_widths, {"params": setup.params_before, "macs": setup.macs_before})
    first = _first_batch(setup) if saved is None else None  # the policy checks a new run
    session.begin(setup.example, first, graph, initial)
    state = RunState(
        session=session,
        schedule=lr_multiplier(config.lr_schedule, setup.steps_per_epoch, setup.total_steps),
        scaler=torch.amp.GradScaler("cuda", enabled=setup.amp_dtype == torch.float16),
        path=path,
    )
    if saved is not None:
        state.load_state_dict(saved)
    _open_history(setup, state, saved)
    setup.log(
        f"{model_name(setup.plain['model'])} on {config.data.name}: {setup.params_before} params, "
        f"{setup.total_steps} steps ({setup.steps_per_epoch}/epoch), "
        f"policy {type(policy).__name__}, device {setup.device}"
    )
    return state


def compiled_wrap(
    procs: distributed.Processes, device: torch.device, backend: str
) -> Callable[[nn.Module], nn.Module]:
    """``trainer.compile``: what trains is ``torch.compile`` of the model (DDP inside under
    torchrun), built anew after every mutation, so the next step compiles the new shapes.
    Dynamo's caches are dropped first: they key on the model's forward code, so without the
    reset the 9th architecture would hit ``recompile_limit`` (8) and train eager, silently."""

    def wrap(model: nn.Module) -> nn.Module:
        torch.compiler.reset()
        return torch.compile(procs.wrap(model, device), backend=backend)

    return wrap


def _first_batch(setup: RunSetup) -> tuple[torch.Tensor, torch.Tensor]:
    """The first training samples (a batch of them), on the device: what the policy checks
    its targets and budgets on before anything is written."""
    train = setup.splits.train
    x0, y0 = default_collate([train[i] for i in range(min(len(train), setup.trainer.batch_size))])
    return x0.to(setup.device), y0.to(setup.device)


def _open_history(setup: RunSetup, state: RunState, saved: dict[str, Any] | None) -> None:
    """Open the history (rank 0): a new run's config and first architecture, or a resumed
    run's history without what was logged after its checkpoint (logged again, identically)."""
    if setup.procs.is_main:
        state.history = HistoryWriter(setup.run_dir / "history.db")
    if saved is not None:
        state.history.rewind(saved["history"], setup.plain)
        setup.log(
            f"resumed {setup.run_dir} at step {state.step} "
            f"({len(state.mutations)} mutations so far)"
        )
    else:
        state.history.write_run(setup.plain, command=" ".join(sys.argv))
        state.history.log_architecture(0, state.graph.to_node_link())


def _train_to_the_end(setup: RunSetup, state: RunState, progress: Any) -> None:
    """Train, check that all processes agree, and mark the history completed, or failed with
    the error's first line."""
    completed = False
    try:
        if state.last_checkpoint is None:  # a new run: step 0, so that it resumes from there
            _checkpoint(setup, state)
            if setup.procs.is_main:
                write_model_spec(setup.run_dir, setup.plain["model"], setup.splits)
        _train(setup, state, progress)
        if state.step < setup.total_steps:
            _stop_between_steps(setup, state)
        _check_processes_agree(setup, state.model)
        state.history.finish("completed")
        completed = True
    except RunInterrupted:
        raise
    except KeyboardInterrupt:  # a second Ctrl-C: mid-step, so no checkpoint of it
        message = (
            f"interrupted during step {state.step}; "
            f"resume continues from step {state.last_checkpoint}"
        )
        state.history.finish("interrupted", message)
        raise RunInterrupted(message, signal.SIGINT) from None
    except BaseException as exc:
        lost = distributed.peer_lost(exc, setup.procs)
        _mark_failed(state, lost or exc)
        if lost is not None:
            raise lost from None
        raise
    finally:
        if progress is not None:
            progress.close()
        if state.board is not None:
            state.board.close()
        state.history.close()
        state.net = None  # DDP holds the process group: collected before the group goes
        distributed.stop(together=completed)


def _mark_failed(state: RunState, exc: BaseException) -> None:
    """Mark the history failed with the error's first line, where it can still be written:
    a full disk or a read-only run dir must not hide the error that stopped the run."""
    try:
        state.history.finish("failed", first_line(exc))
    except (sqlite3.Error, OSError):
        pass


def _stop_between_steps(setup: RunSetup, state: RunState) -> None:
    """A stop request between steps: checkpoint, mark the run interrupted, say how to go on."""
    _checkpoint(setup, state)
    message = f"interrupted at step {state.step}"
    state.history.finish("interrupted", message)
    signum = setup.stop.signum or signal.SIGINT
    raise RunInterrupted(message, signum)


def _train(setup: RunSetup, state: RunState, progress: Any) -> None:
    """Steps until the last, from the data position of the state's step (mid-epoch after a
    resume), or until a stop is requested."""
    loader = setup.train_loader
    while state.step < setup.total_steps:
        epoch, offset = divmod(state.step, setup.steps_per_epoch)
        loader.sampler.set_position(epoch, offset * loader.batch_size)
        for x, y in loader:
            if state.step >= setup.total_steps:
                return
            x = x.to(setup.device, non_blocking=True, memory_format=setup.memory_format)
            y = y.to(setup.device, non_blocking=True)
            if setup.config.data.augment:
                x = augment(x, setup.trainer.seed + setup.procs.rank, state.step)
            if not _step(setup, state, progress, x, y):
                return  # a stop was requested (Ctrl-C, SIGTERM)


def _step(
    setup: RunSetup, state: RunState, progress: Any, x: torch.Tensor, y: torch.Tensor
) -> bool:
    """One step: mutate, update, then show, log, evaluate and checkpoint when due; False
    (nothing done) when a stop was requested."""
    decided = _mutate(setup, state, x, y)
    if decided is None:
        return False
    started = time.perf_counter()
    _update(setup, state, x, y)
    if decided and setup.trainer.compile:  # this step's forward compiled the new model
        seconds = time.perf_counter() - started
        state.history.add_to_events(state.step - 1, {"compile_seconds": round(seconds, 3)})
    if progress is not None:
        progress.update(1)
        progress.set_postfix(
            loss=f"{state.train_losses[-1] if state.train_losses else float('nan'):.3f}",
            acc=f"{state.test_accuracy:.3f}",
            params=state.params,
        )
    step = state.step
    every = setup.trainer.log_every_steps
    if every and step % every == 0:
        _log_train_metrics(setup, state)
    if step % setup.eval_every == 0 or step == setup.total_steps:
        read_losses(setup, state)  # in every process: under torchrun their mean
        if setup.procs.is_main:
            _evaluate_and_record(setup, state)
    periodic = setup.checkpoint_every > 0 and step % setup.checkpoint_every == 0
    if decided or periodic or step == setup.total_steps:
        _checkpoint(setup, state)
    return True


def _mutate(
    setup: RunSetup, state: RunState, x: torch.Tensor, y: torch.Tensor
) -> list[Mutation] | None:
    """The session asks the policy (rank 0; its decision is broadcast) and applies what it
    decided in every process, rewrapping DDP after a change. None when rank 0 saw a stop
    request: it travels with the decision (one broadcast a step), and the policy is not
    asked, so its state matches the checkpoint."""
    stop = setup.procs.is_main and setup.stop.requested()
    if state.session.due:
        read_losses(setup, state)  # what a policy may read
    decided = state.session.decide(x, y, stop)
    if decided is None:
        return None
    if decided and setup.procs.is_main and setup.trainer.keep_versions:
        save_version_weights(setup.run_dir, len(state.mutations), state.model)
    step = state.step
    for m, record in zip(decided, state.session.apply(decided, (x, y)), strict=True):
        _report(setup, state, step, m, record)
    return decided


def _report(
    setup: RunSetup, state: RunState, step: int, m: Mutation, record: MutationRecord
) -> None:
    """One printed line (and TensorBoard's text) for a mutation the session recorded."""
    reason = f" [{m.reason}]" if m.reason else ""
    what = op_named(m.op).describe(m, record)
    line = f"step {step}: {what}, params {record.params_before} -> {record.params_after}{reason}"
    setup.log(f"  {line}")
    if state.board is not None:
        state.board.mutation(step, line)


def _update(setup: RunSetup, state: RunState, x: torch.Tensor, y: torch.Tensor) -> None:
    """Forward, backward and the optimizer and LR steps. The loss stays on the device
    (:func:`read_losses` reads it when it is needed), except with
    ``trainer.on_nonfinite=skip``: a non-finite loss skips its update, so it is read first
    (one transfer a step; the same branch in every process)."""
    if not state.model.training:  # a recursive train() costs up to 0.3 ms a step
        state.model.train()
    state.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(setup.device.type, setup.amp_dtype, enabled=setup.amp_dtype is not None):
        loss = setup.loss_fn(state.net(x), y)
    state.unread_losses.append(loss.detach())
    skipped = False
    if setup.trainer.on_nonfinite == "skip":
        (loss_value,) = read_losses(setup, state)
        if not math.isfinite(loss_value):
            state.train_losses.pop()
            _skip_nonfinite(setup, state, loss_value)
            skipped = True
    if not skipped:
        state.scaler.scale(loss).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
    state.scheduler.step()
    state.step += 1
    # forward + backward ~ 3 forwards, 2 FLOPs a multiply-accumulate, all processes
    state.train_flops += 6 * state.macs * len(x) * setup.procs.world


def read_losses(setup: RunSetup, state: RunState) -> list[float]:
    """The losses not read yet, in one device-to-host transfer (under torchrun one all-reduce:
    their mean over the processes), appended to ``train_losses``; returns them. Called at the
    same steps in every process. With ``trainer.on_nonfinite=stop`` a non-finite loss stops
    the run here, naming its step: the steps since it are lost (at most those to the next
    log, evaluation, checkpoint or policy step), the last checkpoint is before it."""
    unread, state.unread_losses = state.unread_losses, []
    if not unread:
        return []
    summed = setup.procs.sum(torch.stack(unread).float()).tolist()
    values = [value / setup.procs.world for value in summed]
    first = state.step - len(values)  # the step the first was taken at
    for i, value in enumerate(values):
        if not math.isfinite(value) and setup.trainer.on_nonfinite == "stop":
            raise NumericalError(
                f"loss is {value} at step {first + i}; {_last_good(state)} (lower "
                "optimizer.lr, or set trainer.on_nonfinite=skip)"
            )
    state.train_losses.extend(values)
    return values


def _last_good(state: RunState) -> str:
    if state.last_checkpoint is None:
        return "no checkpoint was written yet"
    return f"the last good checkpoint is step {state.last_checkpoint} in {state.path}"


def _skip_nonfinite(setup: RunSetup, state: RunState, loss_value: float) -> None:
    """Lower the LR and go on (``trainer.on_nonfinite=skip``, weights still finite), or stop
    with one line naming the step and the last good checkpoint."""
    if not all(bool(p.isfinite().all()) for p in state.model.parameters()):
        raise NumericalError(
            f"loss is {loss_value} at step {state.step} and the weights are not finite; "
            f"{_last_good(state)} (lower optimizer.lr)"
        )
    state.lr_scale *= setup.trainer.nonfinite_lr_factor
    setup.log(f"  step {state.step}: loss is {loss_value}; update skipped, lr x{state.lr_scale:g}")


def _log_train_metrics(setup: RunSetup, state: RunState) -> None:
    """A 'train' row in the history (``trainer.log_every_steps``), once there is a loss."""
    read_losses(setup, state)
    if not state.train_losses:
        return
    state.history.log_metrics(
        state.step,
        state.step / setup.steps_per_epoch,
        "train",
        {
            "loss": state.train_losses[-1],
            "lr": state.optimizer.param_groups[0]["lr"],
            "params": state.params,
        },
    )


def _evaluate_and_record(setup: RunSetup, state: RunState) -> None:
    """Evaluate on the test set: a metrics row for the checkpoint (policies read them), the
    history and one printed line."""
    state.test_loss, state.test_accuracy = evaluate(state.model, setup.test_loader, setup.device)
    window = state.train_losses[-setup.eval_every :] or [float("nan")]
    row = {
        "step": state.step,
        "epoch": state.step / setup.steps_per_epoch,
        "train_loss": sum(window) / len(window),
        "loss": state.test_loss,
        "accuracy": state.test_accuracy,
        "lr": state.optimizer.param_groups[0]["lr"],
        "params": state.params,
        "macs": state.macs,
        "train_flops": state.train_flops,
    }
    state.metrics.append(row)
    values = {k: v for k, v in row.items() if k not in ("step", "epoch")}
    state.history.log_metrics(state.step, row["epoch"], "eval", values)
    write_metrics_csv(setup.run_dir, state.metrics)
    if state.board is not None:
        state.board.evaluation(row, state.graph.widths())
    setup.log(
        f"epoch {row['epoch']:.2f}: train_loss {row['train_loss']:.4f}  "
        f"test_loss {state.test_loss:.4f}  test_acc {state.test_accuracy:.4f}  "
        f"lr {row['lr']:.4g}  params {row['params']}"
    )


def _checkpoint(setup: RunSetup, state: RunState) -> None:
    """Write the checkpoint (rank 0) and remember its step in every process."""
    read_losses(setup, state)  # saved with it, and checked: no checkpoint after a NaN
    if setup.procs.is_main:
        state.save()
    state.last_checkpoint = state.step


def _check_processes_agree(setup: RunSetup, model: nn.Module) -> None:
    """After the last step: every process holds rank 0's parameters and buffers."""
    procs = setup.procs
    diverged = procs.mismatched_parameters(model)
    if diverged:
        raise DynarchError(f"processes hold different values of {', '.join(diverged[:5])}")
    procs.sync_buffers(model)
    if procs.world > 1:
        setup.log(f"parameters identical on all {procs.world} processes")


def _silent(_message: str) -> None:
    pass


def _progress(total: int, enabled: bool):
    """A tqdm bar on an interactive terminal only (logs and CI stay line-based)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", leave=False)
