"""``trainer.compile``: the model trains compiled, compiled again after every mutation (the
step's seconds in the mutation's event); with the ``eager`` backend (Dynamo's trace, no code
generation: seconds, not minutes, on the CPU) the run is the uncompiled run, bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch
from sync_probe import default_run

from dynarch.history import HistoryReader


def _run(run_dir: Path, **trainer) -> dict:
    default_run(run_dir, steps=30, **trainer)
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def test_a_compiled_run_recompiles_after_each_mutation_and_equals_the_eager_run(
    tmp_path: Path,
) -> None:
    torch._dynamo.reset()
    compiled = _run(tmp_path / "compiled", compile=True, compile_backend="eager")
    eager = _run(tmp_path / "eager")
    events = HistoryReader(tmp_path / "compiled" / "history.db").events()
    assert [(e["step"], e["kind"]) for e in events] == [(10, "grow"), (10, "grow"), (20, "prune")]
    assert all(e["info"]["compile_seconds"] > 0 for e in events)
    plain_events = HistoryReader(tmp_path / "eager" / "history.db").events()
    assert all("compile_seconds" not in e["info"] for e in plain_events)
    assert compiled["train_losses"] == eager["train_losses"]
    assert all(torch.equal(compiled["model"][k], v) for k, v in eager["model"].items())
