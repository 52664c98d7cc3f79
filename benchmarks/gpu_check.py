"""The prepared GPU check (issue 24, item 4): one script, within 8 minutes on one H100/H200,
printing one table: the CUDA tests, the throughput ratio against a plain loop, the cost of a
growth step against a training step, a resnet18 growth run on the CIFAR subset, and the
throughput ratio again with torch.compile on both sides (last: each mutation recompiles).

The device machine has torch, torchvision, networkx and scipy, not hydra-core, omegaconf,
antlr4-python3-runtime or torch-pruning: carry their wheels (made here, with network access
to the package registry) and install them there without an index::

    pip download --no-deps -d wheels hydra-core omegaconf 'antlr4-python3-runtime==4.9.3' \
        torch-pruning tqdm pyyaml packaging pytest
    # on the device machine, in the checkout (wheels/ carried):
    pip install --no-index --find-links wheels hydra-core omegaconf antlr4-python3-runtime \
        torch-pruning pytest && pip install --no-deps --no-build-isolation -e .
    python benchmarks/gpu_check.py --budget-s 480

Without CUDA it says so in one line and exits 0 (after checking its arguments).
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-10k.npz"


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=480.0, help="whole check, seconds")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--data", type=Path, default=CIFAR, help="the CIFAR-10 subset (.npz)")
    parser.add_argument("--skip", nargs="*", default=[], choices=sorted(PARTS), help="parts")
    args = parser.parse_args(argv)
    if args.budget_s <= 0 or args.batch < 1:
        parser.error("--budget-s and --batch must be positive")
    return args


def cuda_tests(args: argparse.Namespace) -> str:
    """The tests marked ``cuda`` (placement, optimizer state, AMP, sync counts)."""
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    return f"{summary} (rc {done.returncode})"


def _throughput(args: argparse.Namespace, cases: tuple[str, ...], *extra: str) -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import throughput as bench

    rows = []
    for case in cases:
        flags = ["--case", case, "--device", "cuda", "--batch", str(args.batch), "--amp", "bf16"]
        flags += ["--channels-last", "--steps", "200", "--chunk", "10", "--eval-every-epochs", "5"]
        result = bench.main(flags + list(extra))
        low, high = result["ci95"]
        rows.append(f"{case} {result['ratio_median']:.3f} [{low:.3f}, {high:.3f}]")
    return "; ".join(rows)


def throughput(args: argparse.Namespace) -> str:
    """Ordinary-step throughput of dynarch run against a plain loop, bf16 + channels-last."""
    return _throughput(args, ("vgg_small-cifar", "resnet18-cifar")) + " (torch.compile off)"


def throughput_compiled(args: argparse.Namespace) -> str:
    """The same with torch.compile (inductor) on both sides: last, as each mutation recompiles."""
    return _throughput(args, ("resnet18-cifar",), "--compile") + " (torch.compile on)"


def _seconds(work: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    work()
    sync()
    return time.perf_counter() - start


def growth_cost(args: argparse.Namespace) -> str:
    """A growth step against a training step (P2 on the GPU): resnet18, the batch of the run."""
    import torch
    import torchvision

    from dynarch import grow

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (args.batch,), device="cuda")
    loss_fn = torch.nn.CrossEntropyLoss()

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        twin = copy.deepcopy(model)
        return twin, torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9)

    net, optimizer = fresh()

    def train() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()

    sync = torch.cuda.synchronize
    for _ in range(3):  # warm-up: cuDNN's algorithm search, the allocator
        train()
    step = statistics.median(_seconds(train, sync) for _ in range(10))
    parts = [f"train step {step * 1e3:.1f} ms"]
    for init in ("zeros", "gradmax_fanin", "gradmax"):
        times = []
        for _ in range(3):
            twin, opt = fresh()
            grown = partial(grow, twin, "layer2.0.conv1", 16, init, (x, y), loss_fn, opt)
            times.append(_seconds(grown, sync))
        parts.append(f"{init} {statistics.median(times) / step:.2f}x")
    return ", ".join(parts)


def resnet18_run(args: argparse.Namespace) -> str:
    """``dynarch run``: resnet18 grown and pruned on the CIFAR subset, bf16 + channels-last."""
    if not args.data.is_file():
        return f"skipped: no {args.data}"
    command = [sys.executable, "-m", "dynarch", "run", "model=torchvision", "data=npz"]
    command += [f"data.path={args.data}", "trainer.device=cuda", "trainer.amp=bf16"]
    command += ["trainer.channels_last=true", "trainer.epochs=10", "trainer.batch_size=256"]
    command += ["trainer.threads=null", "hydra.run.dir=/tmp/gpu_check_resnet18"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    final = re.search(r"final test accuracy .*", done.stdout)
    return final.group(0) if final else f"failed (rc {done.returncode}): {done.stderr[-300:]}"


PARTS: dict[str, Callable[[argparse.Namespace], str]] = {
    "cuda_tests": cuda_tests,
    "throughput": throughput,
    "growth_cost": growth_cost,
    "resnet18_run": resnet18_run,
    "throughput_compiled": throughput_compiled,
}


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}); nothing to check")
        return 0
    start, rows = time.perf_counter(), []
    for name, part in PARTS.items():
        began = time.perf_counter()
        if name in args.skip:
            result = "skipped (--skip)"
        elif began - start > args.budget_s:
            result = f"skipped: the {args.budget_s:.0f} s budget is spent"
        else:
            try:
                result = part(args)
            except Exception as exc:  # one part failing must not hide the others' figures
                result = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        rows.append((name, result, time.perf_counter() - began))
    print(f"\ngpu_check on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| part | result | seconds |\n|---|---|---|")
    for name, result, seconds in rows:
        print(f"| {name} | {result} | {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
