"""Smoke runs of the study's configs (configs/experiment/study_*.yaml with every
configs/policy/study/ arm), a few steps each, so that none of them can rot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_cli import CIFAR, dynarch

from dynarch.cli import composition_error
from dynarch.history import HistoryReader

ARMS = sorted(p.stem for p in (Path(__file__).parents[1] / "configs/policy/study").glob("*.yaml"))


def test_every_study_arm_runs_on_digits(tmp_path: Path) -> None:
    policies = ",".join(f"study/{arm}" for arm in ARMS)
    result = dynarch(
        tmp_path, "run", "-m", "experiment=study_digits", f"policy={policies}", "trainer.steps=21"
    )
    assert result.returncode == 0, result.stderr
    dbs = sorted((tmp_path / "runs" / "multirun").glob("*/*/history.db"))
    assert len(dbs) == len(ARMS) >= 8
    for db in dbs:
        history = HistoryReader(db)
        assert history.run()["status"] == "completed"
        assert history.run()["config"]["study"]["start"] == 20  # the preset's numbers resolved
    grown = [db for db in dbs if any(e["step"] == 20 for e in HistoryReader(db).events())]
    assert len(grown) >= 6  # every fixed-schedule arm grows at the first growth step


@pytest.mark.skipif(not CIFAR.is_file(), reason="needs ../shared/data/cifar10-10k.npz")
def test_study_preset_runs_on_the_cifar_subset(tmp_path: Path) -> None:
    result = dynarch(
        tmp_path,
        "run",
        "experiment=study_cifar",
        "data=npz",
        f"data.path={CIFAR}",
        "policy=study/grow_then_prune",
        "trainer.steps=30",
    )
    assert result.returncode == 0, result.stderr
    (db,) = (tmp_path / "runs").glob("*/history.db")
    assert [e["step"] for e in HistoryReader(db).events()] == [25] * 5  # all at once at 25


def test_every_arm_of_the_study_runner_composes() -> None:
    """benchmarks/study.py and fade_in.py reach into the configs with overrides
    (``policy.policies.0.init``, ``+policy.init_options.bn_gamma``, ``+model.kwargs.norm``); a
    renamed key must fail here, not hours into a study."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import fade_in
    import study

    for spec in study.DATA.values():
        arms = [overrides for _, overrides in study.ARMS.values()]
        for overrides in [*arms, *fade_in.VARIANTS.values()]:
            filled = [o.format(mid=spec["mid"], big=spec["big"]) for o in overrides]
            assert composition_error([*spec["base"], *filled]) is None, filled
    # --init swaps every growing arm's initializer: the keys exist (an unknown key is a
    # composition error), and every initializer an arm names is registered
    spec = study.DATA["digits"]
    for arm, key in study.INIT_KEYS.items():
        filled = [o.format(mid=spec["mid"], big=spec["big"]) for o in study.ARMS[arm][1]]
        assert composition_error([*spec["base"], *filled, f"{key}=tiny"]) is None, arm
    from dynarch.initializers import available_initializers

    named = {o.split("=")[1] for _, arm in study.ARMS.values() for o in arm if "init=" in o}
    assert named <= set(available_initializers()), named
