"""The code base stays ruff clean (the rules are in pyproject.toml)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean() -> None:
    if shutil.which("ruff") is None:
        # CI installs the [test] extra, so a missing ruff there is a broken setup, not a skip
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("ruff is not installed but CI is set: install the [test] extra")
        pytest.skip("ruff is in the [test] extra")
    result = subprocess.run(
        ["ruff", "check", "dynarch", "tests", "benchmarks", "examples"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
