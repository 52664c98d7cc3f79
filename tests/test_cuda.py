"""What only a GPU can check (marker ``cuda``; skipped without one, run by
``benchmarks/gpu_check.py``): tensors and optimizer state stay on the device through every
mutation, the AMP paths, and no host sync on an ordinary step, as CUDA itself counts them
(``torch.cuda.set_sync_debug_mode``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from test_host_sync import _reads_per_step

from dynarch import deepen, grow, prune
from dynarch.models import vgg_small
from dynarch.session import Session

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _on_cuda() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = vgg_small(width=8).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(16, 1, 8, 8, device="cuda"), torch.arange(16, device="cuda") % 10
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    return model, optimizer, x, y


def _everything_on_cuda(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    assert {t.device.type for t in tensors} == {"cuda"}


@pytest.mark.parametrize("op", ["grow_gradmax", "grow_zeros", "prune_taylor", "deepen"])
def test_a_mutation_keeps_model_and_optimizer_on_the_device(op: str) -> None:
    model, optimizer, x, y = _on_cuda()
    model.eval()
    before = model(x)
    data = (x, y)
    if op.startswith("grow"):
        init = op.removeprefix("grow_")
        grow(model, "features.conv2", 4, init=init, optimizer=optimizer, data=data)
    elif op == "prune_taylor":
        prune(model, "features.conv2", k=2, importance="taylor", optimizer=optimizer, data=data)
    else:
        deepen(model, "features.conv2", "residual", optimizer=optimizer, data=data)
    _everything_on_cuda(model, optimizer)
    if op != "prune_taylor":
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    _everything_on_cuda(model, optimizer)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_session_under_autocast_grows_and_ordinary_steps_do_not_sync(dtype) -> None:
    model, optimizer, _, _ = _on_cuda()
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    session = Session(model, optimizer, "grow_then_prune", total_steps=30)
    synced = []
    for step in range(30):
        x = torch.randn(16, 1, 8, 8, device="cuda")
        y = torch.randint(0, 10, (16,), device="cuda")
        due = session.due
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                session.mutate(x, y)
                with torch.autocast("cuda", dtype):
                    loss = torch.nn.functional.cross_entropy(session.net(x), y)
                session.log(loss=loss)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        if not due and any("synchroniz" in str(w.message) for w in caught):
            synced.append(step)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    session.close()
    assert [e["kind"] for e in session.events] == ["grow", "grow", "prune"]
    assert synced == []
    _everything_on_cuda(model, optimizer)


def test_dynarch_runs_ordinary_steps_on_cuda_read_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    steps = _reads_per_step(
        monkeypatch,
        tmp_path / "run",
        device="cuda",
        amp="bf16",
        channels_last=True,
        progress=False,
    )
    assert [(step, reads) for step, reads, busy in steps if reads and not busy] == []
