"""Built-in policies on a tiny model, driven step by step: the right layers at the right steps."""

from __future__ import annotations

import hydra.utils
import pytest
import torch

import dynarch
from dynarch.controller import apply_mutation
from dynarch.models import vgg_small
from dynarch.policies import (
    AllTargets,
    AtSteps,
    Compose,
    Cycle,
    EveryNSteps,
    Grow,
    PolicyError,
    Prune,
    RoundRobin,
    Schedule,
    ScheduleError,
    TrainState,
)


def drive(policy, steps: int, width: int = 4):
    """Run ``policy`` for ``steps`` steps on vgg_small; returns (step, op, target, k) applied."""
    torch.manual_seed(0)
    model = vgg_small(width=width)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    graph = dynarch.ArchGraph.from_module(model, x)
    initial = {t: graph.group_of(t).width for t in graph.targets()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    applied, params = [], []
    for step in range(steps):
        state = TrainState(
            step,
            step / 10,
            10,
            steps,
            model,
            (x, y),
            loss_fn,
            [],
            [],
            initial,
            sum(p.numel() for p in model.parameters()),
        )
        if step == 0 and hasattr(policy, "check"):
            policy.check(state)
        for m in policy.decide(state):
            apply_mutation(m, model, opt, (x, y), loss_fn)
            applied.append((step, m.op, m.target, m.k))
        params.append(sum(p.numel() for p in model.parameters()))
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return applied, model, params


def test_every_n_steps_round_robin_fraction_of_initial() -> None:
    policy = Grow(
        EveryNSteps(5, start=5, max_times=3), RoundRobin(), fraction_of_initial=0.5, init="random"
    )
    applied, model, _ = drive(policy, 20)
    assert applied == [
        (5, "grow", "features.conv1", 2),
        (10, "grow", "features.conv2", 2),
        (15, "grow", "features.conv3", 4),
    ]
    assert model.features.conv3.out_channels == 12


def test_all_targets_at_steps_with_max_width() -> None:
    policy = Grow(
        AtSteps([2, 4]), AllTargets(exclude=["classifier.fc1"]), k=3, init="zeros", max_width=6
    )
    applied, model, _ = drive(policy, 6)
    assert [(s, t, k) for s, _, t, k in applied] == [
        (2, "features.conv1", 2),
        (2, "features.conv2", 2),  # 4 -> 6 = max_width
    ]
    assert model.features.conv1.out_channels == 6 and model.features.conv3.out_channels == 8


def test_parameter_budget_is_never_exceeded() -> None:
    budget = 2600
    policy = Grow(EveryNSteps(1), AllTargets(), k=4, init="random", max_params=budget)
    applied, _, params = drive(policy, 6)
    assert applied and max(params) <= budget
    assert budget - max(params) < 600  # it used the budget, stopping only when a channel won't fit


def test_budget_below_current_size_fails_up_front() -> None:
    with pytest.raises(PolicyError, match="max_params 100 is below"):
        drive(Grow(EveryNSteps(1), AllTargets(), k=1, max_params=100), 1)


def test_prune_by_ratio_keeps_min_width() -> None:
    policy = Prune(
        AtSteps([1, 2, 3]), AllTargets(targets=["features.conv3"]), ratio=0.5, min_width=3
    )
    applied, model, _ = drive(policy, 4)
    assert [k for *_, k in applied] == [4, 1]  # 8 -> 4 -> 3, then nothing left above min_width
    assert model.features.conv3.out_channels == 3


def test_cycle_alternates_grow_and_prune_phases() -> None:
    grow = Grow(EveryNSteps(2), AllTargets(targets=["features.conv2"]), k=2, init="random")
    prune = Prune(EveryNSteps(2), AllTargets(targets=["features.conv2"]), k=1)
    applied, _, _ = drive(Cycle([{"policy": grow, "steps": 4}, {"policy": prune, "steps": 2}]), 12)
    assert [(s, op) for s, op, *_ in applied] == [
        (0, "grow"),
        (2, "grow"),
        (4, "prune"),
        (6, "grow"),
        (8, "grow"),
        (10, "prune"),
    ]


def test_compose_and_state_dict_round_trip() -> None:
    a = Grow(EveryNSteps(3, max_times=2), RoundRobin(), k=1, init="random")
    b = Prune(AtSteps([4]), AllTargets(targets=["features.conv4"]), k=1)
    applied, _, _ = drive(Compose([a, b]), 8)
    assert [(s, op, t) for s, op, t, _ in applied] == [
        (0, "grow", "features.conv1"),
        (3, "grow", "features.conv2"),
        (4, "prune", "features.conv4"),
    ]
    fresh = Grow(EveryNSteps(3, max_times=2), RoundRobin(), k=1, init="random")
    fresh.load_state_dict(a.state_dict())
    assert fresh.state_dict() == {"when": {"fired": 2}, "where": {"position": 2}}


def test_schedule_checks_and_fires_once() -> None:
    policy = Schedule(
        [
            {"step": 3, "op": "grow", "target": "features.conv2", "k": 2},
            {"epoch": 0.5, "op": "prune", "target": "features.conv3", "k": 1},
        ]
    )
    applied, _, _ = drive(policy, 8)
    assert applied == [(3, "grow", "features.conv2", 2), (5, "prune", "features.conv3", 1)]
    with pytest.raises(ScheduleError, match="unknown target 'features.conv7'"):
        drive(Schedule([{"step": 1, "op": "grow", "target": "features.conv7", "k": 1}]), 2)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"when": None, "where": None}, "exactly one of k"),
        ({"when": None, "where": None, "k": 0}, "k must be a positive integer"),
        ({"when": None, "where": None, "fraction_of_initial": -1}, "fraction_of_initial"),
    ],
)
def test_bad_grow_arguments(kwargs, words) -> None:
    with pytest.raises(PolicyError, match=words):
        Grow(**kwargs)


def test_instantiated_from_config_by_target() -> None:
    policy = hydra.utils.instantiate(
        {
            "_target_": "dynarch.policies.Grow",
            "when": {"_target_": "dynarch.policies.EveryNSteps", "n": 4},
            "where": {"_target_": "dynarch.policies.RoundRobin"},
            "k": 1,
            "init": "random",
        }
    )
    applied, _, _ = drive(policy, 5)
    assert [s for s, *_ in applied] == [0, 4]


def test_loss_plateau_fires_only_after_patience() -> None:
    from dynarch.policies import LossPlateau

    trigger = LossPlateau(patience=3, window=2, min_delta=0.01)
    losses: list[float] = []
    fired = []
    curve = [1.0, 0.8, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    for step, loss in enumerate(curve):
        state = TrainState(step, 0.0, 10, 100, None, (None, None), None, [], losses, {}, 0)
        if trigger.should_act(state)[0]:
            fired.append(step)
        losses.append(loss)
    # best window mean 0.5 first seen at step 5 (losses 0.5, 0.5); fires 3 steps later, then
    # again after another 3 steps of no improvement
    assert fired == [8, 11]
