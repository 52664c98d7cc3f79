"""What a run config builds: the device, the optimizer, the LR multiplier, the data loaders
and the model. ``dynarch run`` calls these; a user's own loop builds its own and hands them to
a :class:`dynarch.Session`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynarch import distributed
from dynarch.config import LRScheduleConfig, OptimizerConfig, TrainerConfig
from dynarch.data import DataSplits, make_loaders
from dynarch.errors import ConfigError, first_line
from dynarch.models import build_from_config


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


def make_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    name = cfg.name
    if name == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.momentum > 0,
        )
    if name == "adamw":
        return torch.optim.AdamW(
            model.parameters(),
            lr=cfg.lr,
            betas=(cfg.betas[0], cfg.betas[1]),
            weight_decay=cfg.weight_decay,
        )
    raise ConfigError(f"optimizer.name: unknown optimizer {name!r}; known: sgd, adamw")


def lr_multiplier(cfg: LRScheduleConfig, steps_per_epoch: int, total_steps: int) -> Callable:
    """step -> factor on the base LR: linear warm-up, then cosine, step decay or constant."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    name, gamma = cfg.name, cfg.gamma
    if name not in ("cosine", "step", "constant"):
        raise ConfigError(
            f"lr_schedule.name: unknown schedule {name!r}; known: cosine, step, constant"
        )
    every = max(1, int(cfg.step_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if name == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if name == "step":
            return gamma ** ((step - warmup) // every)
        return 1.0

    return factor


def loaders(
    splits: DataSplits, trainer: TrainerConfig, procs: distributed.Processes, workers: int
) -> tuple[Any, Any]:
    """This process's training loader (its share of every global batch) and the test loader."""
    batch_size = trainer.batch_size
    if batch_size < 1:
        raise ConfigError(f"trainer.batch_size must be positive, got {batch_size}")
    if batch_size % procs.world:
        raise ConfigError(
            f"trainer.batch_size {batch_size} must be divisible by the {procs.world} "
            "processes (it is the global batch)"
        )
    if workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {workers}")
    return make_loaders(
        splits,
        batch_size,
        seed=trainer.seed,
        num_workers=workers,
        rank=procs.rank,
        world=procs.world,
    )


def build_model(
    model_cfg: dict[str, Any], splits: DataSplits, device: torch.device, run_dir: Path
) -> nn.Module:
    """The configured model for the data's classes, channels and image size, on ``device``;
    no code from ``run_dir`` is imported (a resumed run's config comes from it)."""
    data = (splits.num_classes, splits.in_channels, splits.image_size)
    try:
        return build_from_config(model_cfg, *data, code_outside=run_dir).to(device)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model: {first_line(exc)}") from None
