"""history.db: every event committed on its own, read back exactly, refused when foreign."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest
import torch

import dynarch
from dynarch.history import HistoryError, HistoryReader, HistoryWriter
from dynarch.models import vgg_small


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
