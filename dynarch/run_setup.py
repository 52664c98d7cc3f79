"""What stays fixed while ``dynarch run`` trains: the config, the processes, the data, the
model as built and traced, and the run's lengths (:class:`RunSetup`, made by :func:`set_up`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from dynarch import distributed
from dynarch.config import MAX_STEPS, RunConfig, TrainerConfig
from dynarch.data import DataSplits, load_data
from dynarch.errors import ConfigError
from dynarch.factories import build_model, loaders
from dynarch.graph import ArchGraph
from dynarch.models import count_params
from dynarch.policies.base import count_macs
from dynarch.stopping import StopRequest


@dataclass(frozen=True)
class RunSetup:
    """What stays fixed while a run trains: its config, processes, data and lengths."""

    config: RunConfig  # the resolved config, typed: what the loop reads
    plain: dict[str, Any]  # the same as plain data: what the history and config.yaml keep
    run_dir: Path
    procs: distributed.Processes
    device: torch.device
    log: Callable[[str], None]
    splits: DataSplits
    train_loader: Any
    test_loader: Any
    example: torch.Tensor  # one training sample to trace with
    initial_widths: dict[str, int]  # target -> width of its group at the start
    params_before: int
    macs_before: int
    steps_per_epoch: int
    total_steps: int
    eval_every: int  # steps
    checkpoint_every: int  # steps; 0: only after mutations and at the end
    loss_fn: Callable = field(default_factory=nn.CrossEntropyLoss)
    stop: StopRequest = field(default_factory=StopRequest)  # Ctrl-C / SIGTERM seen

    @property
    def trainer(self) -> TrainerConfig:
        return self.config.trainer

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype (``trainer.amp``), on CUDA only; None: full precision."""
        if self.device.type != "cuda" or self.trainer.amp == "off":
            return None
        return torch.bfloat16 if self.trainer.amp == "bf16" else torch.float16

    @property
    def memory_format(self) -> torch.memory_format:
        """Of the model's weights and each batch (``trainer.channels_last``)."""
        return torch.channels_last if self.trainer.channels_last else torch.contiguous_format


def set_up(
    config: RunConfig,
    plain: dict[str, Any],
    run_dir: Path,
    procs: distributed.Processes,
    device: torch.device,
    log: Callable[[str], None],
) -> tuple[RunSetup, nn.Module, ArchGraph]:
    """Data, loaders, the model as built and its graph, the run's lengths; config errors
    first, before anything is written. ``config`` is ``plain`` typed (:func:`run_config`)."""
    trainer, data = config.trainer, config.data
    splits = load_data(
        data.name,
        path=data.path,
        root=data.root,
        download=data.download,
        seed=trainer.seed,
        test_fraction=data.test_fraction,
    )
    train_loader, test_loader = loaders(splits, trainer, procs, data.num_workers)
    model = build_model(plain["model"], splits, device, run_dir)
    if trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # one training sample to trace with; not from the loader, whose order it would disturb
    example = default_collate([splits.train[0]])[0].to(device)
    graph = ArchGraph.from_module(model, example)
    steps_per_epoch = len(train_loader)
    total_steps = trainer.steps or trainer.epochs * steps_per_epoch
    if not 1 <= total_steps <= MAX_STEPS:
        raise ConfigError(
            f"trainer.epochs/steps give {total_steps} steps; need 1 to {MAX_STEPS:.0e}"
        )
    if trainer.on_nonfinite not in ("stop", "skip"):
        got = trainer.on_nonfinite
        raise ConfigError(f"trainer.on_nonfinite must be stop or skip, got {got!r}")
    setup = RunSetup(
        config=config,
        plain=plain,
        run_dir=run_dir,
        procs=procs,
        device=device,
        log=log,
        splits=splits,
        train_loader=train_loader,
        test_loader=test_loader,
        example=example,
        initial_widths={t: graph.group_of(t).width for t in graph.targets()},
        params_before=count_params(model),
        macs_before=count_macs(model),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        eval_every=max(1, int(round(trainer.eval_every_epochs * steps_per_epoch))),
        checkpoint_every=int(round(trainer.checkpoint_every_epochs * steps_per_epoch)),
        stop=StopRequest(last_word=procs.world > 1),
    )
    return setup, model, graph
