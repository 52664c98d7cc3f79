"""``trainer.channels_last``: growth, pruning and deepening keep the memory format of the
weights they replace (a contiguous tensor in a channels-last model would make every later
step convert it), the function kept where the op keeps it."""

from __future__ import annotations

import pytest
import torch

from dynarch import deepen, grow, prune
from dynarch.models import vgg_small
from dynarch.surgery.plan import memory_format


def _channels_last_model() -> tuple[torch.nn.Module, torch.optim.Optimizer, tuple]:
    torch.manual_seed(0)
    model = vgg_small(width=8).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(8, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.arange(8) % 10
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()  # momentum buffers exist
    return model, optimizer, (x, y)


def _not_channels_last(model: torch.nn.Module, optimizer=None) -> list[str]:
    """The 4-d weights (their gradients, their momentum) not laid out channels-last (one with
    a single input channel, or a 1x1 kernel, is both layouts at once): autograd warns of a
    gradient laid out unlike its parameter, and the optimizer's step would convert them."""
    tensors = {}
    for name, p in model.named_parameters():
        tensors[name] = p
        tensors[f"{name}.grad"] = p.grad
        if optimizer is not None and p in optimizer.state:
            tensors[f"{name} momentum"] = optimizer.state[p]["momentum_buffer"]
    return [
        name
        for name, t in tensors.items()
        if t is not None and t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last)
    ]


@pytest.mark.parametrize("op", ["grow", "prune", "deepen"])
def test_mutations_keep_channels_last(op: str) -> None:
    model, optimizer, (x, y) = _channels_last_model()
    assert _not_channels_last(model, optimizer) == []
    assert memory_format(model.features.conv2.weight) == torch.channels_last
    model.eval()
    before = model(x)
    if op == "grow":
        grow(model, "features.conv2", 3, init="zeros", optimizer=optimizer, example_inputs=x)
    elif op == "prune":
        prune(model, "features.conv2", k=3, optimizer=optimizer, example_inputs=x)
    else:
        deepen(model, "features.conv2", "residual", optimizer=optimizer, example_inputs=x)
    assert _not_channels_last(model, optimizer) == []
    if op != "prune":  # zero fan-out / an identity block: the function is kept
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
    weight = model.features.conv2.weight
    assert weight.shape[0] == {"grow": 11, "prune": 5, "deepen": 8}[op]
    assert optimizer.state[weight]["momentum_buffer"].shape == weight.shape
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()  # trains on: state and parameters fit
