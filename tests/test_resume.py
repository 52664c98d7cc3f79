"""Checkpoint and resume: a run killed by SIGKILL anywhere (between steps, during a mutation,
between a logged mutation and its checkpoint) and resumed ends exactly like one that never
stopped; the same config and seed give the same run twice; a NaN loss stops cleanly."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from test_cli import dynarch, one_error_line, run_dir_of

from dynarch.checkpoint import CheckpointError
from dynarch.history import HistoryReader
from dynarch.run_state import CHECKPOINT_KEYS, read_checkpoint

# 2 epochs of digits (23 steps each), checkpoints every 6 steps, mutations at steps 12 and 30:
# two grows at 12 (the second may die half-way), a Taylor prune and a random grow at 30.
BASE = ["trainer.epochs=2", "trainer.checkpoint_every_epochs=0.25"]


def schedule(marker: Path | None = None) -> str:
    dying = f',init_options:{{marker:"{marker}"}}' if marker else ""
    return (
        "policy.mutations=["
        "{step:12,op:grow,target:features.conv2,k:8,init:gradmax},"
        f'{{step:12,op:grow,target:classifier.fc1,k:8,init:"killers:gradmax_dying_midway"{dying}}},'
        "{step:30,op:prune,target:features.conv3,k:8,importance:taylor},"
        "{step:30,op:grow,target:features.conv1,k:4,init:random}]"
    )


def record(run_dir: Path) -> dict:
    """Everything a run leaves that must not depend on whether it was interrupted."""
    history = HistoryReader(run_dir / "history.db")
    events = [{k: v for k, v in e.items() if k != "seconds"} for e in history.events()]
    final = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    return {
        "status": history.run()["status"],
        "metrics": history.metrics(),
        "events": events,
        "versions": history.versions(),
        "graphs": [history.architecture(v) for v, *_ in history.versions()],
        "weights": final["model"],
        "optimizer": final["optimizer"]["state"],
        "checkpoint": final,
    }


def assert_same_run(a: dict, b: dict) -> None:
    for key in ("status", "metrics", "events", "versions", "graphs"):
        assert a[key] == b[key], key
    assert a["weights"].keys() == b["weights"].keys()
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    for i, state in a["optimizer"].items():
        assert all(torch.equal(v, b["optimizer"][i][k]) for k, v in state.items() if k != "step")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    result = dynarch(tmp_path_factory.mktemp("reference"), "run", *BASE, schedule())
    assert result.returncode == 0, result.stderr
    return record(run_dir_of(result))


def test_same_config_and_seed_give_the_same_run(reference: dict, tmp_path: Path) -> None:
    result = dynarch(tmp_path, "run", *BASE, schedule())
    assert result.returncode == 0, result.stderr
    assert_same_run(reference, record(run_dir_of(result)))
    assert [e["step"] for e in reference["events"]] == [12, 12, 30, 30]


def test_checkpoint_is_the_run_state_and_needs_all_of_it(reference: dict, tmp_path: Path) -> None:
    """A real run's checkpoint is ``RunState.state_dict()``: its keys are the ones derived from
    RunState's fields, in order, and one without any of them is refused with one line."""
    payload = reference["checkpoint"]
    assert list(payload) == ["format", *CHECKPOINT_KEYS]
    for key in CHECKPOINT_KEYS:
        path = tmp_path / f"without_{key}.pt"
        torch.save({k: v for k, v in payload.items() if k != key}, path)
        with pytest.raises(CheckpointError) as refused:
            read_checkpoint(path)
        assert str(refused.value) == f"{path} is not a complete checkpoint (no {key!r})"


KILLS = {
    "before the first periodic checkpoint": ["+policy.kill_step=4"],
    # (at a mutation step before its mutations: as the next, less the events to drop;
    # benchmarks/reliability.py kills 72 runs at random times, docs/reliability.md)
    "during a mutation, after the step's first one was logged": [],
    # (mid-epoch between checkpoints: test_depth_runs kills at step 20 and resumes from 18)
    "right after a mutation step's checkpoint": ["+policy.kill_step=31"],
    # (later in the run: the SIGTERM case below resumes from step 21 to the end)
}


@pytest.mark.parametrize("where", list(KILLS))
def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(
    reference: dict, tmp_path: Path, where: str
) -> None:
    marker = tmp_path / "killed"
    if KILLS[where]:  # a policy that dies when the step begins
        args = [
            schedule(),
            "policy._target_=killers.KillAtStep",
            f"+policy.marker={marker}",
            *KILLS[where],
        ]
    else:  # the second grow of step 12 dies after its statistics pass
        args = [schedule(marker)]
    killed = dynarch(tmp_path, "run", *BASE, *args)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert marker.exists()
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert HistoryReader(run_dir / "history.db").run()["status"] == "running"

    resumed = dynarch(tmp_path, "run", f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed " in resumed.stdout and run_dir_of(resumed) == run_dir
    assert_same_run(reference, record(run_dir))


STOPS = {  # signal, how many at once, exit code, the checkpoint the run leaves, its message
    "SIGTERM (or one Ctrl-C)": (signal.SIGTERM, 1, 143, 21, "interrupted at step 21"),
    "Ctrl-C twice": (
        signal.SIGINT,
        2,
        130,
        18,
        "interrupted during step 20; resume continues from step 18",
    ),
}


@pytest.mark.parametrize("how", list(STOPS))
def test_a_stopped_run_says_how_to_go_on_and_resumes_exactly(
    reference: dict, tmp_path: Path, how: str
) -> None:
    """Ctrl-C or a scheduler's SIGTERM: one line, exit 128 + signal, status interrupted, a
    checkpoint before the next step (a second Ctrl-C: at once, from the last checkpoint)."""
    signum, times, code, step, message = STOPS[how]
    args = [
        f"+policy.{k}={v}" for k, v in {"step": 20, "signum": int(signum), "times": times}.items()
    ]
    stopped = dynarch(
        tmp_path,
        "run",
        *BASE,
        schedule(),
        "policy._target_=killers.SignalAtStep",
        f"+policy.marker={tmp_path / 'signalled'}",
        *args,
    )
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert stopped.returncode == code, stopped.stderr
    assert stopped.stderr.strip().splitlines() == [
        f"dynarch: {message}; continue with: dynarch run resume={run_dir}"
    ]
    assert HistoryReader(run_dir / "history.db").run()["status"] == "interrupted"
    assert read_checkpoint(run_dir / "checkpoint.pt")["step"] == step
    if times > 1:  # resuming from an earlier checkpoint is what the SIGKILL cases check
        return
    resumed = dynarch(tmp_path, "run", f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(reference, record(run_dir))


def test_resume_refuses_other_overrides_and_missing_runs(tmp_path: Path) -> None:
    line = one_error_line(dynarch(tmp_path, "run", f"resume={tmp_path}/nope"))
    assert "no dynarch run at" in line and "nope" in line
    line = one_error_line(dynarch(tmp_path, "run", f"resume={tmp_path}", "model.width=3"))
    assert "resume= takes no other overrides than trainer.epochs/steps" in line


def test_nan_loss_stops_with_the_last_checkpoint(tmp_path: Path) -> None:
    poison = ["policy._target_=killers.PoisonBatchAt", "+policy.step=9"]
    line = one_error_line(dynarch(tmp_path, "run", *BASE, schedule(), *poison))
    assert "loss is nan at step 9; the last good checkpoint is step 6" in line
    (run_dir,) = (tmp_path / "runs").iterdir()
    history = HistoryReader(run_dir / "history.db")
    assert history.run()["status"] == "failed" and "step 9" in history.run()["message"]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 6


def test_nan_loss_skipped_when_configured(reference: dict, tmp_path: Path) -> None:
    poison = ["policy._target_=killers.PoisonBatchAt", "+policy.step=9"]
    skip = ["trainer.on_nonfinite=skip", "trainer.nonfinite_lr_factor=0.5"]
    result = dynarch(tmp_path, "run", *BASE, schedule(), *poison, *skip)
    assert result.returncode == 0, result.stderr
    assert "step 9: loss is nan; update skipped, lr x0.5" in result.stdout
    run = record(run_dir_of(result))
    assert [e["step"] for e in run["events"]] == [12, 12, 30, 30]
    # the learning rate after the skip is half the uninterrupted run's at every evaluation
    for got, want in zip(run["metrics"], reference["metrics"], strict=True):
        assert got["lr"] == pytest.approx(want["lr"] * 0.5, abs=1e-12)


def test_a_failing_mutation_leaves_the_history_as_before_it(tmp_path: Path) -> None:
    mutations = (
        "policy.mutations=[{step:3,op:grow,target:features.conv2,k:2,init:gradmax},"
        '{step:7,op:grow,target:features.conv3,k:2,init:"killers:wrong_shape_init"}]'
    )
    line = one_error_line(dynarch(tmp_path, "run", *BASE, mutations))
    assert "initializer gave fan_in['features.conv3'] of shape (3," in line
    (run_dir,) = (tmp_path / "runs").iterdir()
    history = HistoryReader(run_dir / "history.db")
    assert [(e["step"], e["target"]) for e in history.events()] == [(3, "features.conv2")]
    assert [v[1] for v in history.versions()] == [0, 3]  # no version for the failed one
    assert history.run()["status"] == "failed"
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 6 and saved["model"]["features.conv3.weight"].shape[0] == 32
