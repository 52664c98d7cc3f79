"""A user's op (tests/reinit_op.py, registered in one file) end to end: a schedule applies it,
the history records it, a run killed after it resumes bit-equal to an uninterrupted one,
``dynarch query ... events --kind reinit`` lists it and the plots draw it."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from reinit_op import REINIT
from test_cli import dynarch, run_dir_of
from test_resume import BASE, assert_same_run, record

from dynarch.checkpoint import CheckpointError, replay, restore_model
from dynarch.errors import DynarchError
from dynarch.history import HistoryReader
from dynarch.models import vgg_small
from dynarch.ops import OpError, op_named, op_names, register_op

# digits, 2 epochs of 23 steps, checkpoints every 6 steps: a grow at 12, the reinit of 4
# channels of the grown layer at 20, a prune at 30; killed as step 26 begins (resumed from 24)
POLICY = [
    "policy._target_=reinit_op.ReinitSchedule",
    "policy.mutations=["
    "{step:12,op:grow,target:features.conv2,k:8,init:random},"
    "{step:20,op:reinit,target:features.conv2,k:4},"
    "{step:30,op:prune,target:features.conv3,k:8}]",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    result = dynarch(tmp_path_factory.mktemp("reinit"), "run", *BASE, *POLICY)
    assert result.returncode == 0, result.stderr
    assert "step 20: reinit features.conv2 by 4 (kaiming_uniform): width 24 -> 24" in result.stdout
    return record(run_dir_of(result)), run_dir_of(result)


def test_a_user_op_is_applied_and_recorded(reference: tuple[dict, Path]) -> None:
    run, _ = reference
    kinds = [(e["step"], e["kind"], e["target"], e["k"]) for e in run["events"]]
    assert kinds == [
        (12, "grow", "features.conv2", 8),
        (20, "reinit", "features.conv2", 4),
        (30, "prune", "features.conv3", 8),
    ]
    reinit = run["events"][1]
    assert reinit["width_before"] == reinit["width_after"] == 24 and len(reinit["indices"]) == 4


def test_a_run_killed_after_a_user_op_resumes_exactly(
    reference: tuple[dict, Path], tmp_path: Path
) -> None:
    marker = tmp_path / "killed"
    kill = ["+policy.kill_step=26", f"+policy.marker={marker}"]
    killed = dynarch(tmp_path, "run", *BASE, *POLICY, *kill)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert [e["kind"] for e in HistoryReader(run_dir / "history.db").events()] == [
        "grow",
        "reinit",
    ]
    resumed = dynarch(tmp_path, "run", f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed " in resumed.stdout
    assert_same_run(reference[0], record(run_dir))


def test_query_lists_and_plots_a_user_op(reference: tuple[dict, Path], tmp_path: Path) -> None:
    """In a process that never imported reinit_op: the run's recorded kinds are valid."""
    _, run_dir = reference
    listed = dynarch(tmp_path, "query", str(run_dir), "--json", "events", "--kind", "reinit")
    assert listed.returncode == 0, listed.stderr
    assert [(e["step"], e["kind"]) for e in json.loads(listed.stdout)] == [(20, "reinit")]
    wrong = dynarch(tmp_path, "query", str(run_dir), "events", "--kind", "reinti")
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines() == [
        "dynarch: error: argument --kind: invalid choice: 'reinti' (choose from grow, prune, "
        "deepen, reinit) (did you mean: 'reinit'?)"
    ]
    plotted = dynarch(tmp_path, "query", str(run_dir), "plot", "--out", str(tmp_path / "p"))
    assert plotted.returncode == 0, plotted.stderr
    assert {p.name for p in (tmp_path / "p").iterdir()} >= {"widths.png", "metrics.png"}


def test_replaying_an_op_no_one_registered_is_one_line(tmp_path: Path) -> None:
    """A checkpoint whose mutation's op is not registered here (a user's op whose module the
    resuming process did not import) is refused in one line, not replayed as a prune."""
    torch.manual_seed(0)
    model, example = vgg_small(width=4), torch.randn(1, 1, 8, 8)
    entry = {"kind": "reinti", "target": "features.conv2", "k": 2, "indices": [0, 1]}
    with pytest.raises(DynarchError) as refused:
        replay(model, [entry], example)
    assert str(refused.value) == (
        "unknown op 'reinti'; known ops: grow, prune, deepen, reinit (did you mean: 'reinit'?)"
    )
    saved = {"mutations": [entry], "model": model.state_dict()}
    with pytest.raises(CheckpointError) as refused:
        restore_model(tmp_path / "checkpoint.pt", vgg_small(width=4), saved, example)
    assert str(refused.value).splitlines() == [
        f"{tmp_path / 'checkpoint.pt'} does not fit this run's model: unknown op 'reinti'; known "
        "ops: grow, prune, deepen, reinit (did you mean: 'reinit'?)"
    ]
    assert model.features.conv2.out_channels == 4  # nothing was pruned


def test_an_op_is_one_registration() -> None:
    """register_op refuses what is not an Op; the table lists the user's op after the
    built-ins, and op_named's did-you-mean covers it."""
    with pytest.raises(OpError, match="register_op expects an Op, got str"):
        register_op("reinit")
    assert op_names()[:3] == ("grow", "prune", "deepen") and "reinit" in op_names()
    assert op_named("reinit") is REINIT
