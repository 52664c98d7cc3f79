"""Structured configs for ``dynarch run``: Hydra checks every key and type against these
dataclasses when it composes the config, so a typo or a wrong type fails at start with Hydra's
message instead of mid-run. The policy is free-form (``_target_`` + arguments) because users
plug in their own classes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from dynarch.errors import DynarchError


@dataclass
class ModelConfig:
    name: str = "vgg_small"  # vgg_small | resnet_small | wrn | torchvision:<name>
    width: int | None = 16  # base width of the built-in models (None for torchvision)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra builder arguments
    # your own model: pkg.module.Class (or a function), called with kwargs (+ num_classes,
    # in_channels, image_size when it takes them); name and width are then not used
    _target_: str | None = None


@dataclass
class DataConfig:
    name: str = "digits"  # digits | npz | cifar10 | cifar100 | imagefolder | teacher_student
    path: str | None = None  # npz file or imagefolder root, relative to the launch directory
    root: str = "~/.cache/dynarch"  # torchvision download directory
    download: bool = True
    test_fraction: float = 0.2  # digits / teacher_student split
    augment: bool = False  # random crop (padding 4) + horizontal flip of training batches
    num_workers: int = 0  # DataLoader worker processes


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd (Nesterov when momentum > 0) | adamw
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class LRScheduleConfig:
    name: str = "cosine"  # cosine | step | constant
    step_epochs: float = 30.0  # step: decay every this many epochs
    gamma: float = 0.1  # step: decay factor
    warmup_epochs: float = 0.0  # linear warm-up before the schedule


@dataclass
class TrainerConfig:
    epochs: int = 6
    steps: int | None = None  # stop after this many steps instead (None: epochs * steps/epoch)
    batch_size: int = 64
    device: str = "auto"  # auto = CUDA when available, else CPU
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    seed: int = 0
    threads: int | None = 1  # CPU threads (None: torch's default)
    eval_every_epochs: float = 1.0
    tensorboard: bool = False  # event files in <run>/tensorboard (pip install dynarch[tensorboard])
    keep_versions: bool = False  # every architecture version's last weights (dynarch.load step=)
    log_every_steps: int = 0  # history rows of the training loss (0: once per evaluation)
    progress: bool = True  # progress bar on a terminal
    checkpoint_every_epochs: float = 1.0  # also after every step with a mutation, and at the end
    on_nonfinite: str = "stop"  # NaN/Inf loss: stop (one line, last checkpoint kept) | skip
    nonfinite_lr_factor: float = 0.5  # skip: multiply the learning rate by this each time


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    policy: Any = MISSING  # {_target_: ..., ...}: instantiated with hydra.utils.instantiate
    resume: str | None = None  # a run directory to continue from its checkpoint
    # numbers shared by the study's policy presets (configs/policy/study/), set per data set
    # by configs/experiment/study_*.yaml and used through ${study.<key>}
    study: dict[str, Any] = field(default_factory=dict)


def register() -> None:
    """Make the schema available to ``configs/config.yaml`` as ``run_schema``."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)


class ConfigValueError(DynarchError):
    """A config value of the right type that cannot work (a negative learning rate, ...)."""


# (key, test, what the value must be); checked in this order, the first failure is reported.
_RULES: list[tuple[str, Callable[[Any, dict[str, Any]], bool], str]] = [
    ("trainer.steps", lambda v, c: v is None or v >= 1, ">= 1 (or null to train by epochs)"),
    (
        "trainer.epochs",
        lambda v, c: c["trainer"].get("steps") is not None or v >= 1,
        ">= 1 (or set trainer.steps)",
    ),
    ("trainer.batch_size", lambda v, c: v >= 1, ">= 1"),
    ("trainer.seed", lambda v, c: 0 <= v < 2**32, "in [0, 2**32)"),
    ("trainer.threads", lambda v, c: v is None or v >= 1, ">= 1 (or null for torch's default)"),
    ("trainer.eval_every_epochs", lambda v, c: v > 0, "> 0"),
    ("trainer.checkpoint_every_epochs", lambda v, c: v >= 0, ">= 0"),
    ("trainer.log_every_steps", lambda v, c: v >= 0, ">= 0"),
    ("trainer.on_nonfinite", lambda v, c: v in ("stop", "skip"), "stop or skip"),
    ("trainer.nonfinite_lr_factor", lambda v, c: 0 < v <= 1, "in (0, 1]"),
    ("optimizer.lr", lambda v, c: v >= 0, ">= 0"),
    ("optimizer.momentum", lambda v, c: v >= 0, ">= 0"),
    ("optimizer.weight_decay", lambda v, c: v >= 0, ">= 0"),
    (
        "optimizer.betas",
        lambda v, c: len(v) == 2 and all(0 <= b < 1 for b in v),
        "two values in [0, 1)",
    ),
    ("lr_schedule.step_epochs", lambda v, c: v > 0, "> 0"),
    ("lr_schedule.gamma", lambda v, c: v > 0, "> 0"),
    ("lr_schedule.warmup_epochs", lambda v, c: v >= 0, ">= 0"),
]


def check_values(cfg: dict[str, Any]) -> None:
    """Refuse values Hydra's type check lets through but training cannot use, before any run
    directory exists; torch, scikit-learn or the loop would otherwise fail with a traceback
    (``optimizer.lr=-1``, ``trainer.threads=0``, ``trainer.seed=-1``) or silently misbehave
    (``trainer.steps=0`` meant "by epochs")."""
    for key, ok, must in _RULES:
        section, name = key.split(".")
        node = cfg.get(section)
        if not isinstance(node, dict) or name not in node:
            continue
        value = node[name]
        try:
            good = ok(value, cfg)
        except TypeError:  # e.g. betas of the wrong length type; Hydra checked the rest
            good = False
        if not good:
            raise ConfigValueError(f"{key} must be {must}, got {value!r}")
