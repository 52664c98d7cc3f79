"""The run history's store: one SQLite file per run (``history.db``), written as the run goes.

WAL journal, one transaction per event, so a reader (another process, a notebook) sees every
event as soon as it is logged and a crash loses at most the event being written. Architecture
versions are stored whole (networkx node-link JSON, zlib-compressed): reading any version is one
row, and the store grows linearly with versions. The schema is in docs/history.md. All SQL
lives here; :mod:`dynarch.query` asks the reader, and :mod:`dynarch.history` is the public door.
"""

from __future__ import annotations

import json
import sqlite3
import time
import zlib
from pathlib import Path
from typing import Any

from dynarch.errors import DynarchError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE run (
    id INTEGER PRIMARY KEY CHECK (id = 1), config TEXT NOT NULL, command TEXT,
    started_at REAL NOT NULL, finished_at REAL, status TEXT NOT NULL, message TEXT);
CREATE TABLE metrics (
    id INTEGER PRIMARY KEY, step INTEGER NOT NULL, epoch REAL NOT NULL, kind TEXT NOT NULL,
    loss REAL, accuracy REAL, lr REAL, params INTEGER, macs INTEGER, extra TEXT);
CREATE TABLE events (
    id INTEGER PRIMARY KEY, step INTEGER NOT NULL, epoch REAL NOT NULL, kind TEXT NOT NULL,
    target TEXT NOT NULL, grp TEXT NOT NULL, k INTEGER NOT NULL, method TEXT NOT NULL,
    width_before INTEGER NOT NULL, width_after INTEGER NOT NULL, indices TEXT NOT NULL,
    modules TEXT NOT NULL, reason TEXT NOT NULL, fan_in_grad_norm REAL, output_change REAL,
    params_before INTEGER NOT NULL, params_after INTEGER NOT NULL, macs_before INTEGER,
    macs_after INTEGER, seconds REAL NOT NULL, info TEXT NOT NULL);
CREATE TABLE architectures (
    version INTEGER PRIMARY KEY, step INTEGER NOT NULL,
    event_id INTEGER REFERENCES events(id), graph BLOB NOT NULL);
CREATE INDEX metrics_step ON metrics(step);
CREATE INDEX architectures_step ON architectures(step);
"""

_METRIC_COLUMNS = ("loss", "accuracy", "lr", "params", "macs")
# Tables a run only appends to, with the column that orders them.
_APPEND_ONLY = {"metrics": "id", "events": "id", "architectures": "version"}


class HistoryError(DynarchError):
    """A history file dynarch cannot use (not a dynarch history, or another schema version)."""


def _connect(path: Path, read_only: bool) -> sqlite3.Connection:
    uri = f"file:{path}?mode=ro" if read_only else f"file:{path}"
    try:
        conn = sqlite3.connect(uri, uri=True)
        version = _schema_version(conn)
    except sqlite3.DatabaseError as exc:
        raise HistoryError(f"{path} is not a dynarch history ({exc})") from None
    if version is not None and version != SCHEMA_VERSION:
        conn.close()
        raise HistoryError(
            f"{path} has history schema version {version}; this dynarch reads version "
            f"{SCHEMA_VERSION}"
        )
    return conn


def _schema_version(conn: sqlite3.Connection) -> int | None:
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables:
        return None
    if "meta" not in tables:
        raise sqlite3.DatabaseError("no meta table")
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    if row is None:
        raise sqlite3.DatabaseError("no schema version")
    return int(row[0])


class HistoryWriter:
    """Append-only writer of one run's history; every method is one committed transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.conn = _connect(self.path, read_only=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        if _schema_version(self.conn) is None:
            with self.conn:
                self.conn.executescript(_SCHEMA)
                self.conn.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )

    def write_run(self, config: dict[str, Any], *, command: str | None = None) -> None:
        with self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO run (id, config, command, started_at, status) "
                "VALUES (1, ?, ?, ?, 'running')",
                (json.dumps(config, sort_keys=True), command, time.time()),
            )

    def log_metrics(self, step: int, epoch: float, kind: str, values: dict[str, Any]) -> None:
        known = [values.get(c) for c in _METRIC_COLUMNS]
        extra = {k: v for k, v in values.items() if k not in _METRIC_COLUMNS}
        with self.conn:
            self.conn.execute(
                "INSERT INTO metrics (step, epoch, kind, loss, accuracy, lr, params, macs, extra)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (step, epoch, kind, *known, json.dumps(extra) if extra else None),
            )

    def log_mutation(
        self,
        step: int,
        epoch: float,
        record: dict[str, Any],
        *,
        reason: str = "",
        macs_before: int | None = None,
        macs_after: int | None = None,
    ) -> int:
        """Store one ``MutationRecord.to_dict()``; returns the event id."""
        info = record.get("info") or {}
        with self.conn:
            cur = self.conn.execute(
                "INSERT INTO events (step, epoch, kind, target, grp, k, method, width_before, "
                "width_after, indices, modules, reason, fan_in_grad_norm, output_change, "
                "params_before, params_after, macs_before, macs_after, seconds, info) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    step,
                    epoch,
                    record["kind"],
                    record["target"],
                    record["group"],
                    record["k"],
                    record["method"],
                    record["width_before"],
                    record["width_after"],
                    json.dumps(record["indices"]),
                    json.dumps(record["modules"]),
                    reason,
                    info.get("fan_in_grad_norm"),
                    info.get("output_change"),
                    record["params_before"],
                    record["params_after"],
                    macs_before,
                    macs_after,
                    record["seconds"],
                    json.dumps(info, default=float),
                ),
            )
        return int(cur.lastrowid)

    def log_architecture(
        self, step: int, graph: dict[str, Any], *, event_id: int | None = None
    ) -> int:
        """Store an architecture version (node-link dict); returns its version number."""
        blob = zlib.compress(json.dumps(graph, sort_keys=True).encode(), 6)
        with self.conn:
            row = self.conn.execute("SELECT COALESCE(MAX(version) + 1, 0) FROM architectures")
            version = int(row.fetchone()[0])
            self.conn.execute(
                "INSERT INTO architectures (version, step, event_id, graph) VALUES (?, ?, ?, ?)",
                (version, step, event_id, blob),
            )
        return version

    def marks(self) -> dict[str, int]:
        """The last row of each growing table, for a checkpoint to name what it covers."""
        return {
            table: int(
                self.conn.execute(f"SELECT COALESCE(MAX({key}), -1) FROM {table}").fetchone()[0]
            )
            for table, key in _APPEND_ONLY.items()
        }

    def rewind(self, marks: dict[str, int], config: dict[str, Any]) -> None:
        """Drop what was logged after a checkpoint (a resumed run logs it again, identically)
        and mark the run as running with ``config`` (its own, or with a longer run when a
        finished run is extended); one transaction."""
        with self.conn:
            for table, key in _APPEND_ONLY.items():
                self.conn.execute(f"DELETE FROM {table} WHERE {key} > ?", (marks[table],))
            self.conn.execute(
                "UPDATE run SET status = 'running', message = NULL, finished_at = NULL, "
                "config = ? WHERE id = 1",
                (json.dumps(config, sort_keys=True),),
            )

    def finish(self, status: str, message: str | None = None) -> None:
        with self.conn:
            self.conn.execute(
                "UPDATE run SET status = ?, message = ?, finished_at = ? WHERE id = 1",
                (status, message, time.time()),
            )

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HistoryReader:
    """Read-only view of a history, usable while a writer is still appending."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise HistoryError(f"no history at {self.path}")
        self.conn = _connect(self.path, read_only=True)
        self.conn.row_factory = sqlite3.Row

    def run(self) -> dict[str, Any]:
        row = self.conn.execute("SELECT * FROM run WHERE id = 1").fetchone()
        return {**dict(row), "config": json.loads(row["config"])} if row else {}

    def metrics(self, kind: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM metrics", ()
        if kind is not None:
            sql, args = sql + " WHERE kind = ?", (kind,)
        return [dict(r) for r in self.conn.execute(sql + " ORDER BY id", args)]

    def events(self) -> list[dict[str, Any]]:
        rows = []
        for r in self.conn.execute("SELECT * FROM events ORDER BY id"):
            row = dict(r)
            for key in ("indices", "modules", "info"):
                row[key] = json.loads(row[key])
            rows.append(row)
        return rows

    def versions(self) -> list[tuple[int, int, int | None]]:
        """(version, step, event_id) of every architecture version, oldest first."""
        sql = "SELECT version, step, event_id FROM architectures ORDER BY version"
        return [tuple(r) for r in self.conn.execute(sql)]

    def architecture(self, version: int) -> dict[str, Any]:
        row = self.conn.execute(
            "SELECT graph FROM architectures WHERE version = ?", (version,)
        ).fetchone()
        if row is None:
            raise HistoryError(f"{self.path} has no architecture version {version}")
        return json.loads(zlib.decompress(row[0]))

    def last_step(self) -> int:
        """The last step anything was logged at (0 for an empty history)."""
        row = self.conn.execute(
            "SELECT MAX(s) FROM (SELECT MAX(step) AS s FROM metrics UNION ALL "
            "SELECT MAX(step) FROM events UNION ALL SELECT MAX(step) FROM architectures)"
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def version_at(self, step: int) -> int | None:
        """The newest architecture version logged at or before ``step`` (None if none is)."""
        row = self.conn.execute(
            "SELECT MAX(version) FROM architectures WHERE step <= ?", (step,)
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def close(self) -> None:
        self.conn.close()
