"""An ordinary step of ``dynarch run`` reads nothing from the device (issue 24): on a GPU each
such read stops the host from queueing the next step's kernels. Counted on the CPU by
instrumenting every Tensor method that hands a value to Python."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sync_probe import READS, _counting, default_run, install

from dynarch.session import Session


def _reads_per_step(monkeypatch: pytest.MonkeyPatch, run_dir: Path, **trainer: Any) -> list:
    """(step, reads, what else the step did) for every step of a default-policy run."""
    steps: list = []
    install(monkeypatch.setattr, steps)
    assert default_run(run_dir, **{"epochs": 2, **trainer}).mutations == 3
    return steps


def test_an_ordinary_step_reads_nothing_from_the_device(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    steps = _reads_per_step(monkeypatch, tmp_path / "run", progress=False, log_every_steps=10)
    ordinary = [(step, reads) for step, reads, busy in steps if not busy]
    assert len(ordinary) > 30  # of 46: the schedule's policy is asked at 3 steps
    assert [(step, reads) for step, reads in ordinary if reads] == []
    asked = [step for step, _, busy in steps if "asked" in busy]
    assert asked == [0, 15, 31]  # grow_then_prune: at 0.334 and 0.667 of 46 steps
    # the losses are read where they are needed, all of them in one transfer
    assert [reads for step, reads, busy in steps if busy == ["logged"]] == [["tolist"]] * 4


def test_on_nonfinite_skip_reads_the_loss_every_step(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    steps = _reads_per_step(monkeypatch, tmp_path / "run", progress=False, on_nonfinite="skip")
    assert all("tolist" in reads for _, reads, _ in steps)


def test_a_sessions_ordinary_step_reads_nothing_from_the_device(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 10),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    session = Session(model, optimizer, "grow_then_prune", total_steps=30, run_dir=tmp_path / "r")
    reads: list[str] = []
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, _counting(reads, name, getattr(torch.Tensor, name)))
    per_step = []
    for _ in range(30):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        before, asked = len(reads), session.due
        session.mutate(x, y)
        loss = torch.nn.functional.cross_entropy(session.net(x), y)
        during = len(reads)  # the loop's own calls (backward) are not the session's
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after_update = len(reads)
        session.log(loss=loss)
        per_step.append((asked, during - before + len(reads) - after_update))
    session.close()
    assert [step for step, (asked, _) in enumerate(per_step) if asked] == [0, 10, 20]
    # the other steps read nothing but for the checkpoint after a mutation's step
    assert [step for step, (asked, n) in enumerate(per_step) if n and not asked] == [11, 21]
    assert len(session.train_losses) == 30
    assert [e["step"] for e in session.events] == [10, 10, 20]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_under_torchrun_both_ranks_read_nothing_on_an_ordinary_step(tmp_path: Path) -> None:
    """Two processes: the same steps read (the losses' all-reduce, the decisions' broadcast
    on the steps the policy is asked and at least every MEET_EVERY), the others nothing."""
    from test_distributed import torchrun

    counted = ["policy._target_=sync_probe.CountingSchedule", f"+policy.out={tmp_path / 'n'}"]
    (tmp_path / "run").mkdir()
    done = torchrun(tmp_path / "run", "run", "data=teacher_student", "trainer.epochs=4", *counted)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [
        [json.loads(line) for line in (tmp_path / "n" / f"rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 100  # teacher_student: 25 steps an epoch
    assert [(step, reads) for step, reads, busy in ranks[0] + ranks[1] if reads and not busy] == []
    asked = [[step for step, _, busy in rank if "asked" in busy] for rank in ranks]
    # the policy's steps (33, 67), and 25 steps after the last meeting where it is not asked
    assert asked[0] == asked[1] == [0, 25, 33, 58, 67, 92]
