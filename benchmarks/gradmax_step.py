"""P2: time of one GradMax growth step vs one training step on the same batch.

One growth step is one ``dynarch.grow(model, target, k, init="gradmax", data=(x, y), ...)``
call on a batch of 128 (statistics + SVD + surgery); one training step is forward + backward +
SGD step. Measurements are interleaved (train, grow, train, grow, ...) after a warm-up, the
model is deep-copied (outside the timed region) for each grow so every grow sees the same
width, and medians are reported. The growth time is broken down by wrapping, for the duration
of the benchmark, the functions ``grow`` calls (behaviour unchanged, only timed):

- statistics: ``dynarch.gradmax.gradient_matrix`` (forward + backward + the matrix M), of
  which M block: ``dynarch.gradmax._consumer_block`` (M from the captured tensors)
- svd: ``dynarch.gradmax.top_singular_vectors``
- trace: ``trace_group`` (Torch-Pruning dependency graph of the model, in ``resolve``)
- forward check: ``eval_output`` (one-sample eval forward before and after the surgery)
- other: the rest (initializer glue, new tensors, swap)

    python benchmarks/gradmax_step.py --repeats 7 --json /tmp/gradmax_step.json
    python benchmarks/gradmax_step.py --init gradmax_fanin_opt --widths 16 --no-resnet

``--init`` times another initializer the same way; the breakdown then only sees the parts it
looks up through ``dynarch.gradmax`` (the total and the ratio are what compare).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torchvision
from torch import nn

import dynarch
import dynarch.gradmax
import dynarch.surgery.grow
import dynarch.surgery.plan
from dynarch.models import vgg_small

PARTS = ("statistics", "svd", "trace", "forward check")
# (module, attribute, part): every place grow looks these functions up at call time
WRAPPED = (
    (dynarch.gradmax, "gradient_matrix", "statistics"),
    (dynarch.gradmax, "_consumer_block", "M block"),  # inside statistics
    (dynarch.gradmax, "top_singular_vectors", "svd"),
    (dynarch.surgery.plan, "trace_group", "trace"),
    (dynarch.surgery.plan, "eval_output", "forward check"),
    (dynarch.surgery.grow, "eval_output", "forward check"),
)


@contextlib.contextmanager
def timed_parts(times: dict[str, float]) -> Iterator[None]:
    """Accumulate wall time per part into ``times`` while the wrapped functions run."""

    def wrap(fn: Callable, part: str) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[part] += time.perf_counter() - start

        return timed

    originals = [(mod, name, getattr(mod, name)) for mod, name, _ in WRAPPED]
    for (mod, name, part), (_, _, fn) in zip(WRAPPED, originals, strict=True):
        setattr(mod, name, wrap(fn, part))
    try:
        yield
    finally:
        for mod, name, fn in originals:
            setattr(mod, name, fn)


def cases(widths: Sequence[int], resnet: bool) -> list[tuple[str, Callable[[], nn.Module], str]]:
    """(label, model factory, target) for every benchmarked model."""
    out: list[tuple[str, Callable[[], nn.Module], str]] = [
        (
            f"vgg_small w={w}",
            lambda w=w: vgg_small(num_classes=10, in_channels=3, image_size=32, width=w),
            "features.conv3",
        )
        for w in widths
    ]
    if resnet:
        out.append(
            ("resnet18", lambda: torchvision.models.resnet18(num_classes=10), "layer2.0.conv1")
        )
    return out


def measure(
    make: Callable[[], nn.Module],
    target: str,
    batch: int = 128,
    k: int = 4,
    repeats: int = 7,
    warmup: int = 2,
    seed: int = 0,
    init: str = "gradmax",
) -> dict[str, Any]:
    """Median times of a training step and of a grow (``init``), interleaved, with breakdown."""
    torch.manual_seed(seed)
    model = make()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        return time.perf_counter() - start

    def grow_step() -> tuple[float, dict[str, float], dynarch.MutationRecord]:
        clone = copy.deepcopy(model)
        parts: dict[str, float] = defaultdict(float)
        with timed_parts(parts):
            start = time.perf_counter()
            record = dynarch.grow(
                clone, target, k, init=init, data=(x, y), loss_fn=loss_fn, example_inputs=x
            )
            total = time.perf_counter() - start
        parts["other"] = total - sum(parts[p] for p in PARTS)
        return total, dict(parts), record

    for _ in range(warmup):
        train_step()
        grow_step()
    train_times, grow_times, breakdowns = [], [], []
    record = None
    for _ in range(repeats):
        train_times.append(train_step())
        total, parts, record = grow_step()
        grow_times.append(total)
        breakdowns.append(parts)
    assert record is not None and record.width_after == record.width_before + k
    train, grow = statistics.median(train_times), statistics.median(grow_times)
    return {
        "target": target,
        "width": record.width_before,
        "params": sum(p.numel() for p in model.parameters()),
        "train_s": train,
        "grow_s": grow,
        "ratio": grow / train,
        "ratios": [g / t for g, t in zip(grow_times, train_times, strict=True)],
        "parts_s": {
            p: statistics.median(b.get(p, 0.0) for b in breakdowns)
            for p in (*PARTS, "M block", "other")
        },
        "train_all_s": train_times,
        "grow_all_s": grow_times,
    }


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table of medians, ratio and breakdown (ms)."""
    head = (
        "| model (target, width → width+k) | train step ms | grow step ms | grow / train "
        "| statistics ms (M block) | SVD ms | trace ms | forward check ms | other ms |"
    )
    lines = [head, "|---" * 9 + "|"]
    for label, r in results.items():
        p = r["parts_s"]
        lo, hi = min(r["ratios"]), max(r["ratios"])
        lines.append(
            f"| {label} ({r['target']}, {r['width']}) | {1e3 * r['train_s']:.0f} "
            f"| {1e3 * r['grow_s']:.0f} | **{r['ratio']:.2f}×** ({lo:.2f}–{hi:.2f}) "
            f"| {1e3 * p['statistics']:.0f} ({1e3 * p['M block']:.0f}) | "
            + " | ".join(f"{1e3 * p[name]:.0f}" for name in (*PARTS[1:], "other"))
            + " |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Benchmark every case; print the table; optionally save JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--no-resnet", action="store_true", help="skip torchvision resnet18")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--init", default="gradmax", help="the initializer to time")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {}
    for label, make, target in cases(args.widths, not args.no_resnet):
        results[label] = measure(
            make, target, args.batch, args.k, args.repeats, args.warmup, init=args.init
        )
        print(f"{label}: ratio {results[label]['ratio']:.2f}", flush=True)
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, init {args.init}, batch {args.batch}, "
        f"k {args.k}, "
        f"median of {args.repeats} interleaved repeats after {args.warmup} warm-up\n"
    )
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "settings": vars(args),
                    "torch": torch.__version__,
                    "results": results,
                },
                f,
            )
    return results


if __name__ == "__main__":
    main()
