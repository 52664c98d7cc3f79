"""``trainer.compile``: the model trains compiled, compiled again after every mutation (the
step's seconds in the mutation's event); with the ``eager`` backend (Dynamo's trace, no code
generation: seconds, not minutes, on the CPU) the run is the uncompiled run, bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch
from sync_probe import default_run
from torch._dynamo.utils import counters

from dynarch import grow
from dynarch.controller import compiled_wrap
from dynarch.distributed import Processes
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


def test_every_architecture_compiles_past_dynamos_recompile_limit() -> None:
    """Twelve growths, each wrapped anew: each forward is a new graph (without dropping
    Dynamo's caches the 9th would hit ``recompile_limit`` and run eager) and equals eager."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    head = [torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()]
    model = torch.nn.Sequential(conv, *head, torch.nn.Linear(4, 10))
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrap = compiled_wrap(Processes(), torch.device("cpu"), "eager")
    graphs = []
    for _ in range(12):
        grow(model, "0", 1, "zeros", (x, y), torch.nn.functional.cross_entropy, optimizer)
        before = counters["stats"]["unique_graphs"]
        out = wrap(model)(x)
        graphs.append(counters["stats"]["unique_graphs"] - before)
        assert torch.equal(out, model(x))
    assert graphs == [1] * 12
    assert model[0].out_channels == 16
