"""The training job behind ``dynarch run``: a plain PyTorch loop plus a fixed mutation schedule.

Mutations go through :func:`dynarch.grow` / :func:`dynarch.prune` with the *same* optimizer the
loop steps, so momentum of the surviving entries is carried across every architecture change.
The LR scheduler only rewrites ``param_groups[i]["lr"]``, so it keeps its place when the
surgery swaps parameters inside those groups.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from dynarch.data import load_data, make_loaders
from dynarch.errors import DynarchError, close_matches
from dynarch.graph import ArchGraph
from dynarch.initializers import get_initializer
from dynarch.models import build_model, count_params
from dynarch.surgery.grow import grow
from dynarch.surgery.prune import IMPORTANCES, prune
from dynarch.surgery.record import MutationRecord

OPS = ("grow", "prune")
_ENTRY_KEYS = {
    "grow": {"epoch", "op", "target", "k", "init"},
    "prune": {"epoch", "op", "target", "k", "importance"},
}


class ConfigError(DynarchError):
    """A run configuration that cannot work (bad schedule entry, non-positive epochs, ...)."""


@dataclass(frozen=True)
class Mutation:
    """One scheduled grow or prune; ``epoch`` 2.0 means after two full epochs of training."""

    index: int
    epoch: float
    op: str
    target: str
    k: int
    init: str = "random"
    importance: str = "magnitude"

    def step(self, steps_per_epoch: int, epochs: int) -> int:
        """Global step before which this mutation is applied (never past the last step)."""
        return min(int(round(self.epoch * steps_per_epoch)), epochs * steps_per_epoch - 1)


@dataclass
class RunSummary:
    """What a finished run reports: final metrics and the parameter count before/after."""

    params_before: int
    params_after: int
    test_loss: float
    test_accuracy: float
    mutations: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, so the same config runs on a laptop and a GPU box."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"trainer.device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r} but CUDA is not available")
    return device


def make_optimizer(
    model: nn.Module, lr: float, momentum: float, weight_decay: float
) -> torch.optim.SGD:
    """SGD with Nesterov momentum (plain SGD when momentum is 0, which Nesterov forbids)."""
    return torch.optim.SGD(
        model.parameters(),
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=momentum > 0,
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay from the base LR to 0 over every step of the run."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> float:
    """One pass over ``loader``; returns the mean training loss (per sample).

    ``on_step(x, y)`` runs before every optimizer step with the batch on ``device``: the hook
    where scheduled mutations change the model, so the step that follows already trains the
    new architecture. ``scheduler`` (if any) steps after every optimizer step.
    """
    model.train()
    total, count = 0.0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if on_step is not None:
            on_step(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * len(y)
        count += len(y)
    return total / max(1, count)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device) -> tuple[float, float]:
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


def parse_schedule(entries: Any, epochs: int) -> list[Mutation]:
    """Check every entry's keys and values up front; returns mutations sorted by epoch.

    Entries at the same epoch keep their listed order.
    """
    if entries is None:
        return []
    if not isinstance(entries, (list, tuple)):
        raise ConfigError(f"schedule must be a list of mutations, got {type(entries).__name__}")
    mutations = []
    for index, entry in enumerate(entries):
        where = f"schedule[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} must be a mapping like {{epoch, op, target, k}}")
        op = entry.get("op")
        if op not in OPS:
            raise ConfigError(
                f"{where}: unknown op {op!r}; valid ops: {', '.join(OPS)}"
                + close_matches(str(op), OPS)
            )
        unknown = sorted(set(entry) - _ENTRY_KEYS[op])
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for op {op!r}; "
                f"allowed: {', '.join(sorted(_ENTRY_KEYS[op]))}"
            )
        missing = sorted({"epoch", "target", "k"} - set(entry))
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        epoch, target, k = entry["epoch"], entry["target"], entry["k"]
        if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or math.isnan(epoch):
            raise ConfigError(f"{where}: epoch must be a number, got {epoch!r}")
        if not 0 <= epoch < epochs:
            raise ConfigError(
                f"{where}: epoch {epoch} is outside the run; it must be in [0, {epochs})"
            )
        if not isinstance(target, str) or not target:
            raise ConfigError(f"{where}: target must be a module name, got {target!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ConfigError(f"{where}: k must be a positive integer, got {k!r}")
        extra: dict[str, str] = {}
        if op == "grow":
            init = entry.get("init", "random")
            try:
                get_initializer(init)
            except DynarchError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            extra["init"] = init
        else:
            importance = entry.get("importance", "magnitude")
            if importance not in IMPORTANCES:
                raise ConfigError(
                    f"{where}: unknown importance {importance!r}; known: {', '.join(IMPORTANCES)}"
                    + close_matches(str(importance), IMPORTANCES)
                )
            extra["importance"] = importance
        mutations.append(Mutation(index, float(epoch), op, target, k, **extra))
    return sorted(mutations, key=lambda m: m.epoch)


def check_schedule_targets(graph: ArchGraph, mutations: list[Mutation]) -> None:
    """Refuse unknown targets and prunes that would empty a group, before any training.

    Widths are simulated through the whole schedule on the initial channel groups, so a prune
    that only fails after earlier mutations is caught up front too.
    """
    targets = graph.targets()
    widths = {g.name: g.width for g in graph.groups}
    for m in mutations:
        where = f"schedule[{m.index}]"
        if m.target not in targets:
            known = graph.group_by_module.get(m.target)
            if known is not None and known.at_output:
                problem = f"{m.target!r} produces the model's output, whose width the task fixes"
            elif known is not None and known.unsupported:
                problem = f"cannot change the channels of {m.target!r}: {known.unsupported}"
            else:
                problem = f"unknown target {m.target!r}"
            raise ConfigError(
                f"{where}: {problem}; targets: {', '.join(targets)}"
                + close_matches(m.target, targets)
            )
        group = graph.group_of(m.target).name
        if m.op == "grow":
            widths[group] += m.k
        elif widths[group] - m.k < 1:
            raise ConfigError(
                f"{where}: pruning {m.k} channels of {m.target!r} at epoch {m.epoch:g} would leave "
                f"{widths[group] - m.k} (its width is {widths[group]} then)"
            )
        else:
            widths[group] -= m.k


def _json_default(value: Any) -> Any:
    """Make tensors and numpy values in mutation records JSON-serialisable."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _append_jsonl(path: Path, row: Mapping[str, Any]) -> None:
    """Append one line and flush, so a crashed run still leaves its history on disk."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, default=_json_default) + "\n")


def _check_optimizer_covers(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every model parameter must still be in the optimizer, or new channels would never train."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in model.named_parameters() if id(p) not in held]
    if missing:
        raise RuntimeError(f"parameters missing from the optimizer after a mutation: {missing}")


def run_job(
    cfg: Mapping[str, Any], run_dir: Path, log: Callable[[str], None] = print
) -> RunSummary:
    """Load data, build the model, train with the schedule; write metrics/mutations/architecture.

    ``cfg`` is the plain (resolved) config; ``data.path`` is taken relative to the current
    directory. Raises :class:`DynarchError` for anything the user can fix in the config.
    """
    start = time.perf_counter()
    data_cfg, model_cfg, tr = cfg["data"], cfg["model"], cfg["trainer"]
    epochs, every = tr["epochs"], tr.get("eval_every_epochs", 1)
    for key, value in (("epochs", epochs), ("eval_every_epochs", every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"trainer.{key} must be a positive integer, got {value!r}")
    mutations = parse_schedule(cfg.get("schedule"), epochs)
    device = resolve_device(str(tr.get("device", "auto")))
    threads = tr.get("threads")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"trainer.threads must be a positive int or null, got {threads!r}")
        torch.set_num_threads(threads)
    seed = int(tr.get("seed", 0))
    torch.manual_seed(seed)

    splits = load_data(data_cfg["name"], path=data_cfg.get("path"), seed=seed)
    try:
        train_loader, test_loader = make_loaders(splits, tr["batch_size"], seed=seed)
    except ValueError as exc:
        raise ConfigError(f"trainer.batch_size: {exc}") from None
    model_kwargs = {k: v for k, v in model_cfg.items() if k != "name"}
    try:
        model = build_model(
            model_cfg["name"],
            splits.num_classes,
            splits.in_channels,
            splits.image_size,
            **model_kwargs,
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model: {str(exc).splitlines()[0]}") from None
    model.to(device)

    # one training sample to trace with; not from the loader, whose shuffle it would advance
    example = default_collate([splits.train[0]])[0].to(device)
    check_schedule_targets(ArchGraph.from_module(model, example), mutations)

    optimizer = make_optimizer(model, tr["lr"], tr["momentum"], tr["weight_decay"])
    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    scheduler = make_scheduler(optimizer, epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    params_before = count_params(model)
    metrics_path, mutations_path = run_dir / "metrics.jsonl", run_dir / "mutations.jsonl"
    mutations_path.touch()
    log(
        f"{model_cfg['name']} on {data_cfg['name']}: {params_before} params, {epochs} epochs x "
        f"{steps_per_epoch} steps, {len(mutations)} scheduled mutations, device {device}"
    )

    pending = list(mutations)
    done: list[dict[str, Any]] = []
    state = {"step": 0, "traced": False}

    def on_step(x: torch.Tensor, y: torch.Tensor) -> None:
        step = state["step"]
        while pending and pending[0].step(steps_per_epoch, epochs) <= step:
            m = pending.pop(0)
            record = _apply(m, model, optimizer, x, y, loss_fn, first=not state["traced"])
            state["traced"] = True
            _check_optimizer_covers(model, optimizer)
            row = {"step": step, "epoch": step / steps_per_epoch, **record.to_dict()}
            _append_jsonl(mutations_path, row)
            done.append(row)
            log(
                f"  step {step} (epoch {row['epoch']:.2f}): {m.op} {m.target} by {m.k} "
                f"({record.method}): width {record.width_before} -> {record.width_after}, "
                f"params {record.params_before} -> {record.params_after}"
            )
        state["step"] = step + 1

    test_loss = test_acc = float("nan")
    for epoch in range(epochs):
        train_loss = train_one_epoch(
            model, train_loader, optimizer, loss_fn, device, on_step=on_step, scheduler=scheduler
        )
        if (epoch + 1) % every and epoch + 1 != epochs:
            continue
        test_loss, test_acc = evaluate(model, test_loader, device)
        row = {
            "epoch": epoch + 1,
            "step": state["step"],
            "train_loss": train_loss,
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "lr": optimizer.param_groups[0]["lr"],
            "params": count_params(model),
        }
        _append_jsonl(metrics_path, row)
        log(
            f"epoch {epoch + 1}/{epochs}: train_loss {train_loss:.4f}  test_loss {test_loss:.4f}  "
            f"test_acc {test_acc:.4f}  lr {row['lr']:.4g}  params {row['params']}"
        )

    graph = ArchGraph.from_module(model)
    (run_dir / "architecture.json").write_text(graph.to_json() + "\n", encoding="utf-8")
    return RunSummary(
        params_before=params_before,
        params_after=count_params(model),
        test_loss=test_loss,
        test_accuracy=test_acc,
        mutations=done,
        seconds=time.perf_counter() - start,
    )


def _apply(
    m: Mutation,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable,
    first: bool,
) -> MutationRecord:
    """One scheduled mutation on the live model and optimizer; ``(x, y)`` feeds data inits."""
    example = x if first else None
    if m.op == "grow":
        return grow(
            model,
            m.target,
            m.k,
            init=m.init,
            data=(x, y),
            loss_fn=loss_fn,
            optimizer=optimizer,
            example_inputs=example,
        )
    return prune(
        model,
        m.target,
        k=m.k,
        importance=m.importance,
        optimizer=optimizer,
        example_inputs=example,
        data=(x, y),
        loss_fn=loss_fn,
    )
