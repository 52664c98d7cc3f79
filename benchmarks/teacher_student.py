"""Teacher-student toy of the GradMax paper (Evci et al. 2022, Fig. 2/3): grow a student's
hidden layer one unit at a time and compare growth initializers with everything else equal.

Set-up as in the reference notebook (google-research/growneuron, Student_Teacher.ipynb):
teacher Linear(10, 10) -> relu1 -> Linear(10, 10) without biases, weights U[-1, 1], fixed by
``--teacher-seed``; 1 000 standard-normal inputs of dimension 10; MSE. The student (no biases,
Glorot-uniform weights like Keras' default) starts with 5 hidden units and gets one more every
``--steps-per-growth`` full-batch SGD steps (lr 0.1) until it has 10, then trains
``--final-steps`` more. ``relu1`` is ReLU whose derivative at 0 is 1 (the paper's activation),
so new units with zero fan-in still receive gradient; ``--activation relu`` uses torch's ReLU.

For a seed, every initializer sees the same student init and the same RNG state, so the runs
differ only by how the new units are initialised.

    python benchmarks/teacher_student.py --seeds 10 --steps-per-growth 200 \
        --inits gradmax random zeros --json runs/teacher_student.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

import dynarch

DIM, TEACHER_HIDDEN, STUDENT_HIDDEN, SAMPLES = 10, 10, 5, 1000
TARGET = "hidden"


class ReLU1(nn.Module):
    """ReLU with derivative 1 at 0 (the paper's ``relu1``): same forward as ``nn.ReLU``."""

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x)
            return x.clamp_min(0)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            return grad * (x >= 0).to(grad.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._Fn.apply(x)


def mlp(hidden: int, activation: str = "relu1") -> nn.Sequential:
    """Linear(10, hidden) -> activation -> Linear(hidden, 10), no biases."""
    act = ReLU1() if activation == "relu1" else nn.ReLU()
    return nn.Sequential(
        OrderedDict(
            hidden=nn.Linear(DIM, hidden, bias=False),
            act=act,
            out=nn.Linear(hidden, DIM, bias=False),
        )
    )


def teacher_data(
    seed: int = 0, samples: int = SAMPLES, weight_range: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs N(0, 1) and the outputs of a teacher with U[-r, r] weights."""
    gen = torch.Generator().manual_seed(seed)
    teacher = mlp(TEACHER_HIDDEN)
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) * 2 * weight_range - weight_range)
        x = torch.randn(samples, DIM, generator=gen)
        y = teacher(x)
    return x, y


def student(seed: int, hidden: int = STUDENT_HIDDEN, activation: str = "relu1") -> nn.Sequential:
    """The student at its initial width, Glorot-uniform weights (Keras' Dense default)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    model = mlp(hidden, activation)
    with torch.no_grad():
        for p in model.parameters():
            bound = (6.0 / (p.shape[0] + p.shape[1])) ** 0.5
            p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)
    return model


def random_fan_out_norm(fan_in: int) -> float:
    """Expected norm of a fan-out column of ``random`` growth: DIM entries U(+-1/sqrt(fan_in))."""
    return (DIM / (3 * fan_in)) ** 0.5


@dataclass
class Run:
    """One training run: losses and growth statistics, indexed by growth (0-based)."""

    init: str
    seed: int
    loss_before_growth: list[float] = field(default_factory=list)  # just before growth g
    loss_end_of_interval: list[float] = field(default_factory=list)  # last step before g+1
    loss_mean_of_interval: list[float] = field(default_factory=list)  # mean over that interval
    fan_in_grad_norm: list[float] = field(default_factory=list)
    new_fan_out_norm: list[float] = field(default_factory=list)
    output_change: list[float] = field(default_factory=list)
    final_loss: float = float("nan")
    seconds: float = 0.0


def train_with_growth(
    init: str,
    seed: int,
    x: torch.Tensor,
    y: torch.Tensor,
    steps_per_growth: int = 200,
    growths: int = 5,
    final_steps: int | None = None,
    lr: float = 0.1,
    activation: str = "relu1",
    match_random_norm: bool = False,
    **init_options: Any,
) -> Run:
    """Train ``steps_per_growth`` steps, grow one unit, repeat ``growths`` times, then train
    ``final_steps`` (default ``steps_per_growth``) more; full batch SGD on MSE.

    ``init_options`` go to GradMax only; ``match_random_norm`` gives GradMax's fan-out the
    expected norm of the ``random`` init's fan-out, so only the direction differs."""
    final_steps = steps_per_growth if final_steps is None else final_steps
    start = time.perf_counter()
    model = student(seed, activation=activation)
    torch.manual_seed(seed)  # the random/zeros initializers draw from the global RNG
    loss_fn = nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    run = Run(init, seed)

    def train(steps: int) -> list[float]:
        losses = []
        for _ in range(steps):
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    train(steps_per_growth)
    for g in range(growths):
        with torch.no_grad():
            run.loss_before_growth.append(float(loss_fn(model(x), y)))
        options = dict(init_options) if init == "gradmax" else {}
        if init == "gradmax" and match_random_norm:
            options["norm"] = random_fan_out_norm(model.out.in_features + 1)
        record = dynarch.grow(
            model,
            TARGET,
            1,
            init=init,
            data=(x, y),
            loss_fn=loss_fn,
            optimizer=optimizer,
            example_inputs=x,
            **options,
        )
        run.fan_in_grad_norm.append(float(record.info.get("fan_in_grad_norm") or 0.0))
        run.output_change.append(float(record.info.get("output_change", 0.0)))
        run.new_fan_out_norm.append(float(model.out.weight[:, -1].detach().norm()))
        losses = train(steps_per_growth if g < growths - 1 else final_steps)
        with torch.no_grad():
            last = float(loss_fn(model(x), y))
        run.loss_end_of_interval.append(last)
        run.loss_mean_of_interval.append(statistics.fmean(losses) if losses else last)
    run.final_loss = run.loss_end_of_interval[-1]
    run.seconds = time.perf_counter() - start
    return run


def summarize(runs: Sequence[Run], key: str) -> list[tuple[float, float]]:
    """(mean, std) over runs of a per-growth list attribute (or a scalar as a 1-list)."""
    values = [getattr(r, key) for r in runs]
    values = [v if isinstance(v, list) else [v] for v in values]
    out = []
    for column in zip(*values, strict=True):
        std = statistics.stdev(column) if len(column) > 1 else 0.0
        out.append((statistics.fmean(column), std))
    return out


def table(runs_by_init: dict[str, list[Run]], key: str, title: str, digits: int = 4) -> str:
    """Markdown table: one row per init, one column per growth."""
    growths = len(next(iter(runs_by_init.values()))[0].loss_end_of_interval)
    head = "| init | " + " | ".join(f"growth {g + 1}" for g in range(growths)) + " |"
    lines = [f"{title}\n", head, "|---" * (growths + 1) + "|"]
    for init, runs in runs_by_init.items():
        cells = [f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in summarize(runs, key)]
        lines.append(f"| {init} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(runs_by_init: dict[str, list[Run]]) -> str:
    """All tables of the benchmark as markdown."""
    parts = [
        table(
            runs_by_init,
            "loss_end_of_interval",
            "Training loss after the interval following each growth (mean ± std over seeds; "
            "the last column is the final loss):",
        ),
        table(
            runs_by_init,
            "loss_mean_of_interval",
            "Training loss averaged over the steps of the interval following each growth:",
        ),
        table(
            runs_by_init,
            "fan_in_grad_norm",
            "Fan-in gradient norm of the new unit at growth (record.info['fan_in_grad_norm']):",
        ),
        table(runs_by_init, "new_fan_out_norm", "Norm of the new unit's fan-out at growth:"),
    ]
    first = next(iter(runs_by_init.values()))
    before = summarize(first, "loss_before_growth")[0]
    parts.append(
        f"Loss before the first growth (same for every init): {before[0]:.4f} ± {before[1]:.4f}"
    )
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> dict[str, list[Run]]:
    """Run every init for every seed; print the tables; optionally save JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--steps-per-growth", type=int, default=200)
    parser.add_argument("--final-steps", type=int, default=None, help="default: steps per growth")
    parser.add_argument("--growths", type=int, default=TEACHER_HIDDEN - STUDENT_HIDDEN)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--inits", nargs="+", default=["gradmax", "random", "zeros"])
    parser.add_argument("--activation", choices=["relu1", "relu"], default="relu1")
    parser.add_argument("--teacher-seed", type=int, default=0)
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="GradMax fan-out norm / mean existing fan-out norm (paper: 1.0)",
    )
    parser.add_argument(
        "--match-random-norm",
        action="store_true",
        help="give GradMax's fan-out the random init's expected norm instead of --scale",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (tiny matmuls: 1 is fastest)"
    )
    parser.add_argument("--json", type=str, default=None, help="save runs and settings here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    x, y = teacher_data(args.teacher_seed)
    runs_by_init: dict[str, list[Run]] = {}
    for init in args.inits:
        runs_by_init[init] = [
            train_with_growth(
                init,
                seed,
                x,
                y,
                steps_per_growth=args.steps_per_growth,
                growths=args.growths,
                final_steps=args.final_steps,
                lr=args.lr,
                activation=args.activation,
                match_random_norm=args.match_random_norm,
                scale=args.scale,
            )
            for seed in range(args.seeds)
        ]
        seconds = sum(r.seconds for r in runs_by_init[init])
        print(f"{init}: {args.seeds} seeds in {seconds:.1f} s", file=sys.stderr)
    print(f"torch {torch.__version__}, settings: {vars(args)}\n")
    print(report(runs_by_init))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "settings": vars(args),
                    "torch": torch.__version__,
                    "runs": {k: [asdict(r) for r in v] for k, v in runs_by_init.items()},
                },
                f,
                indent=1,
            )
    return runs_by_init


if __name__ == "__main__":
    main()
