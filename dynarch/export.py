"""Architecture graphs in formats other tools read: GraphML, node-link JSON, Graphviz dot.

Every attribute of an architecture graph is a scalar (the channel groups are JSON text in the
graph attribute ``groups``), so GraphML and node-link JSON are networkx's own writers on the graph
as it is, and any other networkx writer works too. Dot is written as plain text (no
pydot/pygraphviz needed).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import networkx as nx

FORMATS = ("graphml", "json", "dot")
_LEGACY_JSON_KEYS_ATTR = "dynarch_json"

# fill colours of dot nodes by how they changed (dynarch.query.node_changes)
CHANGE_COLOURS = {
    "grown": "#8fd18f",
    "pruned": "#f08c8c",
    "added": "#8cb4f0",
    "inputs": "#f3e08a",
    "unchanged": "#e6e6e6",
}


def to_graphml(graph: nx.DiGraph) -> str:
    buf = io.BytesIO()
    nx.write_graphml(graph, buf)
    return buf.getvalue().decode()


def read_graphml(path: str | Path) -> nx.DiGraph:
    """``nx.read_graphml`` without networkx's empty ``node_default``/``edge_default`` graph
    attributes: a graph written by :func:`to_graphml` reads back equal.

    Files written by dynarch before groups became JSON text in the graph itself list the
    attributes they encoded as JSON in a graph attribute ``dynarch_json``: only ``groups``,
    already JSON text as it is today, so that marker is dropped and nothing is decoded.
    """
    graph = nx.read_graphml(path)
    for key in ("node_default", "edge_default"):  # networkx's own GraphML bookkeeping
        if graph.graph.get(key) == {}:
            del graph.graph[key]
    graph.graph.pop(_LEGACY_JSON_KEYS_ATTR, None)
    return graph


def to_node_link_json(graph: nx.DiGraph) -> str:
    """networkx node-link JSON (``edges`` key), as ``nx.node_link_graph(..., edges="edges")``
    reads it."""
    return json.dumps(nx.node_link_data(graph, edges="edges"), sort_keys=True, indent=1)


def read_node_link_json(path: str | Path) -> nx.DiGraph:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return nx.node_link_graph(data, edges="edges")


def _quote(text: Any) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _label(node: str, d: Mapping[str, Any]) -> str:
    if d.get("kind") != "module":
        return str(d.get("op", node))
    label = f"{node}\n{d.get('op', '')}"
    if d.get("in_channels") is not None and d.get("out_channels") is not None:
        label += f" {d['in_channels']}->{d['out_channels']}"
    return label


def to_dot(graph: nx.DiGraph, changes: Mapping[str, str] | None = None, name: str = "arch") -> str:
    """Graphviz dot text; modules are boxes labelled with their op and channels, traced ops
    ellipses; ``changes`` (node -> grown/pruned/added/inputs/unchanged) sets fill colours."""
    lines = [
        f"digraph {_quote(name)} {{",
        "  rankdir=TB;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, '
        'fillcolor="#e6e6e6"];',
    ]
    for n, d in graph.nodes(data=True):
        attrs = {"label": _label(n, d)}
        if d.get("kind") != "module":
            attrs["shape"] = "ellipse"
        if changes and n in changes:
            attrs["fillcolor"] = CHANGE_COLOURS.get(changes[n], CHANGE_COLOURS["unchanged"])
            attrs["tooltip"] = changes[n]
        body = ", ".join(f"{k}={_quote(v)}" for k, v in attrs.items())
        lines.append(f"  {_quote(n)} [{body}];")
    for u, v in graph.edges:
        lines.append(f"  {_quote(u)} -> {_quote(v)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def export_graph(graph: nx.DiGraph, fmt: str, changes: Mapping[str, str] | None = None) -> str:
    """The graph as text in ``fmt`` (graphml, json or dot)."""
    if fmt == "graphml":
        return to_graphml(graph)
    if fmt == "json":
        return to_node_link_json(graph) + "\n"
    if fmt == "dot":
        return to_dot(graph, changes)
    raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
