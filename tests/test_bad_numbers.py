"""Numbers a mutation cannot use are refused in one line with nothing changed: growth data or
statistics with NaN/Inf (issue 16 item 11), a k too large for memory (item 13); integers of
any kind (NumPy, 0-d tensors) are counts like any other (item 14)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from archs import build
from test_bad_input import _assert_unchanged, _snapshot, _trained
from test_policies import drive

import dynarch
from dynarch.errors import InvalidMutationError
from dynarch.graph import remember_example_inputs
from dynarch.policies import EveryNSteps, Grow, Schedule, ScheduleError
from dynarch.policies.base import PolicyError
from dynarch.surgery import plan

INITS = [
    "random",
    "zeros",
    "gradmax",
    "gradmax_opt",
    "gradmax_fanin",
    "gradmax_fanin_opt",
    "tiny",
    "firefly",
    "net2net",
]
LOSS = torch.nn.functional.cross_entropy


def _poisoned(value: float, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x[n - 1, 0, 3, 3] = value  # the last sample: every sample is checked, not the first
    return x, torch.arange(n) % 10


@pytest.mark.parametrize("init", INITS)
def test_growth_data_with_nan_or_inf_is_refused(init: str) -> None:
    model, x = build("vgg_small")
    opt = _trained(model, x)
    example, snap = remember_example_inputs(model, None), _snapshot(model, opt)
    data = _poisoned(float("nan") if INITS.index(init) % 2 else float("inf"))
    with pytest.raises(InvalidMutationError, match=r"holds 1 NaN or infinite value") as info:
        dynarch.grow(model, "features.conv2", 2, init=init, data=data, loss_fn=LOSS, optimizer=opt)
    assert "\n" not in str(info.value)
    _assert_unchanged(model, opt, snap)
    assert remember_example_inputs(model, None) is example


def test_batches_from_an_iterator_are_checked_and_read_once() -> None:
    model, x = build("vgg_small")
    opt, clean = _trained(model, x), _poisoned(0.0)
    snap = _snapshot(model, opt)
    with pytest.raises(InvalidMutationError, match="NaN or infinite"):
        dynarch.grow(model, "features.conv2", 2, "gradmax", iter([clean, _poisoned(-np.inf)]), LOSS)
    _assert_unchanged(model, opt, snap)
    # read once: every pass (M, BatchNorm statistics, the fan-out gradient after) sees it
    record = dynarch.grow(model, "features.conv2", 2, "gradmax_fanin", iter([clean]), LOSS)
    assert record.info["fan_out_grad_norm"] > 0


@pytest.mark.parametrize(
    ("init", "loss_fn", "words"),
    [
        ("gradmax", LOSS, "gradient matrix M of init 'gradmax'"),
        ("tiny", LOSS, "gradient matrix M of init 'tiny'"),
        ("firefly", LOSS, "gradient matrix M of init 'firefly'"),
        ("random", None, "new_values('features.bn2', 'running_mean') from initializer 'random'"),
        ("net2net", None, "('features.conv3', 'weight') from initializer 'net2net'"),
    ],
)
def test_non_finite_statistics_of_a_diverged_model_are_refused(init, loss_fn, words) -> None:
    """Finite data, a model whose forward overflows: what the statistics give is refused."""
    model, x = build("vgg_small")
    opt = _trained(model, x)
    with torch.no_grad():
        model.features.conv1.weight[0, 0, 0, 0] = float("inf")
        model.features.conv3.weight[0, 0, 0, 0] = float("inf")
    snap = _snapshot(model, opt)
    with pytest.raises(InvalidMutationError, match="is not finite") as info:
        dynarch.grow(model, "features.conv2", 2, init, _poisoned(0.0), loss_fn, optimizer=opt)
    assert words in str(info.value) and "\n" not in str(info.value)
    _assert_unchanged(model, opt, snap)


def test_deepen_and_taylor_pruning_refuse_nan_data() -> None:
    model, x = build("vgg_small")
    opt = _trained(model, x)
    snap, data = _snapshot(model, opt), _poisoned(float("nan"))
    with pytest.raises(InvalidMutationError, match="NaN or infinite"):
        dynarch.deepen(model, "features.relu2", optimizer=opt, data=data)
    with pytest.raises(InvalidMutationError, match="NaN or infinite"):
        dynarch.prune(model, "features.conv2", 2, importance="taylor", data=data, loss_fn=LOSS)
    _assert_unchanged(model, opt, snap)


def test_huge_k_is_refused_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = build("vgg_small")
    opt = torch.optim.Adam(model.parameters())
    model(x).sum().backward()
    opt.step()
    dynarch.ArchGraph.from_module(model, x)
    snap = _snapshot(model, opt)
    assert plan.device_memory(torch.device("cpu")) > 2**20  # this machine's RAM is known
    with pytest.raises(InvalidMutationError, match=r"needs ~.* GB, more than the .* GB"):
        dynarch.grow(model, "features.conv2", 10**12, optimizer=opt)  # ~ 10 PB
    # the bound is the device's memory: a 16 GB machine refuses the k = 10**8 (~150 GB
    # for vgg_small with Adam), naming what it needs and what there is
    monkeypatch.setattr(plan, "device_memory", lambda device: 16 * 10**9)
    with pytest.raises(InvalidMutationError) as info:
        dynarch.grow(model, "features.conv2", 10**8, optimizer=opt)
    assert str(info.value).startswith("growing 'features.conv2' by 100000000 channels needs ~")
    assert "16 GB of memory of cpu" in str(info.value)
    _assert_unchanged(model, opt, snap)


def test_huge_k_in_a_schedule_is_refused_before_training() -> None:
    with pytest.raises(ScheduleError, match=r"schedule\[0\]: growing 'features.conv2' by 10{12}"):
        drive(Schedule([{"step": 1, "op": "grow", "target": "features.conv2", "k": 10**12}]), 2)


@pytest.mark.parametrize("k", [np.int64(2), np.uint8(2), torch.tensor(2), torch.tensor(2).int()])
def test_k_is_an_integer_of_any_kind(k) -> None:
    model, x = build("vgg_small")
    dynarch.ArchGraph.from_module(model, x)
    record = dynarch.grow(model, "features.conv2", k)
    assert type(record.k) is int and record.width_after == 10
    record = dynarch.prune(model, "features.conv2", k)
    assert type(record.k) is int and record.width_after == 8
    record = dynarch.prune(model, "features.conv2", idxs=torch.arange(k))
    assert record.indices == [0, 1]
    record = dynarch.deepen(model, "features.relu2", kernel_size=k + 1)
    assert record.info["kernel_size"] == 3 and type(record.info["kernel_size"]) is int


@pytest.mark.parametrize("k", [True, 2.0, torch.tensor([2]), torch.tensor(2.0), np.bool_(True)])
def test_k_that_is_not_an_integer_is_refused(k) -> None:
    model, x = build("vgg_small")
    dynarch.ArchGraph.from_module(model, x)
    with pytest.raises(InvalidMutationError, match="k must be a positive integer"):
        dynarch.grow(model, "features.conv2", k)
    with pytest.raises(InvalidMutationError, match="must be"):
        dynarch.prune(model, "features.conv2", idxs=[k])


def test_policy_counts_are_integers_of_any_kind() -> None:
    grow = Grow(EveryNSteps(np.int64(3), max_times=torch.tensor(1)), None, k=np.int64(2))
    assert type(grow.amount.k) is int and type(grow.when.n) is int
    assert type(grow.when.max_times) is int
    applied, _, _ = drive(
        Schedule(
            [{"step": np.int64(1), "op": "grow", "k": np.int64(2), "target": "features.conv2"}]
        ),
        2,
    )
    assert applied == [(1, "grow", "features.conv2", 2)] and type(applied[0][3]) is int
    with pytest.raises(PolicyError, match="n must be a positive integer, got 2.0"):
        EveryNSteps(2.0)
