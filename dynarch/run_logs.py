"""A run's metrics where other tools read them: ``metrics.csv`` beside ``history.db`` (any
spreadsheet or pandas) and, with ``trainer.tensorboard=true``, TensorBoard event files in
``<run>/tensorboard`` (loss, accuracy, lr, params, MACs, the width of every channel group, and
each mutation as text). The history stays the record; these are views of it, rewritten or
purged on a resume so they never hold a step twice.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dynarch.errors import ConfigError

CSV_NAME = "metrics.csv"
CSV_COLUMNS = (
    "step", "epoch", "train_loss", "loss", "accuracy", "lr", "params", "macs", "train_flops",
)  # fmt: skip
SCALARS = {
    "loss/train": "train_loss",
    "loss/test": "loss",
    "accuracy/test": "accuracy",
    "lr": "lr",
    "size/params": "params",
    "size/macs": "macs",
}


def write_metrics_csv(run_dir: Path, rows: Sequence[dict[str, Any]]) -> None:
    """``metrics.csv``: one line per evaluation so far (written whole, then renamed)."""
    tmp = run_dir / f".{CSV_NAME}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, run_dir / CSV_NAME)


class TensorBoardLog:
    """TensorBoard event files in ``<run_dir>/tensorboard``; a resume from ``step`` drops what
    the stopped run logged from that step on (``purge_step``)."""

    def __init__(self, run_dir: Path, step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "trainer.tensorboard needs the tensorboard package: "
                "pip install 'dynarch[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step or None)

    def evaluation(self, row: dict[str, Any], widths: dict[str, int]) -> None:
        step = row["step"]
        for tag, key in SCALARS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], step)
        for group, width in widths.items():
            self.writer.add_scalar(f"width/{group}", width, step)
        self.writer.flush()

    def mutation(self, step: int, line: str) -> None:
        self.writer.add_text("mutations", line, step)

    def close(self) -> None:
        self.writer.close()
