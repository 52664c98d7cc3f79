"""Ways for a test run to die by SIGKILL at a chosen point, once: each leaves a marker file
first, so the resumed run (same config) goes through the same point without dying."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from dynarch.gradmax import GradMaxOptions, gradmax_init
from dynarch.growth_context import GrowthContext, NewChannels, takes_options
from dynarch.policies import Schedule, TrainState


def die_once(marker: str) -> None:
    path = Path(marker)
    if not path.exists():
        path.write_text("killed\n")
        os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(Schedule):
    """The run's Schedule, plus a SIGKILL when step ``kill_step`` begins (before its
    mutations)."""

    def __init__(self, mutations, kill_step: int, marker: str) -> None:
        super().__init__(mutations)
        self.kill_step, self.marker = kill_step, marker

    def decide(self, state: TrainState):
        if state.step == self.kill_step:
            die_once(self.marker)
        return super().decide(state)


@dataclass(frozen=True)
class DyingOptions(GradMaxOptions):
    marker: str | None = None  # the file that says the process died here once already
    rank: int | None = None  # under torchrun, only the process of this rank dies (no marker)


@takes_options(DyingOptions)
def gradmax_dying_midway(ctx: GrowthContext) -> NewChannels:
    """GradMax, but the process dies after the statistics pass, before any tensor changes."""
    new = gradmax_init(ctx)
    if ctx.options.rank is not None:
        if int(os.environ.get("RANK", "0")) == ctx.options.rank:
            os.kill(os.getpid(), signal.SIGKILL)
    elif ctx.options.marker is not None:
        die_once(ctx.options.marker)
    return new


class PoisonBatchAt(Schedule):
    """The run's Schedule, plus a NaN in the training batch of step ``step`` (the loss of that
    one step is NaN; the weights are still fine)."""

    def __init__(self, mutations, step: int) -> None:
        super().__init__(mutations)
        self.poison_step = step

    def decide(self, state: TrainState):
        if state.step == self.poison_step:
            state.batch[0][0] = float("nan")
        return super().decide(state)


@takes_options(GradMaxOptions)
def wrong_shape_init(ctx: GrowthContext) -> NewChannels:
    """A user initializer with a bug: its fan-in has one row too many."""
    new = gradmax_init(ctx)
    producer = ctx.group.producers[0]
    new.fan_in[producer] = new.fan_in[producer].repeat_interleave(2, dim=0)[: ctx.k + 1]
    return new


class SignalAtStep(Schedule):
    """The run's Schedule, plus ``times`` signals ``signum`` to the process when step
    ``step`` begins (what Ctrl-C or a batch scheduler sends), once (``marker``)."""

    def __init__(self, mutations, step: int, signum: int, marker: str, times: int = 1) -> None:
        super().__init__(mutations)
        self.signal_step, self.signum, self.marker, self.times = step, signum, marker, times

    def decide(self, state: TrainState):
        if state.step == self.signal_step and not Path(self.marker).exists():
            Path(self.marker).write_text("signalled\n")
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)
        return super().decide(state)
