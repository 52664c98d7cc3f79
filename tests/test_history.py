"""history.db: every event committed on its own, read back exactly, refused when foreign,
its schema created atomically, damaged content named in one line."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dynarch
import dynarch.history
from dynarch.history import HistoryError, HistoryReader, HistoryWriter
from dynarch.models import vgg_small
from dynarch.query_cli import main as query_main


def _record_and_graph():
    model = vgg_small(width=4)
    graph0 = dynarch.ArchGraph.from_module(model, torch.randn(2, 1, 8, 8)).to_node_link()
    record = dynarch.grow(model, "features.conv2", 2).to_dict()
    return graph0, record, dynarch.ArchGraph.from_module(model).to_node_link()


def test_round_trip_and_each_event_visible_at_once(tmp_path) -> None:
    graph0, record, graph1 = _record_and_graph()
    path = tmp_path / "history.db"
    other = None
    with HistoryWriter(path) as h:
        assert h.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        h.write_run({"trainer": {"epochs": 2}}, command="dynarch run")
        other = sqlite3.connect(path)  # a second connection sees each event as soon as it lands
        assert other.execute("SELECT status FROM run").fetchone() == ("running",)
        assert h.log_architecture(0, graph0) == 0
        h.log_metrics(5, 0.5, "eval", {"loss": 0.5, "accuracy": 0.9, "params": 10, "note": "x"})
        assert other.execute("SELECT COUNT(*) FROM metrics").fetchone() == (1,)
        event = h.log_mutation(7, 0.7, record, reason="test", macs_before=100, macs_after=120)
        assert other.execute("SELECT target FROM events").fetchone() == ("features.conv2",)
        assert h.log_architecture(7, graph1, event_id=event) == 1
        h.finish("completed")
    other.close()
    r = HistoryReader(path)
    assert r.run()["config"] == {"trainer": {"epochs": 2}} and r.run()["status"] == "completed"
    (m,) = r.metrics()
    assert (m["step"], m["kind"], m["loss"], m["accuracy"], m["params"]) == (
        5,
        "eval",
        0.5,
        0.9,
        10,
    )
    (e,) = r.events()
    assert (e["step"], e["k"], e["width_before"], e["width_after"]) == (7, 2, 4, 6)
    assert e["indices"] == [4, 5] and e["modules"] == record["modules"]
    assert (e["reason"], e["macs_before"], e["macs_after"]) == ("test", 100, 120)
    assert r.versions() == [(0, 0, None), (1, 7, event)]
    assert r.architecture(0) == graph0 and r.architecture(1) == graph1


def test_reopening_appends_after_the_last_version(tmp_path) -> None:
    graph0, record, graph1 = _record_and_graph()
    with HistoryWriter(tmp_path / "h.db") as h:
        h.log_architecture(0, graph0)
    with HistoryWriter(tmp_path / "h.db") as h:
        assert h.log_architecture(3, graph1) == 1


def test_reader_in_another_process_while_writing(tmp_path) -> None:
    path = tmp_path / "h.db"
    graph0, _, _ = _record_and_graph()
    with HistoryWriter(path) as h:
        h.log_architecture(0, graph0)
        for step in range(3):
            h.log_metrics(step, step, "train", {"loss": 1.0 / (step + 1)})
            code = (
                "from dynarch.history import HistoryReader as R;"
                f"print(len(R({str(path)!r}).metrics()))"
            )
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            assert out.stdout.strip() == str(step + 1), out.stderr


def test_unknown_schema_version_is_refused_and_left_untouched(tmp_path) -> None:
    path = tmp_path / "h.db"
    with HistoryWriter(path):
        pass
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    before = path.read_bytes()
    for open_ in (HistoryWriter, HistoryReader):
        with pytest.raises(HistoryError, match="schema version 99") as info:
            open_(path)
        assert "\n" not in str(info.value)
    assert path.read_bytes() == before


def test_a_file_that_is_not_a_history_is_refused(tmp_path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("hello, not sqlite")
    with pytest.raises(HistoryError, match="not a dynarch history"):
        HistoryWriter(path)
    assert path.read_text() == "hello, not sqlite"


def _small_history(run_dir: Path) -> Path:
    """A run dir whose history has a run row, two versions, a mutation and an eval row."""
    graph0, record, graph1 = _record_and_graph()
    run_dir.mkdir()
    with HistoryWriter(run_dir / "history.db") as h:
        h.write_run({"trainer": {"epochs": 1}}, command="test")
        h.log_architecture(0, graph0)
        h.log_metrics(5, 0.5, "eval", {"loss": 0.5, "accuracy": 0.9, "train_loss": 0.6})
        h.log_architecture(7, graph1, event_id=h.log_mutation(7, 0.7, record))
    return run_dir / "history.db"


def _damage(path: Path, sql: str) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(sql)
    conn.close()


DAMAGES = {  # the damage, the call that reads it, the query command, what the line says
    "architecture blob": (
        "UPDATE architectures SET graph = X'00112233' WHERE version = 1",
        lambda h: h.graph_at(7),
        ["summary"],
        "architecture version 1 is damaged (zlib error",
    ),
    "metrics extra": (
        "UPDATE metrics SET extra = '{\"train_loss\": 0.' WHERE id = 1",
        lambda h: h.metrics(),
        ["metrics"],
        "metrics row 1 (step 5) is damaged (JSONDecodeError",
    ),
    "run config": (
        "UPDATE run SET config = '{\"trainer\": {' WHERE id = 1",
        lambda h: h.reader.run(),  # what dynarch run resume=DIR reads first
        ["summary"],
        "the run row's config is damaged (JSONDecodeError",
    ),
    "event info": (
        "UPDATE events SET info = 'nan nan' WHERE id = 1",
        lambda h: h.events(),
        ["events"],
        "event 1 (step 7) is damaged (JSONDecodeError",
    ),
    "missing table": (
        "DROP TABLE metrics",
        lambda h: h.metrics(),
        ["summary"],
        "cannot read the metrics (no such table: metrics)",
    ),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_content_is_one_line_naming_the_file_and_the_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    """The call reading the damaged row, dynarch query, and every other query: one line
    naming the file (a HistoryError), never zlib's, json's or SQLite's own error."""
    sql, call, command, words = DAMAGES[damage]
    path = _small_history(tmp_path / "run")
    _damage(path, sql)
    with dynarch.history.open(path) as h:
        with pytest.raises(HistoryError) as info:
            call(h)
        assert str(info.value).startswith(f"{path}: {words}") and "\n" not in str(info.value)
        for query in (h.summary, h.metrics, h.events, h.version_table, h.widths, h.run):
            try:
                query()
            except HistoryError as exc:
                assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc), exc
    assert query_main([str(tmp_path / "run"), *command]) == 2
    out, err = capsys.readouterr()
    assert not out and err.count("\n") == 1, err
    assert err.startswith(f"dynarch: error: {path}: {words}"), err


def test_resume_of_a_damaged_run_row_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    path = _small_history(tmp_path / "run")
    sql, _, _, words = DAMAGES["run config"]
    _damage(path, sql)
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"not read: the run row comes first")
    before = path.read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "dynarch", "run", f"resume={tmp_path / 'run'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"dynarch: error: {path.resolve()}: {words}"), result.stderr
    assert path.read_bytes() == before and not (tmp_path / "run" / "FAILED").exists()


def test_schema_is_created_in_one_transaction(tmp_path: Path, monkeypatch) -> None:
    """A run killed while creating its history (emulated: the schema version's insert fails
    and the connection closes uncommitted) leaves no history.db at all (it is made under a
    temporary name, in one transaction, then renamed), and the next writer makes a fresh one;
    not tables without a schema version, which every later open refused."""
    path = tmp_path / "history.db"
    connect, opened = sqlite3.connect, []

    def dying_connect(*args, **kwargs):
        conn = connect(*args, **kwargs)
        deny = (sqlite3.SQLITE_INSERT, "meta")
        conn.set_authorizer(lambda a, b, *_: sqlite3.SQLITE_DENY if (a, b) == deny else 0)
        opened.append(conn)
        return conn

    monkeypatch.setattr(sqlite3, "connect", dying_connect)
    with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
        HistoryWriter(path)
    opened[0].close()
    monkeypatch.undo()
    assert not path.exists()
    with HistoryWriter(path) as h:
        h.write_run({"trainer": {}})
    assert HistoryReader(path).run()["status"] == "running"


def test_a_file_without_tables_is_an_empty_history(tmp_path: Path, capsys) -> None:
    """A 0-byte file, or one whose creation never committed (a kill in the run's first
    milliseconds): one line for readers, a fresh history for the next writer."""
    (tmp_path / "empty.db").touch()
    conn = sqlite3.connect(tmp_path / "killed.db", isolation_level=None)
    conn.execute("BEGIN")
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("CREATE TABLE run (id INTEGER PRIMARY KEY)")
    conn.close()  # never committed
    for path in (tmp_path / "empty.db", tmp_path / "killed.db"):
        with pytest.raises(HistoryError, match=f"^{path} holds no history yet [^\n]*$"):
            HistoryReader(path)
        assert query_main([str(path), "summary"]) == 2
        assert capsys.readouterr().err.startswith(f"dynarch: error: {path} holds no history")
        with HistoryWriter(path) as h:
            h.write_run({"trainer": {}})
        assert HistoryReader(path).run()["config"] == {"trainer": {}}
