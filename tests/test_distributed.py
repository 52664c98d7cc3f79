"""Two training processes (torchrun, gloo on CPU): one decision, identical mutations on both
ranks, and the same result as one process where the maths allows (no BatchNorm, magnitude
pruning: every statistic is a sum over the global batch)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import child_pythonpath, dynarch, run_dir_of

from dynarch.history import HistoryReader

TESTS = Path(__file__).resolve().parent
# teacher_student: 1600 training samples, so a global batch of 64 splits into 25 equal steps
# an epoch for one process and for two (32 each)
CONFIG = [
    "data=teacher_student",
    "+model.kwargs.norm=false",
    "trainer.epochs=2",
    "policy.mutations=["
    "{step:5,op:grow,target:features.conv2,k:4,init:gradmax},"
    "{step:10,op:prune,target:features.conv3,k:4,importance:magnitude},"
    "{step:15,op:grow,target:classifier.fc1,k:8,init:gradmax},"
    "{step:20,op:grow,target:features.conv1,k:4,init:gradmax},"
    "{step:30,op:prune,target:features.conv4,k:3,importance:magnitude}]",
]


def torchrun(cwd: Path, *args: str, logs: Path | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=2 -m dynarch ARGS``; on a time-out the whole process group
    is killed (torchrun's workers would otherwise outlive the test). With ``logs``, each
    rank's stdout and stderr go to its own files there (torchrun's ``--redirects``)."""
    env = {**os.environ, "PYTHONPATH": child_pythonpath()}  # one thread: tests/conftest.py
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    if logs is not None:
        command += ["--redirects=3", f"--log-dir={logs}"]
    command += ["--nproc_per_node=2", "-m", "dynarch", *args]
    with subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            out, err = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def architecture_history(run_dir: Path) -> list[tuple]:
    events = HistoryReader(run_dir / "history.db").events()
    return [(e["step"], e["kind"], e["target"], e["k"], e["indices"]) for e in events]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_processes_mutate_identically_and_match_one_process(tmp_path: Path) -> None:
    (tmp_path / "two").mkdir()
    two = torchrun(tmp_path / "two", "run", *CONFIG)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert "parameters identical on all 2 processes" in two.stdout
    assert two.stdout.count("run written to") == 1  # rank 1 stays silent and writes nothing
    (run_dir,) = (tmp_path / "two" / "runs").iterdir()

    (tmp_path / "one").mkdir()
    one = dynarch(tmp_path / "one", "run", *CONFIG)
    assert one.returncode == 0, one.stderr
    assert architecture_history(run_dir) == architecture_history(run_dir_of(one))
    assert len(architecture_history(run_dir)) == 5

    two_weights = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    one_weights = torch.load(run_dir_of(one) / "checkpoint.pt", weights_only=True)["model"]
    for name, value in one_weights.items():
        torch.testing.assert_close(two_weights[name], value, rtol=1e-4, atol=1e-5, msg=name)
    metrics_two = HistoryReader(run_dir / "history.db").metrics("eval")
    metrics_one = HistoryReader(run_dir_of(one) / "history.db").metrics("eval")
    assert [m["accuracy"] for m in metrics_two] == pytest.approx(
        [m["accuracy"] for m in metrics_one], abs=0.01
    )

    # killed by SIGKILL on rank 0 mid-run (torchrun then stops rank 1), resumed under torchrun:
    # the same mutations and, bit for bit, the same final weights as the uninterrupted run
    (tmp_path / "killed").mkdir()
    kill = ["policy._target_=killers.KillAtStep", "+policy.kill_step=22"]
    killed = torchrun(tmp_path / "killed", "run", *CONFIG, *kill, f"+policy.marker={tmp_path}/k")
    assert killed.returncode != 0 and (tmp_path / "k").exists()
    (killed_dir,) = (tmp_path / "killed" / "runs").iterdir()
    resumed = torchrun(tmp_path / "killed", "run", f"resume={killed_dir}")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resumed " in resumed.stdout
    assert architecture_history(killed_dir) == architecture_history(run_dir)
    final = torch.load(killed_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(final[name], value) for name, value in two_weights.items())


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_a_rank_killed_mid_run_leaves_one_line_on_the_other(tmp_path: Path) -> None:
    """Rank 1 dies (SIGKILL) in a grow, after GradMax's statistics were summed over both ranks;
    rank 0 notices in its next collective (DDP's, after the grow) and says so in one line,
    though torchrun SIGTERMs it at once: no traceback, the history failed, the line in run.log."""
    dying = 'init:"killers:gradmax_dying_midway",init_options:{rank:1}'
    grow = f"{{step:3,op:grow,target:classifier.fc1,k:4,{dying}}}"
    config = ["data=teacher_student", "trainer.steps=6", f"policy.mutations=[{grow}]"]
    result = torchrun(tmp_path, "run", *config, logs=tmp_path / "logs")
    assert result.returncode != 0
    (stderr,) = (tmp_path / "logs").glob("*/attempt_0/0/stderr.log")
    text = stderr.read_text(encoding="utf-8")
    assert "Traceback" not in text, text[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    (line,) = [line for line in text.splitlines() if line.startswith("dynarch: error:")]
    assert re.match(r"dynarch: error: rank 0 lost rank 1: Connection (reset|closed) by peer;", line)
    assert line.endswith(f"; resume with: dynarch run resume={run_dir}"), line
    assert f"rank 0 failed: {line.removeprefix('dynarch: error: ')}" in (
        run_dir / "run.log"
    ).read_text(encoding="utf-8")
    assert HistoryReader(run_dir / "history.db").run()["status"] == "failed"


def test_local_parallel_sweep_runs_every_job_and_reports_failures(tmp_path: Path) -> None:
    args = ["run", "-m", "hydra/launcher=local_parallel", "trainer.steps=2", "policy=static"]
    ok = dynarch(tmp_path, *args, "trainer.seed=0,1")
    assert ok.returncode == 0, ok.stderr
    dbs = sorted((tmp_path / "runs" / "multirun").glob("*/*/history.db"))
    assert [HistoryReader(db).run()["status"] for db in dbs] == ["completed", "completed"]
    assert {HistoryReader(db).run()["config"]["trainer"]["seed"] for db in dbs} == {0, 1}
    # a job that fails in a worker process still makes the sweep exit 1
    bad = dynarch(tmp_path, *args, "optimizer.name=sgd,nope")  # two jobs: one round
    assert bad.returncode == 1 and "unknown optimizer 'nope'" in bad.stderr


def test_slurm_launcher_config_composes() -> None:
    from hydra import compose, initialize_config_dir

    from dynarch.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.timeout_min) == (1, 1, 240)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_processes_agree_on_data_driven_inits(tmp_path: Path) -> None:
    """gradmax_fanin_opt (ascent through a grown copy), tiny (line search) and deepens (the
    pass-through BatchNorm's statistics, a GradMax residual block) run under torchrun, on the
    statistics summed over both processes' batches, and the net is the same on both."""
    config = [
        "data=teacher_student",
        "trainer.epochs=1",
        "policy.mutations=["
        "{step:3,op:grow,target:features.conv2,k:3,init:gradmax_fanin_opt},"
        "{step:4,op:deepen,after:features.relu2,kind:conv},"
        "{step:5,op:grow,target:features.conv3,k:3,init:tiny},"
        "{step:6,op:deepen,after:features.relu4,kind:residual,init:gradmax},"
        "{step:7,op:grow,target:classifier.fc1,k:4,init:tiny}]",
    ]
    result = torchrun(tmp_path, "run", *config)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "parameters identical on all 2 processes" in result.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    methods = [e["method"] for e in HistoryReader(run_dir / "history.db").events()]
    assert methods == ["gradmax_fanin_opt", "conv", "tiny", "residual", "tiny"]


def test_a_users_ddp_loop_with_a_session_mutates_identically_on_both_ranks(
    tmp_path: Path,
) -> None:
    """examples/own_loop_ddp.py under torchrun: rank 0's decisions reach rank 1, the GradMax
    statistics and Taylor's chosen channels agree, DDP is rebuilt after each mutation, the
    two ranks end with the same parameters, and rank 0 alone writes the run dir."""
    script = TESTS.parent / "examples" / "own_loop_ddp.py"
    env = {**os.environ, "PYTHONPATH": child_pythonpath()}  # one thread: tests/conftest.py
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(script), str(tmp_path / "run")]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("rank "))
    assert len(lines) == 2, done.stdout
    assert lines[0].removeprefix("rank 0") == lines[1].removeprefix("rank 1"), lines
    assert "2 mutations" in lines[0]
    history = HistoryReader(tmp_path / "run" / "history.db")
    assert [(e["step"], e["kind"]) for e in history.events()] == [(3, "grow"), (5, "prune")]
    assert history.run()["status"] == "completed"
