"""The controller: a plain PyTorch training loop in which a policy changes the architecture.

Every step: build the :class:`TrainState` (cheap; heavy parts are lazy), ask the policy, apply
its mutations through :func:`dynarch.grow` / :func:`dynarch.prune` with the *same* optimizer
(state carried) and record each in the run history, then take the optimizer step. The LR
schedule is a multiplier on ``param_groups``' lr, so it continues across mutations.
"""

from __future__ import annotations

import math
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
from dynarch.data import load_data, make_loaders
from dynarch.errors import ConfigError, DynarchError
from dynarch.graph import ArchGraph
from dynarch.history_store import HistoryWriter
from dynarch.models import build_model, count_params
from dynarch.policies.base import Mutation, Policy, TrainState, count_macs
from dynarch.surgery.grow import grow
from dynarch.surgery.prune import prune
from dynarch.surgery.record import MutationRecord


@dataclass
class RunSummary:
    params_before: int
    params_after: int
    test_loss: float
    test_accuracy: float
    mutations: int
    steps: int
    seconds: float


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


def make_optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    name = cfg["name"]
    if name == "sgd":
        momentum = cfg["momentum"]
        return torch.optim.SGD(
            model.parameters(),
            lr=cfg["lr"],
            momentum=momentum,
            weight_decay=cfg["weight_decay"],
            nesterov=momentum > 0,
        )
    if name == "adamw":
        return torch.optim.AdamW(
            model.parameters(),
            lr=cfg["lr"],
            betas=tuple(cfg["betas"]),
            weight_decay=cfg["weight_decay"],
        )
    raise ConfigError(f"optimizer.name: unknown optimizer {name!r}; known: sgd, adamw")


def lr_multiplier(cfg: dict[str, Any], steps_per_epoch: int, total_steps: int) -> Callable:
    """step -> factor on the base LR: linear warm-up, then cosine, step decay or constant."""
    warmup = int(cfg["warmup_epochs"] * steps_per_epoch)
    name = cfg["name"]
    if name not in ("cosine", "step", "constant"):
        raise ConfigError(
            f"lr_schedule.name: unknown schedule {name!r}; known: cosine, step, constant"
        )
    every = max(1, int(cfg["step_epochs"] * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if name == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if name == "step":
            return cfg["gamma"] ** ((step - warmup) // every)
        return 1.0

    return factor


def apply_mutation(
    m: Mutation,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Callable,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> MutationRecord:
    if m.op == "grow":
        return grow(
            model,
            m.target,
            m.k,
            init=m.init,
            data=batch,
            loss_fn=loss_fn,
            optimizer=optimizer,
            reduce_sum=reduce_sum,
            **m.init_options,
        )
    if m.op == "prune":
        return prune(
            model,
            m.target,
            k=m.k,
            idxs=m.idxs,
            importance=m.importance,
            optimizer=optimizer,
            data=batch,
            loss_fn=loss_fn,
        )
    raise ConfigError(f"policy returned a mutation with unknown op {m.op!r}")


class NumericalError(DynarchError):
    """The loss became NaN or infinite; the message names the step and the last checkpoint."""


def run(
    cfg: dict[str, Any],
    policy: Policy,
    run_dir: Path,
    log: Callable[[str], None] = print,
    resume: bool = False,
) -> RunSummary:
    """Train ``cfg`` (plain resolved config) under ``policy``; history and checkpoints in
    ``run_dir``. With ``resume``, continue from ``run_dir``'s checkpoint: the history logged
    after it is dropped and logged again, so the run ends as if it had never stopped."""
    start = time.perf_counter()
    tr, data_cfg, model_cfg = cfg["trainer"], cfg["data"], cfg["model"]
    procs, device = distributed.start(resolve_device(str(tr["device"])))
    if not procs.is_main:  # one voice: rank 0 prints, logs and writes
        log = _silent
    if tr["threads"] is not None:
        torch.set_num_threads(int(tr["threads"]))
    torch.manual_seed(tr["seed"])
    splits = load_data(
        data_cfg["name"],
        path=data_cfg["path"],
        root=data_cfg["root"],
        download=data_cfg["download"],
        seed=tr["seed"],
        test_fraction=data_cfg["test_fraction"],
    )
    if tr["batch_size"] < 1:
        raise ConfigError(f"trainer.batch_size must be positive, got {tr['batch_size']}")
    if tr["batch_size"] % procs.world:
        raise ConfigError(
            f"trainer.batch_size {tr['batch_size']} must be divisible by the {procs.world} "
            "processes (it is the global batch)"
        )
    train_loader, test_loader = make_loaders(
        splits, tr["batch_size"], seed=tr["seed"], rank=procs.rank, world=procs.world
    )
    kwargs = dict(model_cfg.get("kwargs") or {})
    if model_cfg.get("width") is not None:
        kwargs["width"] = model_cfg["width"]
    try:
        model = build_model(
            model_cfg["name"], splits.num_classes, splits.in_channels, splits.image_size, **kwargs
        ).to(device)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model: {str(exc).splitlines()[0]}") from None
    # one training sample to trace with; not from the loader, whose order it would disturb
    example = default_collate([splits.train[0]])[0].to(device)
    graph = ArchGraph.from_module(model, example)
    initial_widths = {t: graph.group_of(t).width for t in graph.targets()}
    params_before = count_params(model)

    steps_per_epoch = len(train_loader)
    total_steps = tr["steps"] or tr["epochs"] * steps_per_epoch
    if total_steps < 1:
        raise ConfigError(f"trainer.epochs/steps give {total_steps} steps; need at least 1")
    if tr["on_nonfinite"] not in ("stop", "skip"):
        raise ConfigError(f"trainer.on_nonfinite must be stop or skip, got {tr['on_nonfinite']!r}")
    ckpt_path = run_dir / checkpoint.FILENAME
    saved = checkpoint.load(ckpt_path) if resume else None
    if saved is not None:
        checkpoint.restore_model(ckpt_path, model, saved, example)
        graph = ArchGraph.from_module(model, example)
    optimizer = make_optimizer(model, cfg["optimizer"])
    lr_scale = [1.0]  # lowered by trainer.on_nonfinite=skip
    schedule = lr_multiplier(cfg["lr_schedule"], steps_per_epoch, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s) * lr_scale[0])
    loss_fn = nn.CrossEntropyLoss()
    amp = bool(tr["amp"]) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    eval_every = max(1, int(round(tr["eval_every_epochs"] * steps_per_epoch)))
    ckpt_every = int(round(tr["checkpoint_every_epochs"] * steps_per_epoch))

    metrics: list[dict[str, Any]] = []
    train_losses: list[float] = []
    mutations: list[dict[str, Any]] = []  # what checkpoint.replay needs, in order
    step, ckpt_step, train_flops = 0, None, 0
    # parameters and MACs of the current architecture: counted once per version, not per step
    size = {"params": count_params(model), "macs": count_macs(model)}
    check = getattr(policy, "check", None)
    if saved is None and check is not None:
        # validate targets/budgets against the real model before anything is written
        n = min(len(splits.train), tr["batch_size"])
        x0, y0 = default_collate([splits.train[i] for i in range(n)])
        check(
            _state(
                0,
                steps_per_epoch,
                total_steps,
                model,
                (x0.to(device), y0.to(device)),
                loss_fn,
                [],
                [],
                initial_widths,
                params_before,
                graph,
            )
        )
    if saved is not None:  # before the history is opened: a misfit changes nothing
        checkpoint.restore_training_state(ckpt_path, saved, optimizer, scheduler, scaler, policy)
    history = HistoryWriter(run_dir / "history.db") if procs.is_main else _NoHistory()
    if saved is not None:
        history.rewind(saved["history"])
        step = ckpt_step = saved["step"]
        metrics, train_losses, mutations = (
            saved["metrics"],
            saved["train_losses"],
            saved["mutations"],
        )
        lr_scale[0] = saved["lr_scale"]
        train_flops = saved["train_flops"]
        checkpoint.set_rng_states(saved["rng"])
        log(f"resumed {run_dir} at step {step} ({len(mutations)} mutations so far)")
    else:
        history.write_run(cfg, command=" ".join(sys.argv))
        history.log_architecture(0, graph.to_node_link())
    log(
        f"{model_cfg['name']} on {data_cfg['name']}: {params_before} params, {total_steps} steps "
        f"({steps_per_epoch}/epoch), policy {type(policy).__name__}, device {device}"
    )

    def save_checkpoint() -> None:
        if not procs.is_main:
            return
        checkpoint.save(
            ckpt_path,
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "policy": policy.state_dict() if hasattr(policy, "state_dict") else None,
                "rng": checkpoint.rng_states(),
                "mutations": mutations,
                "metrics": metrics,
                "train_losses": train_losses,
                "lr_scale": lr_scale[0],
                "train_flops": train_flops,
                "history": history.marks(),
            },
        )

    if saved is None:
        save_checkpoint()  # step 0: a run killed before its first periodic checkpoint resumes
        ckpt_step = 0
    test_loss = test_acc = float("nan")
    if metrics:
        test_loss, test_acc = metrics[-1]["loss"], metrics[-1]["accuracy"]
    progress = _progress(total_steps - step, tr["progress"] and procs.is_main)
    net, completed = None, False
    try:
        while step < total_steps:
            epoch, offset = divmod(step, steps_per_epoch)
            train_loader.sampler.set_position(epoch, offset * train_loader.batch_size)
            for x, y in train_loader:
                if step >= total_steps:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                state = _state(
                    step,
                    steps_per_epoch,
                    total_steps,
                    model,
                    (x, y),
                    loss_fn,
                    metrics,
                    train_losses,
                    initial_widths,
                    size["params"],
                    graph,
                )
                decided = procs.broadcast(policy.decide(state) if procs.is_main else None)
                graph = state._graph if state._graph is not None else graph
                for m in decided:
                    macs_before = size["macs"]
                    record = _apply_everywhere(procs, m, model, optimizer, (x, y), loss_fn)
                    graph = ArchGraph.from_module(model)
                    size = {"params": count_params(model), "macs": count_macs(model)}
                    event = history.log_mutation(
                        step,
                        step / steps_per_epoch,
                        record.to_dict(),
                        reason=m.reason,
                        macs_before=macs_before,
                        macs_after=size["macs"],
                    )
                    history.log_architecture(step, graph.to_node_link(), event_id=event)
                    mutations.append(
                        {
                            "kind": record.kind,
                            "target": record.target,
                            "k": record.k,
                            "indices": record.indices,
                        }
                    )
                    log(
                        f"  step {step}: {m.op} {m.target} by {record.k} ({record.method}): "
                        f"width {record.width_before} -> {record.width_after}, params "
                        f"{record.params_before} -> {record.params_after}"
                        + (f" [{m.reason}]" if m.reason else "")
                    )
                if decided or net is None:  # DDP holds the old parameters: wrap anew
                    net = procs.wrap(model, device)
                if not model.training:  # a recursive train() costs up to 0.3 ms a step
                    model.train()
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, enabled=amp):
                    loss = loss_fn(net(x), y)
                # the mean over all processes, so that they all take the same branch below
                loss_value = float(procs.sum(loss.detach())) / procs.world
                if not math.isfinite(loss_value):
                    where = (
                        f"the last good checkpoint is step {ckpt_step} in {ckpt_path}"
                        if ckpt_step is not None
                        else "no checkpoint was written yet"
                    )
                    finite_weights = all(bool(p.isfinite().all()) for p in model.parameters())
                    if tr["on_nonfinite"] == "stop" or not finite_weights:
                        what = "" if finite_weights else " and the weights are not finite"
                        raise NumericalError(
                            f"loss is {loss_value} at step {step}{what}; {where} (lower "
                            "optimizer.lr, or set trainer.on_nonfinite=skip)"
                        )
                    lr_scale[0] *= tr["nonfinite_lr_factor"]
                    log(f"  step {step}: loss is {loss_value}; update skipped, lr x{lr_scale[0]:g}")
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    train_losses.append(loss_value)
                scheduler.step()
                step += 1
                # forward + backward ~ 3 forwards, 2 FLOPs a multiply-accumulate, all processes
                train_flops += 6 * size["macs"] * len(x) * procs.world
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(
                        loss=f"{train_losses[-1] if train_losses else float('nan'):.3f}",
                        acc=f"{test_acc:.3f}",
                        params=size["params"],
                    )
                if tr["log_every_steps"] and step % tr["log_every_steps"] == 0 and train_losses:
                    history.log_metrics(
                        step,
                        step / steps_per_epoch,
                        "train",
                        {
                            "loss": train_losses[-1],
                            "lr": optimizer.param_groups[0]["lr"],
                            "params": size["params"],
                        },
                    )
                if procs.is_main and (step % eval_every == 0 or step == total_steps):
                    test_loss, test_acc = evaluate(model, test_loader, device)
                    window = train_losses[-eval_every:] or [float("nan")]
                    row = {
                        "step": step,
                        "epoch": step / steps_per_epoch,
                        "train_loss": sum(window) / len(window),
                        "loss": test_loss,
                        "accuracy": test_acc,
                        "lr": optimizer.param_groups[0]["lr"],
                        "params": size["params"],
                        "macs": size["macs"],
                        "train_flops": train_flops,
                    }
                    metrics.append(row)
                    history.log_metrics(
                        step,
                        row["epoch"],
                        "eval",
                        {k: v for k, v in row.items() if k not in ("step", "epoch")},
                    )
                    log(
                        f"epoch {row['epoch']:.2f}: train_loss {row['train_loss']:.4f}  "
                        f"test_loss {test_loss:.4f}  test_acc {test_acc:.4f}  "
                        f"lr {row['lr']:.4g}  params {row['params']}"
                    )
                periodic = ckpt_every > 0 and step % ckpt_every == 0
                if decided or periodic or step == total_steps:
                    save_checkpoint()
                    ckpt_step = step
        diverged = procs.mismatched_parameters(model)
        if diverged:
            raise DynarchError(f"processes hold different values of {', '.join(diverged[:5])}")
        procs.sync_buffers(model)
        if procs.world > 1:
            log(f"parameters identical on all {procs.world} processes")
        history.finish("completed")
        completed = True
    except BaseException as exc:
        history.finish(
            "failed", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        )
        raise
    finally:
        if progress is not None:
            progress.close()
        history.close()
        distributed.stop(together=completed)
    if procs.is_main:
        (run_dir / "architecture.json").write_text(graph.to_json() + "\n", encoding="utf-8")
    return RunSummary(
        params_before,
        count_params(model),
        test_loss,
        test_acc,
        len(mutations),
        step,
        time.perf_counter() - start,
    )


def _apply_everywhere(
    procs: distributed.Processes,
    m: Mutation,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Callable,
) -> MutationRecord:
    """Apply ``m`` identically in every process: GradMax statistics are summed over all
    processes' batches; the channels a prune removes are chosen by rank 0 alone (an importance
    like Taylor depends on the local batch) and sent to the others."""
    if procs.world == 1:
        return apply_mutation(m, model, optimizer, batch, loss_fn)
    if m.op == "prune" and m.idxs is None:
        record = apply_mutation(m, model, optimizer, batch, loss_fn) if procs.is_main else None
        idxs = procs.broadcast(record.indices if record is not None else None)
        if record is None:
            same = Mutation(**{**m.__dict__, "k": None, "idxs": idxs})
            record = apply_mutation(same, model, optimizer, batch, loss_fn)
        return record
    return apply_mutation(m, model, optimizer, batch, loss_fn, reduce_sum=procs.sum)


class _NoHistory:
    """What processes other than rank 0 write to: nothing."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return lambda *args, **kwargs: {} if name == "marks" else None


def _silent(_message: str) -> None:
    pass


def _state(
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
) -> TrainState:
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
        _graph=graph,
    )


def _progress(total: int, enabled: bool):
    """A tqdm bar on an interactive terminal only (logs and CI stay line-based)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", leave=False)
