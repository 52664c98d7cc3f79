"""Sweep every torchvision classification model: trace, then grow and prune its targets.

For each model (``weights=None``, eval mode, one small input): trace it, then for every target
(or an evenly spaced sample of ``--max-targets``) grow ``k`` channels with zero fan-in and
fan-out (the eval outputs must not change), then prune one channel by magnitude (the model
must run and keep its output shape). Each model runs in its own process with a time cap, so a
hang or a crash costs one row, not the sweep. A model is

- ``supported``: every tested target grew and pruned, outputs preserved;
- ``refused``: dynarch declined with a one-line ``DynarchError`` (the trace, or a target);
- ``failing``: any other exception, an output changed by a growth, or the process died.

    python benchmarks/torchvision_sweep.py --threads 1 --max-targets 6 --seconds 120 \\
        --json /tmp/sweep.json --markdown /tmp/sweep.md
    python benchmarks/torchvision_sweep.py --models resnet18,densenet121 --max-targets 0

The input is 1x3xSxS with S the first of ``--sizes`` the model runs on (inception_v3 needs
75); vision transformers are built with ``image_size=S`` (their size is fixed at build time).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

import dynarch
from dynarch.errors import DynarchError, first_line


def build(name: str, sizes: list[int]) -> tuple[nn.Module, torch.Tensor, str]:
    """The model in eval mode, the smallest input it runs on, and how it was built."""
    problem = ""
    for size in sizes:
        for options in ({}, {"image_size": size}):
            torch.manual_seed(0)
            try:
                model = torchvision.models.get_model(name, weights=None, **options).eval()
                x = torch.randn(1, 3, size, size)
                with torch.no_grad():
                    model(x)
                return model, x, ", ".join(f"{k}={v}" for k, v in options.items())
            except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
                problem = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    raise RuntimeError(f"runs on none of the sizes {sizes}: {problem}")


def sample(targets: list[str], n: int) -> list[str]:
    """``n`` targets evenly spaced over the model (first and last included); all for n <= 0."""
    if n <= 0 or len(targets) <= n:
        return targets
    if n == 1:
        return targets[:1]
    return [targets[round(i * (len(targets) - 1) / (n - 1))] for i in range(n)]


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"


def mutate(model: nn.Module, x: torch.Tensor, target: str, k: int, blocks: int = 1) -> str | None:
    """Grow ``target`` by k (zeros: outputs must not change), then prune one channel (k and
    the one channel per block of a group with grouped convs). None when both worked; else
    why, prefixed 'refused:' or 'failing:'."""
    k = k * blocks
    with torch.no_grad():
        before = model(x)
    try:
        dynarch.grow(model, target, k, init="zeros")
        with torch.no_grad():
            after = model(x)
        change = float((after - before).abs().max())
        if not change <= 1e-5 * max(1.0, float(before.abs().max())):
            return f"failing: growing {target!r} changed the outputs by {change:.2e}"
        dynarch.prune(model, target, k=blocks)
        with torch.no_grad():
            if model(x).shape != before.shape:
                return f"failing: pruning {target!r} changed the output shape"
    except DynarchError as exc:
        return f"refused: {one_line(exc)}"
    except Exception as exc:  # noqa: BLE001 - what the sweep is looking for
        return f"failing: {target}: {one_line(exc)}"
    return None


def width_mismatch(model: nn.Module) -> str | None:
    """After mutations, a producer whose channels in its group (``start:stop``) do not fit its
    real width or are not the group's width (the model re-traced), or None. A producer may
    hold several groups side by side (``c`` in ``cat([a(x), b(x)]) + c(z)``: a's group at its
    channels 0..4, b's at 4..10). benchmarks/reliability.py's fuzz checks the same."""
    graph = dynarch.ArchGraph.from_module(model)
    for group in graph.groups:
        for m in group.members:
            weight = getattr(model.get_submodule(m.module), "weight", None)
            if m.role != "producer" or weight is None:
                continue
            if m.stop > weight.shape[0] or m.stop - m.start != group.width:
                held = f"channels {m.start}..{m.stop} of {weight.shape[0]}"
                return f"graph says {m.module} holds group {group.name!r} ({group.width}) at {held}"
    return None


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Trace, then mutate targets until done or out of time: the model's result row."""
    start = time.perf_counter()
    row: dict[str, Any] = {"model": name, "status": "supported", "reasons": []}
    model, x, options = build(name, args.sizes)
    row.update(
        input=list(x.shape), options=options, params=sum(p.numel() for p in model.parameters())
    )
    try:
        graph = dynarch.ArchGraph.from_module(model, x)
    except DynarchError as exc:
        return {**row, "status": "refused", "reasons": [one_line(exc)], "seconds": _since(start)}
    targets = graph.targets()
    unsupported = [g.unsupported for g in graph.groups if g.unsupported]
    row.update(targets=len(targets), groups=len(graph.groups), unsupported_groups=len(unsupported))
    row["unsupported_example"] = unsupported[0] if unsupported else None
    if not targets:
        why = f"{len(unsupported)} of {len(graph.groups)} groups unsupported"
        example = f", e.g. {unsupported[0]}" if unsupported else ""
        row["reasons"].append(f"refused: no target can change ({why}{example})")
    tested = []
    for target in sample(targets, args.max_targets):
        if _since(start) > args.seconds:
            break
        tested.append(target)
        problem = mutate(model, x, target, args.k, graph.group_of(target).blocks)
        if problem:
            row["reasons"].append(problem)
    row["tested"] = len(tested)
    if tested:
        problem = width_mismatch(model)
        row["reasons"] += [f"failing: {problem}"] if problem else []
    row["status"] = _status(row["reasons"], tested)
    row["seconds"] = _since(start)
    return row


def _status(reasons: list[str], tested: list[str]) -> str:
    if any(r.startswith("failing") for r in reasons):
        return "failing"
    if reasons or not tested:
        return "refused"
    return "supported"


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 1)


def run_isolated(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``run_model`` in a child process, killed after a hard time limit."""
    cmd = [sys.executable, __file__, "--one", name, "--threads", str(args.threads)]
    cmd += ["--seconds", str(args.seconds), "--max-targets", str(args.max_targets)]
    cmd += ["--k", str(args.k), "--sizes", ",".join(map(str, args.sizes))]
    limit = 3 * args.seconds + 300  # building and tracing the largest models is slow too
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"model": name, "status": "failing", "reasons": [f"failing: over {limit} s"]}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, "status": "failing", "reasons": [f"failing: crashed: {tail}"]}
    return json.loads(lines[-1])


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per model, then the counts."""
    out = ["| model | status | targets tested | seconds | first reason |", "|---|---|---|---|---|"]
    for r in rows:
        reason = (r.get("reasons") or [""])[0].replace("|", "/")
        tested = f"{r.get('tested', 0)}/{r.get('targets', '-')}"
        out.append(
            f"| {r['model']} | {r['status']} | {tested} | {r.get('seconds', '-')} | {reason} |"
        )
    counts = {s: sum(r["status"] == s for r in rows) for s in ("supported", "refused", "failing")}
    out.append("")
    out.append(", ".join(f"{n} {s}" for s, n in counts.items()) + f" of {len(rows)} models")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="", help="comma-separated names (default: all)")
    p.add_argument("--max-targets", type=int, default=6, help="targets per model (0: all)")
    p.add_argument("--seconds", type=float, default=120.0, help="mutation time cap per model")
    p.add_argument(
        "--k", type=int, default=1, help="channels grown per target (per block: grouped convs)"
    )
    p.add_argument("--sizes", default="64,128,224", help="input sizes tried in order")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_model(args.one, args)), flush=True)
        return
    names = (
        args.models.split(",")
        if args.models
        else torchvision.models.list_models(module=torchvision.models)
    )
    rows = []
    for name in names:
        rows.append(run_isolated(name, args))
        print(f"{name}: {rows[-1]['status']} {(rows[-1].get('reasons') or [''])[0]}", flush=True)
        meta = {"torch": torch.__version__, "torchvision": torchvision.__version__}
        meta |= {"machine": platform.processor() or platform.machine(), "args": vars(args)}
        if args.json:
            args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
        if args.markdown:
            args.markdown.write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
