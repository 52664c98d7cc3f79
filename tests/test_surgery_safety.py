"""Mutations of a concat of a tensor with a function of itself, and what a mutation that fails
where no check foresaw it leaves behind: one line naming the target, the model as it was."""

from __future__ import annotations

import pytest
import torch
from archs import build
from torch import nn

import dynarch
from dynarch.errors import DynarchError


@pytest.mark.parametrize("target", ["c", "d"])
def test_self_concat_grows_with_every_init_and_prunes(target: str) -> None:
    """Zero fan-out inits (zeros, gradmax) keep the outputs exactly, net2net's split up to
    rounding; pruning leaves shapes that agree (the model runs, the graph matches it)."""
    model, x = build("self_concat")
    y = torch.arange(len(x))
    data, loss = (x, y), nn.functional.cross_entropy
    with torch.no_grad():
        before = model(x)
    width = model.get_submodule(target).out_channels
    for init in ("zeros", "gradmax", "net2net"):
        dynarch.grow(model, target, 2, init=init, data=data, loss_fn=loss, example_inputs=x)
        with torch.no_grad():
            assert (model(x) - before).abs().max() <= 1e-5, init
    assert model.get_submodule(target).out_channels == width + 6
    dynarch.prune(model, target, k=3)
    with torch.no_grad():
        assert model(x).shape == before.shape
    group = dynarch.ArchGraph.from_module(model).group_of(target)
    assert group.width == width + 3
    assert model.fc.in_features == 16 * (model.c.out_channels + model.d.out_channels)


class _ChecksItsWidth(nn.Module):
    """A forward that asserts its own width (as many models do), so any change of 'c' fails in
    the model's code, after the surgery has already swapped the tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.c(x)))
        assert x.shape[1] == 8, f"expects 8 channels, got {x.shape[1]}"
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("mutation", ["grow", "prune"])
def test_a_failure_inside_a_mutation_is_one_line_and_changes_nothing(mutation: str) -> None:
    model, x = _ChecksItsWidth(), torch.randn(2, 3, 4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(model(x), torch.arange(2)).backward()
    opt.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    with pytest.raises(DynarchError) as info:
        if mutation == "grow":
            dynarch.grow(model, "c", 2, init="zeros", optimizer=opt, example_inputs=x)
        else:
            dynarch.prune(model, "c", k=2, optimizer=opt, example_inputs=x)
    message = str(info.value)
    assert "\n" not in message and "'c'" in message and "expects 8 channels" in message
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())
    assert all(
        torch.equal(opt.state[p]["momentum_buffer"], m)
        for p, m in zip(model.parameters(), momentum, strict=True)
    )
    assert model(x).shape == (2, 4)
