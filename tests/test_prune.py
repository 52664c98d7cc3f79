"""Pruning equals zeroing the pruned channels' contributions, built by hand in each test."""

from __future__ import annotations

import copy

import pytest
import torch
from archs import build

import dynarch


def zero_inputs(model, consumers: list[str], channels: list[int], block: int = 1) -> None:
    """Reference: the same model where the given consumers no longer read those channels."""
    with torch.no_grad():
        for name in consumers:
            w = model.get_submodule(name).weight
            for c in channels:
                w[:, c * block : (c + 1) * block] = 0


@pytest.mark.parametrize(
    ("target", "idxs", "consumers", "block"),
    [
        ("features.conv2", [1, 5], ["features.conv3"], 1),
        ("features.conv4", [0, 7, 9], ["classifier.fc1"], 16),  # 16 = 4x4 after flatten
        ("classifier.fc1", [3, 4, 30], ["classifier.fc2"], 1),
    ],
)
def test_prune_vgg_equals_zeroed_contributions(target, idxs, consumers, block) -> None:
    model, x = build("vgg_small")
    reference = copy.deepcopy(model)
    zero_inputs(reference, consumers, idxs, block)
    record = dynarch.prune(model, target, idxs=idxs, example_inputs=x)
    assert record.indices == sorted(idxs)
    assert record.width_after == record.width_before - len(idxs)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("arch", "target", "idxs", "consumers"),
    [
        # inner conv of a block: only the block's second conv reads it
        ("resnet_small", "layer2.0.conv1", [0, 9, 15], ["layer2.0.conv2"]),
        # the residual stream: every conv that reads the stream, across skip connections
        (
            "resnet_small",
            "stem.conv",
            [2, 3],
            ["layer1.0.conv1", "layer2.0.conv1", "layer2.0.shortcut.conv"],
        ),
        (
            "resnet18",
            "layer1.1.conv2",
            [0, 10, 63],
            ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"],
        ),
    ],
)
def test_prune_resnet_equals_zeroed_contributions(arch, target, idxs, consumers) -> None:
    model, x = build(arch)
    reference = copy.deepcopy(model)
    zero_inputs(reference, consumers, idxs)
    dynarch.prune(model, target, idxs=idxs, example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)


def test_prune_resnet_stream_shrinks_every_member() -> None:
    model, x = build("resnet18")
    dynarch.prune(model, "conv1", k=4, example_inputs=x)
    for name in ["conv1", "layer1.0.conv2", "layer1.1.conv2"]:
        assert model.get_submodule(name).out_channels == 60
    for name in ["bn1", "layer1.0.bn2", "layer1.1.bn2"]:
        assert model.get_submodule(name).num_features == 60
    for name in ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"]:
        assert model.get_submodule(name).in_channels == 60


def test_magnitude_importance_removes_the_weakest_channel() -> None:
    model, x = build("vgg_small")
    with torch.no_grad():  # channel 3 is tiny everywhere in its group
        model.features.conv2.weight[3] *= 1e-3
        model.features.bn2.weight[3] *= 1e-3
        model.features.conv3.weight[:, 3] *= 1e-3
    record = dynarch.prune(model, "features.conv2", k=1, importance="magnitude", example_inputs=x)
    assert record.indices == [3]
    assert record.method == "magnitude"


def test_taylor_importance_uses_data_and_leaves_gradients_and_statistics_alone() -> None:
    """Its train-mode probe forward used to move every BatchNorm's running statistics and
    ``num_batches_tracked``; now the kept channels' statistics are exactly as before, and no
    gradient is left behind."""
    model, x = build("vgg_small")
    model.train()
    y = torch.arange(x.shape[0]) % 10
    before = {n: b.clone() for n, b in model.named_buffers()}
    assert all(p.grad is None for p in model.parameters())
    record = dynarch.prune(
        model,
        "features.conv1",
        k=2,
        importance="taylor",
        data=(x, y),
        loss_fn=torch.nn.CrossEntropyLoss(),
        example_inputs=x,
    )
    assert len(record.indices) == 2
    assert all(p.grad is None for p in model.parameters())
    kept = [c for c in range(len(before["features.bn1.running_mean"])) if c not in record.indices]
    for name, buffer in model.named_buffers():
        expected = before[name][kept] if name.startswith("features.bn1.running") else before[name]
        assert torch.equal(buffer, expected), name


SPIKY, FLAT, DEAD = 2, 5, 6  # channels of features.conv2 in the model below


def _three_way_model() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """vgg_small whose features.conv2 group ranks differently under each importance.

    Every channel has the same BatchNorm scale and the same features.conv3 column, so only the
    conv2 rows differ: SPIKY has one weight 0.3 (L1 0.3, L2^2 0.09), FLAT all 72 weights 0.01
    (L1 0.72, L2^2 0.0072), the others all 0.05 (L1 3.6, L2^2 0.18). DEAD is like the others but
    its BatchNorm shift is -100: ReLU zeroes it, so its weights get no gradient at all.
    """
    model, x = build("vgg_small")
    f = model.features
    with torch.no_grad():
        f.conv2.weight.fill_(0.05)
        f.conv2.weight[SPIKY] = 0.0
        f.conv2.weight[SPIKY, 0, 1, 1] = 0.3
        f.conv2.weight[FLAT] = 0.01
        f.bn2.weight.fill_(1.0)
        f.bn2.bias.fill_(0.0)
        f.bn2.bias[DEAD] = -100.0
        f.bn2.running_mean.zero_()
        f.bn2.running_var.fill_(1.0)
        f.conv3.weight.copy_(f.conv3.weight[:, :1].expand_as(f.conv3.weight))
    return model, x, torch.arange(len(x)) % 10


def _expected_channel(model: torch.nn.Module, x, y, importance: str) -> int:
    """The channel each importance should remove, scored here over the group's three members
    (conv2's output rows, bn2's scales, conv3's input columns)."""
    model = copy.deepcopy(model)
    f = model.features
    members = [f.conv2.weight, f.bn2.weight, f.conv3.weight.transpose(0, 1)]
    if importance == "taylor":
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads = [f.conv2.weight.grad, f.bn2.weight.grad, f.conv3.weight.grad.transpose(0, 1)]
        terms = [(w * g).detach() for w, g in zip(members, grads, strict=True)]
        power = 1
    else:
        terms = [w.detach() for w in members]
        power = {"magnitude": 2, "l1": 1}[importance]
    scores = sum(t.abs().pow(power).reshape(len(t), -1).sum(1) for t in terms)
    return int(torch.argmin(scores))


@pytest.mark.parametrize(
    ("importance", "channel"), [("magnitude", FLAT), ("l1", SPIKY), ("taylor", DEAD)]
)
def test_importances_remove_the_channel_their_own_score_ranks_last(importance, channel) -> None:
    model, x, y = _three_way_model()
    assert _expected_channel(model, x, y, importance) == channel
    record = dynarch.prune(
        model,
        "features.conv2",
        k=1,
        importance=importance,
        data=(x, y),
        loss_fn=torch.nn.CrossEntropyLoss(),
        example_inputs=x,
    )
    assert record.indices == [channel] and record.method == importance


def test_prune_then_grow_back_keeps_shapes_and_outputs() -> None:
    """Pruned: the outputs of the model whose consumer no longer reads the pruned channels.
    Grown back with zero fan-out: the pruned model's outputs, and it still trains."""
    model, x = build("mobilenet_v2")
    reference = copy.deepcopy(model)
    record = dynarch.prune(model, "features.2.conv.0.0", k=16, example_inputs=x)
    dw = model.features[2].conv[1][0]
    assert dw.in_channels == dw.out_channels == dw.groups == 80
    # expand 1x1 -> BN -> ReLU6 -> depthwise -> BN -> ReLU6 -> project 1x1: only the project
    # conv reads the expanded channels across them
    zero_inputs(reference, ["features.2.conv.2"], record.indices)
    with torch.no_grad():
        pruned = model(x)
        torch.testing.assert_close(pruned, reference(x), atol=1e-5, rtol=0)
    dynarch.grow(model, "features.2.conv.0.0", 16, init="zeros")
    assert dw.in_channels == dw.out_channels == dw.groups == 96
    with torch.no_grad():
        torch.testing.assert_close(model(x), pruned, atol=1e-5, rtol=0)
    model(x).sum().backward()
    assert model.features[2].conv[2].weight.grad[:, 80:].abs().sum() > 0  # new fan-out trains
