"""dynarch.Session in a plain PyTorch loop: torchvision's resnet18 grows and prunes under the
``grow_then_prune`` preset, ``dynarch query`` reads the run dir, a continuation (through
``state_dict``/``load_state_dict``, and through ``resume=True`` from the run dir) on a freshly
built model is bit-equal to the uninterrupted loop, an LR scheduler keeps its schedule across
a growth, and bad use is one line that changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_cli import child_pythonpath

import dynarch
from dynarch.history import HistoryReader
from dynarch.query_cli import main as query
from dynarch.session_state import SessionError

STEPS = 12  # grow_then_prune: two grows at step 4 (0.334 of the run), a prune at step 8
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "own_loop.py"


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen))
        for _ in range(STEPS)
    ]


def _fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    """The model, optimizer and LR scheduler as a loop builds them at its start."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)


def _train(session: dynarch.Session, scheduler, batches, lrs: list[float]) -> None:
    """The user's loop: from the session's step to ``len(batches)``."""
    for x, y in batches[session.step :]:
        session.mutate(x, y)
        loss = F.cross_entropy(session.net(x), y)
        session.optimizer.zero_grad()
        loss.backward()
        session.optimizer.step()
        scheduler.step()
        lrs.append(session.optimizer.param_groups[0]["lr"])
        session.log(loss=loss)


@dataclass
class Uninterrupted:
    weights: dict[str, torch.Tensor]
    momenta: list[torch.Tensor]
    events: list[dict]
    lrs: list[float]


@pytest.fixture(scope="module")
def uninterrupted() -> Uninterrupted:
    model, optimizer, scheduler = _fresh()
    session = dynarch.Session(model, optimizer, policy="grow_then_prune", total_steps=STEPS)
    lrs: list[float] = []
    _train(session, scheduler, _batches(), lrs)
    session.close()
    momenta = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    return Uninterrupted(model.state_dict(), momenta, session.events, lrs)


def _assert_same(model, optimizer, session, reference: Uninterrupted) -> None:
    got = model.state_dict()
    assert got.keys() == reference.weights.keys()
    for name, tensor in reference.weights.items():
        assert torch.equal(got[name], tensor), name
    momenta = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(momenta, reference.momenta, strict=True))
    assert [(e["step"], e["kind"], e["target"], e["indices"]) for e in session.events] == [
        (e["step"], e["kind"], e["target"], e["indices"]) for e in reference.events
    ]


def test_the_preset_grows_and_prunes_resnet18(uninterrupted: Uninterrupted) -> None:
    kinds = [
        (e["step"], e["kind"], e["width_before"], e["width_after"]) for e in uninterrupted.events
    ]
    assert kinds == [(4, "grow", 64, 96), (4, "grow", 512, 640), (8, "prune", 64, 48)]
    # the scheduler's lr after every step, growth or not: 0.02 halved every 3 steps
    assert uninterrupted.lrs == [0.02 * 0.5 ** ((s + 1) // 3) for s in range(STEPS)]


def test_state_dict_continuation_is_bit_equal(uninterrupted: Uninterrupted) -> None:
    batches = _batches()
    model, optimizer, scheduler = _fresh()
    first = dynarch.Session(model, optimizer, policy="grow_then_prune", total_steps=STEPS)
    _train(first, scheduler, batches[:6], [])  # past the grows, before the prune
    state, scheduler_state = first.state_dict(), scheduler.state_dict()
    model, optimizer, scheduler = _fresh()  # a new process: built as at the start
    second = dynarch.Session(model, optimizer, policy="grow_then_prune", total_steps=STEPS)
    second.load_state_dict(state)
    scheduler.load_state_dict(scheduler_state)
    assert second.step == 6
    _train(second, scheduler, batches, [])
    _assert_same(model, optimizer, second, uninterrupted)


def test_resume_from_the_run_dir_is_bit_equal_and_query_reads_it(
    uninterrupted: Uninterrupted, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir, batches = tmp_path / "mine", _batches()
    model, optimizer, scheduler = _fresh()
    first = dynarch.Session(model, optimizer, total_steps=STEPS, run_dir=run_dir)
    _train(first, scheduler, batches[:6], [])
    first.close()
    scheduler_state = scheduler.state_dict()  # the user's own, saved beside the run
    assert HistoryReader(run_dir / "history.db").run()["status"] == "interrupted"
    model, optimizer, scheduler = _fresh()
    scheduler.load_state_dict(scheduler_state)
    second = dynarch.Session(model, optimizer, total_steps=STEPS, run_dir=run_dir, resume=True)
    _train(second, scheduler, batches, [])
    second.close()
    _assert_same(model, optimizer, second, uninterrupted)
    assert 0 == query([str(run_dir), "events"])
    events = capsys.readouterr().out
    assert events.count(" grow ") == 2 and events.count(" prune ") == 1, events
    assert 0 == query([str(run_dir), "widths"])
    widths = capsys.readouterr().out.splitlines()
    assert len(widths) == 2 + 4  # header, rule, versions 0-3
    assert HistoryReader(run_dir / "history.db").run()["status"] == "completed"


def test_the_example_runs_and_query_plots_its_run(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": child_pythonpath()}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "grow layer1.0.conv1: 64 -> 96" in done.stdout
    assert "prune layer1.1.conv1: 64 -> 48" in done.stdout
    assert 0 == query([str(tmp_path / "run"), "plot", "--out", str(tmp_path / "plots")])
    images = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert "widths.png" in images, images


def test_bad_use_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    model, optimizer, _ = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    held = r"does not hold the model's parameter 'bn1.weight' \(61 in all\)"
    with pytest.raises(SessionError, match=held):
        dynarch.Session(model, torch.optim.SGD([model.conv1.weight], lr=0.1), total_steps=5)
    with pytest.raises(dynarch.DynarchError, match="unknown policy preset 'grow_then_prun'"):
        dynarch.Session(model, optimizer, policy="grow_then_prun", total_steps=5)
    with pytest.raises(SessionError, match="total_steps must be a positive"):
        dynarch.Session(model, optimizer)
    small, small_optimizer = _small(layers=2)
    few = dynarch.Session(small, small_optimizer, total_steps=6)
    with pytest.raises(dynarch.DynarchError, match="'layer\\[2\\]' selects no layer of this"):
        few.mutate(*_batches()[0])  # checked before the first step, not at the prune's
    other, other_opt = torchvision.models.resnet18(num_classes=3), None
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    wrong = dynarch.Session(other, other_opt, total_steps=5)
    wrong.mutate(*_batches()[0])
    session = dynarch.Session(model, optimizer, total_steps=5)
    with pytest.raises(SessionError, match="does not fit this model and optimizer"):
        session.load_state_dict(wrong.state_dict())
    with pytest.raises(SessionError, match="not a session's state_dict"):
        session.load_state_dict({"step": 3})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    session.close()
    with pytest.raises(SessionError, match="mutate after close"):
        session.mutate(*_batches()[0])
    dynarch.Session(model, optimizer, total_steps=5, run_dir=tmp_path).close()
    with pytest.raises(SessionError, match="holds a run already; continue it with resume=True"):
        dynarch.Session(model, optimizer, total_steps=5, run_dir=tmp_path)


def _small(layers: int = 3) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A conv net of ``layers`` convs (BatchNorm after the first) and a linear head."""
    torch.manual_seed(0)
    convs = [torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU()]
    for _ in range(layers - 1):
        convs += [torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU()]
    head = [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)]
    model = torch.nn.Sequential(*convs, *head)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


class Wrapper(torch.nn.Module):
    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def test_net_is_wrapped_anew_after_a_mutation() -> None:
    model, optimizer = _small()
    session = dynarch.Session(model, optimizer, total_steps=6, wrap=Wrapper)
    x, y = _batches()[0]
    nets = []
    for _ in range(6):
        session.mutate(x, y)
        nets.append(session.net)
    assert [e["step"] for e in session.events] == [2, 2, 4]
    assert len({id(n) for n in nets}) == 3  # the first, after the grows, after the prune
    assert all(n.module is model for n in nets)
    assert session.net(x).shape == (8, 10)


def test_an_error_in_the_loop_marks_the_run_failed_and_keeps_its_checkpoint(
    tmp_path: Path,
) -> None:
    model, optimizer = _small()
    x, y = _batches()[0]
    with pytest.raises(ZeroDivisionError):
        with dynarch.Session(model, optimizer, total_steps=6, run_dir=tmp_path) as session:
            for step in range(4):
                session.mutate(x, y)
                if step == 3:
                    raise ZeroDivisionError("division by zero in the user's loop")
    run = HistoryReader(tmp_path / "history.db").run()
    assert (run["status"], run["message"]) == ("failed", "division by zero in the user's loop")
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 3  # written as step 3 began: after the growth's step trained


def test_a_mixed_precision_loop_grows_and_prunes_with_the_scaler_unchanged() -> None:
    """bf16 autocast (CPU here; the same call on CUDA) and a GradScaler around the update:
    mutations happen outside autocast, in the weights' dtype, and the scaler keeps its state
    (one scale for the optimizer, not per parameter)."""
    model, optimizer = _small()
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    session = dynarch.Session(model, optimizer, total_steps=6)
    x, y = _batches()[0]
    for _ in range(6):
        session.mutate(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(session.net(x), y)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        session.log(loss=loss)
    assert [e["kind"] for e in session.events] == ["grow", "grow", "prune"]
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in model.parameters())
    assert scaler.get_scale() == 256.0 and len(session.train_losses) == 6
