"""A residual add onto a concat (``z = cat([a(x), b(x)]); z = z + c(relu(z))``): ``c``'s output
channels join several channel groups, and growing ``c`` grows the group of its last channels
(the concat's last input) with the function kept; GoogLeNet deepened behind its ``maxpool4``
(a concat) is the same structure."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import dynarch
from dynarch.errors import DynarchError
from dynarch.graph import ArchGraph
from dynarch.surgery.deepen import deepen


class ConcatResidual(nn.Module):
    """``z = cat([a(x), b(x)], 1); z = z + c(relu(z))``, then a pooling + linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.c = nn.Conv2d(10, 10, 3, padding=1)
        self.head = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.cat([self.a(x), self.b(x)], 1)
        z = z + self.c(F.relu(z))
        return self.head(F.adaptive_avg_pool2d(z, 1).flatten(1))


class MiniInception(nn.Module):
    """GoogLeNet's shape in small: an inception block (conv-BN-ReLU branches and a pooled
    branch, concatenated), a max-pool, a linear head; deepened behind the pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch1 = _conv_bn_relu(8, 4, 1)
        self.branch2 = nn.Sequential(_conv_bn_relu(8, 3, 1), _conv_bn_relu(3, 5, 3))
        self.branch3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv_bn_relu(8, 2, 1))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(11, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        z = torch.cat([self.branch1(x), self.branch2(x), self.branch3(x)], 1)
        z = self.pool(z)
        return self.head(F.adaptive_avg_pool2d(z, 1).flatten(1))


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU())


def _trained_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm statistics moved off their initial values, so neutral new channels matter."""
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def test_growing_c_grows_the_concats_last_input_and_keeps_the_outputs() -> None:
    torch.manual_seed(0)
    model, x = ConcatResidual().eval(), torch.randn(2, 3, 8, 8)
    graph = ArchGraph.from_module(model, x)
    assert "c" in graph.targets()
    group = graph.group_of("c")
    assert group.name == "b" and group.width == 6 and group.unsupported is None
    assert ("c", "out", "producer", 4, 10) in [
        (m.module, m.side, m.role, m.start, m.stop) for m in group.members
    ]
    for init in ("random", "zeros"):
        grown = copy.deepcopy(model)
        before = grown(x)
        record = dynarch.grow(grown, "c", 2, init=init, example_inputs=x)
        assert record.group == "b" and (record.width_before, record.width_after) == (6, 8)
        assert (grown.a.out_channels, grown.b.out_channels, grown.c.out_channels) == (4, 8, 12)
        assert torch.allclose(grown(x), before, atol=1e-6)


def test_pruning_c_prunes_the_concats_last_input() -> None:
    torch.manual_seed(0)
    model, x = ConcatResidual().eval(), torch.randn(2, 3, 8, 8)
    record = dynarch.prune(model, "c", idxs=[5], example_inputs=x)
    assert record.group == "b" and (record.width_before, record.width_after) == (6, 5)
    assert (model.a.out_channels, model.b.out_channels, model.c.out_channels) == (4, 5, 9)
    assert model.c.in_channels == 9 and model(x).shape == (2, 5)


class InputLast(ConcatResidual):
    """The concat ends with a depthwise conv of the input: no layer produces ``c``'s last
    channels (they are the input's), so ``c`` cannot grow by growing the concat's last input."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.c = nn.Conv2d(7, 7, 3, padding=1)
        self.head = nn.Linear(7, 5)


def test_c_is_refused_with_its_reason_when_no_layer_produces_its_last_channels() -> None:
    torch.manual_seed(0)
    model, x = InputLast().eval(), torch.randn(2, 3, 8, 8)
    graph = ArchGraph.from_module(model, x)
    reason = graph.group_of("c").unsupported
    assert graph.targets() == ["a"] and "no layer produces its last channels" in reason
    assert "c" in {g["name"] for g in json.loads(graph.nx.graph["groups"]) if g["unsupported"]}
    with pytest.raises(DynarchError, match="no layer produces its last channels"):
        dynarch.grow(model, "c", 1, example_inputs=x)
    with pytest.raises(DynarchError, match="no layer produces its last channels"):
        dynarch.prune(model, "c", 1, example_inputs=x)
    assert _every_target_grows_and_prunes(model, x) == ["a"]


def _every_target_grows_and_prunes(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Grow (function kept) and prune every listed target by 1, each on a fresh copy."""
    targets = ArchGraph.from_module(model, x).targets()
    for target in targets:
        grown = copy.deepcopy(model)
        before = grown(x)
        dynarch.grow(grown, target, 1, init="random", example_inputs=x)
        assert torch.allclose(grown(x), before, atol=1e-5), target
        pruned = copy.deepcopy(model)
        dynarch.prune(pruned, target, 1, example_inputs=x)
        assert pruned(x).shape == before.shape, target
    return targets


def test_every_target_of_the_concat_residual_model_grows_and_prunes() -> None:
    torch.manual_seed(0)
    model, x = ConcatResidual().eval(), torch.randn(2, 3, 8, 8)
    assert _every_target_grows_and_prunes(model, x) == ["a", "b", "c"]


def test_every_target_after_a_residual_deepen_behind_a_concat_grows_and_prunes() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = _trained_bn(MiniInception(), x)
    deepen(model, "pool", "residual", example_inputs=x, data=(x, None))
    model.eval()
    targets = _every_target_grows_and_prunes(model, x)
    assert {"pool_deep0.conv1", "pool_deep0.conv2"} <= set(targets)
    group = ArchGraph.from_module(model, x).group_of("pool_deep0.conv2")
    assert group.name == "branch3.1.0" and group.width == 2


def test_googlenet_deepened_behind_maxpool4_grows_its_new_and_coupled_layers() -> None:
    """Not every one of its 59 targets (a minute on 2 cores): the new block's convs and the
    inception blocks on either side of it, the layers whose groups the residual add couples."""
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False)
    x = torch.randn(2, 3, 64, 64)  # small images: seconds on 2 cores
    deepen(model.eval(), "maxpool4", "residual", example_inputs=x)
    targets = ArchGraph.from_module(model, x).targets()
    near = [t for t in targets if t.startswith(("maxpool4_deep0.", "inception4e.branch4"))]
    assert {"maxpool4_deep0.conv1", "maxpool4_deep0.conv2"} <= set(near)
    group = ArchGraph.from_module(model, x).group_of("maxpool4_deep0.conv2")
    assert group.name == "inception4e.branch4.1.conv" and group.width == 128
    before = model(x)
    for target in near:
        dynarch.grow(model, target, 1, init="random", example_inputs=x)
    assert torch.allclose(model(x), before, atol=1e-5)
    assert model.maxpool4_deep0.conv2.out_channels == 834
    dynarch.prune(model, "maxpool4_deep0.conv2", 1, example_inputs=x)
    assert model.inception4e.branch4[1].conv.out_channels == 129
    assert model.maxpool4_deep0.conv2.out_channels == 833 and model(x).shape == before.shape
