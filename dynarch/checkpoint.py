"""Checkpoints of a run: everything needed to continue it exactly, written atomically.

A checkpoint holds the mutations applied so far (replayed on a freshly built model to get the
exact module shapes back, by the same surgery that made them), the weights, the optimizer, LR
schedule and policy states, the RNG states, the position in the data and the history marks
(the last metrics row, event and architecture version it covers). It is written to a temporary
file in the run directory, flushed to disk and renamed over the previous one, so a crash at
any moment leaves either the old checkpoint or the new one, never a torn file. The payload is
:meth:`dynarch.run_state.RunState.state_dict`; this module writes, reads and checks it, and
restores the parts that need care (the model's shapes, the optimizer state's fit, the RNGs).
"""

from __future__ import annotations

import os
import random
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dynarch.errors import DynarchError
from dynarch.ops import op_named
from dynarch.run_dir import CHECKPOINT

FORMAT_VERSION = 2  # 2: only tensors and plain values (the NumPy RNG state as a tensor)
FILENAME = CHECKPOINT


class CheckpointError(DynarchError):
    """A checkpoint that cannot be used (missing, corrupt, another format)."""


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file, fsync, rename). A write that
    fails (disk full, read-only) is one line; the old checkpoint stays, no temporary file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT_VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save's zip writer raises RuntimeError
        tmp.unlink(missing_ok=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CheckpointError(f"cannot write {path}: {reason.splitlines()[0]}") from None


def load(path: Path, required: Sequence[str]) -> dict[str, Any]:
    """Read a checkpoint on the CPU; any problem, such as a missing one of the ``required``
    keys (:data:`dynarch.run_state.CHECKPOINT_KEYS`), is one line naming the file."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (nothing to resume)")
    verify(path)
    try:  # weights_only: a crafted file cannot run code (tensors and plain values only)
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign, unsafe or pre-format-2 bytes
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}; only tensors and plain "
            "values are loaded)"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} has checkpoint format {found!r}; this dynarch reads {FORMAT_VERSION}"
        )
    missing = [key for key in required if key not in payload]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint (no {missing[0]!r})")
    return payload


def verify(path: Path) -> None:
    """Check every record of the file against the CRC-32 its zip archive stores for it:
    torch.load does not, so damaged bytes would load as other weights. One line if any
    record fails (or the archive cannot be read), before anything is loaded."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (damaged: {str(exc) or type(exc).__name__})"
        ) from None
    if damaged is not None:
        raise CheckpointError(
            f"{path} is damaged: its record {damaged!r} fails its CRC-32 check (nothing loaded)"
        )


def restore_model(
    path: Path, model: nn.Module, saved: dict[str, Any], example: torch.Tensor
) -> None:
    """Replay ``saved``'s mutations on ``model`` and load its weights; a checkpoint of another
    run (other widths, other mutations) is one line naming the file, not a state_dict dump."""
    try:
        replay(model, saved["mutations"], example)
        model.load_state_dict(saved["model"])
    except (DynarchError, RuntimeError, KeyError, IndexError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # load_state_dict's first line is only "Error(s) in loading state_dict for ...:"
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
        raise CheckpointError(f"{path} does not fit this run's model: {detail}") from None


def restore_training_state(
    path: Path,
    saved: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    policy: Any,
) -> None:
    """Load the optimizer, LR schedule, AMP scaler and policy states. ``load_state_dict`` only
    compares parameter counts, so the optimizer's per-parameter tensors (momentum, Adam
    moments) are checked against the parameters' shapes here: a state of another run is one
    line naming the file now, not a shape error at the first step."""
    try:
        optimizer.load_state_dict(saved["optimizer"])
        for group in optimizer.param_groups:
            for index, param in enumerate(group["params"]):
                for name, value in optimizer.state.get(param, {}).items():
                    if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                        raise CheckpointError(
                            f"optimizer state {name!r} of parameter {index} has shape "
                            f"{tuple(value.shape)}, the parameter {tuple(param.shape)}"
                        )
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        if saved["policy"] is not None:
            policy.load_state_dict(saved["policy"])
    except (DynarchError, ValueError, RuntimeError, KeyError, IndexError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[0] if lines else type(exc).__name__
        raise CheckpointError(
            f"{path}: the training state does not fit this run: {detail}"
        ) from None


def replay(model: nn.Module, mutations: list[dict[str, Any]], example: torch.Tensor) -> None:
    """Give a freshly built ``model`` the shapes the run had: apply its mutations again, each
    by its op's replay (grows with zeros, prunes of the recorded channels, the same inserted
    layers). Values come from the state dict after. An op not registered in this process is
    one line (no silent guess at what it did)."""
    for m in mutations:
        op_named(m["kind"]).replay(model, m, example)


def rng_states() -> dict[str, Any]:
    """Every generator's state as tensors and plain values (what a weights-only load reads)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
