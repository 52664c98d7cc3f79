"""Extra passes over a few batches that leave the model as they found it.

Growth statistics, signals and checks run forwards and backwards outside the training step;
these helpers cap the samples they read and restore what such a pass would move (BatchNorm
running statistics, train/eval flags, ``.grad`` fields), so a probe never changes training.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from dynarch.errors import InvalidMutationError


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
        yield x[:take], None if y is None else y[:take]  # no labels: a deepen's statistics


def batches_to_reread(data: Any, max_samples: int) -> Any:
    """``data`` as batches that every statistics pass reads alike: a batch ``(x, y)`` or a list
    of batches as given; anything else (a DataLoader, a generator) read once into a list of the
    batches of its first ``max_samples`` samples (a generator would be empty on the second
    pass, a shuffling DataLoader would give other samples)."""
    if data is None or isinstance(data, (tuple, list)):
        return data
    return list(batches(data, max_samples))


def check_finite_data(
    data: Any,
    max_samples: int | None = None,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> None:
    """Refuse data with NaN or Inf in its first ``max_samples`` samples (None: all), in one
    line before anything is changed: it would silently become NaN BatchNorm statistics and
    weights. Reads a batch ``(x, y)`` or a list of batches only (an iterator would be used up).
    ``reduce_sum`` counts over all processes, so that every process refuses together."""
    if data is None or not isinstance(data, (tuple, list)):
        return
    bad = 0
    for x, y in batches(data, sys.maxsize if max_samples is None else max_samples):
        for t in (x, y):
            if torch.is_tensor(t) and (t.is_floating_point() or t.is_complex()):
                bad += int((~torch.isfinite(t)).sum())
    if reduce_sum is not None:
        bad = int(reduce_sum(torch.tensor(float(bad), device=device)))
    if bad:
        raise InvalidMutationError(
            f"the data holds {bad} NaN or infinite value(s); statistics on it would poison "
            "the model (nothing was changed)"
        )


def check_finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """``tensor`` when it holds no NaN or Inf, else one line: a statistic of finite data that
    is not finite comes from a model whose outputs or gradients have diverged, and installing
    what it gives would spread NaN to every output."""
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidMutationError(
            f"{what} is not finite (NaN or Inf: has the model diverged?); nothing was changed"
        )
    return tensor


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
def state_restored(model: nn.Module) -> Iterator[None]:
    """A probe forward in training mode leaves BatchNorm statistics and the random state (a
    Dropout's draws, on the CPU and the model's GPUs) as they were: a run that traces more
    often (a resume replaying its mutations) stays bit-equal."""
    devices = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
    with buffers_restored(model), torch.random.fork_rng(devices):
        yield


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
