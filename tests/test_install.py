"""A regular (non-editable) install works as a user gets it: the wheel carries the configs
(``dynarch.configs``, mapped from the top-level configs/ in pyproject.toml) and ``dynarch run``
from an empty directory finds them. Before, ``pip install .`` then ``dynarch run`` failed with
Hydra's "Primary config directory not found"."""

from __future__ import annotations

import os
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


def test_a_wheel_install_runs_from_an_empty_directory(tmp_path: Path) -> None:
    run(sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation",
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
    result = run(venv / "bin" / "dynarch", "run", "trainer.epochs=1", "data.test_fraction=0.9",
                 cwd=work)  # fmt: skip
    assert "final test accuracy" in result.stdout
    assert sorted(p.name for p in work.iterdir()) == ["runs"]
    assert len(list((work / "runs").glob("*/history.db"))) == 1
