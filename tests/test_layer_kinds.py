"""Layer kinds: a user teaches the engine a new layer type in a few lines, and growth, pruning,
the optimizer state and the history all follow it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import dynarch
import dynarch.history
from dynarch.errors import DynarchError
from dynarch.graph import ArchGraph
from dynarch.history_store import HistoryWriter
from dynarch.layer_kinds import (
    CHANNELWISE,
    ChannelwiseKind,
    kind_of,
    register_layer_kind,
    unregister_layer_kind,
)


class ChannelScale(nn.Module):
    """A custom normalisation: a learned scale and shift per channel (unknown to Torch-Pruning)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.num_channels = channels
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.randn(channels) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def scaled_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        ChannelScale(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


@pytest.fixture
def channel_scale_kind() -> Iterator[ChannelwiseKind]:
    """The whole of what a user writes to support ChannelScale."""
    kind = register_layer_kind(
        ChannelwiseKind(
            "channel_scale",
            ChannelScale,
            tensors=("weight", "bias"),
            size_attr="num_channels",
            fill={"weight": 1.0},
        )
    )
    yield kind
    unregister_layer_kind(kind)


def test_an_unknown_layer_type_is_refused_with_its_name() -> None:
    model, x = scaled_net(), torch.randn(2, 1, 6, 6)
    with pytest.raises(DynarchError, match="ChannelScale") as info:
        dynarch.grow(model, "0", 2, init="zeros", example_inputs=x)
    assert "\n" not in str(info.value)
    assert model[0].out_channels == 8 and model[1].weight.shape == (8,)


def test_a_registered_kind_is_grown_pruned_and_recorded(
    channel_scale_kind: ChannelwiseKind, tmp_path: Path
) -> None:
    model, x = scaled_net(), torch.randn(4, 1, 6, 6)
    assert kind_of(model[1]) is channel_scale_kind
    graph = ArchGraph.from_module(model, x)
    group = graph.group_of("0")
    assert [(m.module, m.role) for m in group.members] == [
        ("0", "producer"),
        ("1", CHANNELWISE),
        ("3", "consumer"),
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    momentum = optimizer.state[model[1].weight]["momentum_buffer"].clone()

    with HistoryWriter(tmp_path / "history.db") as history:
        history.write_run({"test": "layer kinds"})
        history.log_architecture(0, graph.to_node_link())
        before = model.eval()(x)
        grown = dynarch.grow(model, "0", 4, init="zeros", optimizer=optimizer)
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)  # function preserved
        # the new entries are the kind's neutral values; its size attribute follows
        torch.testing.assert_close(model[1].weight[8:], torch.ones(4))
        torch.testing.assert_close(model[1].bias[8:], torch.zeros(4))
        assert model[1].num_channels == 12
        state = optimizer.state[model[1].weight]["momentum_buffer"]
        torch.testing.assert_close(state, torch.cat([momentum, torch.zeros(4)]))
        event = history.log_mutation(1, 0.0, grown.to_dict())
        history.log_architecture(1, ArchGraph.from_module(model).to_node_link(), event_id=event)

        weight, bias = model[1].weight.detach().clone(), model[1].bias.detach().clone()
        pruned = dynarch.prune(model, "0", idxs=[1, 5], optimizer=optimizer)
        keep = [i for i in range(12) if i not in (1, 5)]
        torch.testing.assert_close(model[1].weight.detach(), weight[keep])
        torch.testing.assert_close(model[1].bias.detach(), bias[keep])
        assert model[1].num_channels == 10 and model[0].out_channels == 10
        assert model[3].in_channels == 10
        state = optimizer.state[model[1].weight]["momentum_buffer"]
        torch.testing.assert_close(state, torch.cat([momentum, torch.zeros(4)])[keep])
        event = history.log_mutation(2, 0.0, pruned.to_dict())
        history.log_architecture(2, ArchGraph.from_module(model).to_node_link(), event_id=event)
        history.finish("completed")

    with dynarch.history.open(tmp_path) as h:
        widths = {row["step"]: row["0"] for row in h.widths().to_dicts()}
        assert widths == {0: 8, 1: 12, 2: 10}
        assert h.graph_at(1).nodes["1"]["out_channels"] == 12
        assert h.graph_at(2).nodes["1"]["out_channels"] == 10


def test_a_kind_width_constraint_is_checked_before_any_change() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.GroupNorm(4, 8), nn.ReLU(), nn.Conv2d(8, 2, 3))
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(DynarchError, match="GroupNorm with 4 groups cannot have 10 channels"):
        dynarch.grow(model, "0", 2, init="zeros", example_inputs=x)
    assert model[0].out_channels == 8 and model[1].num_channels == 8
    dynarch.grow(model, "0", 4, init="zeros")
    assert model[1].num_channels == 12 and model[1].weight.shape == (12,)


def test_a_depthwise_conv_is_channelwise_and_not_a_target() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 2, 1))
    assert kind_of(model[1]).name == "depthwise_conv"
    assert ArchGraph.from_module(model, torch.randn(1, 1, 5, 5)).targets() == ["0"]
    with pytest.raises(DynarchError, match="not depthwise"):
        dynarch.grow(model, "1", 1, init="zeros")
