"""DynarchCallback: a LightningModule (torchvision's resnet18) grows and prunes under the
``grow_then_prune`` preset with the optimizer Lightning built, the run dir reads as any other,
a ``fit(ckpt_path=...)`` from Lightning's checkpoint is bit-equal to the uninterrupted fit, and
more than one optimizer or device is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from dynarch.history import HistoryReader
from dynarch.session_state import SessionError

pl = pytest.importorskip("pytorch_lightning")
from dynarch.lightning import DynarchCallback  # noqa: E402

BATCHES, EPOCHS = 6, 2  # 12 steps: grows at step 4, a prune at step 8


class Classifier(pl.LightningModule):
    def __init__(self, optimizers: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torchvision.models.resnet18(num_classes=10)
        self.optimizers_wanted = optimizers
        self.automatic_optimization = optimizers == 1  # Lightning: several need manual steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        make = [torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)]
        return make * self.optimizers_wanted


def _loader() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8 * BATCHES, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (8 * BATCHES,), generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


class StopAfterFirstEpoch(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def _fit(callbacks: list, ckpt_path: Path | None = None, val: bool = False) -> Classifier:
    module = Classifier()
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, _loader(), _loader() if val else None, ckpt_path=ckpt_path)
    module.trainer_used = trainer
    return module


def test_lightning_grows_and_prunes_and_writes_the_history(tmp_path: Path) -> None:
    callback = DynarchCallback(policy="grow_then_prune", run_dir=tmp_path / "run")
    module = _fit([callback], val=True)
    events = [
        (e["step"], e["kind"], e["target"], e["width_after"]) for e in callback.session.events
    ]
    assert events == [
        (4, "grow", "net.layer1.0.conv1", 96),
        (4, "grow", "net.layer4.1.conv1", 640),
        (8, "prune", "net.layer1.1.conv1", 48),
    ]
    optimizer = module.trainer_used.optimizers[0]
    assert {id(p) for p in module.parameters()} == {
        id(p) for g in optimizer.param_groups for p in g["params"]
    }  # Lightning's optimizer holds the grown parameters, with their momentum
    grown = module.net.layer1[0].conv1.weight
    assert optimizer.state[grown]["momentum_buffer"].shape == grown.shape == (96, 64, 3, 3)
    history = HistoryReader(tmp_path / "run" / "history.db")
    assert history.run()["status"] == "completed"
    assert [e["kind"] for e in history.events()] == ["grow", "grow", "prune"]
    assert [m["step"] for m in history.metrics(kind="eval")] == [6, 12]


def test_a_fit_resumed_from_lightnings_checkpoint_is_bit_equal(tmp_path: Path) -> None:
    whole = DynarchCallback(run_dir=tmp_path / "whole")
    reference = _fit([whole])
    first = DynarchCallback(run_dir=tmp_path / "resumed")
    part = _fit([first, StopAfterFirstEpoch()])
    part.trainer_used.save_checkpoint(tmp_path / "epoch1.ckpt")
    assert [e["step"] for e in first.session.events] == [4, 4]
    assert HistoryReader(tmp_path / "resumed" / "history.db").run()["status"] == "interrupted"
    second = DynarchCallback(run_dir=tmp_path / "resumed")
    resumed = _fit([second], ckpt_path=tmp_path / "epoch1.ckpt")
    assert [e["kind"] for e in second.session.events] == ["grow", "grow", "prune"]
    got, want = resumed.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the run dir holds the same history as the uninterrupted fit's, and says it completed
    histories = [HistoryReader(tmp_path / name / "history.db") for name in ("whole", "resumed")]
    assert [h.run()["status"] for h in histories] == ["completed", "completed"]
    kept = ("step", "kind", "target", "k", "indices", "width_after", "params_after")
    once, twice = ([{key: e[key] for key in kept} for e in h.events()] for h in histories)
    assert once == twice and len(once) == 3
    rows = [
        [(m["step"], m["kind"], m["loss"], m["params"]) for m in h.metrics()] for h in histories
    ]
    assert rows[0] == rows[1] and {kind for _, kind, _, _ in rows[0]} == {"train"}


def test_more_than_one_optimizer_is_one_line() -> None:
    module = Classifier(optimizers=2)
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[DynarchCallback()], accelerator="cpu", logger=False
    )
    with pytest.raises(SessionError, match="needs one optimizer; configure_optimizers gave 2"):
        trainer.fit(module, _loader())


def test_more_than_one_device_is_refused_when_fit_starts() -> None:
    """A two-process DDP Trainer (built, not launched: the refusal is the callback's first act
    in ``on_fit_start``, before any session exists) is one line naming the device count."""
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    callback = DynarchCallback()
    with pytest.raises(SessionError, match="runs on one device; this Trainer has 2"):
        callback.on_fit_start(trainer, Classifier())
    assert callback.session is None
