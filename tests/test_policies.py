"""Built-in policies on a tiny model, driven step by step: the right layers at the right steps."""

from __future__ import annotations

import copy

import hydra.utils
import pytest
import torch
from test_prune import zero_inputs

import dynarch
from dynarch.models import count_params, vgg_small
from dynarch.policies import (
    AllTargets,
    AtFractions,
    AtSteps,
    Compose,
    Cycle,
    Deepen,
    EveryFraction,
    EveryNSteps,
    Grow,
    PolicyError,
    Prune,
    RoundRobin,
    Schedule,
    ScheduleError,
    TrainState,
    count_macs,
)
from dynarch.policies.base import Mutation, next_decision
from dynarch.policies.select import select
from dynarch.session import apply_mutation


def drive(policy, steps: int, width: int = 4, snapshots: list | None = None):
    """Run ``policy`` for ``steps`` steps on vgg_small; returns (step, op, target, k) applied.

    ``snapshots`` (a list) receives, for every mutation, its record, a copy of the model before
    it, the batch, and the eval-mode outputs on it before and after the mutation.
    """
    torch.manual_seed(0)
    model = vgg_small(width=width)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    graph = dynarch.ArchGraph.from_module(model, x)
    initial = {t: graph.group_of(t).width for t in graph.targets()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    applied, params = [], []
    sizes = {"params": count_params(model), "macs": count_macs(model)}
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
            initial_sizes=sizes,
        )
        if step == 0 and hasattr(policy, "check"):
            policy.check(state)
        asked_from = next_decision(policy, state)
        decided = policy.decide(state)
        # the session asks from the step next_step names: a policy never acts before it
        assert not decided or asked_from == step, (step, asked_from, decided)
        for m in decided:
            if snapshots is not None:
                before, out_before = copy.deepcopy(model), _eval_outputs(model, x)
            record = apply_mutation(m, model, opt, (x, y), loss_fn)
            if snapshots is not None:
                snapshots.append((record, before, x, out_before, _eval_outputs(model, x)))
            applied.append((step, m.op, m.target, m.k))
        params.append(sum(p.numel() for p in model.parameters()))
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return applied, model, params


def _eval_outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    training = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(training)
    return out


def test_selectors_name_layers_by_role() -> None:
    model = vgg_small(width=4)
    graph = dynarch.ArchGraph.from_module(model, torch.randn(1, 1, 8, 8))
    state = TrainState(0, 0.0, 10, 10, model, (None, None), None, [], [], {}, 0, _graph=graph)
    assert select("conv[1]", state) == ["features.conv2"]
    assert select("conv[-1]", state) == ["features.conv4"]
    assert select("linear[-1]", state) == ["classifier.fc1"]
    assert select("layer[:2]", state) == ["features.conv1", "features.conv2"]
    assert select("layer[3:]", state) == ["features.conv4", "classifier.fc1"]
    with pytest.raises(PolicyError, match=r"'conv\[4\]' selects no layer .*features.conv4\)"):
        select("conv[4]", state)
    with pytest.raises(
        PolicyError, match=r"bad layer selector 'bn\[0\]'.*one of conv, linear, layer"
    ):
        select("bn[0]", state)
    resnet = dynarch.models.resnet_small(width=4)
    graph = dynarch.ArchGraph.from_module(resnet, torch.randn(1, 1, 8, 8))
    state = TrainState(0, 0.0, 10, 10, resnet, (None, None), None, [], [], {}, 0, _graph=graph)
    with pytest.raises(PolicyError, match="its linear targets: none"):
        select("linear[0]", state)


def test_times_as_fractions_of_the_run() -> None:
    every = Grow(EveryFraction(0.25, max_times=3), AllTargets(["conv[0]"]), k=1, init="zeros")
    assert [s for s, *_ in drive(every, 20)[0]] == [5, 10, 15]
    at = Grow(AtFractions([0.5, 0.9]), AllTargets(["layer[-1]"]), k=1, init="zeros")
    assert [(s, t) for s, _, t, _ in drive(at, 20)[0]] == [(10, "classifier.fc1")] + [
        (18, "classifier.fc1")
    ]
    with pytest.raises(PolicyError, match="every must be a fraction of the run"):
        EveryFraction(2)


def test_schedule_by_role_fraction_of_run_and_of_width() -> None:
    schedule = Schedule(
        [
            {"at": 0.5, "op": "grow", "target": "conv[1]", "fraction": 0.5, "init": "zeros"},
            {"at": 0.75, "op": "deepen", "after": "conv[-1]", "kind": "residual"},
            {"at": 0.8, "op": "prune", "target": "layer[-1]", "fraction": 0.25},
        ]
    )
    applied, model, _ = drive(schedule, 20)
    assert applied == [
        (10, "grow", "features.conv2", 2),  # half of its width 4
        (15, "deepen", "features.conv4", None),
        (16, "prune", "classifier.fc1", 4),  # a quarter of its width 16
    ]
    assert schedule.state_dict()["resolved"][0] == ("features.conv2", 2)
    with pytest.raises(ScheduleError, match=r"schedule\[0\]: at must be a fraction"):
        Schedule([{"at": 1.5, "op": "grow", "target": "conv[0]", "k": 1}])


def test_resolved_layers_survive_a_resume_on_a_changed_model() -> None:
    """A resumed run's model has the layers the run added; ``conv[-1]`` must still mean the
    layer it meant when the run started."""
    policy = Deepen(EveryNSteps(2), after=["conv[-1]"], kind="conv")
    applied, model, _ = drive(policy, 4)
    assert [t for _, _, t, _ in applied] == ["features.conv4", "features.conv4"]
    resumed = Deepen(EveryNSteps(2), after=["conv[-1]"], kind="conv")
    resumed.load_state_dict(policy.state_dict())
    assert resumed.places == ["features.conv4"]


def test_relative_budget_is_a_multiple_of_the_start() -> None:
    policy = Grow(EveryNSteps(1), AllTargets(), k=4, init="random", max_params="1.5x")
    applied, model, params = drive(policy, 6)
    start = count_params(vgg_small(width=4))
    assert applied and max(params) <= 1.5 * start < max(params) + 600
    with pytest.raises(PolicyError, match="multiple of the initial size like '2x'"):
        Grow(EveryNSteps(1), AllTargets(), k=1, max_params="lots")


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
    no_selectors = {"targets": [], "exclude": []}
    assert fresh.state_dict() == {
        "when": {"fired": 2},
        "where": {"position": 2, "resolved": no_selectors},
    }


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


def traced_vgg(width: int):
    model = vgg_small(width=width)
    dynarch.ArchGraph.from_module(model, torch.randn(2, 1, 8, 8))
    return model


def test_fraction_of_current_grows_geometrically() -> None:
    policy = Grow(
        EveryNSteps(1, max_times=3),
        AllTargets(targets=["features.conv1"]),
        fraction_of_current=0.5,
        init="random",
    )
    applied, model, _ = drive(policy, 4)
    assert [k for *_, k in applied] == [2, 3, 5]  # 4 -> 6 -> 9 -> 14
    assert model.features.conv1.out_channels == 14


def _one_more_channel_exceeds(model, counter, limit: int) -> bool:
    """Growing any target by a single channel would break ``limit``: the budget is used up."""
    graph = dynarch.ArchGraph.from_module(model)
    for target in graph.targets():
        twin = copy.deepcopy(model)
        dynarch.grow(twin, target, 1, example_inputs=torch.randn(2, 1, 8, 8))
        if counter(twin) <= limit:
            return False
    return True


@pytest.mark.parametrize("what", ["params", "macs"])
def test_grow_budget_is_used_up_but_never_exceeded(what: str) -> None:
    counter = {"params": count_params, "macs": count_macs}[what]
    start = counter(traced_vgg(4))
    limit = int(start * 2.5)
    policy = Grow(EveryNSteps(1), AllTargets(), k=3, init="random", **{f"max_{what}": limit})
    applied, model, _ = drive(policy, 8)
    assert applied and counter(model) <= limit
    assert _one_more_channel_exceeds(model, counter, limit)


def test_mac_budget_below_current_size_fails_up_front() -> None:
    with pytest.raises(PolicyError, match="max_macs 1000 is below the model's"):
        drive(Grow(EveryNSteps(1), AllTargets(), k=1, max_macs=1000), 1)


@pytest.mark.parametrize("what", ["params", "macs"])
def test_prune_to_a_budget_in_one_go(what: str) -> None:
    counter = {"params": count_params, "macs": count_macs}[what]
    limit = int(counter(traced_vgg(8)) * 0.6)
    targets = ["features.conv1", "features.conv2", "features.conv3", "features.conv4"]
    policy = Prune(AtSteps([1]), AllTargets(targets=targets), **{f"to_{what}": limit})
    applied, model, _ = drive(policy, 3, width=8)
    assert {s for s, *_ in applied} == {1} and counter(model) <= limit
    # the smallest share that fits: pruning one channel fewer in every layer would not fit
    twin = traced_vgg(8)
    for _, _, target, k in applied:
        if k > 1:
            dynarch.prune(twin, target, k=k - 1)
    assert counter(twin) > limit
    shares = {t: k / w for _, _, t, k in applied for w in [8 if t.endswith(("1", "2")) else 16]}
    assert max(shares.values()) - min(shares.values()) < 1 / 8 + 1e-9  # one share for all


def test_prune_to_an_unreachable_budget_stops_at_min_width() -> None:
    model = traced_vgg(4)
    policy = Prune(AtSteps([0]), AllTargets(exclude=["classifier.fc1"]), to_params=10, min_width=2)
    state = TrainState(0, 0.0, 10, 10, model, (None, None), None, [], [], {}, 0)
    decided = policy.decide(state)
    assert [(m.target, m.k) for m in decided] == [
        ("features.conv1", 2),
        ("features.conv2", 2),
        ("features.conv3", 6),
        ("features.conv4", 6),
    ]
    assert all("params <= 10 (not reachable)" in m.reason for m in decided)


@pytest.mark.parametrize("importance", ["magnitude", "l1", "taylor", "bn_scale", "lamp"])
def test_each_importance_removes_a_dead_channel(importance: str) -> None:
    torch.manual_seed(0)
    model = vgg_small(width=8)
    with torch.no_grad():  # channel 5 of conv2 contributes nothing, by every measure
        model.features.conv2.weight[5] = 0
        model.features.bn2.weight[5] = 0
        model.features.bn2.bias[5] = 0
        model.features.conv3.weight[:, 5] = 0
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    dynarch.ArchGraph.from_module(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    policy = Prune(AtSteps([0]), AllTargets(targets=["features.conv2"]), k=1, importance=importance)
    state = TrainState(0, 0.0, 10, 10, model, (x, y), torch.nn.CrossEntropyLoss(), [], [], {}, 0)
    (m,) = policy.decide(state)
    record = apply_mutation(m, model, opt, (x, y), torch.nn.CrossEntropyLoss())
    assert record.indices == [5] and record.method == importance


def test_all_targets_changes_each_channel_group_once() -> None:
    from dynarch.models import resnet_small

    torch.manual_seed(0)
    model = resnet_small(width=4)
    x = torch.randn(4, 1, 8, 8)
    graph = dynarch.ArchGraph.from_module(model, x)
    state = TrainState(0, 0.0, 10, 10, model, (x, None), None, [], [], {}, 0)
    chosen = AllTargets().choose(state)
    groups = [graph.group_of(t).name for t in chosen]
    assert len(groups) == len(set(groups)) == len({g.name for g in graph.groups if not g.at_output})
    assert len(chosen) < len(graph.targets())  # the residual stream has several producers


def test_cycle_grows_to_a_budget_prunes_back_and_regrows() -> None:
    start = count_params(vgg_small(width=4))
    grow = Grow(EveryNSteps(1), AllTargets(), fraction_of_current=0.5, max_params=2 * start)
    prune = Prune(AtSteps([6]), AllTargets(), to_params=start)
    regrow = Grow(EveryNSteps(2), RoundRobin(), k=2, init="gradmax")
    policy = Cycle(
        [
            {"policy": grow, "steps": 6},
            {"policy": prune, "steps": 1},
            {"policy": regrow, "steps": 5},
        ],
        repeat=False,
    )
    snapshots: list = []
    applied, _, params = drive(policy, 12, snapshots=snapshots)
    assert max(params[:6]) <= 2 * start and params[5] > 1.5 * start  # grew to near the budget
    assert params[6] <= start  # pruned back to the start size in one step
    assert params[-1] > params[6]  # and grew again with GradMax
    assert [(s, op) for s, op, *_ in applied if s >= 7] == [(8, "grow"), (10, "grow")]
    # GradMax growth (epsilon fan-in) keeps the outputs; each prune equals the model before it
    # with the pruned channels no longer read by their consumers (vgg_small(width=4) on 8x8:
    # conv4's channels are 2x2 blocks of fc1's inputs)
    consumers = {
        "features.conv1": ("features.conv2", 1),
        "features.conv2": ("features.conv3", 1),
        "features.conv3": ("features.conv4", 1),
        "features.conv4": ("classifier.fc1", 4),
        "classifier.fc1": ("classifier.fc2", 1),
    }
    assert [r.kind for r, *_ in snapshots] == [op for _, op, *_ in applied]
    assert {r.kind for r, *_ in snapshots} == {"grow", "prune"}
    for record, before, x, out_before, out_after in snapshots:
        if record.kind == "grow":
            torch.testing.assert_close(out_after, out_before, atol=1e-5, rtol=0)
            continue
        consumer, block = consumers[record.group]
        zero_inputs(before, [consumer], record.indices, block)
        torch.testing.assert_close(out_after, _eval_outputs(before, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "trigger",
    [
        EveryNSteps(3, start=2, stop=17, max_times=4),
        AtSteps([5, 0, 12]),
        EveryFraction(0.25, max_times=3),
        AtFractions([0.1, 0.5, 0.95]),
    ],
    ids=["every_n", "at_steps", "every_fraction", "at_fractions"],
)
def test_a_trigger_names_its_next_step_exactly(trigger) -> None:
    """next_step at every step is the first step at or after it at which the trigger fires
    (the fires found by asking it at every step, on a copy)."""
    total = 20
    states = [
        TrainState(s, s / 10, 10, total, None, None, None, [], [], {}, 0) for s in range(total)
    ]
    asked = copy.deepcopy(trigger)
    fires = [s for s, state in enumerate(states) if asked.should_act(state)[0]]
    for s, state in enumerate(states):
        assert trigger.next_step(state) == next((f for f in fires if f >= s), None), s
        trigger.should_act(state)


def test_a_subclass_that_decides_otherwise_is_asked_every_step() -> None:
    """next_step speaks for its own class's decide: a Schedule subclass with its own decide
    (acting at other steps than its entries) inherits no promise."""

    class EveryStep(Schedule):
        def decide(self, state):
            return super().decide(state)

    class AlsoAt7(Schedule):
        def decide(self, state):
            extra = [Mutation("grow", "features.conv2", 1, init="zeros")] if state.step == 7 else []
            return super().decide(state) + extra

    entries = [{"step": 3, "op": "grow", "target": "features.conv2", "k": 2}]
    state = TrainState(0, 0.0, 10, 20, None, None, None, [], [], {}, 0)
    assert next_decision(Schedule(entries), state) == 3
    assert next_decision(EveryStep(entries), state) == next_decision(AlsoAt7(entries), state) == 0
    applied, _, _ = drive(AlsoAt7(entries), 9)
    assert [step for step, *_ in applied] == [3, 7]
