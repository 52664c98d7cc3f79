"""Questions about a run's history: the architecture at any step, widths, diffs, comparisons.

``dynarch.history.open(run_dir)`` returns a :class:`History`. It only reads (through
:class:`~dynarch.history_store.HistoryReader`, read-only SQLite), so it works on a run that is still
writing and on an interrupted one. Every query re-reads the store, so a live run's new versions
show up without reopening; decoded versions are cached because a version never changes.

Step semantics follow the controller: mutations decided at step ``s`` are applied before step
``s``'s optimizer update and logged at step ``s``, so the architecture in force at step ``s`` is
the last version logged at a step ``<= s``.
"""

from __future__ import annotations

import functools
import json
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import networkx as nx

from dynarch.history_store import HistoryError, HistoryReader
from dynarch.ops import channel_change

_CACHE_SIZE = 256
_F = TypeVar("_F", bound=Callable[..., Any])

EVENT_COLUMNS = (
    "id",
    "step",
    "epoch",
    "kind",
    "target",
    "group",
    "k",
    "method",
    "width_before",
    "width_after",
    "params_before",
    "params_after",
    "macs_before",
    "macs_after",
    "reason",
)


class Table:
    """A small column-named table: readable when printed, ``to_pandas()`` when pandas is there.

    Kept dependency-free so querying a history never needs pandas.
    """

    def __init__(self, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        self.columns = list(columns)
        self.rows = [tuple(r) for r in rows]
        for r in self.rows:
            if len(r) != len(self.columns):
                raise ValueError(f"row {r!r} has {len(r)} values for {len(self.columns)} columns")

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.to_dicts())

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Table) and self.columns == other.columns and self.rows == other.rows
        )

    def column(self, name: str) -> list[Any]:
        """All values of one column, in row order."""
        i = self.columns.index(name)
        return [r[i] for r in self.rows]

    def to_dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` (pandas is imported only here)."""
        try:
            import pandas as pd
        except ImportError:
            raise HistoryError("Table.to_pandas() needs pandas: pip install pandas") from None
        return pd.DataFrame(self.rows, columns=self.columns)

    def __str__(self) -> str:
        cells = [[_cell(v) for v in r] for r in self.rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(self.columns)]
        numeric = [
            all(isinstance(r[i], (int, float)) or r[i] is None for r in self.rows)
            for i in range(len(self.columns))
        ]

        def line(values: Sequence[str]) -> str:
            parts = [
                v.rjust(w) if num else v.ljust(w)
                for v, w, num in zip(values, widths, numeric, strict=True)
            ]
            return "  ".join(parts).rstrip()

        out = [line(self.columns), line(["-" * w for w in widths])]
        out += [line(r) for r in cells]
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"Table({len(self.rows)} rows x {len(self.columns)} columns: {self.columns})"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


@dataclass
class Diff:
    """What changed between the architectures in force at two steps, and the events between."""

    step_a: int
    step_b: int
    version_a: int
    version_b: int
    groups: Table  # group, width_a, width_b, added, removed (from a to b)
    layers: Table  # layer, in_a, in_b, out_a, out_b: every module whose channels changed
    nodes_added: list[str]
    nodes_removed: list[str]
    layers_added: list[str]  # modules (a deepen's new layers), in the order they run
    layers_removed: list[str]
    params_a: int | None
    params_b: int | None
    macs_a: int | None
    macs_b: int | None
    events: Table = field(repr=False)

    @property
    def params_delta(self) -> int | None:
        return None if None in (self.params_a, self.params_b) else self.params_b - self.params_a

    @property
    def macs_delta(self) -> int | None:
        return None if None in (self.macs_a, self.macs_b) else self.macs_b - self.macs_a

    def to_dict(self) -> dict[str, Any]:
        return {
            "step_a": self.step_a,
            "step_b": self.step_b,
            "version_a": self.version_a,
            "version_b": self.version_b,
            "groups": self.groups.to_dicts(),
            "layers": self.layers.to_dicts(),
            "nodes_added": self.nodes_added,
            "nodes_removed": self.nodes_removed,
            "layers_added": self.layers_added,
            "layers_removed": self.layers_removed,
            "params_a": self.params_a,
            "params_b": self.params_b,
            "params_delta": self.params_delta,
            "macs_a": self.macs_a,
            "macs_b": self.macs_b,
            "macs_delta": self.macs_delta,
            "events": self.events.to_dicts(),
        }

    def __str__(self) -> str:
        def delta(a: int | None, b: int | None) -> str:
            return "unknown" if None in (a, b) else f"{a} -> {b} ({b - a:+d})"

        parts = [
            f"step {self.step_a} (version {self.version_a}) -> step {self.step_b} "
            f"(version {self.version_b})",
            f"params {delta(self.params_a, self.params_b)}",
            f"MACs   {delta(self.macs_a, self.macs_b)}",
        ]
        if self.layers_added or self.layers_removed:
            parts.append(f"layers added {self.layers_added}, removed {self.layers_removed}")
        if self.nodes_added or self.nodes_removed:
            parts.append(f"nodes added {self.nodes_added}, removed {self.nodes_removed}")
        parts += ["", "channel groups:", str(self.groups) if len(self.groups) else "  (no change)"]
        parts += ["", "layers:", str(self.layers) if len(self.layers) else "  (no change)"]
        parts += [
            "",
            f"events in between ({len(self.events)}):",
            str(self.events) if len(self.events) else "  (none)",
        ]
        return "\n".join(parts)


def resolve_history_path(path: str | Path) -> Path:
    """A run directory (containing ``history.db``) or the path of the database itself."""
    p = Path(path)
    if p.is_dir():
        db = p / "history.db"
        if not db.is_file():
            raise HistoryError(f"{p} is not a dynarch run directory (no history.db in it)")
        return db
    if not p.exists():
        raise HistoryError(f"no such run directory or history file: {p}")
    return p


def _one_snapshot(method: _F) -> _F:
    """Run a query that reads several statements in one read transaction: a live run appends
    between statements, and a version read after its event list would have no event."""

    @functools.wraps(method)
    def wrapper(self: History, *args: Any, **kwargs: Any) -> Any:
        with self.reader.snapshot():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class History:
    """Read-side API over one run's ``history.db``; see the module docstring for step semantics."""

    def __init__(self, path: str | Path) -> None:
        self.path = resolve_history_path(path)
        self.reader = HistoryReader(self.path)
        self._decoded: dict[int, dict[str, Any]] = {}

    @property
    def name(self) -> str:
        """The run directory's name (what tables and plots call this run)."""
        return self.path.parent.name if self.path.name == "history.db" else self.path.stem

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def snapshot(self) -> AbstractContextManager[HistoryReader]:
        """Several queries against one moment of a live run: ``with h.snapshot(): ...``
        (each query alone is already one snapshot)."""
        return self.reader.snapshot()

    # -- raw access ----------------------------------------------------------------------------
    def _version_rows(self) -> list[tuple[int, int, int | None]]:
        rows = self.reader.versions()
        if not rows:
            raise HistoryError(f"{self.path} has no architecture logged yet")
        return rows

    def _data(self, version: int) -> dict[str, Any]:
        """Node-link dict of one version (cached: versions are immutable)."""
        if version not in self._decoded:
            if len(self._decoded) >= _CACHE_SIZE:
                self._decoded.pop(next(iter(self._decoded)))
            self._decoded[version] = self.reader.architecture(version)
        return self._decoded[version]

    def last_step(self) -> int:
        """The last step anything was logged at (the run's end, or where a live run is now)."""
        return self.reader.last_step()

    @_one_snapshot
    def version_at(self, step: int) -> int:
        """Number of the architecture version in force at ``step``."""
        try:
            step = operator.index(step)  # int, numpy integer, ...; not float or str
        except TypeError:
            raise HistoryError(f"step must be an integer, got {step!r}") from None
        last = self.last_step()
        if step < 0 or step > last:
            status = self.run().get("status", "unknown")
            raise HistoryError(
                f"step {step} is not in this run: it has steps 0..{last} (status {status})"
            )
        version = self.reader.version_at(step)
        if version is None:
            raise HistoryError(f"{self.path} has no architecture logged at or before step {step}")
        return version

    # -- the queries ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """The run row: config, command, status (``running``/``completed``/``failed``), times."""
        return self.reader.run()

    @_one_snapshot
    def graph_at(self, step: int) -> nx.DiGraph:
        """The architecture in force at ``step`` as a networkx DiGraph, ``ArchGraph.nx`` as it was.

        Node attributes are ArchGraph's (kind, op, module, params, in/out_channels, group, ...);
        every attribute is a scalar, so any networkx writer takes the graph. The channel groups
        are JSON text in ``graph.graph["groups"]``; :meth:`groups_at` (or :func:`groups_of`)
        gives them as dicts (name, width, members, ...).
        """
        return self.graph_of_version(self.version_at(step))

    def graph_of_version(self, version: int) -> nx.DiGraph:
        graph = nx.node_link_graph(self._data(version), edges="edges")
        graph.graph = dict(graph.graph)  # networkx shares the dict: keep the cached version intact
        if "groups" in graph.graph and not isinstance(graph.graph["groups"], str):
            # histories written before groups became JSON text store the list itself
            text = json.dumps(graph.graph["groups"], sort_keys=True, separators=(",", ":"))
            graph.graph["groups"] = text
        return graph

    @_one_snapshot
    def groups_at(self, step: int) -> list[dict[str, Any]]:
        """The channel groups in force at ``step``, as dicts (name, width, at_output,
        unsupported, ops, members): the parsed ``graph_at(step).graph["groups"]``."""
        return groups_of(self._data(self.version_at(step)))

    def versions(self) -> list[int]:
        """Steps at which the architecture changed, with 0 (the initial architecture) first."""
        return sorted({step for _, step, _ in self._version_rows()})

    @_one_snapshot
    def version_table(self) -> Table:
        """Every version: its step, the event that made it, params and MACs after it."""
        events = {e["id"]: e for e in self.reader.events()}
        stats = self._version_stats(events)
        rows = []
        for version, step, event_id in self._version_rows():
            e = events.get(event_id) if event_id is not None else None
            params, macs = stats[version]
            rows.append(
                (
                    version,
                    step,
                    event_id,
                    e["kind"] if e else None,
                    e["grp"] if e else None,
                    e["width_before"] if e else None,
                    e["width_after"] if e else None,
                    params,
                    macs,
                )
            )
        return Table(
            ("version", "step", "event", "kind", "group", "width_before", "width_after")
            + ("params", "macs"),
            rows,
        )

    @_one_snapshot
    def _version_stats(
        self, events: dict[int, dict[str, Any]] | None = None
    ) -> dict[int, tuple[int | None, int | None]]:
        """(params, MACs) of every version: from the event that made it; version 0 from the
        first event's "before" values, else the evaluations (no mutation: one architecture)."""
        if events is None:
            events = {e["id"]: e for e in self.reader.events()}
        stats: dict[int, tuple[int | None, int | None]] = {}
        for version, _, event_id in self._version_rows():
            e = events.get(event_id) if event_id is not None else None
            if e is not None:
                stats[version] = (e["params_after"], e["macs_after"])
                continue
            first = next(iter(events.values()), None)
            if first is not None:
                stats[version] = (first["params_before"], first["macs_before"])
                continue
            evals = [m for m in self.reader.metrics("eval") if m["params"] is not None]
            if evals:
                stats[version] = (evals[0]["params"], evals[0]["macs"])
            else:
                stats[version] = (graph_params(self.graph_of_version(version)), None)
        return stats

    @_one_snapshot
    def widths(self) -> Table:
        """Width of every channel group at every version (groups that reach the model's output,
        fixed by the task, are left out): columns ``version, step, <group>...``."""
        rows = []
        names: dict[str, None] = {}
        per_version = []
        for version, step, _ in self._version_rows():
            w = group_widths(groups_of(self._data(version)))
            names.update(dict.fromkeys(w))
            per_version.append((version, step, w))
        for version, step, w in per_version:
            rows.append((version, step, *(w.get(n) for n in names)))
        return Table(("version", "step", *names), rows)

    def events(
        self, kind: str | None = None, target: str | None = None, info: bool = False
    ) -> Table:
        """Mutations, oldest first; ``kind`` an op name (grow, prune, deepen, a user's: see
        dynarch/ops.py), ``target`` a module or group name;
        ``info`` adds the record's info dict (what the initializer measured: fan-in/fan-out
        gradient norms, output change, TINY's loss change, fallbacks) as a last column."""
        rows = []
        for e in self.reader.events():
            if kind is not None and e["kind"] != kind:
                continue
            if target is not None and target not in (e["target"], e["grp"]):
                continue
            extra = (e["info"],) if info else ()
            rows.append((*_event_row(e), *extra))
        return Table(EVENT_COLUMNS + (("info",) if info else ()), rows)

    def metrics(self, kind: str | None = None) -> Table:
        """Logged metrics (``eval`` rows: test loss/accuracy; ``train`` rows), extra values as
        their own columns."""
        raw = self.reader.metrics(kind, parse_extra=True)
        extras: dict[str, None] = {}
        for m in raw:
            extras.update(dict.fromkeys(m["extra"]))
        base = ("step", "epoch", "kind", "loss", "accuracy", "lr", "params", "macs")
        rows = [tuple(m[c] for c in base) + tuple(m["extra"].get(x) for x in extras) for m in raw]
        return Table(base + tuple(extras), rows)

    @_one_snapshot
    def diff(self, step_a: int, step_b: int) -> Diff:
        """Channels added/removed per group and layer, params and MACs delta, and the events
        applied between the two steps (those logged in ``(min, max]``)."""
        va, vb = self.version_at(step_a), self.version_at(step_b)
        ga, gb = self.graph_of_version(va), self.graph_of_version(vb)
        lo, hi = sorted((step_a, step_b))
        forward = step_b >= step_a
        between = [e for e in self.reader.events() if lo < e["step"] <= hi]
        grown: dict[str, int] = {}
        pruned: dict[str, int] = {}
        for e in between:
            sign = channel_change(e["kind"])
            if not sign:  # a deepen adds layers, not channels
                continue
            into = grown if (sign > 0) == forward else pruned
            into[e["grp"]] = into.get(e["grp"], 0) + e["k"]
        wa = group_widths(groups_of(ga))
        wb = group_widths(groups_of(gb))
        group_rows = [
            (n, wa.get(n), wb.get(n), grown.get(n, 0), pruned.get(n, 0))
            for n in dict.fromkeys([*wa, *wb])
            if wa.get(n) != wb.get(n) or n in grown or n in pruned
        ]
        layer_rows = []
        order = nx.topological_sort(gb) if nx.is_directed_acyclic_graph(gb) else gb.nodes
        for n in order:
            if n not in ga:  # added: listed in nodes_added
                continue
            a, b = ga.nodes[n], gb.nodes[n]
            ins = (a.get("in_channels"), b.get("in_channels"))
            outs = (a.get("out_channels"), b.get("out_channels"))
            if ins[0] != ins[1] or outs[0] != outs[1]:
                layer_rows.append((n, ins[0], ins[1], outs[0], outs[1]))
        stats = self._version_stats()
        events = Table(EVENT_COLUMNS, [tuple(_event_row(e)) for e in between])
        return Diff(
            step_a=step_a,
            step_b=step_b,
            version_a=va,
            version_b=vb,
            groups=Table(("group", "width_a", "width_b", "added", "removed"), group_rows),
            layers=Table(("layer", "in_a", "in_b", "out_a", "out_b"), layer_rows),
            nodes_added=sorted(set(gb.nodes) - set(ga.nodes)),
            nodes_removed=sorted(set(ga.nodes) - set(gb.nodes)),
            layers_added=_new_modules(ga, gb),
            layers_removed=_new_modules(gb, ga),
            params_a=stats[va][0],
            params_b=stats[vb][0],
            macs_a=stats[va][1],
            macs_b=stats[vb][1],
            events=events,
        )

    @_one_snapshot
    def summary(self) -> dict[str, Any]:
        """One-glance facts: status, steps, mutations, params/MACs/widths first and last,
        final and best test accuracy."""
        run = self.run()
        rows = self._version_rows()
        stats = self._version_stats()
        events = self.reader.events()
        evals = self.reader.metrics("eval")
        first_v, last_v = rows[0][0], rows[-1][0]
        accs = [m["accuracy"] for m in evals if m["accuracy"] is not None]
        return {
            "run": self.name,
            "path": str(self.path),
            "status": run.get("status"),
            "message": run.get("message"),
            "command": run.get("command"),
            "last_step": self.last_step(),
            "versions": len(rows),
            "grows": sum(channel_change(e["kind"]) > 0 for e in events),
            "prunes": sum(channel_change(e["kind"]) < 0 for e in events),
            "params_initial": stats[first_v][0],
            "params_final": stats[last_v][0],
            "macs_initial": stats[first_v][1],
            "macs_final": stats[last_v][1],
            "accuracy_final": accs[-1] if accs else None,
            "accuracy_best": max(accs) if accs else None,
            "widths_initial": group_widths(groups_of(self._data(first_v))),
            "widths_final": group_widths(groups_of(self._data(last_v))),
        }


def _event_row(e: dict[str, Any]) -> list[Any]:
    return [e["grp"] if c == "group" else e[c] for c in EVENT_COLUMNS]


def groups_of(graph: nx.DiGraph | dict[str, Any]) -> list[dict[str, Any]]:
    """The channel groups of an architecture graph as dicts (``ChannelGroup.to_dict``).

    ``graph`` is a networkx graph (``graph_at``, ``ArchGraph.nx``, one read back from GraphML or
    node-link JSON) or node-link data; its graph attribute ``groups`` is JSON text (a list, in
    histories written before that). No ``groups`` attribute: no groups.
    """
    attrs = graph.graph if isinstance(graph, nx.Graph) else graph.get("graph", {})
    groups = attrs.get("groups", "[]")
    return json.loads(groups) if isinstance(groups, str) else list(groups)


def group_widths(groups: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Width by group name of the groups that can change (not those at the model's output)."""
    return {g["name"]: g["width"] for g in groups if not g.get("at_output")}


def graph_params(graph: nx.DiGraph) -> int:
    """Parameters of the traced modules of an architecture graph."""
    return sum(int(d.get("params", 0)) for _, d in graph.nodes(data=True))


def node_changes(before: nx.DiGraph, after: nx.DiGraph) -> dict[str, str]:
    """How each node of ``after`` changed since ``before``: ``added``, ``grown``/``pruned``
    (output channels up/down), ``inputs`` (only its input width changed) or ``unchanged``."""
    changes = {}
    for n, d in after.nodes(data=True):
        if n not in before:
            changes[n] = "added"
            continue
        b = before.nodes[n]
        out_a, out_b = b.get("out_channels"), d.get("out_channels")
        if out_a is not None and out_b is not None and out_a != out_b:
            changes[n] = "grown" if out_b > out_a else "pruned"
        elif b.get("in_channels") != d.get("in_channels"):
            changes[n] = "inputs"
        else:
            changes[n] = "unchanged"
    return changes


def compare(*runs: str | Path | History) -> Table:
    """Final architecture, params, MACs and accuracy of several runs, one column per run."""
    if not runs:
        raise HistoryError("compare needs at least one run")
    hs = [r if isinstance(r, History) else History(r) for r in runs]
    names = [h.name for h in hs]
    if len(set(names)) < len(names):
        names = [str(h.path.parent if h.path.name == "history.db" else h.path) for h in hs]
    sums = [h.summary() for h in hs]
    keys = (
        "status",
        "last_step",
        "versions",
        "grows",
        "prunes",
        "params_initial",
        "params_final",
        "macs_initial",
        "macs_final",
        "accuracy_final",
        "accuracy_best",
    )
    rows = [(k, *(s[k] for s in sums)) for k in keys]
    groups = dict.fromkeys(g for s in sums for g in s["widths_final"])
    rows += [(f"width {g}", *(s["widths_final"].get(g) for s in sums)) for g in groups]
    return Table(("", *names), rows)


def _new_modules(old: nx.DiGraph, new: nx.DiGraph) -> list[str]:
    """Module nodes of ``new`` that ``old`` does not have, in topological order."""
    order = nx.topological_sort(new) if nx.is_directed_acyclic_graph(new) else new.nodes
    return [n for n in order if n not in old and new.nodes[n].get("kind") == "module"]
