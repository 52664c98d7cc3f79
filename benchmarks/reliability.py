"""Reliability figures: kill/resume, storage faults, fuzzed mutations, live readers.

Each is counted over many random trials (docs/reliability.md reports them).

- ``kill``: one uninterrupted reference run, then runs of the same config SIGKILLed at a random
  time (uniform over the reference's wall time; ``--early`` of them, default a third, 0-50 ms
  after ``history.db`` appears: the start-up) and resumed once; each must end bit-identical to
  the reference (weights, optimizer state, history without times).
- ``faults``: a full disk under the checkpoint write (``<run>/.checkpoint.pt.tmp`` made a
  symlink to /dev/full at a random time) must end in one ``dynarch: error:`` line, status
  ``failed``, no ``.tmp`` left and a readable history, and then resume to the reference; a
  read-only run dir (a read-only bind mount, as root) must be one line with no file changed.
- ``fuzz``: random grow/prune/deepen calls (random targets, k, initializers, importances,
  growth data with NaN/Inf, huge k) over several architectures: each is applied with the
  function kept (zero fan-out growth: eval outputs within 1e-5, or exact in float64) or
  refused in one ``DynarchError`` line with the state_dict unchanged; anything else is failing
  (``MutationFailedError``, an internal error wrapped, is counted apart).
- ``readers``: live cycle runs while this process queries their history again and again.

    python benchmarks/reliability.py kill --runs 72 --seed 0 --json /tmp/rel/kill.json
    python benchmarks/reliability.py kill --runs 24 --seed 1 --early 1.0   # start-up only
    python benchmarks/reliability.py faults --trials 10 --json /tmp/rel/faults.json
    python benchmarks/reliability.py fuzz --mutations 1000 --json /tmp/rel/fuzz.json
    python benchmarks/reliability.py readers --seconds 120 --json /tmp/rel/readers.json

Runs go to ``--work`` (default /tmp/dynarch_reliability); every run has ``trainer.threads=1``
and runs one at a time (timing noise from other jobs only moves where the kills land).
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import dynarch
import dynarch.history
import dynarch.surgery.grow
from dynarch.errors import DynarchError
from dynarch.history import HistoryReader
from dynarch.initializers import available_initializers
from dynarch.surgery.prune import IMPORTANCES

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the small test architectures (tests/archs.py)
from archs import build  # noqa: E402
from fuzz_archs import TRAIN_MODE_CHECKED, register  # noqa: E402
from torchvision_sweep import width_mismatch  # noqa: E402  (benchmarks/, beside this one)

# 2 epochs of digits (46 steps): every layer grown (GradMax) at steps 2, 7, 17, 22, 32, 42 and
# pruned at 12, 27, 37 (45 mutations); a checkpoint every 6 steps and after every mutation step.
CONFIG = [
    "policy=grow_prune_cycle",
    "trainer.epochs=2",
    "trainer.checkpoint_every_epochs=0.25",
    "trainer.threads=1",
    "trainer.progress=false",
]


HISTORY_NAMES = ("history.db", ".history.db.tmp")  # a new history is made under the second


# -- running dynarch ---------------------------------------------------------------------------
def command(*args: str, prefix: tuple[str, ...] = ()) -> list[str]:
    return [*prefix, sys.executable, "-m", "dynarch", "run", *args]


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    """A new run in ``run_dir``, in its own process group (so a kill takes all of it)."""
    cmd = command(*CONFIG, *extra, f"hydra.run.dir={run_dir}")
    return subprocess.Popen(
        cmd, cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen) -> dict[str, Any]:
    out, err = proc.communicate()
    return {"code": proc.returncode, "stdout": out, "stderr": err}


def resume(run_dir: Path, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    cmd = command(f"resume={run_dir}", prefix=prefix)
    done = subprocess.run(cmd, cwd=run_dir.parent, capture_output=True, text=True)
    return {"code": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def error_lines(result: dict[str, Any]) -> list[str]:
    return [line for line in result["stderr"].splitlines() if line.strip()]


def record(run_dir: Path) -> dict[str, Any]:
    """What must not depend on whether the run was interrupted (no times, no seconds)."""
    history = HistoryReader(run_dir / "history.db")
    try:
        events = [{k: v for k, v in e.items() if k != "seconds"} for e in history.events()]
        versions = history.versions()
        rec = {
            "status": history.run()["status"],
            "metrics": history.metrics(),
            "events": events,
            "versions": versions,
            "graphs": [history.architecture(v) for v, *_ in versions],
        }
    finally:
        history.close()
    saved = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    rec["weights"] = saved["model"]
    rec["optimizer"] = saved["optimizer"]["state"]
    return rec


def differences(ref: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """What differs between two records: [] for bit-identical runs."""
    diffs = [
        key for key in ("status", "metrics", "events", "versions", "graphs") if ref[key] != got[key]
    ]
    w, v = ref["weights"], got["weights"]
    if w.keys() != v.keys() or not all(torch.equal(w[k], v[k]) for k in w):
        diffs.append("weights")
    a, b = ref["optimizer"], got["optimizer"]
    same = a.keys() == b.keys() and all(
        a[i].keys() == b[i].keys()
        and all(k == "step" or torch.equal(t, b[i][k]) for k, t in a[i].items())
        for i in a
    )
    return diffs if same else [*diffs, "optimizer"]


def reference(work: Path) -> tuple[dict[str, Any], float]:
    """The uninterrupted run and its wall time (process start to exit)."""
    run_dir = work / "reference"
    began = time.perf_counter()
    result = finish(start(run_dir))
    wall = time.perf_counter() - began
    if result["code"] != 0:
        raise SystemExit(f"the reference run failed: {result['stderr'][-2000:]}")
    return record(run_dir), wall


def compare(run_dir: Path, ref: dict[str, Any]) -> list[str]:
    try:
        return differences(ref, record(run_dir))
    except Exception as exc:  # noqa: BLE001 - an unreadable result is a finding
        return [f"unreadable result: {type(exc).__name__}: {exc}"]


# -- kill ----------------------------------------------------------------------------------------
def kill_at_random(run_dir: Path, rng: random.Random, wall: float, share: float) -> dict:
    """Start a run and SIGKILL it at a random time (a ``share`` of them in the first 50 ms
    after the history file appears, under its temporary name or its own); when it died and
    what it left."""
    early = rng.random() < share
    delay = rng.uniform(0.0, 0.05) if early else rng.uniform(0.0, wall)
    proc, began, appeared, at = start(run_dir), time.perf_counter(), None, None
    while proc.poll() is None:
        now = time.perf_counter()
        if appeared is None and any((run_dir / n).exists() for n in HISTORY_NAMES):
            appeared = now
        origin = appeared if early else began
        if origin is not None and now >= origin + delay:
            os.killpg(proc.pid, signal.SIGKILL)
            at = now
            break
        time.sleep(0.001)
    result = finish(proc)
    after_db = None if appeared is None or at is None else round(1000 * (at - appeared))
    return {
        "aim": "start-up" if early else "uniform", "killed": result["code"] == -signal.SIGKILL,
        "at_s": None if at is None else round(at - began, 3), "ms_after_history": after_db,
        "left": sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else [],
    }  # fmt: skip


def kill_trial(
    i: int, work: Path, rng: random.Random, ref: dict, wall: float, share: float
) -> dict:
    """One killed-and-resumed run, classified: how it died, how it came back, identical?"""
    run_dir = work / f"kill_{i:03d}"
    row = kill_at_random(run_dir, rng, wall, share)
    if not row["killed"]:
        return {
            **row,
            "outcome": "finished before the kill",
            "identical": not compare(run_dir, ref),
        }
    if not any((run_dir / n).is_file() for n in ("history.db", "config.yaml")):
        return {**row, "outcome": "killed before the run dir held anything", "identical": None}
    result = resume(run_dir)
    row["outcome"] = "started over" if "starting it over" in result["stdout"] else "resumed"
    if result["code"] != 0:
        return {**row, "identical": False, "failing": error_lines(result)[-3:]}
    diffs = compare(run_dir, ref)
    return {**row, "identical": not diffs, **({"failing": diffs} if diffs else {})}


def kill(args: argparse.Namespace) -> dict[str, Any]:
    rng, work = random.Random(args.seed), args.work / f"kill_seed{args.seed}_early{args.early:.2f}"
    work.mkdir(parents=True, exist_ok=True)
    ref, wall = reference(work)
    rows = []
    for i in range(args.runs):
        rows.append(kill_trial(i, work, rng, ref, wall, args.early))
        print(json.dumps(rows[-1]), flush=True)
        save(args, {"reference_wall_s": round(wall, 2), "rows": rows})
    counts = Counter(r["outcome"] for r in rows)
    counts["identical"] = sum(r["identical"] is True for r in rows)
    counts["failing"] = sum(r["identical"] is False for r in rows)
    return {"reference_wall_s": round(wall, 2), "counts": dict(counts), "rows": rows}


# -- faults --------------------------------------------------------------------------------------
def plant(tmp: Path, delay: float, proc: subprocess.Popen, planted: dict[str, float]) -> None:
    """After ``delay`` s, make the checkpoint's temporary file a symlink to /dev/full (retried
    while the run dir does not exist yet or a checkpoint write holds the name)."""
    began = time.perf_counter()
    time.sleep(delay)
    while proc.poll() is None:
        try:
            os.symlink("/dev/full", tmp)
        except (FileExistsError, FileNotFoundError):
            time.sleep(0.001)
            continue
        planted["at_s"] = round(time.perf_counter() - began, 3)
        return


def history_state(run_dir: Path) -> dict[str, Any]:
    """The run's status, and whether every table of its history still reads."""
    try:
        history = HistoryReader(run_dir / "history.db")
        try:
            history.metrics(), history.events()
            [history.architecture(v) for v, *_ in history.versions()]
            run = history.run()
            return {
                "status": run.get("status"),
                "at_step": history.last_step(),
                "history_readable": True,
            }
        finally:
            history.close()
    except Exception as exc:  # noqa: BLE001 - an unreadable history is a finding
        return {"status": None, "history_readable": False, "history_error": str(exc)[:200]}


def disk_full_trial(i: int, work: Path, rng: random.Random, ref: dict, wall: float) -> dict:
    """A checkpoint write onto a full disk at a random time, then a resume without the fault."""
    run_dir, delay = work / f"full_{i:03d}", rng.uniform(0.0, wall)
    tmp, planted, proc = run_dir / ".checkpoint.pt.tmp", {}, start(run_dir)
    watcher = threading.Thread(target=plant, args=(tmp, delay, proc, planted))
    watcher.start()
    result = finish(proc)
    watcher.join()
    row = {
        "planted_at_s": planted.get("at_s"),
        "code": result["code"],
        "lines": error_lines(result),
    }
    if result["code"] == 0:
        tmp.unlink(missing_ok=True)
        return {**row, "outcome": "missed (the run had written its last checkpoint)"}
    row |= {"tmp_left": tmp.exists() or tmp.is_symlink(), **history_state(run_dir)}
    tmp.unlink(missing_ok=True)  # the fault goes away, if the run left it
    one_line = len(row["lines"]) == 1 and row["lines"][0].startswith("dynarch: error:")
    clean = one_line and row["status"] == "failed" and not row["tmp_left"]
    resumed = resume(run_dir)
    row |= {"resume_code": resumed["code"], "resume_lines": error_lines(resumed)[-3:]}
    diffs = compare(run_dir, ref) if resumed["code"] == 0 else ["resume failed"]
    ok = clean and row["history_readable"] and not diffs
    return {**row, "diffs": diffs, "outcome": "as required" if ok else "FAILING"}


def fingerprint(run_dir: Path) -> dict[str, str]:
    """Every file under ``run_dir``: its bytes' digest and its mtime."""
    return {
        str(
            p.relative_to(run_dir)
        ): f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.stat().st_mtime_ns}"
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


READ_ONLY = ("unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"')


def read_only_trial(i: int, work: Path, rng: random.Random, ref: dict, wall: float) -> dict:
    """A run killed after its first checkpoint, resumed on a read-only mount of its dir (one
    line, no file changed), then resumed for real; and a new run in a read-only empty dir."""
    run_dir = work / f"ro_{i:03d}"
    proc = start(run_dir)
    while proc.poll() is None and not (run_dir / "checkpoint.pt").exists():
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, wall / 3))
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    finish(proc)
    before = fingerprint(run_dir)
    refused = resume(run_dir, prefix=(*READ_ONLY, str(run_dir)))
    row = {"code": refused["code"], "lines": error_lines(refused)}
    row["unchanged"] = fingerprint(run_dir) == before
    resumed = resume(run_dir)
    row["then_identical"] = resumed["code"] == 0 and not compare(run_dir, ref)
    empty = work / f"ro_new_{i:03d}"
    empty.mkdir()
    new = subprocess.run(
        [*READ_ONLY, str(empty), *command(*CONFIG, f"hydra.run.dir={empty}")],
        cwd=work, capture_output=True, text=True,
    )  # fmt: skip
    row |= {"new_code": new.returncode, "new_lines": error_lines({"stderr": new.stderr})}
    row["new_left"] = sorted(p.name for p in empty.iterdir())
    ok = all(
        r["code"] == 1 and len(r["lines"]) == 1 and r["lines"][0].startswith("dynarch: error:")
        for r in (row, {"code": row["new_code"], "lines": row["new_lines"]})
    )
    ok = ok and row["unchanged"] and row["then_identical"] and not row["new_left"]
    return {**row, "outcome": "as required" if ok else "FAILING"}


def faults(args: argparse.Namespace) -> dict[str, Any]:
    rng, work = random.Random(args.seed), args.work / f"faults_seed{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    ref, wall = reference(work)
    out: dict[str, Any] = {"reference_wall_s": round(wall, 2), "disk_full": [], "read_only": []}
    for kind, trial, n in (
        ("disk_full", disk_full_trial, args.trials),
        ("read_only", read_only_trial, args.read_only_trials),
    ):
        for i in range(n):
            out[kind].append(trial(i, work, rng, ref, wall))
            print(kind, json.dumps(out[kind][-1]), flush=True)
            save(args, out)
    out["counts"] = {
        k: dict(Counter(r["outcome"] for r in out[k])) for k in ("disk_full", "read_only")
    }
    return out


# -- fuzz ----------------------------------------------------------------------------------------
FUZZ_ARCHS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    name: (lambda name=name: build(name))
    for name in ("vgg_small", "resnet_small", "conv_flatten_linear", "self_concat")
    + ("resnet18", "mobilenet_v2", "densenet121")
}
for name in register():  # round three (issue 22): benchmarks/fuzz_archs.py
    FUZZ_ARCHS[name] = lambda name=name: build(name)
FUZZ_ARCHS["shufflenet_v2"] = lambda: (  # Torch-Pruning's tracer fails on its channel shuffle
    torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval(),
    torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
)
HUGE = 100_000_000
SEQUENCE = 20  # mutations on one model before a fresh one is built


def pick_k(rng: random.Random) -> tuple[Any, str]:
    """Mostly small k; sometimes huge (must be refused), invalid, or a NumPy/tensor integer."""
    r = rng.random()
    if r < 0.05:
        return HUGE, "huge"
    if r < 0.10:
        return rng.choice([0, -1, 2.5, "3", True]), "invalid"
    if r < 0.16:
        return rng.choice([np.int64(2), torch.tensor(3)]), "integral"
    return rng.randint(1, 4), "plain"


def batch(
    x: torch.Tensor, rng: random.Random, poison: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) for growth statistics; ``poison``: one NaN or Inf in x."""
    x = x.clone()
    if poison is not None:
        x.view(-1)[rng.randrange(x.numel())] = poison
    return x, torch.arange(x.shape[0]) % 10


def random_call(model: nn.Module, x: torch.Tensor, opt, rng: random.Random) -> dict[str, Any]:
    """One random grow/prune/deepen: what it is, and the call itself (``run``)."""
    op = rng.choices(["grow", "prune", "deepen"], weights=[55, 35, 10])[0]
    targets = dynarch.ArchGraph.from_module(model, x).targets()
    poison = rng.choice([float("nan"), float("inf")]) if rng.random() < 0.08 else None
    data = batch(x, rng, poison) if poison is not None or rng.random() < 0.7 else None
    k, k_kind = pick_k(rng) if op != "deepen" else (None, "none")
    spec = {"op": op, "k": repr(k), "k_kind": k_kind, "poison": repr(poison), "data": data}
    common = {"optimizer": opt, "data": data, "loss_fn": F.cross_entropy}
    if op == "grow":
        spec |= {"target": rng.choice(targets), "init": rng.choice(available_initializers())}
        args = (dynarch.grow, model, spec["target"], k, spec["init"])
    elif op == "prune":
        spec |= {"target": rng.choice(targets), "importance": rng.choice([*IMPORTANCES, "bogus"])}
        args = (dynarch.prune, model, spec["target"], k)
        common["importance"] = spec["importance"]
    else:
        leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
        spec |= {"target": rng.choice(leaves), "kind": rng.choice(["conv", "residual"])}
        spec["init"] = rng.choice(["random", "gradmax"])
        args = (dynarch.deepen, model, spec["target"], spec["kind"])
        common["init"] = spec["init"]
    spec["data"] = data is not None
    return {**spec, "run": functools.partial(*args, **common)}


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and values, a NaN equal to a NaN in the same place."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a, b) or (
        a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
    )


def refusal(model: nn.Module, state: dict[str, torch.Tensor], exc: DynarchError) -> tuple[str, str]:
    """A refusal is one line with the state_dict exactly as before."""
    now = model.state_dict()
    same = now.keys() == state.keys() and all(same_tensor(now[n], t) for n, t in state.items())
    if not same:
        return "FAILING", f"refused, but the model changed: {first_line(exc)}"
    if len(str(exc).strip().splitlines()) != 1:
        return "FAILING", f"refused in several lines: {first_line(exc)}"
    if type(exc).__name__ == "MutationFailedError":  # an internal error, caught and wrapped
        return "refused (internal error)", first_line(exc)
    return "refused", first_line(exc)


def judge(
    model: nn.Module, x: torch.Tensor, spec: dict[str, Any], zero: list[bool], train_mode: bool
) -> tuple[str, str]:
    """Run one call: 'applied' (function kept where it must be), 'refused' or 'FAILING'.
    ``train_mode``: the training-mode outputs must be kept too (a branch only training runs)."""
    model.eval()
    state = {n: t.clone() for n, t in model.state_dict().items()}
    original = copy.deepcopy(model) if spec["op"] in KEEPS_FUNCTION else None
    before = outputs(model, x, train_mode)
    zero.clear()
    try:
        spec["run"]()
    except DynarchError as exc:
        return refusal(model, state, exc)
    except Exception as exc:  # noqa: BLE001 - what the fuzzer is looking for
        return "FAILING", f"raw error: {first_line(exc)}"
    if spec["poison"] != "None" or spec["k_kind"] in ("huge", "invalid"):
        return "FAILING", f"accepted k={spec['k']} / data poisoned with {spec['poison']}"
    try:
        after = outputs(model, x, train_mode)
        problem = width_mismatch(model)
    except Exception as exc:  # noqa: BLE001
        return "FAILING", f"applied, then the model fails: {first_line(exc)}"
    if problem or after[0].shape != before[0].shape:
        return (
            "FAILING",
            problem or f"output shape {tuple(before[0].shape)} -> {tuple(after[0].shape)}",
        )
    changes = [float((a - b).abs().max()) for a, b in zip(after, before, strict=True)]
    scale = max(1.0, *(float(b.abs().max()) for b in before))
    kept = (spec["op"] == "grow" and zero and zero[0]) or (
        spec["op"] == "deepen" and (spec["data"] or spec["kind"] == "residual")
    )
    if kept and not max(changes) <= 1e-5 * scale:
        exact = float64_change(original, model, x, train_mode)  # float32 rounding, or not?
        if not exact <= 1e-9 * scale:
            mode = "training" if changes[0] <= 1e-5 * scale else "eval"
            why = f"of {scale:.1e}; in float64 by {exact:.1e}"
            return (
                "FAILING",
                f"{spec['op']} changed the {mode}-mode outputs by {max(changes):.2e} ({why})",
            )
        return "applied", f"output change {max(changes):.1e} in float32, {exact:.1e} in float64"
    return "applied", f"output change {max(changes):.1e}"


KEEPS_FUNCTION = ("grow", "deepen")  # zero fan-out growth; deepen with data or residual


def outputs(model: nn.Module, x: torch.Tensor, train_mode: bool) -> list[torch.Tensor]:
    """Eval-mode outputs, and training-mode ones when asked (buffers restored after: a
    train-mode BatchNorm updates its running statistics); the model is left in eval mode."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad():
        outs = [model.eval()(x)] + ([model.train()(x)] if train_mode else [])
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    model.eval()
    return outs


def float64_change(
    before: nn.Module, after: nn.Module, x: torch.Tensor, train_mode: bool = False
) -> float:
    """Largest output change between two models evaluated in float64 (copies): zero when
    a float32 change is only rounding (another summation order in a wider layer)."""
    a = outputs(copy.deepcopy(after).double(), x.double(), train_mode)
    b = outputs(copy.deepcopy(before).double(), x.double(), train_mode)
    return max(float((u - v).abs().max()) for u, v in zip(a, b, strict=True))


def train_step(model: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer) -> bool:
    """One SGD step: the optimizer still fits the mutated parameters; weights move on.
    False when the model diverged (a fresh one is built then: NaN weights test nothing)."""
    model.train()
    opt.zero_grad()
    F.cross_entropy(model(x), torch.arange(x.shape[0]) % 10).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        return bool(torch.isfinite(model(x)).all())


def watch_zero_fan_out() -> list[bool]:
    """Record, per grow, whether the initializer's new channels have a zero fan-out (those
    must leave the outputs as they were); grow looks ``new_channels`` up in its module."""
    seen: list[bool] = []
    original = dynarch.surgery.grow.new_channels

    def recording(ctx, init):
        new = original(ctx, init)
        seen.append(new.zero_fan_out())
        return new

    dynarch.surgery.grow.new_channels = recording
    return seen


def fuzz_arch(name: str, n: int, seed: int, zero: list[bool]) -> dict[str, Any]:
    """``n`` random calls on ``name`` (a fresh model every SEQUENCE calls)."""
    rng, outcomes, reasons, failing = random.Random(f"{seed}-{name}"), Counter(), Counter(), []
    fresh = True
    for i in range(n):
        spec: dict[str, Any] = {}
        if fresh or i % SEQUENCE == 0:
            torch.manual_seed(seed + i)
            model, x = FUZZ_ARCHS[name]()
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            outcomes["models built"] += 1
        try:
            spec = random_call(model, x, opt, rng)
            outcome, why = judge(model, x, spec, zero, name in TRAIN_MODE_CHECKED)
            fresh = outcome == "FAILING" or (outcome == "applied" and not train_step(model, x, opt))
        except DynarchError as exc:  # the trace itself refused
            spec, (outcome, why) = {"op": "trace"}, refusal(model, model.state_dict(), exc)
        except Exception as exc:  # noqa: BLE001
            outcome, why, fresh = "FAILING", first_line(exc), True
        outcomes[outcome] += 1
        outcomes[f"{spec.get('op')} calls, k {spec.get('k_kind')}"] += 1
        outcomes["calls with NaN/Inf data"] += spec.get("poison", "None") != "None"
        outcomes["float32 rounding only (float64 exact)"] += "in float64" in why
        reasons[f"{outcome}: {why[:110]}"] += outcome != "applied"
        if outcome not in ("applied", "refused"):  # failing, or an internal error wrapped
            spec = {k: v for k, v in spec.items() if k != "run"}
            failing.append({"index": i, "outcome": outcome, **spec, "why": why})
    top = [f"{count} x {reason}" for reason, count in reasons.most_common(12) if count]
    return {"counts": dict(outcomes), "failing": failing, "top_reasons": top}


def fuzz(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    names = args.archs.split(",") if args.archs else list(FUZZ_ARCHS)
    zero, out = watch_zero_fan_out(), {"archs": {}}
    for j, name in enumerate(names):
        n = args.mutations // len(names) + (j < args.mutations % len(names))
        began = time.perf_counter()
        out["archs"][name] = {
            **fuzz_arch(name, n, args.seed, zero),
            "seconds": round(time.perf_counter() - began, 1),
        }
        print(name, json.dumps(out["archs"][name]["counts"]), flush=True)
        save(args, out)
    out["counts"] = dict(sum((Counter(a["counts"]) for a in out["archs"].values()), Counter()))
    return out


# -- readers -------------------------------------------------------------------------------------
# A run's first moments: no history file, no tables, or no architecture logged yet (graph_at
# of step 0, the only step then).
NOT_YET = (
    "holds no history yet",
    "no architecture logged yet",
    "no history at",
    "no architecture logged at or before step 0",
)


def version_rows_problem(table: Any) -> str | None:
    """A version made by an event must show the event's kind, group and params."""
    for row in table:
        if row["event"] is not None and None in (row["kind"], row["group"], row["params"]):
            return f"version {row['version']}: event {row['event']} but {row}"
    return None


def consistent_snapshot(h: Any) -> str | None:
    """version_table, summary and widths of one snapshot agree on the number of versions."""
    with h.snapshot():
        table, summary, widths = h.version_table(), h.summary(), h.widths()
    if not len(table) == summary["versions"] == len(widths):
        return f"versions: table {len(table)}, summary {summary['versions']}, widths {len(widths)}"
    return version_rows_problem(table)


QUERIES: dict[str, Callable[[Any, random.Random], str | None]] = {
    "version_table": lambda h, rng: version_rows_problem(h.version_table()),
    "summary": lambda h, rng: None if h.summary()["versions"] >= 1 else "summary without versions",
    "widths": lambda h, rng: None if len(h.widths()) >= 1 else "no width rows",
    "graph_at": lambda h, rng: (
        None if h.graph_at(rng.randint(0, h.last_step())).number_of_nodes() else "empty graph"
    ),
    "snapshot": lambda h, rng: consistent_snapshot(h),
}


def read_once(run_dir: Path, rng: random.Random, counts: Counter, problems: list[str]) -> None:
    """Open the live run's history and run every query once; count what happens."""
    try:
        h = dynarch.history.open(run_dir)
    except DynarchError as exc:
        counts["not yet (open)" if any(s in str(exc) for s in NOT_YET) else "errors"] += 1
        return
    with h:
        for name, query in QUERIES.items():
            try:
                problem = query(h, rng)
            except DynarchError as exc:
                if any(s in str(exc) for s in NOT_YET):
                    counts["not yet"] += 1
                    continue
                problem = f"error: {first_line(exc)}"
            except Exception as exc:  # noqa: BLE001 - what the hammering is looking for
                problem = f"error: {first_line(exc)}"
            counts["reads"] += 1
            if problem:
                counts["errors" if problem.startswith("error") else "inconsistent"] += 1
                problems.append(f"{name}: {problem}"[:300])


def readers(args: argparse.Namespace) -> dict[str, Any]:
    """Cycle runs one after another for ``--seconds``, read while they run."""
    rng, work = random.Random(args.seed), args.work / f"readers_seed{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    counts, problems, runs, deadline = Counter(), [], [], time.perf_counter() + args.seconds
    while time.perf_counter() < deadline:
        run_dir = work / f"live_{len(runs):03d}"
        proc = start(run_dir)
        while proc.poll() is None:
            if (run_dir / "history.db").exists():
                read_once(run_dir, rng, counts, problems)
            else:
                time.sleep(0.005)
        runs.append(finish(proc)["code"])
        save(args, {"counts": dict(counts), "runs": runs, "problems": problems})
    print(json.dumps(counts), flush=True)
    return {"counts": dict(counts), "run_exit_codes": runs, "problems": problems}


# -- main ----------------------------------------------------------------------------------------
def save(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """The result so far (and how it was made) to ``--json``, after every trial."""
    if args.json is None:
        return
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv}
    meta |= {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__}
    args.json.write_text(json.dumps({"meta": meta, **result}, indent=1, default=str))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    for name, helptext in (
        ("kill", "SIGKILL at random times, resume, compare"),
        ("faults", "disk full under the checkpoint, read-only run dir"),
        ("fuzz", "random mutations over several architectures"),
        ("readers", "query live runs' histories"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--work", type=Path, default=Path("/tmp/dynarch_reliability"))
        s.add_argument("--json", type=Path, default=None)
    sub.choices["kill"].add_argument("--runs", type=int, default=72)
    sub.choices["kill"].add_argument(
        "--early", type=float, default=1 / 3, help="share of kills 0-50 ms after history.db"
    )
    sub.choices["faults"].add_argument("--trials", type=int, default=10)
    sub.choices["faults"].add_argument("--read-only-trials", type=int, default=3)
    sub.choices["fuzz"].add_argument("--mutations", type=int, default=1000)
    sub.choices["fuzz"].add_argument("--archs", default="", help=f"of {','.join(FUZZ_ARCHS)}")
    sub.choices["readers"].add_argument("--seconds", type=float, default=120.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = {"kill": kill, "faults": faults, "fuzz": fuzz, "readers": readers}[args.what](args)
    save(args, result)
    print(json.dumps({k: v for k, v in result.items() if "count" in k}, indent=1))


if __name__ == "__main__":
    main()
