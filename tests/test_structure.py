"""The package's shape: imports point one way (no cycles, none hidden in a function) and every
function fits on a screen. Read from the source, so a new module is checked without a list."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "dynarch"
MAX_FUNCTION_LINES = 80
# Imports inside a function, each to keep the command line fast (torch, matplotlib, networkx
# are paid for only when the command needs them), never to break a cycle.
LAZY = {
    ("dynarch.cli", "dynarch.controller"),
    ("dynarch.cli", "dynarch.query_cli"),
    ("dynarch.cli", "dynarch.export_cli"),
    ("dynarch.query_cli", "dynarch.plots"),
    ("dynarch.data", "dynarch.models"),
    # the op table's built-ins run the surgery; dynarch query reads the table without torch
    ("dynarch.ops", "dynarch.surgery.grow"),
    ("dynarch.ops", "dynarch.surgery.prune"),
    ("dynarch.ops", "dynarch.surgery.deepen"),
    ("dynarch.ops", "dynarch.initializers"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, modules: set[str]) -> list[str]:
    """The package modules an import statement names (``from dynarch import x`` names x)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module.split(".")[: -node.level]
            base = ".".join(package + ([base] if base else []))
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    else:
        return []
    return [name for name in names if name in modules and name != module]


def _sources() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def _scripts() -> dict[str, ast.Module]:
    """benchmarks/ and examples/: held to the same screen as the package."""
    root = PACKAGE.parent
    paths = [*sorted((root / "benchmarks").glob("*.py")), *sorted((root / "examples").glob("*.py"))]
    return {str(p.relative_to(root)): ast.parse(p.read_text()) for p in paths}


def test_imports_point_one_way() -> None:
    sources = _sources()
    graph, lazy = nx.DiGraph(), set()
    for module, tree in sources.items():
        graph.add_node(module)
        functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
        inner = {id(n) for f in functions for n in ast.walk(f)}
        for node in ast.walk(tree):
            for target in _imported(node, module, set(sources)):
                graph.add_edge(module, target)
                if id(node) in inner:
                    lazy.add((module, target))
    assert list(nx.simple_cycles(graph)) == []
    assert lazy <= LAZY, f"function-level imports: {sorted(lazy - LAZY)}"
    # the layering the docs draw: the engine never reaches up to what drives it
    for low, high in [
        ("dynarch.layer_kinds", "dynarch.graph"),
        ("dynarch.tracing", "dynarch.groups"),  # the adapter, then groups, then the graph
        ("dynarch.groups", "dynarch.graph"),
        ("dynarch.graph", "dynarch.surgery.grow"),
        ("dynarch.initializers", "dynarch.surgery.grow"),
        ("dynarch.history_store", "dynarch.query"),
        ("dynarch.surgery.grow", "dynarch.policies.base"),
        ("dynarch.policies.base", "dynarch.controller"),
        ("dynarch.surgery.grow", "dynarch.ops"),
        ("dynarch.ops", "dynarch.controller"),
        ("dynarch.ops", "dynarch.checkpoint"),
        ("dynarch.ops", "dynarch.query"),
    ]:
        assert not nx.has_path(graph, low, high), f"{low} reaches {high}"
    assert not graph.has_edge("dynarch.surgery.grow", "dynarch.gradmax")


def test_every_function_fits_on_a_screen() -> None:
    long = [
        f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for module, tree in {**_sources(), **_scripts()}.items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


# Torch-Pruning's private names dynarch relies on; a new release may change any of them, so
# they are read and written in one module (the tracing adapter) only.
TP_PRIVATE = {"index_mapping", "_ConcatIndexMapping", "_param_to_name", "update_index_mapping"}


def _touches_tp_internals(node: ast.AST) -> bool:
    """``tp.<...>._private`` or one of Torch-Pruning's private names."""
    if isinstance(node, ast.Attribute):
        root = node
        while isinstance(root, ast.Attribute):
            root = root.value
        from_tp = isinstance(root, ast.Name) and root.id in {"tp", "tp_index_mapping"}
        private = node.attr.startswith("_") and not node.attr.startswith("__")
        return node.attr in TP_PRIVATE or (from_tp and private)
    if isinstance(node, ast.ImportFrom) and node.module == "dynarch.tp_adapter":
        return any(alias.name in TP_PRIVATE for alias in node.names)
    return False


def test_only_the_tracing_adapter_touches_torch_prunings_internals() -> None:
    touching = sorted(
        {
            module
            for module, tree in _sources().items()
            for n in ast.walk(tree)
            if _touches_tp_internals(n)
        }
    )
    assert touching == ["dynarch.tracing"]  # tp_adapter imports Torch-Pruning, no more
