"""The query API, CLI, exports and plots against a history whose every version is known.

The history is written the way the controller writes it (version 0 at step 0, one version per
mutation, logged at the step whose update it precedes) while a tiny vgg_small is really trained,
grown and pruned; the live model's ArchGraph after every step is the expected answer.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch
import torchvision
from graph_formats import assert_networkx_round_trips, non_scalar_attributes

import dynarch
import dynarch.history
from dynarch.cli import main as cli_main
from dynarch.export import read_graphml, to_dot, to_graphml, to_node_link_json
from dynarch.history import HistoryError, HistoryWriter
from dynarch.models import count_params, vgg_small
from dynarch.policies.base import count_macs
from dynarch.query import Table, graph_params, group_widths, groups_of

# (step, op, target, k): two mutations share step 3 and step 10
SCHEDULE = [
    (3, "grow", "features.conv2", 2),
    (3, "prune", "features.conv3", 3),
    (7, "grow", "features.conv1", 3),
    (10, "prune", "features.conv2", 1),
    (10, "grow", "classifier.fc1", 4),
]
LAST_STEP = 12


class LiveRun:
    """What the live model looked like: ArchGraph after each step's mutations and each version."""

    def __init__(self, run_dir: Path, status: str = "completed") -> None:
        torch.manual_seed(0)
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        model = vgg_small(width=4)
        x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loss_fn = torch.nn.CrossEntropyLoss()
        graph = dynarch.ArchGraph.from_module(model, x[:1])
        self.at_step: dict[int, dynarch.ArchGraph] = {}
        self.versions: list[tuple[int, dynarch.ArchGraph]] = [(0, graph)]
        self.params: list[int] = [count_params(model)]
        self.macs: list[int] = [count_macs(model)]
        with HistoryWriter(run_dir / "history.db") as h:
            h.write_run({"trainer": {"steps": LAST_STEP}}, command="test")
            h.log_architecture(0, graph.to_node_link())
            for step in range(LAST_STEP):
                for s, op, target, k in SCHEDULE:
                    if s != step:
                        continue
                    macs_before = count_macs(model)
                    if op == "grow":
                        rec = dynarch.grow(model, target, k, init="random", optimizer=opt)
                    else:
                        rec = dynarch.prune(model, target, k=k, optimizer=opt)
                    graph = dynarch.ArchGraph.from_module(model)
                    self.macs.append(count_macs(model))
                    self.params.append(count_params(model))
                    event = h.log_mutation(
                        step,
                        step / 4,
                        rec.to_dict(),
                        reason="test",
                        macs_before=macs_before,
                        macs_after=self.macs[-1],
                    )
                    h.log_architecture(step, graph.to_node_link(), event_id=event)
                    self.versions.append((step, graph))
                self.at_step[step] = dynarch.ArchGraph.from_module(model)
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                if (step + 1) % 4 == 0 or step + 1 == LAST_STEP:
                    h.log_metrics(
                        step + 1,
                        (step + 1) / 4,
                        "eval",
                        {
                            "loss": loss.item(),
                            "accuracy": 0.1 * (step + 1) / LAST_STEP,
                            "params": count_params(model),
                            "macs": count_macs(model),
                            "train_loss": loss.item(),
                        },
                    )
            self.at_step[LAST_STEP] = dynarch.ArchGraph.from_module(model)
            if status != "running":
                h.finish(status, None if status == "completed" else "boom")


def assert_same_graph(got: nx.DiGraph, expected: nx.DiGraph) -> None:
    assert dict(got.nodes(data=True)) == dict(expected.nodes(data=True))
    assert set(got.edges) == set(expected.edges)
    assert got.graph == expected.graph


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> LiveRun:
    return LiveRun(tmp_path_factory.mktemp("query") / "run_a")


def test_graph_at_every_step_is_the_live_models_architecture(live: LiveRun) -> None:
    h = dynarch.history.open(live.run_dir)
    for step in range(LAST_STEP + 1):
        assert_same_graph(h.graph_at(step), live.at_step[step].nx)
    # the path of the database itself works too
    h2 = dynarch.history.open(live.run_dir / "history.db")
    assert_same_graph(h2.graph_at(3), live.at_step[3].nx)


def test_groups_at_every_step_are_the_live_models_groups(live: LiveRun) -> None:
    h = dynarch.history.open(live.run_dir)
    for step in range(LAST_STEP + 1):
        expected = [g.to_dict() for g in live.at_step[step].groups]
        assert h.groups_at(step) == groups_of(h.graph_at(step)) == expected
    assert h.groups_at(7)[0]["name"] == "features.conv1" and h.groups_at(7)[0]["width"] == 7


@pytest.mark.parametrize("step", [0, 3, LAST_STEP])
def test_graph_at_goes_through_every_networkx_writer(
    live: LiveRun, tmp_path: Path, step: int
) -> None:
    g = dynarch.history.open(live.run_dir).graph_at(step)
    assert non_scalar_attributes(g) == []
    assert_networkx_round_trips(g, tmp_path)


def test_graph_at_returns_a_fresh_graph_each_time(live: LiveRun) -> None:
    h = dynarch.history.open(live.run_dir)
    g = h.graph_at(3)
    g.graph["note"] = "mine"
    g.graph["groups"] = "[]"
    g.nodes["features.conv1"]["out_channels"] = 99
    assert_same_graph(h.graph_at(3), live.at_step[3].nx)
    assert len(h.widths().columns) == 7


def test_histories_that_stored_the_groups_as_a_list_read_the_same(
    live: LiveRun, tmp_path: Path
) -> None:
    """Blobs written before the groups became JSON text hold the list; every query reads them."""
    old = tmp_path / "old"
    old.mkdir()
    with HistoryWriter(old / "history.db") as w, dynarch.history.open(live.run_dir) as src:
        w.write_run({}, command="test")
        for version, step, _ in src.reader.versions():
            data = src.reader.architecture(version)
            data["graph"]["groups"] = json.loads(data["graph"]["groups"])
            w.log_architecture(step, data)
        w.log_metrics(LAST_STEP, 3.0, "train", {"loss": 1.0})
    h, new = dynarch.history.open(old), dynarch.history.open(live.run_dir)
    assert isinstance(h.reader.architecture(1)["graph"]["groups"], list)
    for step in (0, 3, 7, LAST_STEP):
        assert_same_graph(h.graph_at(step), new.graph_at(step))
        assert h.groups_at(step) == new.groups_at(step)
    assert h.widths() == new.widths()
    # (no events copied: compare the widths, not the channels the events added or removed)
    widths = [r[:3] for r in h.diff(0, LAST_STEP).groups.rows]
    assert widths == [r[:3] for r in new.diff(0, LAST_STEP).groups.rows] and len(widths) == 4
    assert h.summary()["widths_final"] == new.summary()["widths_final"]


def test_versions_and_widths_match_the_live_model(live: LiveRun) -> None:
    h = dynarch.history.open(live.run_dir)
    assert h.versions() == [0, 3, 7, 10]
    table = h.widths()
    names = list(table.columns[2:])
    assert names == ["features.conv1", "features.conv2", "features.conv3", "features.conv4"] + [
        "classifier.fc1"
    ]
    expected = []
    for version, (step, arch) in enumerate(live.versions):
        w = {g.name: g.width for g in arch.groups if not g.at_output}
        expected.append((version, step, *(w[n] for n in names)))
    assert table.rows == expected
    assert table.rows[-1][2:] == (7, 5, 5, 8, 20)
    assert h.version_table().column("params") == live.params
    assert h.version_table().column("macs") == live.macs


def test_diff_is_exact(live: LiveRun) -> None:
    h = dynarch.history.open(live.run_dir)
    d = h.diff(0, LAST_STEP)
    assert d.groups.rows == [
        ("features.conv1", 4, 7, 3, 0),
        ("features.conv2", 4, 5, 2, 1),
        ("features.conv3", 8, 5, 0, 3),
        ("classifier.fc1", 16, 20, 4, 0),
    ]
    assert (d.params_a, d.params_b) == (live.params[0], live.params[-1])
    assert d.params_delta == live.params[-1] - live.params[0]
    assert d.macs_delta == live.macs[-1] - live.macs[0]
    assert len(d.events) == len(SCHEDULE) and d.nodes_added == d.nodes_removed == []
    layers = {r[0]: r[1:] for r in d.layers.rows}
    assert layers["features.conv2"] == (4, 7, 4, 5)  # in: conv1 grew by 3; out: +2 -1
    assert layers["features.bn3"] == (8, 5, 8, 5)
    assert layers["features.conv4"] == (8, 5, 8, 8)  # conv3 pruned by 3
    assert layers["classifier.fc1"] == (32, 32, 16, 20)  # conv4 (8 channels x 2x2) unchanged
    assert layers["classifier.fc2"] == (16, 20, 10, 10)
    assert "features.conv5" not in layers and "features.bn4" not in layers
    # mutations logged at step 3 are already in force at step 3: only step 7's is between
    d37 = h.diff(3, 7)
    assert d37.events.column("step") == [7] and d37.groups.rows == [("features.conv1", 4, 7, 3, 0)]
    assert (d37.version_a, d37.version_b) == (2, 3)
    back = h.diff(7, 3)  # backwards: the growth is a removal
    assert back.groups.rows == [("features.conv1", 7, 4, 0, 3)]
    assert back.params_delta == -d37.params_delta
    same = h.diff(4, 6)
    assert len(same.groups) == len(same.layers) == len(same.events) == 0
    assert same.params_delta == same.macs_delta == 0


def test_events_and_metrics_tables(live: LiveRun) -> None:
    h = dynarch.history.open(live.run_dir)
    assert h.events().column("target") == [t for _, _, t, _ in SCHEDULE]
    prunes = h.events(kind="prune")
    assert prunes.column("target") == ["features.conv3", "features.conv2"]
    assert prunes.column("width_after") == [5, 5]
    assert h.events(target="features.conv2").column("kind") == ["grow", "prune"]
    assert len(h.events(kind="grow", target="features.conv3")) == 0
    grown = h.events(kind="grow", info=True)
    assert grown.columns[-1] == "info" and len(grown.columns) == len(h.events().columns) + 1
    assert all("output_change" in info for info in grown.column("info"))
    m = h.metrics("eval")
    assert m.column("step") == [4, 8, 12] and "train_loss" in m.columns
    assert m.column("params")[-1] == live.params[-1]
    text = str(h.events())
    assert text.splitlines()[0].split()[:3] == ["id", "step", "epoch"]
    assert len(text.splitlines()) == 2 + len(SCHEDULE)


def test_unknown_steps_are_one_line_errors(live: LiveRun, tmp_path: Path) -> None:
    h = dynarch.history.open(live.run_dir)
    for step in (-1, LAST_STEP + 1):
        with pytest.raises(HistoryError, match=f"step {step} is not in this run: .*0..12"):
            h.graph_at(step)
    with pytest.raises(HistoryError, match="not a dynarch run directory"):
        dynarch.history.open(tmp_path)
    with pytest.raises(HistoryError, match="no such run directory"):
        dynarch.history.open(tmp_path / "nope")


def read_dot(text: str) -> tuple[set[str], set[tuple[str, str]]]:
    quoted = r'"((?:[^"\\]|\\.)*)"'
    nodes = set(re.findall(rf"^\s*{quoted} \[", text, flags=re.M))
    edges = set(re.findall(rf"^\s*{quoted} -> {quoted};", text, flags=re.M))
    return nodes, edges


@pytest.mark.parametrize("step", [0, 3, LAST_STEP])
def test_exports_read_back_into_an_equal_graph(live: LiveRun, tmp_path: Path, step: int) -> None:
    g = dynarch.history.open(live.run_dir).graph_at(step)
    (tmp_path / "a.graphml").write_text(to_graphml(g))
    assert_same_graph(read_graphml(tmp_path / "a.graphml"), g)
    plain = nx.read_graphml(tmp_path / "a.graphml")  # what Gephi/yEd users get: same nodes
    assert dict(plain.nodes(data=True)) == dict(g.nodes(data=True))
    assert plain.graph["groups"] == g.graph["groups"]
    assert groups_of(plain) == dynarch.history.open(live.run_dir).groups_at(step)
    back = nx.node_link_graph(json.loads(to_node_link_json(g)), edges="edges")
    assert_same_graph(back, g)
    nodes, edges = read_dot(to_dot(g))
    assert nodes == set(g.nodes) and edges == set(g.edges)


def query(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        cli_main(["query", *args])
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_cli_tables_json_and_graph_files(live: LiveRun, tmp_path: Path, capsys) -> None:
    run = str(live.run_dir)
    code, out, _ = query(run, "widths", "--json", capsys=capsys)
    assert code == 0
    assert json.loads(out) == dynarch.history.open(run).widths().to_dicts()
    code, out, _ = query(run, "widths", capsys=capsys)
    assert out.strip() == str(dynarch.history.open(run).widths())
    code, out, _ = query(run, "--json", "diff", "0", "12", capsys=capsys)
    assert json.loads(out)["params_delta"] == live.params[-1] - live.params[0]
    code, out, _ = query(run, "diff", "3", "7", capsys=capsys)
    assert "features.conv1" in out and "events in between (1)" in out
    code, out, _ = query(run, "summary", "--json", capsys=capsys)
    summary = json.loads(out)
    assert (summary["status"], summary["versions"], summary["grows"], summary["prunes"]) == (
        "completed",
        6,
        3,
        2,
    )
    for cmd in (["summary"], ["versions"], ["events", "--kind", "grow"], ["metrics"]):
        code, out, err = query(run, *cmd, capsys=capsys)
        assert code == 0 and out.strip() and not err
    for fmt in ("graphml", "json", "dot"):
        path = tmp_path / f"g.{fmt}"
        code, out, _ = query(
            run, "graph", "--at", "7", "--format", fmt, "--out", str(path), capsys=capsys
        )
        assert code == 0 and path.is_file()
    expected = dynarch.history.open(run).graph_at(7)
    assert_same_graph(read_graphml(tmp_path / "g.graphml"), expected)
    assert_same_graph(dynarch.export.read_node_link_json(tmp_path / "g.json"), expected)
    assert read_dot((tmp_path / "g.dot").read_text())[0] == set(expected.nodes)
    code, out, _ = query(run, "graph", "--format", "dot", capsys=capsys)  # default: last step
    assert 'fillcolor="#8fd18f"' in out  # grown layers are coloured


@pytest.mark.parametrize(
    "args, words",
    [
        (["{missing}", "summary"], ["no such run directory"]),
        (["{empty}", "summary"], ["not a dynarch run directory"]),
        (["{notdb}", "summary"], ["not a dynarch history"]),
        (["{run}", "graph", "--at", "99"], ["step 99 is not in this run"]),
        (["{run}", "diff", "0", "x"], ["invalid int value"]),
        (["{run}", "frobnicate"], ["invalid choice", "frobnicate"]),
        (["{run}"], ["COMMAND"]),
        ([], ["RUN_DIR"]),
        (["compare"], ["runs"]),
    ],
)
def test_cli_bad_input_is_one_line(live, tmp_path, capsys, args, words) -> None:
    (tmp_path / "notdb").write_text("hello")
    paths = {
        "run": str(live.run_dir),
        "missing": str(tmp_path / "missing"),
        "empty": str(tmp_path),
        "notdb": str(tmp_path / "notdb"),
    }
    code, out, err = query(*(a.format(**paths) for a in args), capsys=capsys)
    assert code == 2 and not out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynarch: error: "), err
    assert all(w in lines[0] for w in words), lines[0]


def test_cli_error_in_a_real_process_has_no_traceback(live: LiveRun) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dynarch", "query", str(live.run_dir), "diff", "0", "50"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "dynarch: error: step 50 is not in this run: it has steps 0..12 (status completed)"
    )


def test_compare_and_interrupted_runs(live: LiveRun, tmp_path: Path, capsys) -> None:
    failed = tmp_path / "run_failed"
    running = tmp_path / "run_running"
    # a run that failed at step 8 and one that was killed at step 5 (status stays 'running')
    for path, status, last in ((failed, "failed", 8), (running, "running", 5)):
        path.mkdir()
        with HistoryWriter(path / "history.db") as w, dynarch.history.open(live.run_dir) as src:
            w.write_run({}, command="test")
            for version, step, _ in src.reader.versions():
                if step <= last:
                    w.log_architecture(step, src.reader.architecture(version))
            w.log_metrics(last, last / 4, "train", {"loss": 1.0})
            if status == "failed":
                w.finish("failed", "boom")
    h = dynarch.history.open(failed)
    assert h.summary()["status"] == "failed" and h.summary()["message"] == "boom"
    assert_same_graph(h.graph_at(8), live.at_step[8].nx)
    assert dynarch.history.open(running).summary()["status"] == "running"
    with pytest.raises(HistoryError, match="status running"):
        dynarch.history.open(running).graph_at(6)
    table = dynarch.history.compare(live.run_dir, failed)
    assert table == dynarch.query.compare(live.run_dir, failed)
    assert table.columns == ["", "run_a", "run_failed"]
    rows = {r[0]: r[1:] for r in table.rows}
    assert rows["status"] == ("completed", "failed")
    assert rows["params_final"][0] == live.params[-1]
    assert rows["width features.conv1"] == (7, 7) and rows["width classifier.fc1"] == (20, 16)
    assert rows["accuracy_final"] == (pytest.approx(0.1), None)
    code, out, _ = query("compare", str(live.run_dir), str(failed), "--json", capsys=capsys)
    assert code == 0 and json.loads(out) == table.to_dicts()


def test_table_prints_aligned_and_converts_to_pandas() -> None:
    t = Table(("name", "width"), [("conv1", 4), ("classifier.fc1", None), ("x", 1.23456)])
    assert str(t).splitlines() == [
        "name            width",
        "--------------  -----",
        "conv1               4",
        "classifier.fc1      -",
        "x               1.235",
    ]
    pd = pytest.importorskip("pandas")
    assert isinstance(t.to_pandas(), pd.DataFrame) and list(t.to_pandas()["width"])[0] == 4


def test_reading_while_another_process_appends(live: LiveRun, tmp_path: Path) -> None:
    """A writer process appends one version per line we send; we query between appends."""
    path = tmp_path / "live" / "history.db"
    path.parent.mkdir()
    src = dynarch.history.open(live.run_dir)
    graphs = [src.reader.architecture(v) for v, _, _ in src.reader.versions()]
    steps = [s for _, s, _ in src.reader.versions()]
    (tmp_path / "graphs.json").write_text(json.dumps({"graphs": graphs, "steps": steps}))
    code = textwrap.dedent(
        f"""
        import json, sys
        from dynarch.history import HistoryWriter
        data = json.load(open({str(tmp_path / "graphs.json")!r}))
        w = HistoryWriter({str(path)!r})
        w.write_run({{}}, command="writer")
        for graph, step in zip(data["graphs"], data["steps"]):
            w.log_architecture(step, graph)
            w.log_metrics(step, 0.0, "train", {{"loss": 1.0}})
            print("logged", step, flush=True)
            if sys.stdin.readline().strip() != "next":
                break
        w.finish("completed")
        print("done", flush=True)
        """
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        for i, step in enumerate(steps):
            assert writer.stdout.readline().split() == ["logged", str(step)]
            with dynarch.history.open(path) as h:  # opened while the writer is mid-run
                assert h.summary()["status"] == "running"
                assert h.versions() == sorted(set(steps[: i + 1]))
                assert len(h.widths()) == i + 1
                assert_same_graph(h.graph_at(step), nx.node_link_graph(graphs[i], edges="edges"))
            writer.stdin.write("next\n")
            writer.stdin.flush()
        assert writer.stdout.readline().strip() == "done"
    finally:
        writer.stdin.close()
        writer.wait(timeout=60)
    assert dynarch.history.open(path).summary()["status"] == "completed"


def test_plots_are_written_and_import_dynarch_does_not_load_matplotlib(
    live: LiveRun, tmp_path: Path, capsys
) -> None:
    code, out, err = query(str(live.run_dir), "plot", "--out", str(tmp_path / "p"), capsys=capsys)
    assert code == 0, err
    files = [Path(line) for line in out.split()]
    assert [f.name for f in files] == ["widths.png", "metrics.png", "graph.png"]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000
    code, out, _ = query(
        str(live.run_dir),
        "plot",
        "--out",
        str(tmp_path / "s"),
        "--format",
        "svg",
        "--at",
        "7",
        capsys=capsys,
    )
    assert code == 0 and (tmp_path / "s" / "graph.svg").read_text().lstrip().startswith("<?xml")
    check = (
        "import sys, dynarch, dynarch.history, dynarch.query, dynarch.cli; "
        "print('matplotlib' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_group_widths_skips_groups_at_the_output(live: LiveRun) -> None:
    arch = live.at_step[0]
    widths = group_widths(g.to_dict() for g in arch.groups)
    assert "classifier.fc2" not in widths and widths["features.conv1"] == 4


def test_a_killed_writer_leaves_a_readable_running_history(live: LiveRun, tmp_path: Path) -> None:
    """SIGKILL mid-run: no finish(), WAL not checkpointed; the history still answers."""
    path = tmp_path / "killed" / "history.db"
    path.parent.mkdir()
    graph = dynarch.history.open(live.run_dir).reader.architecture(3)
    code = textwrap.dedent(
        f"""
        import json, sys
        from dynarch.history import HistoryWriter
        w = HistoryWriter({str(path)!r})
        w.write_run({{}}, command="writer")
        w.log_architecture(0, json.loads({json.dumps(json.dumps(graph))}))
        w.log_metrics(4, 1.0, "eval", {{"accuracy": 0.5}})
        print("ready", flush=True)
        sys.stdin.readline()
        """
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout.readline().strip() == "ready"
    writer.kill()
    writer.wait(timeout=60)
    h = dynarch.history.open(path.parent)
    assert h.summary()["status"] == "running" and h.last_step() == 4
    assert_same_graph(h.graph_at(4), nx.node_link_graph(graph, edges="edges"))
    assert h.graph_at(np.int64(2)).number_of_nodes() == len(graph["nodes"])
    with pytest.raises(HistoryError, match="must be an integer"):
        h.graph_at(2.0)


def test_a_real_dynarch_run_is_queryable(tmp_path: Path) -> None:
    """End to end with the controller: the last step's graph is the run's architecture.json."""
    schedule = (
        "policy.mutations=[{epoch:1,op:grow,target:features.conv2,k:4,init:random},"
        "{epoch:1,op:prune,target:features.conv3,k:4,importance:magnitude}]"
    )
    result = subprocess.run(
        [sys.executable, "-m", "dynarch", "run", "trainer.epochs=2", "model.width=8", schedule],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1].removeprefix("run written to "))
    h = dynarch.history.open(run_dir)
    final = json.loads((run_dir / "architecture.json").read_text())
    assert_same_graph(h.graph_at(h.last_step()), nx.node_link_graph(final, edges="edges"))
    (grow_step,) = h.versions()[1:]
    assert h.last_step() == 2 * grow_step  # one epoch before the mutations, one after
    d = h.diff(grow_step - 1, grow_step)
    assert d.groups.rows == [("features.conv2", 8, 12, 4, 0), ("features.conv3", 16, 12, 0, 4)]
    evals = h.metrics("eval")
    assert d.params_a == evals.column("params")[0] and d.params_b == evals.column("params")[1]
    summary = h.summary()
    assert summary["status"] == "completed" and summary["accuracy_final"] > 0.5


def test_graph_layout_keeps_branches_off_the_main_column_and_drops_tracer_inputs() -> None:
    """resnet18: every downsample sits right of the main column (its label cannot cross the
    main column's, which are on the left); the linear weight's transpose the tracer adds is
    not drawn; every stage gets one band, in order."""
    from dynarch.plots import _drawn, _layers, _stages

    model = torchvision.models.resnet18(num_classes=10)
    graph = _drawn(dynarch.ArchGraph.from_module(model, torch.randn(1, 3, 32, 32)).nx)
    sources = [n for n in graph if graph.in_degree(n) == 0]
    assert sources == ["conv1"]
    pos = _layers(graph)
    assert all(pos[n][0] > 0 for n in graph if "downsample" in n)
    assert all(pos[n][0] == 0 for n in graph if n.endswith((".conv1", ".conv2", ".bn2")))
    assert len({pos[n] for n in graph}) == len(graph)  # no two nodes on one spot
    assert [s for s, *_ in _stages(graph, pos)] == ["layer1", "layer2", "layer3", "layer4"]


def test_widths_plot_has_one_panel_per_group(live: LiveRun) -> None:
    from dynarch.plots import widths_figure

    with dynarch.history.open(live.run_dir) as h:
        groups, last = h.widths().columns[2:], h.widths().rows[-1][2:]
        titles = [ax.get_title() for ax in widths_figure(h).axes if ax.get_title()]
    assert [t.split()[0] for t in titles] == list(groups)
    assert [int(t.split("→")[-1]) for t in titles] == list(last)


def _hammer_graph(params: int) -> dict:
    """A one-layer architecture whose params and group width are both ``params``."""
    groups = json.dumps([{"name": "g", "width": params, "at_output": False}])
    node = {"id": "conv", "kind": "module", "params": params}
    return {
        "directed": True,
        "multigraph": False,
        "graph": {"groups": groups},
        "nodes": [node],
        "edges": [],
    }


def _hammer_writer(path: Path, ready: threading.Event, stop: threading.Event, failed: list) -> None:
    """Append mutations the way the controller does: the event, then the version it made,
    each its own transaction; version v has v + 1 params."""
    try:
        with HistoryWriter(path) as w:
            w.write_run({}, command="hammer")
            w.log_architecture(0, _hammer_graph(1))
            ready.set()
            n = 1
            while not stop.is_set() and n < 3000:
                record = {
                    **dict(kind="grow", target="conv", group="g", k=1, method="random"),
                    **dict(width_before=n, width_after=n + 1, indices=[n], modules=["conv"]),
                    **dict(params_before=n, params_after=n + 1, seconds=0.0, info={}),
                }
                event = w.log_mutation(n, 0.0, record)
                w.log_architecture(n, _hammer_graph(n + 1), event_id=event)
                n += 1
    except BaseException as exc:  # reported by the reader's thread
        failed.append(exc)
        ready.set()


def test_live_reads_are_one_snapshot_while_a_writer_appends(tmp_path: Path) -> None:
    """version_table() and summary() while a writer logs thousands of versions a second (a
    thread with its own connection: to SQLite, a run's process; reads raced far more often
    than against a cycle run): every row consistent, no KeyError, no version without its
    event, params those of the stored graph. Before one snapshot per query, most reads failed."""
    path = tmp_path / "history.db"
    ready, stop, failed = threading.Event(), threading.Event(), []
    writer = threading.Thread(target=_hammer_writer, args=(path, ready, stop, failed))
    writer.start()
    try:
        ready.wait()
        with dynarch.history.open(path) as h:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and writer.is_alive():
                rows = h.version_table().to_dicts()
                for r in rows:
                    made = (None, None) if r["version"] == 0 else ("grow", "g")
                    assert (r["kind"], r["group"]) == made and r["params"] == r["version"] + 1, r
                assert rows[-1]["params"] == graph_params(h.graph_of_version(len(rows) - 1))
                s = h.summary()
                assert s["params_final"] == s["widths_final"]["g"] == s["versions"], s
                assert s["grows"] in (s["versions"] - 1, s["versions"]), s
    finally:
        stop.set()
        writer.join()
    assert not failed, failed


def test_events_of_a_deepen_by_kind(tmp_path: Path, capsys) -> None:
    """``--kind`` takes every op of the table (a deepen too, once refused by argparse); a
    misspelt one is one line with the closest names."""
    torch.manual_seed(0)
    model, x = vgg_small(width=4), torch.randn(2, 1, 8, 8)
    with HistoryWriter(tmp_path / "history.db") as h:
        h.write_run({"trainer": {"steps": 4}}, command="test")
        h.log_architecture(0, dynarch.ArchGraph.from_module(model, x[:1]).to_node_link())
        rec = dynarch.deepen(model, "features.conv1", "conv", example_inputs=x[:1])
        event = h.log_mutation(2, 0.5, rec.to_dict(), reason="test")
        h.log_architecture(2, dynarch.ArchGraph.from_module(model).to_node_link(), event_id=event)
        h.finish("completed", None)
    code, out, err = query(str(tmp_path), "--json", "events", "--kind", "deepen", capsys=capsys)
    assert code == 0 and not err
    assert [(e["step"], e["kind"], e["target"]) for e in json.loads(out)] == [
        (2, "deepen", "features.conv1")
    ]
    code, out, _ = query(str(tmp_path), "--json", "events", "--kind", "grow", capsys=capsys)
    assert code == 0 and json.loads(out) == []
    code, _, err = query(str(tmp_path), "events", "--kind", "deepn", capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "invalid choice: 'deepn'" in err and "(did you mean: 'deepen'?)" in err
