"""The run history's store: one SQLite file per run (``history.db``), written as the run goes.

WAL journal, one transaction per event, so a reader (another process, a notebook) sees every
event as soon as it is logged and a crash loses at most the event being written. Architecture
versions are stored whole (networkx node-link JSON, zlib-compressed): reading any version is one
row, and the store grows linearly with versions. The schema is in docs/history.md. All SQL
lives here; :mod:`dynarch.query` asks the reader, and :mod:`dynarch.history` is the public door.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

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

_T = TypeVar("_T")
_METRIC_COLUMNS = ("loss", "accuracy", "lr", "params", "macs")
# Tables a run only appends to, with the column that orders them.
_APPEND_ONLY = {"metrics": "id", "events": "id", "architectures": "version"}


class HistoryError(DynarchError):
    """A history file dynarch cannot use (not a dynarch history, another schema version, a
    damaged row), in one line naming the file."""


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


def _create_schema(conn: sqlite3.Connection) -> None:
    """Tables and schema version in one transaction, so a run killed while creating them
    leaves a file without tables (a fresh history the next writer creates) rather than tables
    without a schema version (refused); a no-op on an existing history. Not executescript:
    it commits before every statement."""
    if _schema_version(conn) is not None:
        return
    conn.execute("BEGIN IMMEDIATE")  # a second writer waits here, then sees the tables
    try:
        if _schema_version(conn) is None:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


def _create_file(path: Path) -> None:
    """A new history, made under a temporary name and renamed: ``path`` never exists half
    made. (A run killed while SQLite created it in place left a hot rollback journal, which a
    read-only reader cannot roll back: neither resumable nor restartable.) Side files of an
    earlier, empty ``path`` go first: SQLite would apply a stale journal to the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    for stale in (tmp, path):
        for suffix in ("", "-journal", "-wal", "-shm"):
            if stale is tmp or suffix:
                Path(f"{stale}{suffix}").unlink(missing_ok=True)
    conn = sqlite3.connect(tmp)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        _create_schema(conn)
    finally:
        conn.close()  # the last connection: the WAL is checkpointed into the file
    os.replace(tmp, path)


class HistoryWriter:
    """Append-only writer of one run's history; every method is one committed transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file() or self.path.stat().st_size == 0:
            _create_file(self.path)
        self.conn = _connect(self.path, read_only=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        _create_schema(self.conn)

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

    def add_to_events(self, step: int, info: dict[str, Any]) -> None:
        """Add ``info`` to the ``info`` of the events of ``step`` (a measurement made after
        them: the recompile a mutation caused)."""
        with self.conn:
            rows = self.conn.execute("SELECT id, info FROM events WHERE step = ?", (step,))
            for event_id, text in rows.fetchall():
                merged = json.dumps({**json.loads(text), **info}, default=float)
                self.conn.execute("UPDATE events SET info = ? WHERE id = ?", (merged, event_id))

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


class NoHistory:
    """The history of processes other than rank 0, of a run before its history is opened,
    and of a closed session: every call does nothing; ``marks`` are those given (a closed
    history's last rows, so a state taken after the close still names what it covers)."""

    def __init__(self, marks: dict[str, int] | None = None) -> None:
        self._marks = dict(marks or {})

    def marks(self) -> dict[str, int]:
        return dict(self._marks)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return lambda *args, **kwargs: None


class HistoryReader:
    """Read-only view of a history, usable while a writer is still appending.

    Each call reads one snapshot; calls inside :meth:`snapshot` share one, so a query that
    reads several tables sees them as they were at one moment (a live run adds rows between
    statements). Damaged content is a :class:`HistoryError` naming the file and the row.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise HistoryError(f"no history at {self.path}")
        self.conn = _connect(self.path, read_only=True)
        self.conn.isolation_level = None  # autocommit; snapshot() says BEGIN itself
        self.conn.row_factory = sqlite3.Row
        self._depth = 0
        if _schema_version(self.conn) is None:
            self.conn.close()
            raise HistoryError(
                f"{self.path} holds no history yet (no tables: its run stopped, or is starting, "
                "before creating them)"
            )

    @contextmanager
    def snapshot(self) -> Iterator[HistoryReader]:
        """One read transaction around several reads (nested: the outermost one counts)."""
        if self._depth == 0:
            self._sql("BEGIN", (), "the history")
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.conn.execute("COMMIT")

    def _sql(self, sql: str, args: tuple[Any, ...], what: str) -> list[sqlite3.Row]:
        """All rows of one statement; a store SQLite cannot read is one line naming ``what``."""
        try:
            return self.conn.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise HistoryError(f"{self.path}: cannot read {what} ({exc})") from None

    def _decoded(self, what: str, decode: Callable[[], _T]) -> _T:
        """``decode()``, or one line naming the damaged row (zlib, JSON, UTF-8 or type error)."""
        try:
            return decode()
        except (zlib.error, ValueError, TypeError) as exc:
            kind = "zlib error" if isinstance(exc, zlib.error) else type(exc).__name__
            raise HistoryError(f"{self.path}: {what} is damaged ({kind}: {exc})") from None

    def run(self) -> dict[str, Any]:
        rows = self._sql("SELECT * FROM run WHERE id = 1", (), "the run row")
        if not rows:
            return {}
        config = self._decoded("the run row's config", lambda: json.loads(rows[0]["config"]))
        return {**dict(rows[0]), "config": config}

    def metrics(
        self, kind: str | None = None, *, parse_extra: bool = False
    ) -> list[dict[str, Any]]:
        """Metrics rows, oldest first; ``extra`` (the values of no fixed column) is its JSON
        text, or with ``parse_extra`` a dict."""
        sql, args = "SELECT * FROM metrics", ()
        if kind is not None:
            sql, args = sql + " WHERE kind = ?", (kind,)
        rows = [dict(r) for r in self._sql(sql + " ORDER BY id", args, "the metrics")]
        for row in rows if parse_extra else ():
            text, what = row["extra"], f"metrics row {row['id']} (step {row['step']})"
            row["extra"] = self._decoded(what, lambda t=text: json.loads(t)) if text else {}
        return rows

    def events(self) -> list[dict[str, Any]]:
        rows = []
        for r in self._sql("SELECT * FROM events ORDER BY id", (), "the events"):
            row = dict(r)
            what = f"event {row['id']} (step {row['step']})"
            for key in ("indices", "modules", "info"):
                row[key] = self._decoded(what, lambda t=row[key]: json.loads(t))
            rows.append(row)
        return rows

    def versions(self) -> list[tuple[int, int, int | None]]:
        """(version, step, event_id) of every architecture version, oldest first."""
        sql = "SELECT version, step, event_id FROM architectures ORDER BY version"
        return [tuple(r) for r in self._sql(sql, (), "the architecture versions")]

    def architecture(self, version: int) -> dict[str, Any]:
        what = f"architecture version {version}"
        rows = self._sql("SELECT graph FROM architectures WHERE version = ?", (version,), what)
        if not rows:
            raise HistoryError(f"{self.path} has no architecture version {version}")
        return self._decoded(what, lambda: json.loads(zlib.decompress(rows[0][0])))

    def last_step(self) -> int:
        """The last step anything was logged at (0 for an empty history)."""
        (row,) = self._sql(
            "SELECT MAX(s) FROM (SELECT MAX(step) AS s FROM metrics UNION ALL "
            "SELECT MAX(step) FROM events UNION ALL SELECT MAX(step) FROM architectures)",
            (),
            "the last step",
        )
        return 0 if row[0] is None else int(row[0])

    def version_at(self, step: int) -> int | None:
        """The newest architecture version logged at or before ``step`` (None if none is)."""
        (row,) = self._sql(
            "SELECT MAX(version) FROM architectures WHERE step <= ?",
            (step,),
            f"the architecture at step {step}",
        )
        return None if row[0] is None else int(row[0])

    def close(self) -> None:
        self.conn.close()


def records_nothing(path: Path) -> bool:
    """Whether the history at ``path`` holds nothing a fresh start would lose: no file, an
    empty one, no tables, or no more than the run row and its first architecture (a run
    stopped before its first checkpoint). A file that is not SQLite holds something."""
    if not path.is_file() or path.stat().st_size == 0:
        return True
    try:  # read-write: the run dir's owner asks; SQLite rolls a hot journal back first
        conn = sqlite3.connect(path)
        try:
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            rows = {
                t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("metrics", "events", "architectures")
                if t in tables
            }
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return False
    return (
        rows.get("metrics", 0) == 0
        and rows.get("events", 0) == 0
        and rows.get("architectures", 0) <= 1
    )
