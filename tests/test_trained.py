"""The trained model back out of a run: ``dynarch.load`` rebuilds it (every grown, pruned and
inserted layer) with the run's weights, and ``dynarch export`` writes files that plain torch
(or onnxruntime) runs with the same outputs, without importing dynarch."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import dynarch, one_error_line, run_dir_of
from torch import nn

import dynarch as dynarch_api
from dynarch.data import load_data
from dynarch.export_cli import main as export_main
from dynarch.history import HistoryReader
from dynarch.models import count_params, resnet_small
from dynarch.surgery.deepen import deepen
from dynarch.trained import LoadError, fold_batchnorm


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run that deepens (a conv unit and a residual block), then widens a conv."""
    cwd = tmp_path_factory.mktemp("trained")
    keep = ["trainer.keep_versions=true", "trainer.tensorboard=true"]
    result = dynarch(cwd, "run", "policy=deepen_schedule", "trainer.epochs=3", *keep)
    assert result.returncode == 0, result.stderr
    (cwd / "stdout.txt").write_text(result.stdout)
    return run_dir_of(result)


def accuracy_on_digits(model: torch.nn.Module) -> float:
    test = load_data("digits", seed=0).test  # the run's split (trainer.seed 0)
    x = torch.stack([img for img, _ in test])
    y = torch.as_tensor([int(c) for _, c in test])
    with torch.no_grad():
        return (model(x).argmax(1) == y).sum().item() / len(y)


def test_load_gives_the_final_model_with_its_test_accuracy(run_dir: Path) -> None:
    model = dynarch_api.load(run_dir)
    assert not model.training
    names = [n for n, _ in model.named_modules()]
    assert "features.conv2_deep0" in names and "features.conv4_deep0" in names
    final = HistoryReader(run_dir / "history.db").metrics("eval")[-1]
    assert count_params(model) == final["params"]
    assert accuracy_on_digits(model) == final["accuracy"]


def test_load_an_earlier_version_with_the_weights_it_ended_with(
    run_dir: Path, tmp_path: Path
) -> None:
    """Deepens at steps 12 and 23: the version in force at step 22 ended with the weights the
    evaluation at step 23 saw (the step-23 deepen comes before step 23's update)."""
    history = HistoryReader(run_dir / "history.db")
    assert [e["step"] for e in history.events()][:2] == [12, 23]
    at_23 = next(m for m in history.metrics("eval") if m["step"] == 23)
    earlier = dynarch_api.load(run_dir, step=22)
    assert count_params(earlier) == at_23["params"]
    assert accuracy_on_digits(earlier) == at_23["accuracy"]
    shapes = dynarch_api.load(run_dir, step=11, weights=False)
    assert count_params(shapes) == history.events()[0]["params_before"]
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("versions"))
    with pytest.raises(LoadError, match="trainer.keep_versions=true"):
        dynarch_api.load(copy, step=22)


def test_exports_run_in_plain_torch(run_dir: Path, tmp_path: Path) -> None:
    """torch.export (default) and TorchScript with BatchNorm folded, read back in a process
    that never imports dynarch, give the run's final model's outputs."""
    pt2, ts = tmp_path / "model.pt2", tmp_path / "model.ts"
    for out, flags in ((pt2, []), (ts, ["--format", "torchscript", "--fold-bn"])):
        result = dynarch(tmp_path, "export", str(run_dir), "--out", str(out), *flags)
        assert result.returncode == 0, result.stderr
    x = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch, warnings\n"
        "warnings.simplefilter('ignore')\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"a = torch.export.load({str(pt2)!r}).module()(x)\n"
        f"b = torch.jit.load({str(ts)!r})(x)\n"
        f"torch.save((a, b), {str(tmp_path / 'y.pt')!r})\n"
        "print('dynarch' in sys.modules)\n"
    )
    plain = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert plain.stdout.strip() == "False", plain.stderr
    with torch.no_grad():
        expected = dynarch_api.load(run_dir)(x)
    for y in torch.load(tmp_path / "y.pt"):
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


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


def test_export_of_a_missing_or_damaged_run_is_one_line(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert "no model.json in" in one_error_line(dynarch(tmp_path, "export", str(tmp_path)))
    spec = json.loads((run_dir / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**spec, "num_classes": "ten"}))
    assert export_main([str(tmp_path)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith("model.json: 'num_classes' missing or not a int")


def test_run_logs_agree_with_the_history(run_dir: Path) -> None:
    """run.log holds what was printed, metrics.csv every evaluation, TensorBoard the
    scalars, each group's width and each mutation as text (trainer.tensorboard=true)."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    assert (run_dir / "run.log").read_text() == (run_dir.parent.parent / "stdout.txt").read_text()
    history = HistoryReader(run_dir / "history.db")
    evals = history.metrics("eval")
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [e["step"] for e in evals] == [23, 46, 69]
    assert [float(r["accuracy"]) for r in rows] == [e["accuracy"] for e in evals]
    board = accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    board.Reload()
    accuracy = board.Scalars("accuracy/test")  # float32 in the event file
    assert [s.step for s in accuracy] == [e["step"] for e in evals]
    assert [s.value for s in accuracy] == pytest.approx([e["accuracy"] for e in evals])
    grown = history.events()[-1]  # the schedule's last entry widens a conv
    assert board.Scalars(f"width/{grown['grp']}")[-1].value == grown["width_after"]
    assert len(board.Tensors("mutations/text_summary")) == len(history.events()) == 3


def test_folding_keeps_a_layer_deepened_into_the_models_own_forward() -> None:
    """fx traces a class's forward: a deepen inside the model's own forward (resnet_small's
    stem) was dropped by the fold (outputs off by 6.5e-3); traced as a child, it is kept."""
    torch.manual_seed(0)
    model = resnet_small(num_classes=10, in_channels=3, width=8).eval()
    x = torch.randn(4, 3, 16, 16)
    deepen(model, "stem", "residual", example_inputs=x)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.5 if "deep0" in name else 0.0)  # the new block no longer a no-op
        expected = model(x)
        folded = fold_batchnorm(model)(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fold_batchnorm(model).modules())
    torch.testing.assert_close(folded, expected, atol=1e-5, rtol=1e-5)
