"""Architecture graphs through networkx's own writers and readers, compared attribute by
attribute."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import networkx as nx

SCALARS = (str, int, float, bool)


def non_scalar_attributes(g: nx.DiGraph) -> list[tuple[str, Any, str, str]]:
    """(graph/node/edge, where, key, type) of every attribute that is not exactly a str, int,
    float or bool (numpy and torch numbers count as non-scalar: not every writer takes them)."""
    items = [("graph", None, g.graph)]
    items += [("node", n, d) for n, d in g.nodes(data=True)]
    items += [("edge", (u, v), d) for u, v, d in g.edges(data=True)]
    return [
        (kind, where, key, type(value).__name__)
        for kind, where, attrs in items
        for key, value in attrs.items()
        if type(value) not in SCALARS
    ]


def _typed(attrs: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, tuple[type, Any]]:
    """Attributes with their exact types, so 1, 1.0, True and "1" all differ."""
    return {k: (type(v), v) for k, v in attrs.items() if k not in drop}


def assert_same_typed(
    got: nx.DiGraph,
    expected: nx.DiGraph,
    *,
    node_drop: tuple[str, ...] = (),
    edge_drop: tuple[str, ...] = (),
    graph_drop: tuple[str, ...] | None = (),
) -> None:
    """Same nodes, edges and attributes (types included); ``*_drop`` are keys the reader adds;
    ``graph_drop=None`` skips the graph attributes (a format that has none)."""
    assert isinstance(got, nx.DiGraph) and got.is_directed()
    assert set(got.nodes) == set(expected.nodes)
    assert set(got.edges) == set(expected.edges)
    for n, d in expected.nodes(data=True):
        assert _typed(got.nodes[n], node_drop) == _typed(d), n
    for u, v, d in expected.edges(data=True):
        assert _typed(got.edges[u, v], edge_drop) == _typed(d), (u, v)
    if graph_drop is not None:
        assert _typed(got.graph, graph_drop) == _typed(expected.graph)


def assert_networkx_round_trips(g: nx.DiGraph, tmp_path: Path) -> None:
    """``g`` written by nx.write_graphml / write_gexf / node_link_data (through JSON) reads back
    with the same nodes, edges and attributes."""
    assert non_scalar_attributes(g) == []
    nx.write_graphml(g, tmp_path / "g.graphml")
    # networkx's GraphML reader adds its (empty) default-attribute bookkeeping
    back = nx.read_graphml(tmp_path / "g.graphml")
    assert_same_typed(back, g, graph_drop=("node_default", "edge_default"))

    nx.write_gexf(g, tmp_path / "g.gexf")
    back = nx.read_gexf(tmp_path / "g.gexf")
    # GEXF has no graph attributes; the reader adds a label per node and an id per edge
    assert all(d["label"] == n for n, d in back.nodes(data=True))
    assert_same_typed(back, g, node_drop=("label",), edge_drop=("id",), graph_drop=None)

    text = json.dumps(nx.node_link_data(g, edges="edges"))
    back = nx.node_link_graph(json.loads(text), edges="edges")
    assert_same_typed(back, g)
