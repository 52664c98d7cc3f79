"""A researcher's first hour, scripted: a regular (non-editable) install as a user gets it
(the wheel carries the configs, ``dynarch.configs`` mapped from the top-level configs/ in
pyproject.toml; before, ``pip install .`` then ``dynarch run`` failed with Hydra's "Primary
config directory not found"), then from an empty directory: ``dynarch run`` with the default
policy on every built-in model for 2 epochs, ``dynarch query latest plot``, ``dynarch export
latest --format torchscript``, and the export loaded by plain torch gives the run's final
model's outputs."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*command: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no checkout on the path
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def test_first_hour_from_a_wheel_install(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: setuptools' build/ stays out of the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("dynarch", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    run(sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation",
        "-q", "-w", tmp_path / "wheel")  # fmt: skip
    (wheel,) = (tmp_path / "wheel").glob("dynarch-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    # the dependencies from this environment, but not its (editable) dynarch: a plain path
    # entry, whose .pth files (the editable finder) are not run
    purelib = Path(sysconfig.get_path("purelib", vars={"base": venv, "platbase": venv}))
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel)
    where = run(python, "-c", "import dynarch; print(dynarch.__file__)", cwd=tmp_path).stdout
    assert where.startswith(str(venv)), where
    work = tmp_path / "work"
    work.mkdir()
    models = "model=vgg_small,resnet_small"  # 2 epochs of 1 step each (the rest: test_models)
    short = ["trainer.epochs=2", "data.test_fraction=0.9", "trainer.batch_size=180"]
    run(venv / "bin" / "dynarch", "run", "-m", models, *short, cwd=work)
    assert len(list((work / "runs").glob("multirun/*/*/history.db"))) == 2
    plots = run(venv / "bin" / "dynarch", "query", "latest", "plot", cwd=work).stdout.split()
    assert sorted(Path(p).name for p in plots) == ["graph.png", "metrics.png", "widths.png"]
    exported = run(venv / "bin" / "dynarch", "export", "latest", "--format", "torchscript",
                   cwd=work).stdout  # fmt: skip
    model_file = Path(exported.strip().removeprefix("torchscript written to "))
    compare = (
        "import torch, warnings, dynarch\n"
        "warnings.simplefilter('ignore')\n"
        "x = torch.randn(4, 1, 8, 8)\n"
        f"plain = torch.jit.load({str(model_file)!r})(x)\n"
        f"final = dynarch.load({str(model_file.parent)!r})(x)\n"
        "print(torch.allclose(plain, final, atol=1e-5))\n"
    )
    assert run(python, "-c", compare, cwd=work).stdout.strip() == "True"


def test_dependencies_are_capped_by_major_version_only() -> None:
    """No exact patch cap (``torch<=2.14.1`` forced old wheels on everyone); torch-pruning is
    capped below the major version whose DependencyGraph internals graph.py reads."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {d.split(">")[0].split("<")[0].strip(): d for d in project["dependencies"]}
    assert not [d for d in pins.values() if "<=" in d or "==" in d]
    assert pins["torch-pruning"].endswith("<2") and pins["torch"].endswith("<3")
    extras = project["optional-dependencies"]
    assert {"onnx", "tensorboard", "timm"} <= extras.keys()
