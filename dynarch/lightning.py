"""dynarch under Lightning: a callback that gives a LightningModule a :class:`dynarch.Session`.

::

    from dynarch.lightning import DynarchCallback
    trainer = Trainer(max_epochs=3, callbacks=[DynarchCallback(policy="grow_then_prune",
                                                               run_dir="runs/mine")])
    trainer.fit(module, loader)

The session is started when ``fit`` starts, with the optimizer Lightning built (its state is
carried through every mutation), and the run's length Lightning estimates. Before each training
batch the policy may change the module; after it, the step's loss is logged; validation metrics
named in ``test_metrics`` become the history's evaluation rows. One device only: more are
refused when ``fit`` starts. Needs ``pip install 'dynarch[lightning]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from dynarch.checkpoint import replay
from dynarch.session import Session
from dynarch.session_state import SessionError

try:  # the unified package first, then the standalone one
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl
    except ImportError as exc:
        raise ImportError(
            "dynarch.lightning needs Lightning: pip install 'dynarch[lightning]'"
        ) from exc

# validation metric (as the LightningModule logs it) -> the history's name
TEST_METRICS = {"val_acc": "accuracy", "val_accuracy": "accuracy", "val_loss": "loss"}


class DynarchCallback(pl.Callback):
    """Grow and prune the LightningModule while Lightning trains it (see the module doc)."""

    def __init__(
        self,
        policy: Any = "grow_then_prune",
        run_dir: str | Path | None = None,
        loss_fn: Callable = F.cross_entropy,
        test_metrics: Mapping[str, str] | None = None,
    ) -> None:
        self.policy, self.run_dir, self.loss_fn = policy, run_dir, loss_fn
        self.test_metrics = dict(TEST_METRICS if test_metrics is None else test_metrics)
        self.session: Session | None = None
        self._resumed: dict[str, Any] | None = None  # the state a resumed fit continues
        self._unwrap: Callable[[], None] = lambda: None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resuming ``fit(ckpt_path=...)``, Lightning loads the module's weights before any
        callback sees the checkpoint; the module's ``on_load_checkpoint`` runs just before,
        so it is wrapped here to give the module the checkpoint's shapes first."""
        self._resumed = None
        if stage != "fit":
            return
        own = pl_module.on_load_checkpoint

        def replay_then_load(checkpoint: dict[str, Any]) -> None:
            state = checkpoint.get("callbacks", {}).get(self.state_key) or None
            if state is not None:
                device = next(pl_module.parameters()).device
                replay(pl_module, state["mutations"], state["example"].to(device))
                self._resumed = state
            own(checkpoint)

        pl_module.on_load_checkpoint = replay_then_load
        self._unwrap = lambda: setattr(pl_module, "on_load_checkpoint", own)

    def state_dict(self) -> dict[str, Any]:
        """The session's part of Lightning's checkpoint (Lightning saves the weights)."""
        return self.session.state_dict(weights=False) if self.session is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to do: :meth:`setup` read the same state before the weights were loaded."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap()
        if trainer.world_size > 1:
            raise SessionError(
                f"DynarchCallback runs on one device; this Trainer has {trainer.world_size} "
                "(devices=1, or dynarch run under torchrun for several)"
            )
        if len(trainer.optimizers) != 1:
            raise SessionError(
                f"DynarchCallback needs one optimizer; configure_optimizers gave "
                f"{len(trainer.optimizers)}"
            )
        self.session = Session(
            pl_module,
            trainer.optimizers[0],
            policy=self.policy,
            total_steps=int(trainer.estimated_stepping_batches),
            loss_fn=self.loss_fn,
            run_dir=self.run_dir,
            steps_per_epoch=max(1, int(trainer.num_training_batches)),
            continued=self._resumed,
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        x, y = batch[0], batch[1]
        self._session().mutate(x, y)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if torch.is_tensor(loss):
            self._session().log(loss=loss)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.session is None or trainer.sanity_checking:
            return
        found = trainer.callback_metrics
        values = {
            f"test_{ours}": found[theirs]
            for theirs, ours in self.test_metrics.items()
            if theirs in found
        }
        if values:
            self.session.log(**values)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.session is not None:
            self.session.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.session is not None and not self.session.closed:
            self.session.__exit__(type(exception), exception, None)

    def _session(self) -> Session:
        if self.session is None:
            raise SessionError("DynarchCallback: the session starts with fit (on_fit_start)")
        return self.session
