"""Plots of a run's history (matplotlib, Agg: files only, no display needed).

Imported lazily (``dynarch query ... plot``, or explicitly), so ``import dynarch`` never loads
matplotlib. Figures are built with ``matplotlib.figure.Figure`` rather than pyplot: no global
state, safe in a server or a notebook.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx

from dynarch.atomic import write_rendered
from dynarch.errors import DynarchError
from dynarch.ops import channel_change, look_of, op_names
from dynarch.query import History, node_changes

COLOURS = {
    "grown": "#2ca02c",
    "pruned": "#d62728",
    "added": "#1f77b4",
    "inputs": "#e6b800",
    "unchanged": "#b0b0b0",
}
LEGEND = {"inputs": "input width changed", "added": "new node"}


def _figure(**kwargs: Any) -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        raise DynarchError("plots need matplotlib: pip install matplotlib") from None
    return Figure(**kwargs)


def _end_step(h: History) -> int:
    return max(1, h.last_step())


def plot_widths(h: History, path: str | Path) -> Path:
    """The widths figure (:func:`widths_figure`) written to ``path``."""
    return _save(widths_figure(h), path)


def widths_figure(h: History) -> Any:
    """One small panel per channel group (each with its own scale, so layers of equal width
    never hide each other and no colour has to tell them apart): its width over steps,
    ▲ where it grew, ▼ where it was pruned, start → end in the panel's title."""
    table = h.widths()
    steps, names = table.column("step"), table.columns[2:]
    end, events = _end_step(h), h.events()
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig = _figure(figsize=(2.4 * cols + 0.6, 1.55 * rows + 0.7), dpi=90)
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        last: dict[int, int] = {}  # several versions can share a step: the last one is in force
        for s, w in zip(steps, table.column(name), strict=True):
            if w is not None:
                last[s] = w
        xs, ys = list(last), list(last.values())
        ax.step([*xs, end], [*ys, ys[-1]], where="post", color="#1f77b4", linewidth=1.4)
        for e in events:
            if e["group"] == name:
                look = look_of(e["kind"])
                ax.plot(e["step"], e["width_after"], look.marker, color=look.colour, ms=6)
        ax.set_title(f"{name}  {ys[0]}→{ys[-1]}", fontsize=7.5)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    for ax in axes[max(0, len(names) - cols) : len(names)]:  # the lowest panel of each column
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xlabel("step", fontsize=8)
    marks = ", ".join(f"{look_of(kind).glyph} {kind}" for kind in _kinds(events))
    fig.suptitle(f"{h.name}: channels of every layer ({marks})", fontsize=10)
    return fig


def plot_metrics(h: History, path: str | Path) -> Path:
    """Parameters and MACs of the architecture in force, training and test loss, test
    accuracy, over steps (epochs on the top axis); dashed lines at mutations."""
    versions = h.version_table()
    end = _end_step(h)
    fig = _figure(figsize=(7, 7.5), dpi=90)
    axes = fig.subplots(4, 1, sharex=True)
    steps = versions.column("step")
    for ax, key, label in ((axes[0], "params", "parameters"), (axes[1], "macs", "MACs / example")):
        values = versions.column(key)
        pts = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.step([*xs, end], [*ys, ys[-1]], where="post", color="#1f77b4")
        ax.set_ylabel(label)
    evals = [m for m in h.metrics("eval") if m["accuracy"] is not None]
    at = [m["step"] for m in evals]
    axes[2].plot(at, [m.get("train_loss") for m in evals], "o-", ms=3, label="train (mean)")
    axes[2].plot(at, [m["loss"] for m in evals], "s-", ms=3, label="test")
    axes[2].set_ylabel("loss")
    axes[2].legend(fontsize=7)
    axes[3].plot(at, [m["accuracy"] for m in evals], "o-", ms=3, color="#2ca02c")
    axes[3].set_ylabel("test accuracy")
    axes[3].set_xlabel("step")
    per_epoch = next((m["step"] / m["epoch"] for m in evals if m["epoch"]), None)
    if per_epoch:
        top = axes[0].secondary_xaxis(
            "top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch)
        )
        top.set_xlabel("epoch", fontsize=8)
    events = h.events()
    for e in events:
        colour = look_of(e["kind"]).colour
        for ax in axes:
            ax.axvline(e["step"], color=colour, linestyle="--", linewidth=0.8, alpha=0.6)
    for ax in axes:
        ax.grid(alpha=0.3)
    dashes = ", ".join(f"{look_of(kind).colour_name} {kind}" for kind in _kinds(events))
    fig.suptitle(f"{h.name}: size, loss and accuracy (dashed: {dashes})", fontsize=10)
    return _save(fig, path)


def _kinds(events: Any) -> list[str]:
    """The ops a figure's title explains: grow and prune always, then any other the run
    recorded (a deepen, a user's op), in the table's order."""
    recorded = {e["kind"] for e in events}
    return [
        k for k in dict.fromkeys([*op_names(), *recorded]) if k in recorded or channel_change(k)
    ]


def _drawn(graph: nx.DiGraph) -> nx.DiGraph:
    """The graph without the tracer's dangling sources (Torch-Pruning traces a linear weight's
    transpose as an op node with no input): only what data flows through."""
    drawn = graph.copy()
    dangling = [
        n for n in graph if graph.in_degree(n) == 0 and graph.nodes[n].get("kind") != "module"
    ]
    drawn.remove_nodes_from(dangling)
    return drawn


def _layers(graph: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """Top-to-bottom layout by longest-path depth (no Graphviz needed): the longest path is
    the main column at x = 0 (labels on its left), side branches (shortcuts, downsamples)
    in columns to its right (labels on their right), so no label crosses another."""
    depth: dict[str, int] = {}
    for n in nx.topological_sort(graph):
        preds = list(graph.predecessors(n))
        depth[n] = 1 + max(depth[p] for p in preds) if preds else 0
    main = set(nx.dag_longest_path(graph))
    rows: dict[int, list[str]] = {}
    for n in graph.nodes:
        rows.setdefault(depth[n], []).append(n)
    pos = {}
    for d, nodes in rows.items():
        nodes.sort(key=lambda n: (n not in main, n))
        for i, n in enumerate(nodes):
            pos[n] = (1.6 * i, -d)
    return pos


def _stages(graph: nx.DiGraph, pos: dict[str, tuple[float, float]]) -> list[tuple[str, int, int]]:
    """(stage, first row, last row) of the main column: the first part of the module names
    (``layer2`` of ``layer2.0.conv1``); ops belong to the stage above them."""
    spans: list[tuple[str, int, int]] = []
    stage = ""
    for n in sorted((n for n in graph if pos[n][0] == 0), key=lambda n: -pos[n][1]):
        row = int(-pos[n][1])
        if graph.nodes[n].get("kind") == "module":
            stage = n.split(".")[0] if "." in n else ""
        if spans and spans[-1][0] == stage:
            spans[-1] = (stage, spans[-1][1], row)
        else:
            spans.append((stage, row, row))
    return [s for s in spans if s[0]]


def plot_graph(h: History, path: str | Path, step: int | None = None) -> Path:
    """The architecture at ``step`` (default: the end): node size by output width, colour by
    how the node changed since step 0, stages shaded."""
    step = h.last_step() if step is None else step
    start, graph = h.graph_at(0), _drawn(h.graph_at(step))
    changes = node_changes(start, graph)
    pos = _layers(graph) if nx.is_directed_acyclic_graph(graph) else nx.spring_layout(graph)
    rows = 1 - min(y for _, y in pos.values())
    fig = _figure(figsize=(7.5, max(4.0, 0.24 * rows)), dpi=90)
    ax = fig.add_subplot()
    for i, (stage, first, last) in enumerate(_stages(graph, pos)):
        ax.axhspan(-last - 0.5, -first + 0.5, color="#f0f0f0" if i % 2 else "#e4ecf7", zorder=0)
        ax.text(-5.6, -(first + last) / 2, stage, fontsize=8, va="center", color="#555555")
    for u, v in graph.edges:
        (x0, y0), (x1, y1) = pos[u], pos[v]
        ax.annotate(
            "",
            xy=(x1, y1),
            xytext=(x0, y0),
            arrowprops={"arrowstyle": "->", "color": "#888888", "lw": 0.7},
        )
    widths = [d.get("out_channels") or 0 for _, d in graph.nodes(data=True)]
    top = max(widths) or 1
    for (n, d), w in zip(graph.nodes(data=True), widths, strict=True):
        x, y = pos[n]
        module = d.get("kind") == "module"
        size = 20 + 220 * w / top if module else 12
        ax.scatter([x], [y], s=size, color=COLOURS[changes[n]], edgecolors="#333333", zorder=3)
        before = start.nodes[n].get("out_channels") if n in start else None
        text = (f"{n}  {w}" if before in (None, w) else f"{n}  {before}→{w}") if module else ""
        text = text or d.get("op", n)
        side = {"ha": "right", "x": x - 0.25} if x == 0 else {"ha": "left", "x": x + 0.25}
        ax.text(side.pop("x"), y, text, fontsize=6.5 if module else 5.5, va="center",
                color="#000000" if module else "#777777", **side)  # fmt: skip
    for label, colour in COLOURS.items():
        if label in changes.values():
            ax.scatter([], [], s=40, color=colour, label=LEGEND.get(label, label))
    ax.legend(fontsize=7, loc="upper right", title="since step 0", title_fontsize=7)
    xs = [x for x, _ in pos.values()]
    ax.set_xlim(-6.0, max(xs) + 4.0)
    ax.set_ylim(-rows + 0.5, 1.5)
    ax.set_axis_off()
    ax.set_title(f"{h.name}: architecture at step {step} (size = output channels)", fontsize=9)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    """Rendered in memory, then written whole (dynarch/atomic.py): a killed ``query plot`` once
    left a 0-byte PNG under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fmt = path.suffix.lstrip(".").lower() or "png"
    return write_rendered(path, lambda f: fig.savefig(f, format=fmt))


def plot_all(
    h: History, out_dir: str | Path, fmt: str = "png", step: int | None = None
) -> list[Path]:
    """The three plots of a run into ``out_dir``: widths, metrics, graph."""
    if fmt not in ("png", "svg"):
        raise DynarchError(f"unknown plot format {fmt!r}; known: png, svg")
    if step is not None:
        h.version_at(step)  # an unknown step is an error before anything is written
    out = Path(out_dir)
    return [
        plot_widths(h, out / f"widths.{fmt}"),
        plot_metrics(h, out / f"metrics.{fmt}"),
        plot_graph(h, out / f"graph.{fmt}", step),
    ]


__all__ = ["plot_all", "plot_graph", "plot_metrics", "plot_widths"]
