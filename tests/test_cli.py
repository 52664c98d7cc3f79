"""`dynarch run` end to end, as a user runs it: a subprocess in a fresh directory.

The training run is short (2 epochs of digits, one grow and one prune after epoch 1) but real:
it checks the run directory's files agree with each other and with the printed summary.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dynarch.cli import main
from dynarch.train import ConfigError, parse_schedule

# Two epochs of vgg_small (width 16) on digits with this schedule reach 0.972-0.986 test
# accuracy for seeds 0-4 (measured); chance is 0.1. 0.93 leaves room for BLAS differences across
# machines yet fails when a mutation or the optimizer hand-off breaks training.
MIN_ACCURACY = 0.93

FAST = [
    "trainer.epochs=2",
    "schedule=[{epoch:1,op:grow,target:features.conv2,k:8,init:random},"
    "{epoch:1,op:prune,target:features.conv3,k:8,importance:magnitude}]",
]


def dynarch(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dynarch", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    cwd = tmp_path_factory.mktemp("fast_run")
    return dynarch(cwd, "run", *FAST), cwd


def test_run_prints_run_dir_last(fast_run) -> None:
    result, cwd = fast_run
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("run written to ")
    run_dir = Path(lines[-1].removeprefix("run written to "))
    assert run_dir.is_absolute() and run_dir.is_dir()
    assert run_dir.parent == (cwd / "runs").resolve()
    assert lines[-2].startswith("final test accuracy ")
    for name in ("config.yaml", "metrics.jsonl", "mutations.jsonl", "architecture.json"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "FAILED").exists()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["trainer"]["epochs"] == 2 and len(config["schedule"]) == 2
    # one line per epoch and one per mutation, besides the header and the two summary lines
    assert sum(line.startswith("epoch ") for line in lines) == 2
    assert sum(line.strip().startswith("step ") for line in lines) == 2


def run_dir_of(result: subprocess.CompletedProcess) -> Path:
    return Path(result.stdout.strip().splitlines()[-1].removeprefix("run written to "))


def test_mutations_log_has_the_scheduled_widths(fast_run) -> None:
    result, _ = fast_run
    rows = read_jsonl(run_dir_of(result) / "mutations.jsonl")
    assert [(r["kind"], r["target"]) for r in rows] == [
        ("grow", "features.conv2"),
        ("prune", "features.conv3"),
    ]
    grow, prune = rows
    assert (grow["width_before"], grow["width_after"]) == (16, 24)
    assert (prune["width_before"], prune["width_after"]) == (32, 24)
    steps = grow["step"]
    assert steps > 0 and prune["step"] == steps and grow["epoch"] == 1.0
    assert prune["params_before"] == grow["params_after"]


def test_metrics_track_accuracy_lr_and_final_params(fast_run) -> None:
    result, _ = fast_run
    run_dir = run_dir_of(result)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    mutations = read_jsonl(run_dir / "mutations.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert metrics[-1]["test_accuracy"] > MIN_ACCURACY
    for key in ("train_loss", "test_loss", "step"):
        assert all(math.isfinite(m[key]) for m in metrics)
    # the mutations happened between the two evaluations
    assert metrics[0]["params"] == mutations[0]["params_before"]
    assert metrics[1]["params"] == mutations[-1]["params_after"]
    # the final architecture holds exactly the parameters the last evaluation counted
    arch = json.loads((run_dir / "architecture.json").read_text())
    modules = [n for n in arch["nodes"] if n.get("kind") == "module"]
    assert sum(n["params"] for n in modules) == metrics[-1]["params"]
    widths = {n["module"]: n["out_channels"] for n in modules if "out_channels" in n}
    assert widths["features.conv2"] == 24 and widths["features.conv3"] == 24
    # the cosine schedule kept its place through the parameter swaps of both mutations
    total, base = metrics[-1]["step"], 0.05
    for m in metrics:
        expected = base * (1 + math.cos(math.pi * m["step"] / total)) / 2
        assert m["lr"] == pytest.approx(expected, abs=1e-9)


def test_unknown_target_fails_before_training(tmp_path: Path) -> None:
    schedule = "schedule=[{epoch:1,op:grow,target:features.conv9,k:4}]"
    result = dynarch(tmp_path, "run", "trainer.epochs=2", schedule)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynarch: error: ")
    assert "'features.conv9'" in lines[0]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "FAILED").read_text().strip() == lines[0].removeprefix("dynarch: error: ")
    assert not (run_dir / "metrics.jsonl").exists()  # no epoch ran


def test_missing_npz_names_the_path(tmp_path: Path) -> None:
    result = dynarch(tmp_path, "run", "data.name=npz", "data.path=no_such/images.npz")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynarch: error: ")
    assert str(tmp_path / "no_such" / "images.npz") in lines[0]


@pytest.mark.parametrize(
    "override, words",
    [
        ("schedule=[{epoch:1,op:widen,target:features.conv2,k:4}]", ["'widen'", "grow"]),
        ("model.name=vgg_smal", ["'vgg_smal'", "vgg_small"]),
    ],
)
def test_other_user_errors_are_one_line(tmp_path: Path, override: str, words: list[str]) -> None:
    result = dynarch(tmp_path, "run", override)
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynarch: error: ")
    assert all(word in lines[0] for word in words), lines[0]


@pytest.mark.parametrize("args", [[], ["train"], ["--run"]])
def test_no_or_unknown_subcommand_prints_usage(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: dynarch run") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"epoch": 6, "op": "grow", "target": "a", "k": 1}, "outside the run"),
        ({"epoch": 1, "op": "grow", "target": "a", "k": 0}, "positive integer"),
        ({"epoch": 1, "op": "grow", "target": "a", "k": 1, "importance": "l1"}, "'importance'"),
        ({"epoch": 1, "op": "prune", "target": "a", "k": 1, "importance": "mag"}, "'mag'"),
        ({"epoch": 1, "op": "grow", "target": "a", "k": 1, "init": "nope"}, "'nope'"),
        ({"op": "grow", "target": "a", "k": 1}, "missing epoch"),
    ],
)
def test_schedule_entries_are_checked_up_front(entry: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_schedule([entry], epochs=6)


def test_schedule_is_sorted_by_epoch_keeping_listed_order() -> None:
    entries = [
        {"epoch": 3, "op": "prune", "target": "c", "k": 1},
        {"epoch": 1, "op": "grow", "target": "a", "k": 1},
        {"epoch": 1, "op": "grow", "target": "b", "k": 1},
    ]
    assert [m.target for m in parse_schedule(entries, epochs=4)] == ["a", "b", "c"]
