"""benchmarks/gpu_check.py on a machine without CUDA: its arguments checked, then one line
saying there is nothing to check, exit status 0 (CI runs this path; a GPU runs the rest)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the whole check would run")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(capsys) -> None:
    assert gpu_check.main(["--budget-s", "60", "--skip", "resnet18_run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"gpu_check: no CUDA device here (torch {torch.__version__}); nothing to check"]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--budget-s", "0"], "must be positive"),
        (["--skip", "everything"], "invalid choice: 'everything'"),
        (["--batch", "x"], "invalid int value"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(argv, words, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(argv)
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err
