"""Bad requests: one clear line naming the problem, model and optimizer exactly as before."""

from __future__ import annotations

import pytest
import torch
from archs import ShuffleNetLike, build
from torch import nn

import dynarch
from dynarch.errors import InvalidMutationError, UnknownTargetError, UnsupportedOpError
from dynarch.initializers import NewChannels


class HardCodedView(nn.Module):
    """Its forward hard-codes the flattened size, so growing conv2 breaks it at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).view(-1, 256))


class WithGroupNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.norm(self.conv1(x)))).mean((2, 3))


def _snapshot(model, opt):
    params = {n: (id(p), p.detach().clone()) for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    sizes = {
        n: (getattr(m, "in_channels", None), getattr(m, "out_channels", None))
        for n, m in model.named_modules()
    }
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    return params, buffers, sizes, state, [list(map(id, g["params"])) for g in opt.param_groups]


def _assert_unchanged(model, opt, snap) -> None:
    params, buffers, sizes, state, groups = snap
    now = _snapshot(model, opt)
    assert now[0].keys() == params.keys()
    for n, (pid, value) in params.items():
        assert now[0][n][0] == pid, f"parameter object {n} was replaced"
        assert torch.equal(now[0][n][1], value), n
    for n, b in buffers.items():
        assert torch.equal(now[1][n], b), n
    assert now[2] == sizes and now[4] == groups
    assert now[3].keys() == state.keys()
    for pid, s in state.items():
        for k, v in s.items():
            assert torch.equal(now[3][pid][k], v)


def _trained(model, x):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(x).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    dynarch.ArchGraph.from_module(model, x)  # remember example inputs
    return opt


def _bad_initializer(ctx):
    return NewChannels(fan_in={}, fan_out={})


CASES = [
    # (call, error type, words the message must contain)
    (
        lambda m, o: dynarch.grow(m, "features.conv9", 2, optimizer=o),
        UnknownTargetError,
        ["features.conv9", "did you mean", "features.conv"],
    ),
    (
        lambda m, o: dynarch.grow(m, "features.bn2", 2, optimizer=o),
        UnknownTargetError,
        ["features.bn2", "BatchNorm2d", "conv or linear"],
    ),
    (
        lambda m, o: dynarch.grow(m, "features.conv2", 0, optimizer=o),
        InvalidMutationError,
        ["k must be a positive integer", "0"],
    ),
    (
        lambda m, o: dynarch.grow(m, "features.conv2", -3, optimizer=o),
        InvalidMutationError,
        ["k must be a positive integer", "-3"],
    ),
    (
        lambda m, o: dynarch.grow(m, "features.conv2", 1.5, optimizer=o),
        InvalidMutationError,
        ["k must be a positive integer", "1.5"],
    ),
    (
        lambda m, o: dynarch.prune(m, "features.conv2", k=8, optimizer=o),
        InvalidMutationError,
        ["pruning 8 of 8", "empty"],
    ),
    (
        lambda m, o: dynarch.prune(m, "features.conv2", k=-1, optimizer=o),
        InvalidMutationError,
        ["k must be a positive integer"],
    ),
    (
        lambda m, o: dynarch.prune(m, "features.conv2", idxs=[0, 8], optimizer=o),
        InvalidMutationError,
        ["idxs must be in 0..7"],
    ),
    (
        lambda m, o: dynarch.prune(m, "features.conv2", idxs=[1, 1], optimizer=o),
        InvalidMutationError,
        ["repeated"],
    ),
    (
        lambda m, o: dynarch.prune(m, "features.conv2", k=1, idxs=[1], optimizer=o),
        InvalidMutationError,
        ["exactly one of k"],
    ),
    (
        lambda m, o: dynarch.grow(m, "classifier.fc2", 2, optimizer=o),
        InvalidMutationError,
        ["classifier.fc2", "model's output"],
    ),
    (
        lambda m, o: dynarch.prune(m, "classifier.fc2", k=2, optimizer=o),
        InvalidMutationError,
        ["classifier.fc2", "model's output"],
    ),
    (
        lambda m, o: dynarch.grow(m, "features.conv2", 2, init="gradmaxx", optimizer=o),
        dynarch.DynarchError,
        ["unknown initializer 'gradmaxx'", "random"],
    ),
    (
        lambda m, o: dynarch.grow(m, "features.conv2", 2, init="nowhere.module:fn", optimizer=o),
        dynarch.DynarchError,
        ["cannot import initializer 'nowhere.module:fn'"],
    ),
    (
        lambda m, o: dynarch.prune(m, "features.conv2", k=1, importance="magnitud", optimizer=o),
        dynarch.DynarchError,
        ["unknown importance 'magnitud'", "did you mean", "'magnitude'"],
    ),
    (
        lambda m, o: dynarch.prune(m, "features.conv2", k=1, importance="taylor", optimizer=o),
        InvalidMutationError,
        ["taylor", "needs data"],
    ),
    (
        lambda m, o: dynarch.grow(m, "features.conv2", 2, init=_bad_initializer, optimizer=o),
        dynarch.DynarchError,
        ["initializer gave fan_in['features.conv2']", "expected (2, 8, 3, 3)"],
    ),
]


@pytest.mark.parametrize(("call", "error", "words"), CASES, ids=[str(i) for i in range(len(CASES))])
def test_bad_request_changes_nothing(call, error, words) -> None:
    model, x = build("vgg_small")
    opt = _trained(model, x)
    snap = _snapshot(model, opt)
    with pytest.raises(error) as info:
        call(model, opt)
    message = str(info.value)
    assert "\n" not in message
    for w in words:
        assert w in message
    _assert_unchanged(model, opt, snap)


def test_channel_shuffle_is_refused_naming_the_op() -> None:
    model = ShuffleNetLike().eval()
    x = torch.randn(2, 3, 8, 8)
    opt = _trained(model, x)
    snap = _snapshot(model, opt)
    for call in (
        lambda: dynarch.grow(model, "conv1", 2, optimizer=opt),
        lambda: dynarch.prune(model, "conv1", k=2, optimizer=opt),
    ):
        with pytest.raises(UnsupportedOpError, match="channelshuffle") as info:
            call()
        assert "\n" not in str(info.value) and "'conv1'" in str(info.value)
        _assert_unchanged(model, opt, snap)
    assert "conv1" not in dynarch.ArchGraph.from_module(model).targets()
    dynarch.grow(model, "conv2", 2, optimizer=opt)  # the group after the shuffle is fine
    assert model.conv2.out_channels == 10


def test_failure_after_surgery_rolls_everything_back() -> None:
    model = HardCodedView()
    x = torch.randn(2, 3, 8, 8)
    opt = _trained(model, x)
    snap = _snapshot(model, opt)
    with pytest.raises(UnsupportedOpError, match="forward fails after growing 'conv2'") as info:
        dynarch.grow(model, "conv2", 2, optimizer=opt)
    assert "\n" not in str(info.value)
    _assert_unchanged(model, opt, snap)
    assert model(x).shape == (2, 3)


def test_group_norm_needs_divisible_width() -> None:
    model = WithGroupNorm()
    x = torch.randn(2, 3, 8, 8)
    opt = _trained(model, x)
    snap = _snapshot(model, opt)
    with pytest.raises(InvalidMutationError, match="GroupNorm with 4 groups cannot have 10"):
        dynarch.grow(model, "conv1", 2, optimizer=opt)
    _assert_unchanged(model, opt, snap)
    dynarch.grow(model, "conv1", 4, optimizer=opt)
    assert model.norm.num_channels == 12 and model.norm.weight.shape == (12,)


def test_first_trace_needs_example_inputs() -> None:
    model, _ = build("resnet_small")
    with pytest.raises(UnknownTargetError, match="example_inputs are needed"):
        dynarch.grow(model, "layer1.0.conv1", 2)
