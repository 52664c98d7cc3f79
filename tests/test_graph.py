"""ArchGraph: nodes and edges of the traced model, and exactly the coupled channel groups."""

from __future__ import annotations

import functools
import json

import networkx as nx
import pytest
import torch
import torchvision
from archs import SelfConcat, ShuffleNetLike, build
from graph_formats import assert_networkx_round_trips, non_scalar_attributes
from torch import nn

import dynarch
from dynarch.errors import DynarchError, UnsupportedOpError
from dynarch.models import wrn
from dynarch.probes import buffers_restored, modes_restored
from dynarch.query import groups_of


@functools.cache
def traced(name: str) -> dynarch.ArchGraph:
    """ArchGraph of a test architecture (read-only: shared by the tests of this file)."""
    if name == "wrn":
        torch.manual_seed(0)
        return dynarch.ArchGraph.from_module(wrn(width=4, depth=10), torch.randn(1, 3, 16, 16))
    return dynarch.ArchGraph.from_module(*build(name))


def _members(group, role=None):
    return {
        (m.module, m.start, m.stop, m.multiplicity)
        for m in group.members
        if role is None or m.role == role
    }


def test_vgg_nodes_edges_and_targets() -> None:
    model, x = build("vgg_small")
    graph = dynarch.ArchGraph.from_module(model, x)
    g = graph.nx
    conv1 = g.nodes["features.conv1"]
    assert conv1["op"] == "Conv2d" and conv1["kernel"] == "3x3" and conv1["stride"] == "1x1"
    assert (conv1["in_channels"], conv1["out_channels"], conv1["params"]) == (3, 8, 8 * 3 * 9)
    assert g.nodes["features.bn1"]["out_channels"] == 8
    assert g.has_edge("features.conv1", "features.bn1")
    assert nx.is_directed_acyclic_graph(g)
    assert graph.targets() == [
        "features.conv1",
        "features.conv2",
        "features.conv3",
        "features.conv4",
        "classifier.fc1",
    ]
    assert graph.group_of("features.conv4").width == 16
    # conv4 -> bn4 -> relu -> pool -> flatten -> fc1: 16 features (4x4) per channel
    assert _members(graph.group_of("features.conv4"), "consumer") == {
        ("classifier.fc1", 0, 256, 16)
    }
    assert g.nodes["features.conv4"]["group"] == "features.conv4"
    assert graph.widths()["classifier.fc1"] == 32


def test_resnet18_residual_group() -> None:
    graph = traced("resnet18")
    group = graph.group_of("layer1.0.conv2")
    assert group.name == "conv1" and group.width == 64
    assert set(group.producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    assert set(group.consumers) == {
        "layer1.0.conv1",
        "layer1.1.conv1",
        "layer2.0.conv1",
        "layer2.0.downsample.0",
    }
    assert {"bn1", "layer1.0.bn2", "layer1.1.bn2"} <= set(group.member_modules())
    assert graph.group_of("layer2.0.downsample.0") is graph.group_of("layer2.0.conv2")
    assert "fc" not in graph.targets()


def test_densenet_concat_offsets() -> None:
    graph = traced("densenet121")
    layer1 = graph.group_of("features.denseblock1.denselayer1.conv2")
    assert layer1.width == 32
    # denselayer1's 32 channels follow the 64 stem channels in every later concatenation
    assert ("features.denseblock1.denselayer2.norm1", 64, 96, 1) in _members(layer1)
    assert ("features.denseblock1.denselayer2.conv1", 64, 96, 1) in _members(layer1, "consumer")
    assert ("features.transition1.conv", 64, 96, 1) in _members(layer1, "consumer")
    stem = graph.group_of("features.conv0")
    assert ("features.denseblock1.denselayer6.norm1", 0, 64, 1) in _members(stem)
    assert "cat_0" in graph.nx


def test_mobilenet_depthwise_is_channelwise_member() -> None:
    graph = traced("mobilenet_v2")
    group = graph.group_of("features.2.conv.0.0")
    roles = {m.module: m.role for m in group.members}
    assert roles["features.2.conv.1.0"] == "channelwise"  # depthwise 3x3
    assert roles["features.2.conv.2"] == "consumer"
    assert "features.2.conv.1.0" not in graph.targets()


def test_channel_shuffle_group_is_marked_unsupported() -> None:
    model = ShuffleNetLike()
    graph = dynarch.ArchGraph.from_module(model, torch.randn(1, 3, 8, 8))
    assert "channelshuffle" in graph.group_of("conv1").unsupported
    assert graph.targets() == ["conv2"]


def _same_graph(a: nx.DiGraph, b: nx.DiGraph) -> None:
    assert set(a.nodes) == set(b.nodes) and set(a.edges) == set(b.edges)
    for n in a.nodes:
        assert a.nodes[n] == b.nodes[n], n


def test_exports_read_back_equal(tmp_path) -> None:
    graph = traced("resnet_small")
    graph.write_graphml(str(tmp_path / "g.graphml"))
    _same_graph(graph.nx, nx.read_graphml(tmp_path / "g.graphml"))
    data = json.loads(graph.to_json())
    assert data == nx.node_link_data(graph.nx, edges="edges")
    _same_graph(graph.nx, nx.node_link_graph(data, edges="edges"))
    assert {g["name"] for g in groups_of(data)} == {g.name for g in graph.groups}


@pytest.mark.parametrize(
    "name", ["vgg_small", "resnet_small", "wrn", "resnet18", "mobilenet_v2", "densenet121"]
)
def test_every_attribute_is_a_scalar_and_groups_are_json_text(name: str) -> None:
    graph = traced(name)
    assert non_scalar_attributes(graph.nx) == []
    assert set(graph.nx.graph) == {"groups"}
    assert json.loads(graph.nx.graph["groups"]) == [g.to_dict() for g in graph.groups]
    assert groups_of(graph.nx) == [g.to_dict() for g in graph.groups]
    assert {d["group"] for _, d in graph.nx.nodes(data=True) if "group" in d} <= set(graph.widths())


def test_networkx_writers_round_trip_a_grown_and_pruned_live_graph(tmp_path) -> None:
    model, x = build("resnet_small")
    dynarch.grow(model, "layer2.0.conv1", 3, example_inputs=x)
    dynarch.prune(model, "layer3.0.conv2", k=2)
    graph = dynarch.ArchGraph.from_module(model)
    assert graph.nx.nodes["layer2.0.conv1"]["out_channels"] == 19
    assert_networkx_round_trips(graph.nx, tmp_path)
    # ArchGraph's own GraphML export: the groups come back as the same text, parsed by groups_of
    graph.write_graphml(str(tmp_path / "a.graphml"))
    assert groups_of(nx.read_graphml(tmp_path / "a.graphml")) == [g.to_dict() for g in graph.groups]


def test_graph_follows_mutations() -> None:
    model, x = build("resnet_small")
    dynarch.grow(model, "layer2.0.conv1", 5, example_inputs=x)
    dynarch.prune(model, "layer3.0.conv2", k=3)
    graph = dynarch.ArchGraph.from_module(model)
    assert graph.nx.nodes["layer2.0.conv1"]["out_channels"] == 21
    assert graph.nx.nodes["layer2.0.bn1"]["out_channels"] == 21
    assert graph.nx.nodes["layer2.0.conv2"]["in_channels"] == 21
    assert graph.group_of("layer3.0.shortcut.conv").width == 29
    assert graph.nx.nodes["fc"]["in_channels"] == 29


def test_concat_of_a_tensor_with_a_function_of_itself_before_a_linear() -> None:
    """cat([x, relu(d(x))]) -> flatten -> linear: x's 8 channels are the first 8 of the cat
    (128 features), d's 16 the next (features 128..384); d produces only its own group."""
    graph = dynarch.ArchGraph.from_module(SelfConcat(), torch.randn(1, 3, 8, 8))
    assert _members(graph.group_of("c")) == {
        ("c", 0, 8, 1),
        ("bn", 0, 8, 1),
        ("d", 0, 8, 1),
        ("fc", 0, 128, 16),
    }
    assert graph.group_of("c").producers == ["c"]
    assert _members(graph.group_of("d")) == {("d", 0, 16, 1), ("fc", 128, 384, 16)}
    assert graph.targets() == ["c", "d"]


class _PadChannels(torch.nn.Module):
    """Pads the channel dimension: the conv's channels no longer start at 0 in the next conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.nn.functional.pad(self.a(x), (0, 0, 0, 0, 1, 1))).mean((2, 3))


class _SumChannels(_PadChannels):
    def __init__(self) -> None:
        super().__init__()
        self.b = torch.nn.Conv2d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).sum(1, keepdim=True)).mean((2, 3))


@pytest.mark.parametrize("model", [_PadChannels, _SumChannels])
def test_ops_that_change_the_channel_count_are_refused(model) -> None:
    """Torch-Pruning takes pad and sum for channel-preserving; growing 'a' through them would
    silently change the function (pad) or fail deep in the surgery (sum)."""
    graph = dynarch.ArchGraph.from_module(model(), torch.randn(1, 3, 4, 4))
    assert "channel" in graph.group_of("a").unsupported
    assert graph.targets() == []


def test_a_tracer_crash_is_one_line_naming_the_model_and_the_op() -> None:
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=4)
    with pytest.raises(UnsupportedOpError) as info:
        dynarch.ArchGraph.from_module(model, torch.randn(1, 3, 16, 16))
    message = str(info.value)
    assert "\n" not in message and "ShuffleNetV2" in message and "op view after" in message
    with pytest.raises(DynarchError, match="Inception3 fails on example inputs of shape"):
        dynarch.ArchGraph.from_module(
            torchvision.models.inception_v3(init_weights=False, aux_logits=False, num_classes=4),
            torch.randn(1, 3, 16, 16),
        )


class _TrainingOnlyHead(nn.Module):
    """GoogLeNet's auxiliary head in small: ``aux`` reads conv1's channels in training only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.aux, self.fc = nn.Linear(6, 4), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        out = self.fc(torch.relu(self.bn(self.conv2(x))).mean((2, 3)))
        return out + self.aux(x.mean((2, 3))) if self.training else out


@pytest.mark.parametrize("init", ["zeros", "gradmax", "gradmax_fanin"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_training_only_branch_is_in_the_group_it_reads(mode: str, init: str) -> None:
    """Torch-Pruning traces in eval mode, where ``aux`` does not run: conv1's group missed it,
    and after growing conv1 the next training step failed (mat1 and mat2 shapes cannot be
    multiplied). The trace follows the training-mode forward when it runs more layers; in
    eval mode a gradient init gives aux no gradient (it was a KeyError), and the taylor
    importance a zero one (an AttributeError)."""
    torch.manual_seed(0)
    model = _TrainingOnlyHead().train(mode == "train")
    x = torch.randn(4, 3, 8, 8)

    def outputs() -> dict[str, torch.Tensor]:
        with torch.no_grad(), buffers_restored(model), modes_restored(model):
            return {m: model.train(m == "train")(x) for m in ("train", "eval")}

    before, running = outputs(), model.bn.running_mean.clone()
    graph = dynarch.ArchGraph.from_module(model, x)
    assert "aux" in graph.group_of("conv1").member_modules()
    assert torch.equal(model.bn.running_mean, running) and model.training == (mode == "train")
    data = (x, torch.arange(4) % 4)
    dynarch.grow(model, "conv1", 2, init, data=data, loss_fn=nn.functional.cross_entropy)
    assert model.aux.in_features == 8
    after = outputs()
    for m in ("train", "eval"):
        assert torch.allclose(after[m], before[m], atol=1e-6), m
    dynarch.prune(model, "conv1", 2, data=data, loss_fn=nn.functional.cross_entropy)
    dynarch.prune(
        model, "conv1", 1, importance="taylor", data=data, loss_fn=nn.functional.cross_entropy
    )
    assert model.aux.in_features == 5 and model.train()(x).shape == (4, 4)
