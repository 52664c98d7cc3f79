"""Counting what hands a tensor's value to Python, per step of ``dynarch run`` (issue 24):
``install`` in a test process, or :class:`CountingSchedule` as a run's policy, which installs
it in every process a torchrun starts and writes each rank's steps to ``out/rank<R>.jsonl``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from dynarch import controller
from dynarch.config import RunConfig
from dynarch.policies import Schedule
from dynarch.presets import build_policy, preset_config

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


def _counting(reads: list[str], name: str, method: Callable) -> Callable:
    def counted(*args: Any, **kwargs: Any) -> Any:
        reads.append(name)
        return method(*args, **kwargs)

    return counted


def install(set_attribute: Callable, steps: list, each: Callable[[tuple], None] = id) -> None:
    """Count every read of a tensor's value; append (step, reads, what else the step did)
    to ``steps`` for every step (and pass it to ``each``)."""
    reads: list[str] = []
    for name in READS:
        set_attribute(torch.Tensor, name, _counting(reads, name, getattr(torch.Tensor, name)))
    step_once = controller._step

    def counted_step(setup, state, progress, x, y) -> bool:
        before, asked, mutations = len(reads), state.session.due, len(state.mutations)
        result = step_once(setup, state, progress, x, y)
        after, every = state.step, setup.trainer.log_every_steps
        busy = {
            "asked": asked,
            "mutated": len(state.mutations) > mutations,
            "evaluated": after % setup.eval_every == 0 or after == setup.total_steps,
            "checkpointed": bool(setup.checkpoint_every) and after % setup.checkpoint_every == 0,
            "logged": bool(every) and after % every == 0,
        }
        row = (after - 1, reads[before:], sorted(k for k, v in busy.items() if v))
        steps.append(row)
        each(row)
        return result

    set_attribute(controller, "_step", counted_step)


def default_run(run_dir: Path, **trainer: Any) -> controller.RunSummary:
    """``dynarch run`` of the default policy in this process (``trainer`` overrides), the run
    dir made here."""
    config = {"policy": preset_config("grow_then_prune"), "trainer": trainer}
    plain = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(RunConfig), config))
    policy, _ = build_policy(plain["policy"])
    run_dir.mkdir()
    return controller.run(plain, policy, run_dir, log=lambda line: None)


class CountingSchedule(Schedule):
    """The run's Schedule, counting reads in this process (see the module doc)."""

    def __init__(self, mutations: list, out: str) -> None:
        super().__init__(mutations)
        path = Path(out) / f"rank{os.environ.get('RANK', '0')}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(row: tuple) -> None:
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

        install(setattr, [], write)
