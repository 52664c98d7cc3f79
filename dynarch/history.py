"""A run's history: open it for queries, compare runs; the store's classes for writing.

``dynarch.history.open(run_dir)`` returns a :class:`dynarch.query.History` (``graph_at``,
``widths``, ``diff``, ``events``, ``metrics``, ...). The SQLite store itself (schema, writer,
reader) is :mod:`dynarch.history_store`; the query API is :mod:`dynarch.query`.
"""

from __future__ import annotations

from pathlib import Path

from dynarch.history_store import SCHEMA_VERSION, HistoryError, HistoryReader, HistoryWriter
from dynarch.query import History, Table
from dynarch.query import compare as _compare

__all__ = [
    "SCHEMA_VERSION",
    "History",
    "HistoryError",
    "HistoryReader",
    "HistoryWriter",
    "compare",
    "open",
]


def open(path: str | Path) -> History:  # noqa: A001  (dynarch.history.open, like io.open)
    """Open a run's history for queries (``graph_at``, ``widths``, ``diff``, ...).

    ``path`` is a run directory or its ``history.db``. Read-only: safe on a run still writing.
    """
    return History(path)


def compare(*runs: str | Path | History) -> Table:
    """Final architecture, params, MACs and accuracy of several runs side by side."""
    return _compare(*runs)
