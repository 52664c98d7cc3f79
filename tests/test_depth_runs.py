"""Depth growth in a run: a schedule that deepens, then grows the new layer; the history holds
every topology (``graph_at`` equals the live graph), ``diff`` names the inserted layers, and a
run killed at or right after a deepen resumes to exactly the uninterrupted run."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from test_cli import dynarch, run_dir_of
from test_resume import BASE, assert_same_run, record

from dynarch import history as run_history
from dynarch.checkpoint import replay
from dynarch.graph import ArchGraph
from dynarch.models import vgg_small
from dynarch.query import groups_of

DEEPEN = (
    "policy.mutations=["
    "{step:12,op:deepen,after:features.relu2,kind:conv},"
    "{step:20,op:deepen,after:features.relu4,kind:residual},"
    "{step:30,op:grow,target:features.relu2_deep0.conv,k:4,init:zeros}]"
)


@pytest.fixture(scope="module")
def deepened(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    result = dynarch(tmp_path_factory.mktemp("deepened"), "run", *BASE, DEEPEN)
    assert result.returncode == 0, result.stderr
    assert "step 20: deepen after features.relu4: residual (features.relu4_deep0)" in result.stdout
    return run_dir_of(result), record(run_dir_of(result))


def test_every_topology_is_in_the_history(deepened: tuple[Path, dict]) -> None:
    run_dir, _ = deepened
    h = run_history.open(run_dir)
    events = h.events().to_dicts()
    assert [(e["step"], e["kind"], e["target"]) for e in events] == [
        (12, "deepen", "features.relu2"),
        (20, "deepen", "features.relu4"),
        (30, "grow", "features.relu2_deep0.conv"),
    ]
    # the live graph after each mutation, rebuilt by replaying the mutations on a fresh model
    model, example = vgg_small(), torch.zeros(1, 1, 8, 8)
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["mutations"]
    for count, step in enumerate([0, 12, 20, 30]):
        replay(model, saved[count - 1 : count] if count else [], example)
        live = ArchGraph.from_module(model, example)
        recorded = h.graph_at(step)
        assert set(recorded.nodes) == set(live.nx.nodes)
        assert set(recorded.edges) == set(live.nx.edges)
        for node, attrs in live.nx.nodes(data=True):
            assert recorded.nodes[node] == attrs
        assert groups_of(recorded) == [g.to_dict() for g in live.groups]
    diff = h.diff(0, 25)
    assert diff.layers_added[:2] == ["features.relu2_deep0.conv", "features.relu2_deep0.bn"]
    assert "features.relu4_deep0.conv2" in diff.layers_added and diff.layers_removed == []
    assert len(diff.groups) == 2 and all(row[1] is None for row in diff.groups.rows)


@pytest.mark.parametrize("kill_step", [20])
def test_a_run_killed_at_a_deepen_resumes_exactly(
    deepened: tuple[Path, dict], tmp_path: Path, kill_step: int
) -> None:
    """Killed when step 20 begins, before its deepen: the resume replays the first deepen on a
    fresh model, loads the checkpoint into it, and makes the second one itself. (Killed at 21,
    after the deepen's own checkpoint, it replays both: also bit-equal, measured 2026-11-27.)"""
    marker = tmp_path / "killed"
    killers = ["policy._target_=killers.KillAtStep", f"+policy.marker={marker}"]
    args = [*BASE, DEEPEN, *killers, f"+policy.kill_step={kill_step}"]
    killed = dynarch(tmp_path, "run", *args)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    resumed = dynarch(tmp_path, "run", f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(deepened[1], record(run_dir))
