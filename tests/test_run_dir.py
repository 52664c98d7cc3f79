"""A run dir has one writer and one run (issue 16, items 1-5): a second process is refused
naming the holder, a run stopped before its first checkpoint starts over, a full disk or a
read-only dir is one line with the history intact."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf
from test_bad_input_table import snapshot
from test_cli import dynarch, one_error_line, run_dir_of

from dynarch.errors import DynarchError
from dynarch.history_store import HistoryReader, HistoryWriter, records_nothing
from dynarch.run_dir import owned

SHORT = ["trainer.steps=2", "policy=static"]


def history_rows(run_dir: Path) -> dict:
    reader = HistoryReader(run_dir / "history.db")
    try:
        return {"run": reader.run(), "versions": reader.versions(), "metrics": reader.metrics()}
    finally:
        reader.close()


def test_a_run_dir_held_by_a_process_refuses_a_second_one(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "history.db").write_bytes(b"")  # a run that has just begun
    before = snapshot(run_dir)
    with owned(run_dir):
        result = dynarch(tmp_path, "run", f"resume={run_dir}")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"dynarch: error: {run_dir} is in use by process {os.getpid()}; one process writes a "
        "run dir at a time (wait for it to end, or stop it first)"
    )
    assert snapshot(run_dir) == before
    with owned(run_dir):  # released when the holder's block ends
        pass


def test_full_disk_is_one_line_then_the_run_starts_over(tmp_path: Path) -> None:
    """The step-0 checkpoint hits a full disk (/dev/full behind its temporary file): one line,
    no temporary file, the history marked failed. The run stopped before its first checkpoint,
    so ``resume`` starts it over (said in one line) and it completes."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".checkpoint.pt.tmp").symlink_to("/dev/full")

    full = dynarch(tmp_path, "run", *SHORT, f"hydra.run.dir={run_dir}")

    line = f"dynarch: error: cannot write {run_dir / 'checkpoint.pt'}: No space left on device"
    assert full.returncode == 1 and full.stderr.strip().splitlines() == [line]
    assert (
        not (run_dir / ".checkpoint.pt.tmp").exists() and not (run_dir / "checkpoint.pt").exists()
    )
    stopped = history_rows(run_dir)
    assert stopped["run"]["status"] == "failed" and stopped["versions"] == [(0, 0, None)]

    again = dynarch(tmp_path, "run", f"resume={run_dir}")

    assert again.returncode == 0, again.stderr
    assert f"{run_dir} stopped before its first checkpoint: starting it over" in again.stdout
    done = history_rows(run_dir)
    assert done["run"]["status"] == "completed" and done["versions"] == [(0, 0, None)]
    assert [m["step"] for m in done["metrics"] if m["kind"] == "eval"] == [2]
    assert not (run_dir / "FAILED").exists()


def read_only(run_dir: Path, *args: str) -> list[str]:
    """A command that sees ``run_dir`` read-only: a read-only bind mount when root (root
    writes through permissions), else the dir's permissions."""
    if os.geteuid() != 0:
        run_dir.chmod(0o555)
        return list(args)
    unshare = shutil.which("unshare")
    probe = [unshare or "unshare", "-m", "true"]
    if unshare is None or subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.skip("root without mount namespaces: cannot make a read-only dir")
    mount = f'mount --bind -o ro {run_dir} {run_dir} && exec "$@"'
    return [unshare, "-m", "sh", "-c", mount, "sh", *args]


def test_a_read_only_run_dir_is_one_line_and_unchanged(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with HistoryWriter(run_dir / "history.db") as writer:
        writer.write_run({"trainer": {}}, command="dynarch run")
    before = snapshot(run_dir)
    command = read_only(run_dir, *dynarch_command(), "run", f"resume={run_dir}")

    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)

    run_dir.chmod(0o755)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"dynarch: error: {run_dir} cannot be written (read-only, or no permission); "
        "a run writes there"
    )
    assert snapshot(run_dir) == before


def dynarch_command() -> list[str]:
    return [sys.executable, "-m", "dynarch"]


def test_what_a_fresh_start_would_lose(tmp_path: Path) -> None:
    """A history stopped while being created, or before its first checkpoint, records
    nothing; one with training in it, or bytes that are not SQLite, does."""
    path = tmp_path / "history.db"
    assert records_nothing(path)  # no file
    path.write_bytes(b"")
    assert records_nothing(path)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.commit()
    conn.close()
    assert records_nothing(path)  # some tables, no schema version (an older writer's kill)
    path.unlink()
    with HistoryWriter(path) as writer:
        writer.write_run({"trainer": {}})
        writer.log_architecture(0, {"nodes": []})
        assert records_nothing(path)
        writer.log_metrics(1, 0.1, "train", {"loss": 1.0})
        assert not records_nothing(path)
    path.write_bytes(os.urandom(4096))
    assert not records_nothing(path)


HOT_JOURNAL = """
import os, signal, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA cache_size=1")  # spill to the file mid-transaction: a hot journal
conn.execute("BEGIN")
conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
for i in range(200):
    conn.execute("INSERT INTO meta VALUES (?, ?)", (str(i), "x" * 2000))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_history_killed_while_being_made_records_nothing(tmp_path: Path) -> None:
    """SIGKILL inside SQLite's first transaction leaves a hot rollback journal, which only a
    read-write open rolls back (benchmarks/reliability.py found runs killed there that could
    be neither resumed nor started over)."""
    path = tmp_path / "history.db"
    subprocess.run([sys.executable, "-c", HOT_JOURNAL, str(path)], check=False)
    assert Path(f"{path}-journal").stat().st_size > 0 and path.stat().st_size > 0
    assert records_nothing(path)
    with HistoryWriter(path) as writer:  # and a writer makes a whole history of it
        writer.write_run({"trainer": {}})
    assert history_rows(path.parent)["run"]["status"] == "running"


class FailOnce:
    """A user's policy that fails at ``step`` once (``marker`` remembers it did): a run that
    stops on an error, then resumes and completes."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def decide(self, state: Any) -> list:
        if state.step == self.step and not self.marker.exists():
            self.marker.write_text("failed once\n")
            raise DynarchError(f"failing once at step {self.step}")
        return []


def test_a_resumed_run_that_completes_leaves_no_stale_failed_file(tmp_path: Path) -> None:
    """Issue 22 item 8: the first attempt's FAILED file went on naming its error beside the
    history's ``completed``, in ``query list`` too."""
    policy = ["policy=static", "policy._target_=test_run_dir.FailOnce", "+policy.step=2"]
    marker = f"+policy.marker={tmp_path / 'failed_once'}"
    line = one_error_line(dynarch(tmp_path, "run", "trainer.steps=4", *policy, marker))
    assert line.endswith("failing once at step 2")
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "FAILED").is_file()

    resumed = dynarch(tmp_path, "run", f"resume={run_dir}")

    assert resumed.returncode == 0, resumed.stderr
    assert "config.yaml" not in resumed.stdout  # not edited: nothing to say
    assert not (run_dir / "FAILED").exists()
    listed = dynarch(tmp_path, "query", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [(r["status"], r["steps"], r["message"]) for r in json.loads(listed.stdout)]
    assert rows == [("completed", 4, None)]


def saved_config(run_dir: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))


def test_a_hand_edited_config_yaml_is_said_and_rewritten_on_resume(tmp_path: Path) -> None:
    """Issue 22 item 5: a resume runs with the history's config, whatever config.yaml says;
    an edited (or unreadable) config.yaml is one line naming what differs, then rewritten to
    what runs, so the file and the run agree again."""
    first = dynarch(tmp_path, "run", *SHORT)
    assert first.returncode == 0, first.stderr
    run_dir = run_dir_of(first)
    path = run_dir / "config.yaml"
    edited = OmegaConf.load(path)
    edited.model.width, edited.optimizer.lr, edited.policy = 64, 0.5, {"_target_": "x.Y"}
    OmegaConf.save(edited, path)

    resumed = dynarch(tmp_path, "run", f"resume={run_dir}", "trainer.steps=3")

    assert resumed.returncode == 0, resumed.stderr
    said = [line for line in resumed.stdout.splitlines() if "config.yaml" in line]
    assert said == [
        f"{path} differs from the config this run started with in model.width, optimizer.lr, "
        "policy._target_: the run goes on with its own (history.db), written back to config.yaml"
    ]
    config = history_rows(run_dir)["run"]["config"]
    assert config["model"]["width"] == 16 and config["trainer"]["steps"] == 3
    assert saved_config(run_dir) == config

    path.write_text("model: {width: [64\n")  # not YAML
    resumed = dynarch(tmp_path, "run", f"resume={run_dir}", "trainer.steps=4")

    assert resumed.returncode == 0, resumed.stderr
    said = [line for line in resumed.stdout.splitlines() if "config.yaml" in line]
    assert len(said) == 1 and said[0].startswith(f"{path} is not a readable config (")
    assert said[0].endswith(
        "): the run goes on with its own (history.db), written back to config.yaml"
    )
    assert saved_config(run_dir) == history_rows(run_dir)["run"]["config"]
