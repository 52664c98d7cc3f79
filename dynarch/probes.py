"""Extra passes over a few batches that leave the model as they found it.

Growth statistics, signals and checks run forwards and backwards outside the training step;
these helpers cap the samples they read and restore what such a pass would move (BatchNorm
running statistics, train/eval flags, ``.grad`` fields), so a probe never changes training.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def batches(data: Any, max_samples: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` or an iterable of ``(x, y)`` batches, capped at ``max_samples`` samples."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        data = [data]
    seen = 0
    for x, y in data:
        if seen >= max_samples:
            return
        take = min(len(x), max_samples - seen)
        seen += take
        yield x[:take], y[:take]


@contextmanager
def buffers_restored(model: nn.Module) -> Iterator[None]:
    """Run extra forwards (statistics, probes) without moving BatchNorm running statistics."""
    saved = {n: b.clone() for n, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])


@contextmanager
def modes_restored(model: nn.Module, training: bool | None = None) -> Iterator[None]:
    """Put ``model`` in train (``training=True``) or eval mode for a probe, or leave it, and
    give every submodule back its own flag afterwards (a frozen BatchNorm stays in eval)."""
    modes = {m: m.training for m in model.modules()}
    try:
        if training is not None:
            model.train(training)
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def mean_weight_grads(
    model: nn.Module, weights: list[torch.Tensor], data: Any, loss_fn: Any, max_samples: int
) -> tuple[list[torch.Tensor], int]:
    """The loss gradient of each of ``weights`` averaged over ``data``'s samples (batches
    weighted by size), and the number of samples; the model's ``.grad`` fields and BatchNorm
    running statistics are left as they were."""
    device = weights[0].device
    totals = [torch.zeros_like(w) for w in weights]
    samples = 0
    with buffers_restored(model):
        for x, y in batches(data, max_samples):
            with torch.enable_grad():
                loss = loss_fn(model(x.to(device)), y.to(device))
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for total, grad in zip(totals, grads, strict=True):
                if grad is not None:
                    total += grad.detach() * len(x)
            samples += len(x)
    return [t / max(samples, 1) for t in totals], samples


def seeded_generator(device: torch.device, seed: Any) -> torch.Generator:
    """A generator on ``device``: seeded by ``seed``, or drawn from the global RNG so that
    ``torch.manual_seed`` makes runs repeatable."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    return torch.Generator(device=device).manual_seed(int(seed))
