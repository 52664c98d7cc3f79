"""A user's op in one file: ``reinit`` re-draws the fan-in of the ``k`` channels of a target
with the smallest fan-in norm (Kaiming-uniform, from the run's seeded generator) and clears
their optimizer state. It changes values only, so a resume replays nothing (the checkpoint's
weights hold it). A run names :class:`ReinitSchedule` by ``_target_``: importing this module
registers the op before the schedule parses its ``op: reinit`` entries."""

from __future__ import annotations

import math
import time

import torch
from killers import KillAtStep

from dynarch.ops import Look, Op, register_op, replay_nothing
from dynarch.surgery.record import MutationRecord


@torch.no_grad()
def apply_reinit(m, model, optimizer, batch, loss_fn, reduce_sum=None) -> MutationRecord:
    start = time.perf_counter()
    layer = model.get_submodule(m.target)
    weight = layer.weight
    weakest = weight.flatten(1).norm(dim=1).argsort(stable=True)[: m.k]
    fresh = torch.empty_like(weight[weakest])
    torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
    weight[weakest] = fresh
    for param in (weight, layer.bias):
        for value in optimizer.state.get(param, {}).values() if param is not None else ():
            if torch.is_tensor(value) and value.dim() > 0:
                value[weakest] = 0
    params = sum(p.numel() for p in model.parameters())
    width = int(weight.shape[0])
    return MutationRecord(
        kind="reinit",
        target=m.target,
        group=m.target,
        k=m.k,
        method="kaiming_uniform",
        width_before=width,
        width_after=width,
        indices=sorted(weakest.tolist()),
        modules=[m.target],
        params_before=params,
        params_after=params,
        seconds=time.perf_counter() - start,
    )


REINIT = register_op(
    Op(
        "reinit",
        apply=apply_reinit,
        replay=replay_nothing,
        look=Look("#ff7f0e", "*", "★", "orange"),
    )
)


class ReinitSchedule(KillAtStep):
    """dynarch's Schedule (which now knows ``op: reinit``), plus a SIGKILL once when step
    ``kill_step`` begins, for the resume test (never, by default)."""

    def __init__(self, mutations, kill_step: int = -1, marker: str = "") -> None:
        super().__init__(mutations, kill_step, marker)
