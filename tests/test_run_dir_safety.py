"""A run dir is data (issue 22): loading, exporting or resuming one runs no code it names, only
an nn.Module subclass from outside it (item 1); an export or a plot appears whole under
its final name or not at all, and a full disk is one line (item 6)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_cli import child_pythonpath, dynarch, one_error_line, run_dir_of

import dynarch as dynarch_api
from dynarch import checkpoint
from dynarch.export_cli import SUFFIX
from dynarch.export_cli import main as export_main
from dynarch.models import build_target
from dynarch.trained import LoadError, example_input, export, read_model_spec

SHAPE = {"num_classes": 10, "in_channels": 1, "image_size": 8}


def fake_run(run: Path, model_cfg: dict[str, Any], state: dict[str, Any] | None = None) -> Path:
    """A run dir as a stranger could hand it over: a model.json and a valid checkpoint."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "model.json").write_text(json.dumps({"model": model_cfg, **SHAPE}))
    payload = {"mutations": [], "model": state or {}, "step": 0}
    checkpoint.save(run / checkpoint.FILENAME, payload)
    return run


def not_models(marker: Path) -> list[tuple[str, dict[str, Any]]]:
    """Callables that would make the marker if called with these keyword arguments."""
    return [
        ("os.system", {"command": f"touch {marker}"}),
        ("subprocess.call", {"args": ["touch", str(marker)]}),
        ("builtins.eval", {"source": f"open({str(marker)!r}, 'w')"}),
        ("os.makedirs", {"name": str(marker)}),  # a Python function
        (  # annotated -> torch.nn.Module, and it executes import_block
            "torch.fx.graph_module.reduce_graph_module",
            {
                "body": {"_code": "def forward(self, x):\n    return x\n"},
                "import_block": f"import os; os.system('touch {marker}')\n",
            },
        ),
    ]


@pytest.mark.parametrize("index", range(5))
def test_load_and_export_refuse_a_target_that_is_not_a_model_class(
    tmp_path: Path, index: int, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "marker"
    target, kwargs = not_models(marker)[index]
    run = fake_run(tmp_path / "run", {"_target_": target, "kwargs": kwargs})
    with pytest.raises(LoadError) as info:
        dynarch_api.load(run)
    message = str(info.value)
    assert "\n" not in message and f"{target!r}" in message, message
    assert "not an nn.Module subclass" in message, message
    assert export_main([str(run)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("dynarch: error: ") and "not an nn.Module subclass" in line, line
    assert not marker.exists()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "model.json"]


def test_the_cli_refuses_os_system_as_the_model(tmp_path: Path) -> None:
    marker = tmp_path / "X"
    result = dynarch(
        tmp_path, "run", "model._target_=os.system", f"+model.kwargs.command='touch {marker}'",
        "trainer.steps=2",
    )  # fmt: skip
    line = one_error_line(result)
    assert "'os.system'" in line and "not an nn.Module subclass" in line, line
    assert not marker.exists()


EVIL = """\
from pathlib import Path
from torch import nn
Path({marker!r}).touch()


class EvilNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))
"""


@pytest.mark.parametrize("layout", ["evil_model.py", "evil_model/__init__.py"])
def test_a_model_module_inside_the_run_dir_is_not_imported(
    tmp_path: Path, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cd RUN && dynarch export .`` puts the run dir on sys.path: a module there would run."""
    marker = tmp_path / "marker"
    run = fake_run(tmp_path / "run", {"_target_": "evil_model.EvilNet"})
    (run / layout).parent.mkdir(exist_ok=True)
    (run / layout).write_text(EVIL.format(marker=str(marker)))
    monkeypatch.chdir(run)
    monkeypatch.syspath_prepend(str(run))
    with pytest.raises(LoadError, match="inside the run dir") as info:
        dynarch_api.load(".")
    assert "\n" not in str(info.value)
    assert not marker.exists() and "evil_model" not in sys.modules
    line = one_error_line(dynarch(run, "export", "."))
    assert "evil_model" in line and "inside the run dir" in line, line
    assert not marker.exists()


OWN = """\
from __future__ import annotations

from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, hidden: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x).relu()))


def annotated(num_classes: int, in_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.Flatten(), nn.Linear(144, num_classes))


def bare(num_classes, in_channels):
    return annotated(num_classes, in_channels)
"""


def test_model_classes_build_and_functions_are_refused_uncalled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A class builds, from a module outside the run dir, loaded from it too; a function is
    refused before it is called, even one annotated to return a module, with what to name."""
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "own_models.py").write_text(OWN)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    shape = tuple(SHAPE.values())
    for target in ("own_models.TinyNet", "dynarch.models.ResNetSmall"):
        assert isinstance(build_target(target, *shape), torch.nn.Module)
    for function in ("own_models.annotated", "own_models.bare", "dynarch.models.vgg_small"):
        with pytest.raises(ValueError, match="a function: name the nn.Module class it builds"):
            build_target(function, *shape)
    state = build_target("own_models.TinyNet", *shape, hidden=5).state_dict()
    model_cfg = {"_target_": "own_models.TinyNet", "kwargs": {"hidden": 5}}
    loaded = dynarch_api.load(fake_run(tmp_path / "run", model_cfg, state))
    torch.testing.assert_close(loaded.conv.weight, state["conv.weight"])


def test_a_resumed_run_imports_no_module_from_its_run_dir(tmp_path: Path) -> None:
    """``cd RUN && dynarch run resume=.``: the history names own_models.TinyNet, and a module
    of that name inside the run dir would run on import; it is refused in one line."""
    (tmp_path / "own_models.py").write_text(OWN)
    run = tmp_path / "run"
    result = dynarch(
        tmp_path, "run", "model._target_=own_models.TinyNet", "trainer.steps=2",
        "policy=static", f"hydra.run.dir={run}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    marker = tmp_path / "marker"
    (tmp_path / "own_models.py").unlink()
    (run / "own_models.py").write_text(
        EVIL.format(marker=str(marker)).replace("EvilNet", "TinyNet")
    )
    line = one_error_line(dynarch(run, "run", "resume=.", "trainer.steps=4"))
    assert "own_models" in line and "inside the run dir" in line, line
    assert not marker.exists()


# ---- item 6: exports and plots appear whole or not at all


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four steps of the default vgg_small on digits: a checkpoint of ~100 kB, and a history."""
    cwd = tmp_path_factory.mktemp("safety")
    result = dynarch(cwd, "run", "trainer.steps=4", "policy=static")
    assert result.returncode == 0, result.stderr
    return run_dir_of(result)


LIMITED = """\
import resource, sys
from dynarch.export_cli import main
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.exit(main(sys.argv[1:]))
"""


def child(cwd: Path, code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": child_pythonpath(), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


@pytest.mark.parametrize("fmt", ["pt2", "torchscript", "state_dict"])
def test_export_past_the_file_size_limit_is_one_line_and_leaves_no_file(
    real_run: Path, tmp_path: Path, fmt: str
) -> None:
    """``ulimit -f 16``: SIGXFSZ would kill the process, and a C++ writer aborts (rc 134)."""
    out = tmp_path / "out" / SUFFIX[fmt]
    out.parent.mkdir()
    proc = child(tmp_path, LIMITED, str(real_run), "--format", fmt, "--out", str(out))
    stdout, stderr = proc.communicate(timeout=300)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    line = one_error_line(result)
    assert str(out) in line and "File too large" in line, line
    assert list(out.parent.iterdir()) == []


def interrupted(*args: Any, **kwargs: Any) -> None:
    raise KeyboardInterrupt


def partial_writer(*args: Any, **kwargs: Any) -> None:
    """A writer killed half-way: some bytes out, then gone."""
    destination = args[1]
    if isinstance(destination, (str, Path)):
        with open(destination, "wb") as f:
            f.write(b"PK\x03\x04 half")
    else:
        destination.write(b"PK\x03\x04 half")
    raise KeyboardInterrupt


@pytest.mark.parametrize("fmt", ["pt2", "torchscript", "state_dict"])
def test_an_export_interrupted_while_writing_leaves_nothing(
    real_run: Path, tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, example = dynarch_api.load(real_run), example_input(read_model_spec(real_run))
    writer = {"pt2": (torch.export, "save"), "torchscript": (torch.jit, "save")}
    monkeypatch.setattr(*writer.get(fmt, (torch, "save")), partial_writer)
    with pytest.raises(KeyboardInterrupt):
        export(model, example, fmt, tmp_path / SUFFIX[fmt])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", interrupted)  # the rename itself interrupted
    with pytest.raises(KeyboardInterrupt):
        export(model, example, fmt, tmp_path / SUFFIX[fmt])
    assert list(tmp_path.iterdir()) == []


def test_a_plot_interrupted_while_writing_leaves_nothing(
    real_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    from dynarch.plots import plot_widths
    from dynarch.query import History

    with History(real_run) as h:
        monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: partial_writer(fig, *a))
        with pytest.raises(KeyboardInterrupt):
            plot_widths(h, tmp_path / "widths.png")
        assert list(tmp_path.iterdir()) == []
        monkeypatch.undo()
        monkeypatch.setattr(os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            plot_widths(h, tmp_path / "widths.png")
        assert list(tmp_path.iterdir()) == []


KILLED = """\
import sys
from dynarch.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["export", "plot"])
def test_a_kill_as_the_file_appears_leaves_it_whole(
    real_run: Path, tmp_path: Path, command: str
) -> None:
    """SIGKILL the moment the file shows under its final name: what is there is complete."""
    out = tmp_path / ("model.pt2" if command == "export" else "widths.png")
    if command == "export":
        args = ["export", str(real_run), "--out", str(out)]
    else:
        args = ["query", str(real_run), "plot", "--out", str(tmp_path)]
    proc = child(tmp_path, KILLED, *args)
    deadline = time.monotonic() + 300
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        pass
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert out.exists(), "the file never appeared"
    if command == "export":
        program = torch.export.load(str(out))
        assert program.module()(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    else:
        from matplotlib.image import imread

        assert imread(out).ndim == 3
