"""Growth keeps the function and every coupled shape, on every target of every architecture."""

from __future__ import annotations

import pytest
import torch
from archs import build

import dynarch

SMALL = [
    "vgg_small",
    "resnet_small",
    "conv_flatten_linear",
    "resnet18",
    "mobilenet_v2",
    "mobilenet_v2_narrow",
]


def _grow_every_target(
    name: str, inits: list[str], k: int = 2, stride: int = 1, keep: tuple[str, ...] = ()
) -> None:
    """Grow each target in turn (every ``stride``-th one, the last, and those whose name holds
    a ``keep`` word) and check the function after each growth."""
    model, x = build(name)
    with torch.no_grad():
        before = model(x)
    assert before.abs().mean() > 1e-3, "test model output must not be trivially zero"
    graph = dynarch.ArchGraph.from_module(model, x)
    targets = graph.targets()
    assert targets
    chosen = [t for i, t in enumerate(targets) if i % stride == 0 or any(w in t for w in keep)]
    targets = [*chosen, targets[-1]] if chosen[-1] != targets[-1] else chosen
    for i, target in enumerate(targets):
        width = model.get_submodule(target).weight.shape[0]
        record = dynarch.grow(model, target, k, init=inits[i % len(inits)])
        assert (record.width_before, record.width_after) == (width, width + k)
        assert model.get_submodule(target).weight.shape[0] == width + k
        assert record.info["output_change"] <= 1e-5
        with torch.no_grad():
            after = model(x)
        diff = (after - before).abs().max().item()
        assert diff <= 1e-5, f"{name}: output changed by {diff} after growing {target}"
    assert record.params_after > record.params_before


@pytest.mark.parametrize("init", ["random", "zeros"])
@pytest.mark.parametrize("name", SMALL)
def test_growth_preserves_outputs_on_every_target(name: str, init: str) -> None:
    _grow_every_target(name, [init])


def test_growth_preserves_outputs_resnet50_every_other_target() -> None:
    # 53 targets, the bottleneck's kinds repeated 16 times: every other one and the last, the
    # two inits alternating (every target with each init took 30 s of the suite)
    _grow_every_target("resnet50", ["random", "zeros"], stride=2)


def test_growth_preserves_outputs_densenet121_every_target() -> None:
    # 120 targets of a few repeated kinds (dense-layer convs feeding the concatenations,
    # transitions): every third one, every transition and the last, both inits alternating,
    # to keep the suite fast (every target: 3x the time, the same kinds).
    _grow_every_target("densenet121", ["random", "zeros"], k=1, stride=3, keep=("transition",))


def test_grow_inserts_at_concat_offset_and_flatten_blocks() -> None:
    """New channels land right after the group's block in every consumer, not at the end."""
    model, x = build("densenet121")
    dynarch.ArchGraph.from_module(model, x)
    norm = model.features.denseblock1.denselayer2.norm1  # sees cat([conv0 features, layer1 out])
    old_mean = norm.running_mean.clone()
    dynarch.grow(model, "features.denseblock1.denselayer1.conv2", 3)
    # denselayer1 output sits at offset 64 .. 96 of the cat; new entries go to 96 .. 99.
    assert norm.running_mean.shape[0] == old_mean.shape[0] + 3
    assert torch.equal(norm.running_mean[:96], old_mean[:96])
    assert torch.equal(norm.running_mean[96:99], torch.zeros(3))
    assert torch.equal(norm.running_var[96:99], torch.ones(3))

    model, x = build("vgg_small")
    dynarch.ArchGraph.from_module(model, x)
    fc1 = model.classifier.fc1
    old = fc1.weight.detach().clone()  # in = 16 channels * (4 * 4)
    dynarch.grow(model, "features.conv4", 2, init="random", epsilon=0.0)
    assert fc1.weight.shape == (old.shape[0], old.shape[1] + 2 * 16)
    assert torch.equal(fc1.weight[:, : old.shape[1]], old)
    assert model.features.conv4.weight[-2:].abs().sum() == 0  # exactly zero fan-in
    assert fc1.weight[:, old.shape[1] :].abs().sum() > 0  # random fan-out


def test_zeros_init_has_random_fan_in_and_zero_fan_out() -> None:
    model, x = build("resnet_small")
    dynarch.ArchGraph.from_module(model, x)
    conv1, conv2 = model.layer2[0].conv1, model.layer2[0].conv2
    dynarch.grow(model, "layer2.0.conv1", 3, init="zeros")
    assert conv1.weight[-3:].abs().sum() > 0
    assert conv2.weight[:, -3:].abs().sum() == 0
    bn = model.layer2[0].bn1
    assert bn.num_features == conv1.out_channels == conv2.in_channels == 19


def test_depthwise_conv_grows_with_identity_kernels() -> None:
    model, x = build("mobilenet_v2")
    dynarch.ArchGraph.from_module(model, x)
    dw = model.features[2].conv[1][0]
    assert dw.groups == dw.in_channels == dw.out_channels == 96
    dynarch.grow(model, "features.2.conv.0.0", 4)
    assert dw.groups == dw.in_channels == dw.out_channels == 100
    kernel = dw.weight[-4:]
    assert kernel.shape == (4, 1, 3, 3)
    assert torch.equal(kernel[:, 0, 1, 1], torch.ones(4))
    assert kernel.abs().sum() == 4


def test_growth_keeps_dtype_and_device() -> None:
    model, x = build("resnet_small")
    model = model.double()
    dynarch.grow(model, "layer1.0.conv1", 2, example_inputs=x.double())
    for p in model.parameters():
        assert p.dtype == torch.float64
    assert model(x.double()).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_growth_and_pruning_stay_on_cuda() -> None:
    model, x = build("resnet_small")
    model, x = model.cuda(), x.cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).sum().backward()
    opt.step()
    dynarch.grow(model, "layer1.0.conv1", 2, optimizer=opt, example_inputs=x)
    dynarch.prune(model, "layer1.0.conv1", k=3, optimizer=opt)
    for p in model.parameters():
        assert p.is_cuda
        assert opt.state[p]["momentum_buffer"].is_cuda


def test_random_init_fan_in_is_epsilon_times_existing_norm() -> None:
    model, x = build("vgg_small")
    conv = model.features.conv2
    mean_norm = conv.weight.detach().flatten(1).norm(dim=1).mean()
    # bn_gate=False: behind a BatchNorm the near-zero moves to gamma (test_batchnorm_growth.py)
    dynarch.grow(model, "features.conv2", 3, init="random", example_inputs=x, bn_gate=False)
    new_norms = model.features.conv2.weight[-3:].detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(new_norms, torch.full((3,), 1e-8 * float(mean_norm)))
