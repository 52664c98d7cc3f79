"""Structured configs for ``dynarch run``: Hydra checks every key and type against these
dataclasses when it composes the config, so a typo or a wrong type fails at start with Hydra's
message instead of mid-run. The policy is free-form (``_target_`` + arguments) because users
plug in their own classes."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

from dynarch.errors import DynarchError, close_matches


@dataclass
class ModelConfig:
    name: str = "vgg_small"  # vgg_small | resnet_small | wrn | torchvision:<name> | timm:<name>
    width: int | None = 16  # base width of the built-in models (None for torchvision)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra builder arguments
    # your own model: pkg.module.Class (an nn.Module subclass), called with kwargs (+ num_classes,
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
    amp: str = "bf16"  # mixed precision on CUDA: bf16 | fp16 (with a GradScaler) | off
    channels_last: bool = False  # model and inputs channels-last (tensor cores' layout)
    # torch.compile the model, again after every mutation (the time in the mutation's event);
    # compile_backend: torch.compile's backend (inductor; eager traces only, for a quick check)
    compile: bool = False
    compile_backend: str = "inductor"
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


AMP_MODES = ("bf16", "fp16", "off")


def upgraded(config: Any) -> Any:
    """A run config from before a key changed type, in today's terms: ``trainer.amp`` was a
    bool (true: fp16 autocast with a GradScaler on CUDA), so a resumed run trains as it did."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config)
    trainer = config.get("trainer") if isinstance(config, dict) else None
    if isinstance(trainer, dict) and isinstance(trainer.get("amp"), bool):
        amp = "fp16" if trainer["amp"] else "off"
        config = {**config, "trainer": {**trainer, "amp": amp}}
    return config


def run_config(plain: dict[str, Any]) -> RunConfig:
    """A run's resolved config (merged with the schema, checked) as the schema's dataclasses:
    the loop reads attributes whose types the schema fixed, not a dict's keys."""
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), plain))
    assert isinstance(config, RunConfig)
    return config


def register() -> None:
    """Make the schema available to ``configs/config.yaml`` as ``run_schema``."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)


class ConfigValueError(DynarchError):
    """A config value of the right type that cannot work (a negative learning rate, ...)."""


# Bounds on what a run may ask for. 1024 threads: torch.set_num_threads(100000) makes
# OpenBLAS's thread start-up fail and the process die with SIGSEGV (rc -11); 1024 works, and is
# above the cores of any machine dynarch runs on. 10**6 epochs and 10**9 steps: a billion
# steps is months on any hardware; larger counts are typos (1e23) that would run forever.
MAX_THREADS, MAX_EPOCHS, MAX_STEPS = 1024, 10**6, 10**9


def _finite(test: Callable[[Any], bool]) -> Callable[[Any, dict[str, Any]], bool]:
    """``test`` on a finite number: inf passes every comparison with 0 and then breaks the
    loop (``int(inf)`` in the evaluation interval, a NaN loss at step 1 for ``lr=inf``)."""
    return lambda v, c: math.isfinite(v) and test(v)


# (key, test, what the value must be); checked in this order, the first failure is reported.
_RULES: list[tuple[str, Callable[[Any, dict[str, Any]], bool], str]] = [
    ("trainer.steps", lambda v, c: v is None or v >= 1, ">= 1 (or null to train by epochs)"),
    ("trainer.steps", lambda v, c: v is None or v <= MAX_STEPS, f"<= {MAX_STEPS}"),
    (
        "trainer.epochs",
        lambda v, c: c["trainer"].get("steps") is not None or v >= 1,
        ">= 1 (or set trainer.steps)",
    ),
    ("trainer.epochs", lambda v, c: v <= MAX_EPOCHS, f"<= {MAX_EPOCHS}"),
    ("trainer.batch_size", lambda v, c: v >= 1, ">= 1"),
    ("trainer.seed", lambda v, c: 0 <= v < 2**32, "in [0, 2**32)"),
    ("trainer.threads", lambda v, c: v is None or v >= 1, ">= 1 (or null for torch's default)"),
    ("trainer.threads", lambda v, c: v is None or v <= MAX_THREADS, f"<= {MAX_THREADS}"),
    ("trainer.eval_every_epochs", _finite(lambda v: v > 0), "finite and > 0"),
    ("trainer.checkpoint_every_epochs", _finite(lambda v: v >= 0), "finite and >= 0"),
    ("trainer.log_every_steps", lambda v, c: v >= 0, ">= 0"),
    ("trainer.on_nonfinite", lambda v, c: v in ("stop", "skip"), "stop or skip"),
    ("trainer.amp", lambda v, c: v in AMP_MODES, "bf16, fp16 or off"),
    ("trainer.nonfinite_lr_factor", lambda v, c: 0 < v <= 1, "in (0, 1]"),
    ("optimizer.lr", _finite(lambda v: v >= 0), "finite and >= 0"),
    ("optimizer.momentum", _finite(lambda v: v >= 0), "finite and >= 0"),
    ("optimizer.weight_decay", _finite(lambda v: v >= 0), "finite and >= 0"),
    (
        "optimizer.betas",
        lambda v, c: len(v) == 2 and all(0 <= b < 1 for b in v),
        "two values in [0, 1)",
    ),
    ("lr_schedule.step_epochs", _finite(lambda v: v > 0), "finite and > 0"),
    ("lr_schedule.gamma", _finite(lambda v: v > 0), "finite and > 0"),
    ("lr_schedule.warmup_epochs", _finite(lambda v: v >= 0), "finite and >= 0"),
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
        except (TypeError, ValueError):  # e.g. betas of the wrong length type
            good = False
        if not good:
            raise ConfigValueError(f"{key} must be {must}, got {value!r}")


def check_keys(cfg: dict[str, Any]) -> None:
    """Refuse keys the schema does not know. Hydra checks a plain ``trainer.epoch=3`` against
    the dataclasses, but ``+trainer.epoch=3`` adds the key past that check, and the run would
    train with the defaults without a word. Open sections (``model.kwargs``, ``policy``,
    ``study``) are not dataclasses: :func:`check_arguments` asks their targets."""
    for key, schema in _unknown_keys(cfg, RunConfig, ""):
        name = key.rsplit(".", 1)[-1]
        fields = [f.name for f in dataclasses.fields(schema)]
        raise ConfigValueError(
            f"unknown key {key}: {schema.__name__} has no {name!r}{close_matches(name, fields)}"
        )


def _unknown_keys(node: Any, schema: type, prefix: str) -> Iterator[tuple[str, type]]:
    """(dotted key, the dataclass it is not a field of) for every unknown key under ``node``."""
    if not isinstance(node, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            yield dotted, schema
            continue
        inner = fields[key].default_factory
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            yield from _unknown_keys(value, inner, f"{dotted}.")


# dynarch.models.BUILTIN_MODELS, each a builder function of that name (named, not imported:
# models imports torch, which a refused command line should not wait for)
BUILTIN_BUILDERS = ("vgg_small", "resnet_small", "wrn")


def check_arguments(cfg: dict[str, Any]) -> None:
    """Refuse an argument the target does not take, where a section is open: the model's
    ``kwargs`` (a built-in's builder, or a user's nn.Module class) and every ``_target_`` of
    the policy, nested ones too. A target that takes ``**kwargs``, or that cannot be resolved
    here (the run reports that in its own words), is left alone; nothing is called."""
    model = cfg.get("model")
    if isinstance(model, dict) and model.get("kwargs"):
        own, name = model.get("_target_"), model.get("name")
        if own or name in BUILTIN_BUILDERS:
            target = own or f"dynarch.models.{name}"
            _check_call(target, list(model["kwargs"]), "model.kwargs", classes_only=bool(own))
    for where, node in _targets(cfg.get("policy"), "policy"):
        given = [k for k in node if not (isinstance(k, str) and k.startswith("_"))]
        _check_call(node["_target_"], given, where)


def _targets(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every dict with a ``_target_`` under ``node``, with its dotted place."""
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield where, node
        for key, value in node.items():
            yield from _targets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{where}[{i}]")


def _check_call(target: str, given: list[str], where: str, classes_only: bool = False) -> None:
    """One line if ``target``'s signature takes none of some name in ``given``."""
    found = _resolved(target)
    if found is None or (classes_only and not inspect.isclass(found)):
        return
    try:
        parameters = inspect.signature(found).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    takes = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for name in given:
        if name not in takes:
            raise ConfigValueError(
                f"{where}: {target} takes no argument {name!r}{close_matches(str(name), takes)}"
            )


def _resolved(target: str) -> Any:
    """What ``target`` names, found the way Hydra's instantiate finds it (its rules on which
    targets may be named apply) but not called; None if it cannot be found or is refused."""
    try:
        deferred = instantiate({"_target_": target, "_partial_": True})
    except (InstantiationException, ImportError, AttributeError, ValueError):
        return None
    return getattr(deferred, "func", None)
