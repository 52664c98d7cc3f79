"""Throughput of ``dynarch run`` against the floor: a plain PyTorch loop (issue 24, item 3).

Both train the same architecture (the plain loop gets a copy of dynarch's model after every
mutation, with a fresh optimizer of the same config and the same LR schedule) on the same
batches, in chunks of ``--chunk`` steps, interleaved (dynarch then plain, then plain then
dynarch, ...), with no host sync inside a chunk and one at its end, so that on a GPU what is
timed includes how well the host keeps the device fed. A chunk in which dynarch mutated,
evaluated or checkpointed is not in the ratio: those steps are counted apart.

    python benchmarks/throughput.py --case vgg_small-digits --steps 400
    python benchmarks/throughput.py --case resnet18-cifar --steps 120
    python benchmarks/throughput.py --case resnet18-cifar --device cuda --batch 512 \
        --amp bf16 --channels-last --compile

Results, with the machine: docs/benchmarks.md ("Throughput against a plain loop").
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from perf import environment, median_ci

from dynarch import controller, distributed
from dynarch.cli import _with_schema
from dynarch.config import run_config
from dynarch.factories import lr_multiplier, make_optimizer, resolve_device
from dynarch.presets import build_policy, preset_config
from dynarch.run_setup import RunSetup, set_up
from dynarch.run_state import RunState

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-10k.npz"
CASES: dict[str, dict[str, Any]] = {
    "vgg_small-digits": {"model": {"name": "vgg_small"}, "data": {"name": "digits"}},
    "vgg_small-cifar": {
        "model": {"name": "vgg_small"},
        "data": {"name": "npz", "path": str(CIFAR)},
    },
    "resnet18-cifar": {
        "model": {"name": "torchvision:resnet18", "width": None},
        "data": {"name": "npz", "path": str(CIFAR)},
    },
}


def run_config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The plain config of the dynarch side: the case, the default policy, the trainer."""
    trainer = {
        "steps": args.steps,
        "batch_size": args.batch,
        "device": args.device,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "threads": args.threads,
        "progress": False,
        "eval_every_epochs": args.eval_every_epochs,
        "compile": args.compile,
        "compile_backend": args.compile_backend,
    }
    case = CASES[args.case]
    config = {"policy": preset_config(args.policy), **case, "trainer": trainer}
    return _with_schema(config, Path(f"throughput {args.case}"))


def started(plain: dict[str, Any], run_dir: Path) -> tuple[RunSetup, RunState]:
    """dynarch run's set-up and starting state, as ``controller.run`` makes them."""
    config = run_config(plain)
    procs, device = distributed.start(resolve_device(config.trainer.device), run_dir)
    if config.trainer.threads is not None:
        torch.set_num_threads(config.trainer.threads)
    torch.manual_seed(config.trainer.seed)
    setup, model, graph = set_up(config, plain, run_dir, procs, device, log=lambda line: None)
    policy, _ = build_policy(plain["policy"])
    return setup, controller._starting_state(setup, policy, model, graph, resume=False)


class PlainLoop:
    """What a user writes by hand for the model dynarch has now: forward, loss, backward,
    optimizer and LR scheduler steps, autocast (and a GradScaler for fp16), torch.compile as
    configured."""

    def __init__(self, setup: RunSetup, model: torch.nn.Module) -> None:
        self.setup, self.model = setup, copy.deepcopy(model)
        trainer = setup.trainer
        self.forward = (
            torch.compile(self.model, backend=trainer.compile_backend)
            if trainer.compile
            else self.model
        )
        self.optimizer = make_optimizer(self.model, setup.config.optimizer)
        schedule = lr_multiplier(setup.config.lr_schedule, setup.steps_per_epoch, setup.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        fp16 = setup.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        setup = self.setup
        self.optimizer.zero_grad(set_to_none=True)
        enabled = setup.amp_dtype is not None
        with torch.autocast(setup.device.type, setup.amp_dtype, enabled=enabled):
            loss = setup.loss_fn(self.forward(x), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()


def batches(setup: RunSetup) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The run's training batches on the device, epoch after epoch (loader time not timed)."""
    loader = setup.train_loader
    epoch = 0
    while True:
        loader.sampler.set_position(epoch, 0)
        for x, y in loader:
            x = x.to(setup.device, memory_format=setup.memory_format)
            yield x, y.to(setup.device)
        epoch += 1


def _timed(device: torch.device, work: Callable[[], None]) -> float:
    """Seconds of ``work``, the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _special(setup: RunSetup, state: RunState, step: int, mutations: int) -> bool:
    """Whether dynarch's step ``step`` (0-based) mutated, evaluated or checkpointed."""
    done = step + 1
    periodic = setup.checkpoint_every and done % setup.checkpoint_every == 0
    evaluated = done % setup.eval_every == 0 or done == setup.total_steps
    return len(state.mutations) > mutations or bool(periodic) or evaluated


def dynarch_chunk(setup: RunSetup, state: RunState, xs: list, busy: list[bool]) -> None:
    """dynarch run's steps on ``xs``; appends whether one mutated, evaluated or checkpointed."""
    special = False
    for x, y in xs:
        mutations = len(state.mutations)
        controller._step(setup, state, None, x, y)
        special |= _special(setup, state, state.step - 1, mutations)
    busy.append(special)


def plain_chunk(plain: PlainLoop, xs: list) -> None:
    for x, y in xs:
        plain.step(x, y)


def measure(setup: RunSetup, state: RunState, chunk: int) -> dict[str, Any]:
    """Chunks of ``chunk`` steps, dynarch and plain interleaved; per-chunk seconds. The first
    chunk warms both up (allocator, kernels, compile) and, under torch.compile, so does the
    chunk after a mutation (both compile the new shapes: dynarch's in its events'
    ``compile_seconds``); those chunks are in neither the ratio nor the special count."""
    data, plain = batches(setup), PlainLoop(setup, state.model)
    ordinary: list[tuple[float, float]] = []  # (dynarch, plain) seconds of a chunk
    special = {"chunks": 0, "dynarch_s": 0.0, "plain_s": 0.0, "mutations": 0, "warm_up": 0}
    busy: list[bool] = []
    warming = True
    while state.step + chunk <= setup.total_steps:
        xs = [next(data) for _ in range(chunk)]
        mutations = len(state.mutations)
        run_dynarch = partial(dynarch_chunk, setup, state, xs, busy)
        run_plain = partial(plain_chunk, plain, xs)
        if len(busy) % 2 == 0:
            d, p = _timed(setup.device, run_dynarch), _timed(setup.device, run_plain)
        else:
            p, d = _timed(setup.device, run_plain), _timed(setup.device, run_dynarch)
        mutated = len(state.mutations) > mutations
        if mutated:
            plain = PlainLoop(setup, state.model)  # the architecture dynarch has now
        if busy[-1]:
            special["chunks"] += 1
            special["dynarch_s"] += d
            special["plain_s"] += p
            special["mutations"] += len(state.mutations) - mutations
        elif warming:
            special["warm_up"] += 1
        else:
            ordinary.append((d, p))
        warming = mutated and setup.trainer.compile
    return {"ordinary": ordinary, "special": special, "steps": state.step}


def summary(result: dict[str, Any], chunk: int) -> dict[str, Any]:
    """steps/s of both sides over the ordinary chunks and dynarch's relative throughput
    (plain seconds / dynarch seconds: 1.0 is the floor's speed) with its 95 % interval."""
    d = [a for a, _ in result["ordinary"]]
    p = [b for _, b in result["ordinary"]]
    low, high = median_ci(p, d)
    special = result["special"]
    return {
        "chunks": len(d),
        "dynarch_steps_per_s": chunk * len(d) / sum(d),
        "plain_steps_per_s": chunk * len(p) / sum(p),
        "ratio_median": statistics.median(b / a for a, b in zip(d, p, strict=True)),
        "ratio_total": sum(p) / sum(d),
        "ci95": (low, high),
        "special_chunks": special["chunks"],
        "mutations": special["mutations"],
        "special_extra_s": special["dynarch_s"] - special["plain_s"],
        "warm_up_chunks": special["warm_up"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), default="vgg_small-digits")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--policy", default="grow_then_prune")
    parser.add_argument("--eval-every-epochs", type=float, default=1.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides")
    parser.add_argument("--compile-backend", default="inductor")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        setup, state = started(run_config_of(args), Path(tmp))
        with state.history:
            result = summary(measure(setup, state, args.chunk), args.chunk)
    print(environment())
    print(f"case {args.case}, {vars(args)}")
    low, high = result["ci95"]
    print(
        f"| {args.case} | {args.device} | {args.batch} | {result['chunks']}×{args.chunk} | "
        f"{result['dynarch_steps_per_s']:.1f} | {result['plain_steps_per_s']:.1f} | "
        f"**{result['ratio_median']:.3f}** [{low:.3f}, {high:.3f}] | "
        f"{result['ratio_total']:.3f} | {result['mutations']} in {result['special_chunks']} "
        f"chunks, +{result['special_extra_s']:.2f} s |"
    )
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
