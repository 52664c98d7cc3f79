"""The trained model back out of a run: ``dynarch.load`` rebuilds it (every grown, pruned and
inserted layer) with the run's weights, and ``dynarch export`` writes files that plain torch
(or onnxruntime) runs with the same outputs, without importing dynarch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import dynarch, one_error_line, run_dir_of

import dynarch as dynarch_api
from dynarch.data import load_data
from dynarch.history import HistoryReader
from dynarch.models import count_params
from dynarch.trained import LoadError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run that deepens (a conv unit and a residual block), then widens a conv."""
    cwd = tmp_path_factory.mktemp("trained")
    result = dynarch(cwd, "run", "policy=deepen_schedule", "trainer.epochs=3")
    assert result.returncode == 0, result.stderr
    return run_dir_of(result)


def test_load_gives_the_final_model_with_its_test_accuracy(run_dir: Path) -> None:
    model = dynarch_api.load(run_dir)
    assert not model.training
    names = [n for n, _ in model.named_modules()]
    assert "features.conv2_deep0" in names and "features.conv4_deep0" in names
    history = HistoryReader(run_dir / "history.db")
    final = history.metrics("eval")[-1]
    assert count_params(model) == final["params"]
    test = load_data("digits", seed=0).test  # the run's split (trainer.seed 0)
    x, y = (
        torch.stack(t) for t in zip(*[(img, torch.as_tensor(c)) for img, c in test], strict=True)
    )
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).sum().item()
    assert correct / len(y) == final["accuracy"]


def test_load_an_earlier_architecture(run_dir: Path) -> None:
    history = HistoryReader(run_dir / "history.db")
    first_deepen = history.events()[0]
    before = dynarch_api.load(run_dir, step=first_deepen["step"] - 1, weights=False)
    at = dynarch_api.load(run_dir, step=first_deepen["step"], weights=False)
    assert count_params(before) == first_deepen["params_before"]
    assert count_params(at) == first_deepen["params_after"]
    with pytest.raises(LoadError, match="weights are kept for step 69 only"):
        dynarch_api.load(run_dir, step=10)


@pytest.mark.parametrize("fmt, flags", [("pt2", []), ("torchscript", ["--fold-bn"])])
def test_export_runs_in_plain_torch(run_dir: Path, tmp_path: Path, fmt: str, flags: list) -> None:
    out = tmp_path / f"model.{fmt}"
    result = dynarch(tmp_path, "export", str(run_dir), "--format", fmt, "--out", str(out), *flags)
    assert result.returncode == 0, result.stderr
    x = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    read = "torch.export.load(p).module()" if fmt == "pt2" else "torch.jit.load(p)"
    script = (
        "import sys, torch, warnings\n"
        "warnings.simplefilter('ignore')\n"
        f"p = {str(out)!r}\n"
        f"m = {read}\n"
        f"y = m(torch.load({str(tmp_path / 'x.pt')!r}))\n"
        f"torch.save(y, {str(tmp_path / 'y.pt')!r})\n"
        "print('dynarch' in sys.modules)\n"
    )
    plain = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert plain.stdout.strip() == "False", plain.stderr
    with torch.no_grad():
        expected = dynarch_api.load(run_dir)(x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, atol=1e-5, rtol=1e-5)


def test_onnx_export_runs_in_onnxruntime(run_dir: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    result = dynarch(tmp_path, "export", str(run_dir), "--format", "onnx", "--out", "m.onnx")
    assert result.returncode == 0, result.stderr
    x = torch.randn(3, 1, 8, 8)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    (y,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(
            torch.from_numpy(y), dynarch_api.load(run_dir)(x), atol=1e-5, rtol=1e-5
        )


def test_export_of_a_missing_or_damaged_run_is_one_line(run_dir: Path, tmp_path: Path) -> None:
    assert "no model.json in" in one_error_line(dynarch(tmp_path, "export", str(tmp_path)))
    spec = json.loads((run_dir / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**spec, "num_classes": "ten"}))
    line = one_error_line(dynarch(tmp_path, "export", str(tmp_path)))
    assert line.endswith("model.json: 'num_classes' missing or not a int")
