"""Every policy preset under configs/policy fits every built-in model and any run length:
layers are chosen by role (``conv[1]``, ``layer[-1]``), times are fractions of the run and
budgets multiples of the starting size. One sweep per model, each run 2 epochs of one step
(digits, 180 training images), the real ``dynarch`` command. On torchvision's resnet18 the
presets that measure or grow all 20 channel groups at every firing take 25-60 s each, so the
suite runs its schedules there and ``benchmarks/presets.py`` the whole matrix."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import dynarch

from dynarch.history import HistoryReader

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "policy"
PRESETS = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
# resnet18 in the suite: presets whose cost does not scale with the number of layers (the
# default, grow_then_prune, runs on it in tests/test_install.py's first hour)
CHEAP = ["deepen_schedule", "random_schedule"]
# the residual nets share the presets between them (the suite's time budget): every preset
# runs on a residual net, all of them on vgg_small
PER_MODEL = {"resnet18": CHEAP, "wrn": PRESETS[::2], "resnet_small": PRESETS[1::2]}
MODELS = {
    "vgg_small": ["model=vgg_small"],
    "resnet_small": ["model=resnet_small"],
    "wrn": ["model=wrn28", "model.width=4", "model.kwargs.depth=10"],  # WRN-10: same blocks
    "resnet18": ["model=torchvision", "model.name=torchvision:resnet18"],
}
SHORT = ["trainer.epochs=2", "data.test_fraction=0.9", "trainer.batch_size=180"]


@pytest.mark.parametrize("model", MODELS)
def test_every_preset_runs_on_every_built_in_model(tmp_path: Path, model: str) -> None:
    presets = PER_MODEL.get(model, PRESETS)
    events = sweep(tmp_path, [*MODELS[model], f"policy={','.join(presets)}", *SHORT], presets)
    assert len(events) == len(presets) and len(PRESETS) >= 10
    for preset, changes in events.items():
        assert (preset == "static") == (not changes), preset
    if model != "vgg_small":
        return
    assert all("north: phi" in e["reason"] for e in events["north"])
    assert all("gradient: " in e["reason"] for e in events["gradient_trigger"])
    assert all("top gradient" in e["reason"] for e in events["top_scored"])
    budget = events["grow_prune_budget"]  # 2.4x the start, then pruned to 1.2x
    start = budget[0]["params_before"]
    assert max(e["params_after"] for e in budget) <= 2.4 * start
    pruned = [e for e in budget if e["kind"] == "prune"]
    assert pruned and pruned[-1]["params_after"] <= 1.2 * start
    depth = [(e["kind"], e["method"]) for e in events["deepen_schedule"]]
    assert depth == [("deepen", "conv"), ("deepen", "residual"), ("grow", "zeros")]


def sweep(cwd: Path, overrides: list[str], presets: list[str]) -> dict[str, list[dict]]:
    """Run a sweep; every run completed; each preset's mutation events."""
    result = dynarch(cwd, "run", "-m", *overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = sorted((cwd / "runs" / "multirun").glob("*/[0-9]*"), key=lambda d: int(d.name))
    events = {}
    for preset, job in zip(presets, jobs, strict=True):
        history = HistoryReader(job / "history.db")
        assert history.run()["status"] == "completed", (preset, history.run()["message"])
        events[preset] = history.events()
    return events


def test_default_policy_fits_short_and_long_runs_of_the_readme_models(tmp_path: Path) -> None:
    """The walls a new user hit: ``dynarch run trainer.epochs=3`` (the old default named epoch
    4) and the README's ``model=resnet_small`` (the old default named vgg_small's layers). The
    mutations land at the same fractions of the run, whatever its length."""
    runs = ["trainer.epochs=1,3", "model=resnet_small", "data.test_fraction=0.9"]
    events = sweep(tmp_path, runs, ["1 epoch", "3 epochs"])
    steps = {run: [e["step"] for e in changes] for run, changes in events.items()}
    assert all([e["kind"] for e in changes][-1] == "prune" for changes in events.values())
    # 3 steps an epoch: grow at 1/3 of the run, prune at 2/3
    assert steps == {"1 epoch": [1, 1, 2], "3 epochs": [3, 3, 6]}
