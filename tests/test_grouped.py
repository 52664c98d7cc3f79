"""Grouped convolutions (ResNeXt, RegNet) grow and prune per conv group.

A group holding a conv with g groups changes by a multiple of g: k / g new channels at the end
of each block, so every conv group keeps its own inputs and outputs. The outputs after a
growth are checked against a computation that builds each conv group by hand.
"""

import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import dynarch
from dynarch.errors import DynarchError
from dynarch.initializers import NewChannels
from dynarch.models import count_params
from dynarch.policies import (
    AllTargets,
    AtSteps,
    Grow,
    PolicyError,
    Prune,
    Schedule,
    ScheduleError,
    TrainState,
)
from dynarch.session import apply_mutation

GROUPS = 4


class GroupedNet(nn.Module):
    """conv1 -> ReLU -> gconv (4 groups) -> ReLU -> conv3 -> pool -> fc, no norms: the
    function of every channel is easy to write down."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gconv = nn.Conv2d(8, 12, 3, padding=1, groups=GROUPS)
        self.conv3 = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.gconv(F.relu(self.conv1(x))))
        return self.fc(self.conv3(h).mean((2, 3)))


def _net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return GroupedNet().double(), torch.randn(4, 3, 8, 8, dtype=torch.float64)


def _fixed(fan_in: dict, fan_out: dict):
    """An initializer giving these nonzero values (the function then changes, by a known
    amount that the test computes by hand)."""
    return lambda ctx: NewChannels(fan_in=dict(fan_in), fan_out=dict(fan_out))


def _by_block(t: torch.Tensor, dim: int = 0) -> list[torch.Tensor]:
    return list(t.chunk(GROUPS, dim))


def test_groups_of_a_grouped_conv_come_in_blocks() -> None:
    model, x = _net()
    graph = dynarch.ArchGraph.from_module(model, x[:1])
    assert set(graph.targets()) == {"conv1", "gconv", "conv3"}
    assert graph.group_of("conv1").blocks == GROUPS
    assert graph.group_of("gconv").blocks == GROUPS
    assert graph.group_of("conv3").blocks == 1
    assert graph.group_of("conv1").to_dict()["blocks"] == GROUPS
    assert "blocks" not in graph.group_of("conv3").to_dict()  # other graphs as before


def test_grouped_consumer_reads_each_blocks_new_inputs() -> None:
    """conv1 grows by 8: 2 new inputs for each of gconv's groups. Block b of gconv's output is
    conv(cat(old inputs of b, new inputs of b), cat(old weights of b, new columns of b))."""
    model, x = _net()
    k, m = 8, 8 // GROUPS
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    fan_in = torch.randn(k, 3, 3, 3, dtype=torch.float64)
    fan_out = torch.randn(12, m, 3, 3, dtype=torch.float64)
    dynarch.grow(
        model, "conv1", k, init=_fixed({"conv1": fan_in}, {"gconv": fan_out}), example_inputs=x
    )
    h_old = F.relu(F.conv2d(x, old["conv1.weight"], old["conv1.bias"], padding=1))
    h_new = F.relu(F.conv2d(x, fan_in, padding=1))  # new channels' bias is 0
    blocks = [
        F.conv2d(torch.cat([ho, hn], 1), torch.cat([wo, wn], 1), bo, padding=1)  # one conv group
        for ho, hn, wo, wn, bo in zip(
            _by_block(h_old, 1),
            _by_block(h_new, 1),
            _by_block(old["gconv.weight"]),
            _by_block(fan_out),
            _by_block(old["gconv.bias"]),
            strict=True,
        )
    ]
    with torch.no_grad():
        got = model.gconv(F.relu(model.conv1(x)))
    torch.testing.assert_close(got, torch.cat(blocks, 1), rtol=0, atol=1e-12)
    assert model.gconv.weight.shape == (12, 2 + m, 3, 3) and model.gconv.in_channels == 16


def test_grouped_producer_grows_rows_in_each_block() -> None:
    """gconv grows by 4: one new output per conv group, reading that group's inputs only;
    conv3 reads the new outputs through its new columns, in block order."""
    model, x = _net()
    k, m = 4, 1
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    fan_in = torch.randn(k, 2, 3, 3, dtype=torch.float64)  # gconv's weight: 2 inputs per group
    fan_out = torch.randn(6, k, 1, 1, dtype=torch.float64)
    dynarch.grow(
        model, "gconv", k, init=_fixed({"gconv": fan_in}, {"conv3": fan_out}), example_inputs=x
    )
    with torch.no_grad():
        h1 = F.relu(model.conv1(x))
        got_gconv = model.gconv(h1)
        got = model.conv3(F.relu(got_gconv))
    old_out = F.conv2d(h1, old["gconv.weight"], old["gconv.bias"], padding=1, groups=GROUPS)
    new_out = torch.cat(
        [
            F.conv2d(hb, fb, padding=1)
            for hb, fb in zip(_by_block(h1, 1), _by_block(fan_in), strict=True)
        ],
        1,
    )
    expected = F.conv2d(F.relu(old_out), old["conv3.weight"], old["conv3.bias"]) + F.conv2d(
        F.relu(new_out), fan_out
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    for b in range(GROUPS):  # block b of the grown output: its 3 old channels, then its new one
        block = got_gconv[:, b * (3 + m) : (b + 1) * (3 + m)]
        torch.testing.assert_close(
            block[:, :3], old_out[:, b * 3 : (b + 1) * 3], rtol=0, atol=1e-12
        )
        torch.testing.assert_close(block[:, 3:], new_out[:, b : b + 1], rtol=0, atol=1e-12)


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = {p: n for n, p in model.named_parameters()}
    state = {names[p]: s["momentum_buffer"].clone() for p, s in opt.state.items()}
    return params, state


def _trained(model: nn.Module, x: torch.Tensor) -> torch.optim.SGD:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return opt


@pytest.mark.parametrize("target, k", [("conv1", 8), ("gconv", 4)])
def test_grow_then_prune_the_new_channels_gives_back_the_model(target: str, k: int) -> None:
    """The new channels' indices (interleaved, one run per block) pruned again give the same
    parameters and SGD momentum, bit for bit: growth and pruning agree on the layout, and the
    optimizer state of every old entry went to the right place and back."""
    model, x = _net()
    opt = _trained(model, x)
    params, state = _snapshot(model, opt)
    with torch.no_grad():
        before = model(x)
    record = dynarch.grow(
        model, target, k, init="random", epsilon=0.0, optimizer=opt, example_inputs=x
    )
    m = k // GROUPS
    width = record.width_before // GROUPS
    assert record.indices == [b * (width + m) + width + j for b in range(GROUPS) for j in range(m)]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-12)  # zero fan-in
    opt.zero_grad()
    model(x).square().mean().backward()  # the optimizer steps on the grown model
    dynarch.prune(model, target, idxs=record.indices, optimizer=opt)
    after, state_after = _snapshot(model, opt)
    assert after.keys() == params.keys() and state_after.keys() == state.keys()
    for name in params:
        assert torch.equal(after[name], params[name]), name
        assert torch.equal(state_after[name], state[name]), name


def test_prune_removes_the_same_positions_in_every_block() -> None:
    """Pruning conv1 by 4 removes one position per block; the model equals the original with
    those channels of conv1 switched off (rows and bias zero)."""
    model, x = _net()
    reference = GroupedNet().double()
    reference.load_state_dict(model.state_dict())
    record = dynarch.prune(model, "conv1", k=GROUPS, example_inputs=x)
    positions = {i % 2 for i in record.indices}
    assert len(record.indices) == GROUPS and len(positions) == 1
    assert sorted(i // 2 for i in record.indices) == list(range(GROUPS))
    with torch.no_grad():
        reference.conv1.weight[record.indices] = 0
        reference.conv1.bias[record.indices] = 0
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-12)
    assert model.gconv.weight.shape == (12, 1, 3, 3)


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda m, x: dynarch.grow(m, "conv1", 6, example_inputs=x), "a multiple of 4"),
        (lambda m, x: dynarch.prune(m, "gconv", k=3, example_inputs=x), "a multiple of 4"),
        (
            lambda m, x: dynarch.prune(m, "conv1", idxs=[0, 2, 5, 7], example_inputs=x),
            "the same positions in each of the 4 blocks",
        ),
        (
            lambda m, x: dynarch.grow(m, "conv1", 4, init="net2net", example_inputs=x),
            "init 'net2net' cannot grow a group with grouped convolutions (gconv)",
        ),
    ],
)
def test_what_grouped_convs_refuse_is_one_line_and_changes_nothing(call, words: str) -> None:
    model, x = _net()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(DynarchError, match=re.escape(words)) as info:
        call(model, x)
    assert "\n" not in str(info.value)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before)


@pytest.mark.parametrize(
    "name, target",
    [
        ("resnext50_32x4d", "layer2.0.conv1"),  # its consumer conv2 has 32 groups
        ("regnet_y_400mf", "trunk_output.block2.block2-0.f.b.0"),  # grouped, with its SE
    ],
)
def test_torchvision_grouped_nets_grow_and_prune_keeping_outputs_and_state(
    name: str, target: str
) -> None:
    """No group of these is unsupported now; a grouped group grows with the outputs kept and
    back by pruning the new channels, parameters and momentum bit-equal."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = dynarch.ArchGraph.from_module(model, x[:1])
    assert [g.unsupported for g in graph.groups if g.unsupported] == []
    group = graph.group_of(target)
    assert group.blocks > 1
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model(x).square().mean().backward()
    opt.step()
    params, state = _snapshot(model, opt)
    with torch.no_grad():
        before = model(x)
    record = dynarch.grow(model, target, 2 * group.blocks, init="random", optimizer=opt)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    dynarch.prune(model, target, idxs=record.indices, optimizer=opt)
    after, state_after = _snapshot(model, opt)
    for n in params:
        assert torch.equal(after[n], params[n]) and torch.equal(state_after[n], state[n]), n


def _policy_state(model: nn.Module, x: torch.Tensor) -> TrainState:
    dynarch.ArchGraph.from_module(model, x[:1])  # remembers the example inputs
    widths = {"conv1": 8, "gconv": 12, "conv3": 6}
    return TrainState(0, 0.0, 10, 10, model, (x, None), None, [], [], widths, 0)


def test_policies_change_grouped_groups_by_whole_blocks() -> None:
    """A policy's amount is rounded up to whole blocks, a cap (max_width, a budget, min_width)
    down: every decision is one the surgery accepts."""
    model, x = _net()
    state = _policy_state(model, x)
    grow_one = Grow(AtSteps([0]), AllTargets(["conv1", "conv3"]), k=1)
    assert [(m.target, m.k) for m in grow_one.decide(state)] == [("conv1", 4), ("conv3", 1)]
    capped = Grow(AtSteps([0]), AllTargets(["conv1"]), k=1, max_width=15)  # room: 7 -> 4
    assert [(m.target, m.k) for m in capped.decide(state)] == [("conv1", 4)]
    prune_one = Prune(AtSteps([0]), AllTargets(["gconv"]), k=1, min_width=5)  # room: 7 -> 4
    assert [(m.target, m.k) for m in prune_one.decide(state)] == [("gconv", 4)]
    params = count_params(model)
    one_block = 4 * (3 * 9 + 1) + 12 * 1 * 9  # conv1's 4 new rows, gconv's 1 new column each
    budget = Grow(
        AtSteps([0]), AllTargets(["conv1"]), k=40, init="random", max_params=params + 2 * one_block
    )
    [grown] = budget.decide(state)
    assert grown.k == 8
    to_params = Prune(AtSteps([0]), AllTargets(["conv1"]), to_params=params - 1)
    [pruned] = to_params.decide(state)
    assert pruned.k == 4 and count_params(model) == params  # decided on a copy
    for m in (grown, pruned):
        apply_mutation(m, model, None, (x, None), None)
    assert model.conv1.out_channels == 12 and model.gconv.in_channels == 12


def test_a_schedule_entry_not_in_whole_blocks_is_refused_before_training() -> None:
    model, x = _net()
    state = _policy_state(model, x)
    schedule = Schedule([{"step": 1, "op": "grow", "target": "conv1", "k": 6}])
    with pytest.raises(ScheduleError, match=r"schedule\[0\]: 'conv1'.* a multiple of 4, got 6"):
        schedule.check(state)
    by_fraction = Schedule([{"step": 1, "op": "grow", "target": "gconv", "fraction": 0.1}])
    by_fraction.check(state)  # 10 % of 12 is 1 channel: one per block, 4
    assert by_fraction.resolved == [("gconv", 4)]


@pytest.mark.parametrize("init, fallback", [("gradmax", "random"), ("gradmax_fanin", "zeros")])
def test_gradient_inits_fall_back_on_grouped_convs_and_say_so(init: str, fallback: str) -> None:
    """Their statistics (one matrix per layer) assume every output reads every new channel:
    on a group with a grouped conv they grow with their fallback, recorded in the event."""
    model, x = _net()
    with torch.no_grad():
        before = model(x)
    y = torch.arange(4) % 5
    record = dynarch.grow(
        model, "conv1", 4, init=init, data=(x, y), loss_fn=F.cross_entropy, example_inputs=x
    )
    assert record.info["fallback"] == (
        f"{fallback}: grouped convolutions (gconv) are not supported"
    )
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)  # the fallbacks keep it


def test_a_policy_with_net2net_on_grouped_convs_is_refused_before_training() -> None:
    model, x = _net()
    state = _policy_state(model, x)
    with pytest.raises(PolicyError, match=r"init 'net2net' cannot grow a group with grouped"):
        Grow(AtSteps([0]), AllTargets(), k=4, init="net2net").check(state)
    Grow(AtSteps([0]), AllTargets(["conv3"]), k=4, init="net2net").check(state)  # not grouped
    Grow(AtSteps([0]), AllTargets(), k=4, init="gradmax").check(state)  # falls back
    schedule = Schedule([{"step": 1, "op": "grow", "target": "gconv", "k": 4, "init": "net2net"}])
    with pytest.raises(ScheduleError, match=r"schedule\[0\]: init 'net2net' cannot grow"):
        schedule.check(state)
