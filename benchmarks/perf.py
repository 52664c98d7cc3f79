"""Performance benchmarks of issue 6: engine overhead (P1), prune step (P3), pruned inference
speedup (P4) and peak memory of a grow step (memory).

The machine these run on is shared, so every comparison is measured side by side in one process,
interleaved (A B, then B A, ...: drift hits both sides alike), and reported as medians and
medians of per-round ratios; memory is measured in fresh subprocesses.

    python benchmarks/perf.py p1 --repeats 60 --threads 1
    python benchmarks/perf.py p3 --repeats 15 --threads 1 --profile
    python benchmarks/perf.py p4 --repeats 30 --threads 1
    python benchmarks/perf.py p4 --repeats 15 --threads 1 --exported
    python benchmarks/perf.py memory --repeats 3

Results, with the machine and the reading of each number: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import datetime
import gc
import io
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch_pruning as tp
import torchvision
from gradmax_step import PARTS, timed_parts  # P2's wrappers: the same breakdown of a mutation
from torch import nn

import dynarch
from dynarch import distributed
from dynarch.graph import ArchGraph, remember_example_inputs
from dynarch.models import conv_like, count_params, vgg_small
from dynarch.policies.base import Policy, count_macs
from dynarch.policies.base import train_state as _state
from dynarch.policies.schedule import Schedule, Static
from dynarch.trained import fold_batchnorm

Step = Callable[[], float]


# -- shared helpers ----------------------------------------------------------------------------
def environment() -> str:
    """One line naming what the numbers were measured on (the machine is shared: load shown)."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    now = datetime.datetime.now(datetime.UTC).strftime("%a %b %d %H:%M UTC %Y")
    return (
        f"{now}; {os.cpu_count()} CPUs ({cpu}); load average {load}; torch {torch.__version__}, "
        f"torch-pruning {tp.__version__}, {torch.get_num_threads()} torch threads, "
        f"Python {sys.version.split()[0]}"
    )


def interleaved(steps: dict[str, Step], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Run every timed step once per round, the order reversed every other round, so slow
    phases of the shared machine fall on all sides alike. Each step returns its own seconds
    (set-up such as deep copies stays outside the timed region)."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t = steps[n]()
            if r >= warmup:
                times[n].append(t)
    return times


def median_ci(num: list[float], den: list[float], draws: int = 2000) -> tuple[float, float]:
    """95 % bootstrap interval of the median per-round ratio: how well the median is pinned."""
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    g = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(ratios), (draws, len(ratios)), generator=g)
    meds = torch.tensor(ratios, dtype=torch.float64)[picks].median(dim=1).values.sort().values
    return float(meds[int(0.025 * draws)]), float(meds[int(0.975 * draws) - 1])


def ratio_stats(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median of per-round ratios, with its inter-quartile range (robust on a shared CPU)."""
    ratios = sorted(a / b for a, b in zip(num, den, strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), q[0], q[2]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x, y) -> Step:
    """Forward + backward + optimizer step, as a plain training loop does it."""
    loss_fn = nn.CrossEntropyLoss()

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def batch(n: int, channels: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g), torch.randint(
        0, 10, (n,), generator=g
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], int, int]] = {
    # name: (builder, input channels, image size)
    "vgg_small w=16 8x8": (lambda: vgg_small(10, 1, width=16, image_size=8), 1, 8),
    "vgg_small w=16 32x32": (lambda: vgg_small(10, 3, width=16, image_size=32), 3, 32),
    "vgg_small w=32 32x32": (lambda: vgg_small(10, 3, width=32, image_size=32), 3, 32),
    "vgg_small w=64 32x32": (lambda: vgg_small(10, 3, width=64, image_size=32), 3, 32),
    "resnet18 32x32": (lambda: torchvision.models.resnet18(num_classes=10), 3, 32),
}


def fresh_static(model: nn.Module, builder: Callable[[], nn.Module]) -> nn.Module:
    """A new plain model with ``model``'s current shapes: the original constructor, every conv,
    BatchNorm and linear layer replaced by a newly constructed one of the final size, then
    ``model``'s weights loaded (strict). What a user would write by hand for that architecture."""
    static = builder()
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            new: nn.Module = conv_like(m)
        elif isinstance(m, nn.BatchNorm2d):
            new = nn.BatchNorm2d(m.num_features, eps=m.eps, momentum=m.momentum)
        elif isinstance(m, nn.Linear):
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(static.get_submodule(parent) if parent else static, attr, new)
    static.load_state_dict(model.state_dict(), strict=True)
    return static


def leftovers(model: nn.Module) -> dict[str, int]:
    """Anything dynarch could have left on the hot path: module/tensor hooks, non-contiguous or
    non-Parameter weights, global module hooks."""
    hooks = sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    )
    tensor_hooks = sum(len(p._backward_hooks or {}) for p in model.parameters())
    glob = nn.modules.module
    return {
        "module hooks": hooks,
        "tensor hooks": tensor_hooks,
        "global hooks": len(glob._global_forward_hooks) + len(glob._global_backward_hooks),
        "non-contiguous params": sum(not p.is_contiguous() for p in model.parameters()),
        "non-Parameter params": sum(type(p) is not nn.Parameter for p in model.parameters()),
    }


# -- P1: engine overhead -----------------------------------------------------------------------
MUTATIONS: dict[str, list[tuple[str, str, int, str]]] = {
    # (op, target, k, init or importance)
    "vgg": [
        ("grow", "features.conv1", 4, "gradmax"),
        ("grow", "features.conv3", 8, "gradmax"),
        ("prune", "features.conv2", 4, "magnitude"),
        ("grow", "classifier.fc1", 8, "random"),
        ("prune", "features.conv4", 6, "magnitude"),
        ("grow", "features.conv4", 3, "gradmax"),
    ],
    "resnet": [
        ("grow", "layer1.0.conv1", 8, "gradmax"),
        ("prune", "layer2.0.conv1", 16, "magnitude"),
        ("grow", "conv1", 8, "gradmax"),
        ("prune", "layer3.1.conv1", 40, "magnitude"),
        ("grow", "layer4.0.conv1", 12, "gradmax"),
        ("prune", "layer2.0.conv2", 8, "magnitude"),
    ],
}


def grown_and_pruned(
    builder: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, plan: list
) -> tuple[nn.Module, torch.optim.Optimizer, list[str]]:
    """A model trained a little, mutated by ``plan`` with its optimizer carried, as the
    controller would leave it."""
    torch.manual_seed(0)
    model = builder()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    step = train_step(model, opt, x, y)
    step()
    done = []
    for op, target, k, how in plan:
        if op == "grow":
            rec = dynarch.grow(
                model,
                target,
                k,
                init=how,
                data=(x, y),
                loss_fn=loss_fn,
                optimizer=opt,
                example_inputs=x,
            )
        else:
            rec = dynarch.prune(model, target, k=k, importance=how, optimizer=opt, example_inputs=x)
        done.append(f"{op} {target} {rec.width_before}->{rec.width_after}")
        step()
    return model, opt, done


def controller_overhead(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, policy: Policy, calls: int = 300
) -> dict[str, float]:
    """Microseconds per step of the controller's work outside the model, as in ``run``: build
    the TrainState (with ``count_params``), ``policy.decide``, broadcast (one process), then
    ``model.train()``; and ``count_params`` alone."""
    graph = ArchGraph.from_module(model, x[:1])
    widths = {t: graph.group_of(t).width for t in graph.targets()}
    procs = distributed.Processes()
    loss_fn = nn.CrossEntropyLoss()
    metrics: list = []
    losses: list = [1.0] * 100

    def per_step(step: int) -> None:
        state = _state(
            step,
            100,
            10_000,
            model,
            (x, y),
            loss_fn,
            metrics,
            losses,
            widths,
            count_params(model),
            graph,
        )
        procs.broadcast(policy.decide(state))
        model.train()

    params = count_params(model)

    def proposed(step: int) -> None:
        """The same with the fix proposed for the controller: the parameter count cached per
        architecture version, ``model.train()`` only when the model is not in training mode."""
        state = _state(
            step, 100, 10_000, model, (x, y), loss_fn, metrics, losses, widths, params, graph
        )
        procs.broadcast(policy.decide(state))
        if not model.training:
            model.train()

    # the loop's mixed-precision machinery, switched off on CPU, and its LR schedule
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    loss = torch.tensor(1.0, requires_grad=True)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: 1.0)
    sgd.step()  # no gradients: changes nothing, but orders the scheduler after a step

    def amp_off(_step: int) -> None:
        with torch.autocast("cpu", enabled=False):
            pass
        scaler.scale(loss)
        scaler.update()

    out = {}
    for name, fn in (
        ("state+decide+train()", per_step),
        ("proposed", proposed),
        ("count_params", lambda _s: count_params(model)),
        ("model.train()", lambda _s: model.train()),
        ("autocast+GradScaler off", amp_off),
        ("LR scheduler.step()", lambda _s: scheduler.step()),
    ):
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            for s in range(calls):
                fn(s)
            samples.append((time.perf_counter() - start) / calls)
        out[name] = 1e6 * statistics.median(samples)
    return out


def future_schedule() -> Schedule:
    """A schedule whose entries are all still to come: decide() sorts and checks them."""
    return Schedule(
        [{"step": 5000 + i, "op": "grow", "target": "features.conv1", "k": 2} for i in range(8)]
    )


def _p1_case(label: str, args: argparse.Namespace) -> dict[str, Any]:
    """One model of P1: grown and pruned against its static twin, interleaved."""
    builder, channels, size = MODELS[label]
    x, y = batch(args.batch, channels, size)
    plan = MUTATIONS["resnet" if "resnet" in label else "vgg"]
    model, opt, done = grown_and_pruned(builder, x, y, plan)
    static = fresh_static(model, builder)
    model.train(), static.train()
    with torch.no_grad():
        same = float((model.eval()(x[:8]) - static.eval()(x[:8])).abs().max())
    model.train(), static.train()
    static_opt = torch.optim.SGD(static.parameters(), lr=0.01, momentum=0.9)
    twin = fresh_static(model, builder).train()  # A/A control: how far "equal" scatters
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9)
    times = interleaved(
        {
            "dynarch": train_step(model, opt, x, y),
            "static": train_step(static, static_opt, x, y),
            "static twin": train_step(twin, twin_opt, x, y),
        },
        args.repeats,
        args.warmup,
    )
    med, lo, hi = ratio_stats(times["dynarch"], times["static"])
    over: dict[str, dict[str, float]] = {}
    for pname, policy in (("Static", Static()), ("Schedule(8 pending)", future_schedule())):
        over[pname] = controller_overhead(model, x, y, policy)
    result = {
        "mutations": done,
        "params": count_params(model),
        "identical_outputs": same,
        "leftovers": leftovers(model),
        "dynarch_s": statistics.median(times["dynarch"]),
        "static_s": statistics.median(times["static"]),
        "ratio": med,
        "ratio_iqr": (lo, hi),
        "ratio_ci": median_ci(times["dynarch"], times["static"]),
        "twin_ratio": ratio_stats(times["static twin"], times["static"])[0],
        "twin_ci": median_ci(times["static twin"], times["static"]),
        "ratio_of_medians": statistics.median(times["dynarch"])
        / statistics.median(times["static"]),
        "overhead_us": over,
        "times": times,
    }
    print(f"{label}: ratio {med:.3f} ({lo:.3f}-{hi:.3f})", flush=True)
    return result


def _print_p1(results: dict[str, Any], args: argparse.Namespace) -> None:
    """P1's tables."""
    print(f"\n{environment()}; batch {args.batch}, median of {args.repeats} interleaved rounds\n")
    print(
        "| model (mutations) | params | dynarch step ms | static step ms | **dynarch / static** "
        "[95 % CI of the median] (IQR of per-round ratios) | A/A: static twin / static [CI] "
        "| ratio of medians | hooks / non-contiguous left |"
    )
    print("|---" * 8 + "|")
    for label, r in results.items():
        left = r["leftovers"]
        print(
            f"| {label} ({len(r['mutations'])}) | {r['params']:,} | {1e3 * r['dynarch_s']:.1f} "
            f"| {1e3 * r['static_s']:.1f} | **{r['ratio']:.3f}** [{r['ratio_ci'][0]:.3f}–"
            f"{r['ratio_ci'][1]:.3f}] ({r['ratio_iqr'][0]:.3f}–{r['ratio_iqr'][1]:.3f}) "
            f"| {r['twin_ratio']:.3f} [{r['twin_ci'][0]:.3f}–{r['twin_ci'][1]:.3f}] "
            f"| {r['ratio_of_medians']:.3f} "
            f"| {left['module hooks'] + left['tensor hooks'] + left['global hooks']} / "
            f"{left['non-contiguous params']} |"
        )
    print("\nController work per step outside the model (µs; % of the dynarch step):\n")
    print(
        "| model | policy | state + decide + train() | of which count_params | model.train() "
        "| autocast + GradScaler (off) | LR scheduler.step() | with the proposed fix |"
    )
    print("|---" * 8 + "|")
    for label, r in results.items():
        step_us = 1e6 * r["dynarch_s"]
        for pname, o in r["overhead_us"].items():
            print(
                f"| {label} | {pname} | {o['state+decide+train()']:.1f} "
                f"({100 * o['state+decide+train()'] / step_us:.3f} %) "
                f"| {o['count_params']:.1f} | {o['model.train()']:.1f} "
                f"| {o['autocast+GradScaler off']:.1f} | {o['LR scheduler.step()']:.1f} "
                f"| {o['proposed']:.1f} |"
            )
    for label, r in results.items():
        print(
            f"\n{label}: "
            + "; ".join(r["mutations"])
            + f"; max output difference: {r['identical_outputs']:.1e}"
        )


def run_p1(args: argparse.Namespace) -> dict[str, Any]:
    results = {label: _p1_case(label, args) for label in args.models}
    _print_p1(results, args)
    return results


# -- P3: prune step vs Torch-Pruning's pruner --------------------------------------------------
P3_CASES: dict[str, tuple[str, str, float]] = {
    # label: (model, target, ratio)
    "vgg_small w=32, features.conv3": ("vgg_small w=32 32x32", "features.conv3", 0.5),
    "resnet18, layer2.0.conv1": ("resnet18 32x32", "layer2.0.conv1", 0.5),
    "resnet18, layer3.0.conv2 (residual stream)": ("resnet18 32x32", "layer3.0.conv2", 0.5),
}


def with_momentum(model: nn.Module) -> torch.optim.SGD:
    """SGD with momentum state on every parameter, as after a few training steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.randn_like(p)
    return opt


def tp_pruner(
    model: nn.Module, x1: torch.Tensor, target: str, ratio: float
) -> tp.pruner.BasePruner:
    """Torch-Pruning's own pruner, local magnitude (L2) ranking, only ``target``'s group."""
    return tp.pruner.BasePruner(
        model,
        x1,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.0,
        pruning_ratio_dict={model.get_submodule(target): ratio},
        ignored_layers=[m for m in model.modules() if isinstance(m, nn.Linear)][-1:],
    )


def _p3_timers(
    base: nn.Module,
    base_opt: torch.optim.Optimizer,
    x1: torch.Tensor,
    target: str,
    k: int,
    ratio: float,
    kept: dict[str, torch.Tensor],
    parts_all: list[dict[str, float]],
    tp_build: list[float],
) -> dict[str, Callable[[], float]]:
    """P3's three ways to prune ``k`` channels of ``target``, each timed on a fresh copy;
    what each kept goes to ``kept``, dynarch's parts and TP's build times to the lists."""
    width = base.get_submodule(target).out_channels

    def dyn() -> float:
        model, opt = copy.deepcopy((base, base_opt))
        parts: dict[str, float] = defaultdict(float)
        with timed_parts(parts):
            start = time.perf_counter()
            dynarch.prune(
                model, target, k=k, importance="magnitude", optimizer=opt, example_inputs=x1
            )
            total = time.perf_counter() - start
        parts["other"] = total - sum(parts[p] for p in PARTS)
        parts_all.append(dict(parts))
        kept["dynarch"] = model.get_submodule(target).weight.detach()
        return total

    def tpp() -> float:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        pruner = tp_pruner(model, x1, target, ratio)
        built = time.perf_counter()
        pruner.step()
        end = time.perf_counter()
        tp_build.append(built - start)
        kept["tp"] = model.get_submodule(target).weight.detach()
        return end - start

    def by_hand() -> float:
        """The least Torch-Pruning needs for one group: trace, score, group.prune()."""
        model = copy.deepcopy(base)
        start = time.perf_counter()
        dg = tp.DependencyGraph().build_dependency(model, x1)
        module = model.get_submodule(target)
        prune_fn = dg.get_pruner_of_module(module).prune_out_channels
        full = dg.get_pruning_group(module, prune_fn, list(range(width)))
        scores = tp.importance.GroupMagnitudeImportance(p=2)(full)
        idxs = sorted(torch.argsort(scores, stable=True)[:k].tolist())
        dg.get_pruning_group(module, prune_fn, idxs).prune()
        end = time.perf_counter()
        kept["by hand"] = module.weight.detach()
        return end - start

    return {"dynarch": dyn, "tp": tpp, "by hand": by_hand}


def p3_case(mname: str, target: str, ratio: float, args: argparse.Namespace) -> dict[str, Any]:
    """dynarch.prune vs Torch-Pruning (pruner and by hand) on one layer, interleaved."""
    builder, channels, size = MODELS[mname]
    torch.manual_seed(0)
    base = builder()
    base_opt = with_momentum(base)
    x1 = batch(1, channels, size)[0]
    width = base.get_submodule(target).out_channels
    k = width - int(width * (1 - ratio))
    kept: dict[str, torch.Tensor] = {}
    parts_all: list[dict[str, float]] = []
    tp_build: list[float] = []
    timers = _p3_timers(base, base_opt, x1, target, k, ratio, kept, parts_all, tp_build)
    times = interleaved(timers, args.repeats, args.warmup)
    # does the optimizer still hold the parameters after Torch-Pruning's pruner?
    model, opt = copy.deepcopy((base, base_opt))
    tp_pruner(model, x1, target, ratio).step()
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    tp_keeps_optimizer = (
        model.get_submodule(target).weight is not None
        and id(model.get_submodule(target).weight) in held
    )
    tp_build = tp_build[args.warmup :]
    tp_step = [t - b for t, b in zip(times["tp"], tp_build, strict=True)]
    med, lo, hi = ratio_stats(times["dynarch"], times["tp"])
    hand_ratio = ratio_stats(times["dynarch"], times["by hand"])
    parts = {
        p: statistics.median(d.get(p, 0.0) for d in parts_all[-args.repeats :])
        for p in (*PARTS, "other")
    }
    prof = cProfile.Profile()
    model, opt = copy.deepcopy((base, base_opt))
    prof.enable()
    dynarch.prune(model, target, k=k, importance="magnitude", optimizer=opt, example_inputs=x1)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
    return {
        "width": width,
        "k": k,
        "same_channels": all(
            kept["dynarch"].shape == kept[o].shape and torch.equal(kept["dynarch"], kept[o])
            for o in ("tp", "by hand")
        ),
        "tp_keeps_optimizer": tp_keeps_optimizer,
        "by_hand_s": statistics.median(times["by hand"]),
        "by_hand_ratio": hand_ratio,
        "dynarch_s": statistics.median(times["dynarch"]),
        "tp_s": statistics.median(times["tp"]),
        "tp_build_s": statistics.median(tp_build),
        "tp_step_s": statistics.median(tp_step),
        "ratio": med,
        "ratio_iqr": (lo, hi),
        "parts_s": parts,
        "profile": buf.getvalue(),
        "times": times,
    }


def run_p3(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for label, (mname, target, ratio) in P3_CASES.items():
        results[label] = r = p3_case(mname, target, ratio, args)
        med, lo, hi = r["ratio"], *r["ratio_iqr"]
        print(f"{label}: ratio {med:.2f} ({lo:.2f}-{hi:.2f})", flush=True)
    print(f"\n{environment()}; median of {args.repeats} interleaved rounds\n")
    print(
        "| model, target (width → kept) | dynarch.prune ms | TP pruner ms (build + step) "
        "| **dynarch / TP pruner** (IQR) | TP by hand ms | dynarch / TP by hand (IQR) "
        "| same channels | dynarch: trace ms | forward check ms | other ms |"
    )
    print("|---" * 10 + "|")
    for label, r in results.items():
        p = r["parts_s"]
        print(
            f"| {label} ({r['width']} → {r['width'] - r['k']}) | {1e3 * r['dynarch_s']:.1f} "
            f"| {1e3 * r['tp_s']:.1f} ({1e3 * r['tp_build_s']:.1f} + {1e3 * r['tp_step_s']:.1f}) "
            f"| **{r['ratio']:.2f}** ({r['ratio_iqr'][0]:.2f}–{r['ratio_iqr'][1]:.2f}) "
            f"| {1e3 * r['by_hand_s']:.1f} | {r['by_hand_ratio'][0]:.2f} "
            f"({r['by_hand_ratio'][1]:.2f}–{r['by_hand_ratio'][2]:.2f}) "
            f"| {'yes' if r['same_channels'] else 'NO'} | {1e3 * p['trace']:.1f} "
            f"| {1e3 * p['forward check']:.1f} | {1e3 * p['other']:.1f} |"
        )
    keeps = {r["tp_keeps_optimizer"] for r in results.values()}
    print(f"\nTorch-Pruning's pruner leaves the optimizer holding the pruned parameters: {keeps}")
    if args.profile:
        for label, r in results.items():
            print(f"\n### cProfile of one dynarch.prune: {label}\n{r['profile']}")
    return results


# -- P4: inference speedup after pruning half the channels -------------------------------------
def prune_half(model: nn.Module, x1: torch.Tensor) -> list[str]:
    """Remove 50 % of the channels of every prunable group (one dynarch.prune per group)."""
    graph = ArchGraph.from_module(model, x1)
    seen, done = set(), []
    for t in graph.targets():
        group = graph.group_of(t)
        if group.name in seen:
            continue
        seen.add(group.name)
        dynarch.prune(model, t, k=group.width // 2, importance="magnitude")
        done.append(f"{group.name} {group.width}->{group.width - group.width // 2}")
    return done


def infer(model: nn.Module, x: torch.Tensor) -> Step:
    def step() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            model(x)
            return time.perf_counter() - start

    return step


def exported(model: nn.Module, x1: torch.Tensor) -> nn.Module:
    """``model`` with BatchNorm folded into its convs, through torch.export (batch dynamic)."""
    folded = fold_batchnorm(model)
    two = x1.expand(2, *x1.shape[1:])
    program = torch.export.export(folded, (two,), dynamic_shapes=({0: torch.export.Dim("b")},))
    return program.module()


def run_p4(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for label in args.models:
        builder, channels, size = MODELS[label]
        torch.manual_seed(0)
        dense = builder().eval()
        x1 = batch(1, channels, size)[0]
        pruned = copy.deepcopy(dense)
        done = prune_half(pruned, x1)
        pruned.eval()
        static = fresh_static(pruned, builder).eval()  # same shapes, never touched by dynarch
        remember_example_inputs(dense, x1)
        macs_dense, macs_pruned = count_macs(dense.train()), count_macs(pruned.train())
        dense.eval(), pruned.eval()
        params_dense, params_pruned = count_params(dense), count_params(pruned)
        if args.exported:  # what `dynarch export --fold-bn` gives: BatchNorm folded, torch.export
            dense, pruned, static = (exported(m, x1) for m in (dense, pruned, static))
        for n in args.batches:
            x = batch(n, channels, size)[0]
            times = interleaved(
                {"dense": infer(dense, x), "pruned": infer(pruned, x), "static": infer(static, x)},
                args.repeats,
                args.warmup,
            )
            speedup, lo, hi = ratio_stats(times["dense"], times["pruned"])
            static_speedup = ratio_stats(times["dense"], times["static"])[0]
            ideal = macs_dense / macs_pruned
            results[f"{label}, batch {n}"] = {
                "groups": done,
                "macs": (macs_dense, macs_pruned),
                "params": (params_dense, params_pruned),
                "dense_s": statistics.median(times["dense"]),
                "pruned_s": statistics.median(times["pruned"]),
                "speedup": speedup,
                "speedup_iqr": (lo, hi),
                "static_speedup": static_speedup,
                "ideal": ideal,
                "efficiency": speedup / ideal,
                # noise on a shared CPU only ever adds time: the fastest rounds are a second view
                "min_speedup": min(times["dense"]) / min(times["pruned"]),
                "times": times,
            }
            print(f"{label}, batch {n}: speedup {speedup:.2f} of ideal {ideal:.2f}", flush=True)
    print(f"\n{environment()}; eval mode, inference_mode, median of {args.repeats} rounds\n")
    print(
        "| model, batch | MACs/sample dense → pruned | ideal (MAC ratio) | dense ms | pruned ms "
        "| **measured speedup** (IQR) | fastest / fastest | fresh static model of pruned shapes "
        "| **speedup / ideal** (fastest) |"
    )
    print("|---" * 9 + "|")
    for label, r in results.items():
        md, mp = r["macs"]
        print(
            f"| {label} | {md / 1e6:.1f} M → {mp / 1e6:.1f} M | {r['ideal']:.2f}× "
            f"| {1e3 * r['dense_s']:.2f} | {1e3 * r['pruned_s']:.2f} "
            f"| **{r['speedup']:.2f}×** ({r['speedup_iqr'][0]:.2f}–{r['speedup_iqr'][1]:.2f}) "
            f"| {r['min_speedup']:.2f}× | {r['static_speedup']:.2f}× "
            f"| **{r['efficiency']:.2f}** ({r['min_speedup'] / r['ideal']:.2f}) |"
        )
    return results


# -- memory: peak RSS of a grow step vs a training step ----------------------------------------
MEMORY_CASES: dict[str, tuple[str, str]] = {
    "vgg_small w=32 32x32": ("vgg_small w=32 32x32", "features.conv3"),
    "resnet18 32x32": ("resnet18 32x32", "layer2.0.conv1"),
}
WORKS = ("train", "grow", "train, train", "train, grow")


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: set up model, data and optimizer, then do only ``args.work``; print
    the peak RSS before and after (and between, for two-part works) as JSON."""
    mname, target = MEMORY_CASES[args.case]
    builder, channels, size = MODELS[mname]
    torch.manual_seed(0)
    model = builder()
    x, y = batch(args.batch, channels, size)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():  # load the kernels once, outside what is measured
        model.eval()(x[:2])
    model.train()
    remember_example_inputs(model, x)
    step = train_step(model, opt, x, y)

    def grow() -> None:
        dynarch.grow(model, target, 4, init="gradmax", data=(x, y), loss_fn=loss_fn, optimizer=opt)

    gc.collect()
    marks = [max_rss_mb()]
    for part in args.work.split(", "):
        step() if part == "train" else grow()
        gc.collect()
        marks.append(max_rss_mb())
    print(json.dumps({"marks_mb": marks}))


def memory_table(results: dict[str, Any]) -> str:
    """Peak RSS growth of one step from set-up, and of a grow vs a 2nd training step after one
    training step (the steady state of a run: does a grow raise the run's peak?)."""
    lines = [
        "| model (grown layer) | training step MB | grow step MB (GradMax, k=4) | **grow / train** "
        "| train + train MB (2nd step +MB) | train + grow MB (grow +MB) "
        "| **(train + grow) / (train + train)** |",
        "|---" * 7 + "|",
    ]
    for case, r in results.items():
        m, runs = r["median_delta_mb"], r["all_delta_mb"]
        tt = statistics.median(sum(d) for d in runs["train, train"])
        tg = statistics.median(sum(d) for d in runs["train, grow"])
        lines.append(
            f"| {case} ({MEMORY_CASES[case][1]}) | {m['train'][0]:.0f} | {m['grow'][0]:.0f} "
            f"| **{m['grow'][0] / m['train'][0]:.2f}** | {tt:.0f} (+{m['train, train'][1]:.0f}) "
            f"| {tg:.0f} (+{m['train, grow'][1]:.0f}) | **{tg / tt:.2f}** |"
        )
    return "\n".join(lines)


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for case in MEMORY_CASES:
        deltas: dict[str, list[list[float]]] = {w: [] for w in WORKS}
        for _ in range(args.repeats):
            for work in WORKS:
                cmd = [
                    sys.executable,
                    __file__,
                    "memory-child",
                    "--case",
                    case,
                    "--work",
                    work,
                    "--batch",
                    str(args.batch),
                    "--threads",
                    str(torch.get_num_threads()),
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                marks = json.loads(out.strip().splitlines()[-1])["marks_mb"]
                deltas[work].append([b - a for a, b in zip(marks, marks[1:], strict=False)])
        med = {
            w: [statistics.median(d[i] for d in ds) for i in range(len(ds[0]))]
            for w, ds in deltas.items()
        }
        results[case] = {"median_delta_mb": med, "all_delta_mb": deltas}
        print(f"{case}: {med}", flush=True)
    print(
        f"\n{environment()}; batch {args.batch}; peak RSS (ru_maxrss) growth over the set-up "
        f"(model, data, optimizer, one no-grad forward), median of {args.repeats} fresh processes\n"
    )
    print(memory_table(results))
    return results


def main(argv: Sequence[str] | None = None) -> Any:
    """Parse the subcommand, run it, print its table; optionally save JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    defaults = {"p1": 40, "p3": 15, "p4": 15, "memory": 3}
    for name, reps in defaults.items():
        p = sub.add_parser(name)
        p.add_argument("--repeats", type=int, default=reps)
        p.add_argument("--warmup", type=int, default=3)
        p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
        p.add_argument("--batch", type=int, default=128)
        p.add_argument("--json", type=str, default=None)
    sub.choices["p1"].add_argument(
        "--models",
        nargs="+",
        default=["vgg_small w=16 8x8", "vgg_small w=16 32x32", "resnet18 32x32"],
    )
    sub.choices["p3"].add_argument("--profile", action="store_true", help="print cProfile")
    sub.choices["p4"].add_argument(
        "--models",
        nargs="+",
        default=["vgg_small w=32 32x32", "vgg_small w=64 32x32", "resnet18 32x32"],
    )
    sub.choices["p4"].add_argument("--batches", type=int, nargs="+", default=[64, 1])
    sub.choices["p4"].add_argument(
        "--exported", action="store_true", help="time BatchNorm-folded torch.export programs"
    )
    child = sub.add_parser("memory-child")
    child.add_argument("--case", required=True)
    child.add_argument("--work", required=True)
    child.add_argument("--batch", type=int, default=128)
    child.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cmd == "memory-child":
        return memory_child(args)
    results = {"p1": run_p1, "p3": run_p3, "p4": run_p4, "memory": run_memory}[args.cmd](args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {"settings": vars(args), "torch": torch.__version__, "results": results},
                f,
                default=str,
            )
    return results


if __name__ == "__main__":
    main()
