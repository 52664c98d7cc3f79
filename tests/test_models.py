"""Behaviour of dynarch.models: output shapes, stable names, adaptation and trainability."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynarch
from dynarch.models import build_model, count_params, resnet_small, vgg_small


def _forward(model: nn.Module, batch: int, channels: int, size: int) -> torch.Tensor:
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, channels, size, size))


def test_vgg_small_on_8x8() -> None:
    model = vgg_small(num_classes=10, in_channels=1, width=4, image_size=8)
    assert _forward(model, 3, 1, 8).shape == (3, 10)
    # Two pools take 8x8 to 2x2: the flatten multiplies channels by 4.
    assert model.classifier.fc1.in_features == 8 * 2 * 2
    assert model.classifier.fc1.out_features == 16
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert names == ["features.conv1", "features.conv2", "features.conv3", "features.conv4"]
    assert [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)] == [4, 4, 8, 8]


def test_vgg_small_on_32x32_rgb() -> None:
    model = vgg_small(num_classes=7, in_channels=3, width=8, image_size=32)
    assert _forward(model, 2, 3, 32).shape == (2, 7)
    assert model.classifier.fc1.in_features == 16 * 8 * 8


def test_vgg_small_skips_pools_that_would_vanish() -> None:
    model = vgg_small(num_classes=3, in_channels=1, width=2, image_size=2)
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 1
    assert _forward(model, 2, 1, 2).shape == (2, 3)
    assert model.classifier.fc1.in_features == 4


def test_resnet_small_shapes_and_shortcuts() -> None:
    model = resnet_small(num_classes=5, in_channels=3, width=4, blocks=(2, 1, 1))
    assert _forward(model, 2, 3, 16).shape == (2, 5)
    assert _forward(model, 2, 3, 8).shape == (2, 5)  # global pooling: any input size
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert isinstance(model.layer2[0].shortcut.conv, nn.Conv2d)
    assert model.layer2[0].shortcut.conv.stride == (2, 2)
    assert model.layer3[0].conv2.out_channels == 16
    assert model.fc.in_features == 16
    with pytest.raises(ValueError, match="3 positive block counts"):
        resnet_small(blocks=(1, 1))


def test_resnet_small_projection_when_width_changes_at_stride_one() -> None:
    model = resnet_small(in_channels=1, width=4)
    stem_out = model.stem.conv.out_channels
    assert stem_out == model.layer1[0].conv1.in_channels == 4
    assert isinstance(model.layer1[0].shortcut, nn.Identity)


@pytest.mark.parametrize(
    ("name", "channels", "size"),
    [("vgg_small", 1, 8), ("vgg_small", 3, 32), ("resnet_small", 1, 8), ("resnet_small", 3, 32)],
)
def test_build_model_builtin(name: str, channels: int, size: int) -> None:
    model = build_model(name, num_classes=10, in_channels=channels, image_size=size, width=4)
    assert _forward(model, 2, channels, size).shape == (2, 10)


def test_build_model_torchvision_resnet18_grayscale() -> None:
    model = build_model("torchvision:resnet18", num_classes=10, in_channels=1, image_size=32)
    assert model.conv1.in_channels == 1
    assert model.conv1.out_channels == 64
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert model.conv1.padding == (3, 3) and model.conv1.bias is None
    assert model.fc.out_features == 10
    assert _forward(model, 2, 1, 32).shape == (2, 10)


def test_build_model_torchvision_nested_first_conv() -> None:
    # mobilenet_v2 keeps its first conv at features.0.0, inside nested Sequentials.
    model = build_model("torchvision:mobilenet_v2", num_classes=4, in_channels=2, image_size=32)
    first = model.features[0][0]
    assert isinstance(first, nn.Conv2d) and first.in_channels == 2 and first.stride == (2, 2)
    assert _forward(model, 2, 2, 32).shape == (2, 4)


def test_build_model_unknown_name_suggests_close_match() -> None:
    with pytest.raises(ValueError) as info:
        build_model("vgg_smal", num_classes=10, in_channels=1, image_size=8)
    assert "unknown model 'vgg_smal'" in str(info.value)
    assert "vgg_small" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="torchvision:resnet18"):
        build_model("torchvision:resnet81", num_classes=10, in_channels=3, image_size=32)


def test_count_params() -> None:
    model = vgg_small(num_classes=10, in_channels=1, width=4, image_size=8)
    convs = 1 * 4 * 9 + 4 * 4 * 9 + 4 * 8 * 9 + 8 * 8 * 9  # bias-free convs
    bns = 2 * (4 + 4 + 8 + 8)
    linears = (32 * 16 + 16) + (16 * 10 + 10)
    assert count_params(model) == convs + bns + linears == 1790


def test_one_sgd_step_reduces_loss_vgg_small() -> None:
    torch.manual_seed(0)
    model = vgg_small(num_classes=10, in_channels=1, width=8, image_size=8)
    x = torch.randn(32, 1, 8, 8)
    y = torch.arange(32) % 10
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    before = loss_fn(model(x), y)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_fn(model(x), y)
    # An untrained 10-way classifier starts near ln(10) ~ 2.30; one step must clearly improve it.
    assert before.item() == pytest.approx(2.30, abs=0.15)
    assert after.item() < before.item() - 0.1


def test_wrn_shapes_and_gradmax_growth_of_a_hidden_conv() -> None:
    import dynarch
    from dynarch.models import wrn

    model = wrn(num_classes=10, in_channels=3, width=8, depth=10).eval()
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == (2, 10)
    assert model.stage3[0].conv2.out_channels == 32  # stages 8, 16, 32
    before = model(x).detach()
    record = dynarch.grow(
        model,
        "stage2.0.conv1",
        4,
        init="gradmax",
        data=(x, torch.arange(2)),
        loss_fn=torch.nn.CrossEntropyLoss(),
    )
    assert "fallback" not in record.info and record.info["fan_in_grad_norm"] > 0
    torch.testing.assert_close(model(x).detach(), before, atol=1e-5, rtol=0)
    assert model.stage2[0].conv2.in_channels == 20


def test_wrn_rejects_a_depth_that_is_not_6n_plus_4() -> None:
    from dynarch.models import wrn

    with pytest.raises(ValueError, match="6n \\+ 4"):
        wrn(depth=27)


def test_pretrained_torchvision_weights_get_a_new_head_and_a_grey_first_conv(
    tmp_path, monkeypatch
) -> None:
    """``model.kwargs.weights=DEFAULT`` used to fail ("got multiple values for keyword
    argument 'weights'"). The weights come from torch.hub's cache (no network here): a file
    written where torchvision looks for resnet18's, so the loaded values are known."""
    import torchvision

    torch.manual_seed(0)
    pretrained = torchvision.models.resnet18().state_dict()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(pretrained, cache / "resnet18-f37072fd.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = build_model("torchvision:resnet18", 10, 1, 32, weights="DEFAULT")
    state = model.state_dict()
    assert torch.equal(state["layer3.1.conv2.weight"], pretrained["layer3.1.conv2.weight"])
    assert torch.equal(state["bn1.running_var"], pretrained["bn1.running_var"])
    assert model.fc.out_features == 10 and model.fc.in_features == 512
    # one grey channel sees what the RGB kernels saw of a grey image (R = G = B)
    torch.testing.assert_close(state["conv1.weight"], pretrained["conv1.weight"].sum(1, True))


def test_timm_models_by_name_grow_and_prune_with_the_function_kept() -> None:
    """``timm:<name>``: timm builds the head and first conv for the data itself; its resnet18d
    (deep stem, avg-pool shortcuts) grows with zero fan-out and prunes; a misspelt name is one
    line with timm's closest names."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = build_model("timm:resnet18d", num_classes=10, in_channels=1, image_size=16).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        before = model(x)
    assert before.shape == (2, 10)
    targets = dynarch.ArchGraph.from_module(model, x).targets()
    assert {"conv1.0", "layer1.0.conv1", "layer4.1.conv1"} <= set(targets)
    dynarch.grow(model, "layer1.0.conv1", 3, "zeros")
    dynarch.grow(model, "conv1.3", 2, "gradmax_fanin", data=(x, torch.tensor([1, 2])),
                 loss_fn=nn.functional.cross_entropy)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    dynarch.prune(model, "layer4.1.conv1", 100)
    assert model.layer4[1].conv1.out_channels == 412 and model(x).shape == (2, 10)
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet18e'; did you mean: .*timm:"):
        build_model("timm:resnet18e", 10, 1, 16)
