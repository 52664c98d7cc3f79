"""``dynarch query``: read a run's history from the terminal (argparse; not a Hydra app).

    dynarch query RUN_DIR summary | versions | widths | events | metrics
    dynarch query RUN_DIR diff STEP_A STEP_B
    dynarch query RUN_DIR graph [--at STEP] [--format graphml|json|dot] [--out FILE]
    dynarch query RUN_DIR plot [--out DIR] [--format png|svg]   (default: RUN_DIR/plots)

RUN_DIR may be ``latest``: the run under ./runs that started last.
    dynarch query compare RUN_DIR RUN_DIR...   (or a sweep's directory: its runs)
    dynarch query list [DIR]                  (every run under DIR, default ./runs)

Tables are aligned text; ``--json`` prints JSON for scripts. Any mistake (missing directory, not
a history, unknown step or subcommand) is one ``dynarch: error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any, NoReturn

from dynarch.atomic import write_bytes
from dynarch.errors import DynarchError, close_matches, first_line
from dynarch.export import FORMATS, export_graph
from dynarch.ops import op_names
from dynarch.query import History, Table, _cell, compare, node_changes

COMMANDS = ("summary", "versions", "widths", "events", "metrics", "diff", "graph", "plot")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so every error is one line."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    json_flag = _Parser(add_help=False)
    json_flag.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts"
    )
    p = _Parser(
        prog="dynarch query",
        description="Query a run's history.db: architectures over time, diffs, plots, exports.",
        parents=[json_flag],
    )
    p.add_argument(
        "run_dir", help="a run directory (or its history.db), or latest: the newest under ./runs"
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, text in (
        ("summary", "status, steps, mutations, params/MACs/accuracy first and last"),
        ("versions", "every architecture version: step, event, params, MACs"),
        ("widths", "width of every channel group at every version"),
        ("metrics", "logged metrics (eval and train rows)"),
    ):
        sub.add_parser(name, help=text, parents=[json_flag])
    events = sub.add_parser("events", help="grow/prune/deepen events", parents=[json_flag])
    events.add_argument(
        "--kind",
        metavar="{" + ",".join(op_names()) + "}",
        help="an op (dynarch/ops.py), or any op the run recorded",
    )
    events.add_argument("--target", help="module or channel group name")
    diff = sub.add_parser("diff", help="what changed between two steps", parents=[json_flag])
    diff.add_argument("step_a", type=int)
    diff.add_argument("step_b", type=int)
    graph = sub.add_parser("graph", help="export the architecture at a step", parents=[json_flag])
    graph.add_argument("--at", type=int, help="step (default: the last one)")
    graph.add_argument("--format", choices=FORMATS, default="json")
    graph.add_argument("--out", type=Path, help="file to write (default: standard output)")
    plot = sub.add_parser("plot", help="widths, params/MACs/accuracy and graph plots")
    plot.add_argument("--out", type=Path, help="directory for the images (default: RUN_DIR/plots)")
    plot.add_argument("--format", choices=("png", "svg"), default="png")
    plot.add_argument("--at", type=int, help="step of the graph drawing (default: the last)")
    return p


def _list_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dynarch query list", description="Every run under DIR, oldest first.")
    p.add_argument("dir", nargs="?", type=Path, default=Path("runs"), help="default: ./runs")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    return p


def _compare_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dynarch query compare", description="Compare runs side by side.")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    return p


def _print(value: Any, as_json: bool) -> None:
    if as_json:
        if isinstance(value, Table):
            value = value.to_dicts()
        print(json.dumps(value, indent=1, default=str))
    elif isinstance(value, dict):
        width = max(map(len, value))
        for k, v in value.items():
            print(f"{k.ljust(width)}  {_flat(v)}")
    else:
        print(value)


def _flat(v: Any) -> Any:
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    return _cell(v)


def _dispatch(argv: list[str]) -> None:
    if argv and argv[0] == "compare":
        args = _compare_parser().parse_args(argv[1:])
        _print(compare(*runs_in(args.runs)), args.json)
        return
    if argv and argv[0] == "list":
        args = _list_parser().parse_args(argv[1:])
        _print(run_list(args.dir), args.json)
        return
    args = _parser().parse_args(argv)
    as_json = getattr(args, "json", False)
    args.run_dir = resolve_run(args.run_dir)
    with History(args.run_dir) as h, h.snapshot():  # a live run's one moment, for every query
        if args.command == "summary":
            _print(h.summary(), as_json)
        elif args.command == "versions":
            _print(h.version_table(), as_json)
        elif args.command == "widths":
            _print(h.widths(), as_json)
        elif args.command == "metrics":
            _print(h.metrics(), as_json)
        elif args.command == "events":
            _print(h.events(kind=_op_kind(h, args.kind), target=args.target), as_json)
        elif args.command == "diff":
            d = h.diff(args.step_a, args.step_b)
            _print(d.to_dict() if as_json else d, as_json)
        elif args.command == "graph":
            step = h.last_step() if args.at is None else args.at
            g = h.graph_at(step)
            text = export_graph(g, args.format, node_changes(h.graph_at(0), g))
            if args.out is None:
                sys.stdout.write(text)
            else:
                write_bytes(args.out, text.encode("utf-8"))
                print(f"architecture at step {step} written to {args.out}")
        elif args.command == "plot":
            from dynarch.plots import plot_all

            out = args.out if args.out is not None else _run_dir(args.run_dir) / "plots"
            for path in plot_all(h, out, fmt=args.format, step=args.at):
                print(path)


def _op_kind(h: History, kind: str | None) -> str | None:
    """``--kind``: a registered op, or one the run recorded (a user's op, whose module this
    process has not imported); anything else is argparse's one line, with the closest names."""
    if kind is None:
        return None
    known = list(dict.fromkeys([*op_names(), *h.events().column("kind")]))
    if kind not in known:
        raise _UsageError(
            f"argument --kind: invalid choice: {kind!r} (choose from {', '.join(known)})"
            + close_matches(kind, known)
        )
    return kind


def runs_in(paths: list[str]) -> list[Path]:
    """The runs among ``paths``: a run dir or its history.db as given, a directory of runs
    (a sweep's) expanded to its runs in order; anything else (multirun.yaml, .hydra) left
    out. ``latest`` is resolved."""
    found: list[Path] = []
    for given in paths:
        path = resolve_run(given)
        if (path / "history.db").is_file() or path.name == "history.db":
            found.append(path)
        elif path.is_dir():
            found += sorted((db.parent for db in path.glob("*/history.db")), key=_run_order)
    if not found:
        raise _UsageError(f"no runs in {', '.join(paths)} (a run dir holds history.db)")
    return found


def _run_order(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 62, path.name)


def run_list(root: Path) -> Table:
    """Every run under ``root``, oldest first: status, steps, accuracy, params; a run dir
    whose start failed before its history existed shows its FAILED message."""
    if not root.is_dir():
        raise _UsageError(f"no directory {root}")
    dirs = {p.parent for p in root.rglob("history.db")} | {p.parent for p in root.rglob("FAILED")}
    rows = []
    for run in sorted(dirs, key=_started_at):
        name = str(run.relative_to(root))
        if not (run / "history.db").is_file():
            message = (run / "FAILED").read_text(encoding="utf-8").strip()
            rows.append((name, "failed", None, None, None, message))
            continue
        with History(run) as h:
            s = h.summary()
        failed = (
            (run / "FAILED").read_text(encoding="utf-8").strip()
            if (run / "FAILED").is_file()
            else None
        )
        rows.append(
            (
                name,
                s["status"],
                s["last_step"],
                s["accuracy_final"],
                s["params_final"],
                failed or s.get("message"),
            )
        )
    return Table(("run", "status", "steps", "accuracy", "params", "message"), rows)


def _started_at(run: Path) -> float:
    for name in ("config.yaml", "history.db", "FAILED"):
        if (run / name).is_file():
            return (run / name).stat().st_mtime
    return 0.0


def resolve_run(name: str, runs: Path = Path("runs")) -> Path:
    """``latest``: the run under ``runs`` (sweep jobs included) whose config was written last,
    i.e. the one started last; any other name is a path."""
    if name != "latest":
        return Path(name)
    started = {db.parent: _started_at(db.parent) for db in runs.rglob("history.db")}
    if not started:
        raise _UsageError(f"latest: no runs under {runs.resolve()}")
    return max(started, key=started.__getitem__)


def _run_dir(path: Path) -> Path:
    return path.parent if path.name == "history.db" else path


def main(argv: list[str]) -> int:
    """Run ``dynarch query ARGV``; returns the exit code (errors are one line on stderr)."""
    if not argv:
        return _fail("dynarch query needs RUN_DIR and a COMMAND (see dynarch query --help)")
    if argv[0] in ("-h", "--help"):
        _parser().print_help()
        print("\n  or: dynarch query compare RUN_DIR RUN_DIR... [--json]")
        return 0
    try:
        _dispatch(argv)
    except BrokenPipeError:  # `dynarch query ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except _UsageError as exc:
        return _fail(str(exc))
    except (DynarchError, sqlite3.Error, OSError) as exc:
        return _fail(first_line(exc))
    return 0


def _fail(message: str) -> int:
    print(f"dynarch: error: {message}", file=sys.stderr)
    return 2
