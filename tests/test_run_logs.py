"""What a run leaves for other tools: run.log (the console lines), metrics.csv, and with
``trainer.tensorboard=true`` TensorBoard scalars and mutation texts, all agreeing with the
history; a resume appends to the log and rewrites or purges the rest."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from test_cli import dynarch, run_dir_of

from dynarch.history import HistoryReader


def test_log_csv_and_tensorboard_agree_with_the_history(tmp_path: Path) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    result = dynarch(tmp_path, "run", "trainer.epochs=2", "trainer.tensorboard=true")
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_of(result)
    assert (run_dir / "run.log").read_text().splitlines() == result.stdout.splitlines()
    history = HistoryReader(run_dir / "history.db")
    evals = history.metrics("eval")
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [e["step"] for e in evals] == [23, 46]
    assert [float(r["accuracy"]) for r in rows] == [e["accuracy"] for e in evals]
    board = accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    board.Reload()
    accuracy = board.Scalars("accuracy/test")  # float32 in the event file
    assert [s.step for s in accuracy] == [e["step"] for e in evals]
    assert [s.value for s in accuracy] == pytest.approx([e["accuracy"] for e in evals])
    assert board.Scalars("width/features.conv2")[-1].value == 24  # 16, grown by 8
    texts = board.Tensors("mutations/text_summary")
    assert len(texts) == len(history.events()) == 3
