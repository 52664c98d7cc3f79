"""Initializer options are typed and checked once: a misspelt or mistyped option is one line
naming it (with a "did you mean"), before anything changes or any training starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import dynarch
from dynarch.errors import DynarchError
from dynarch.gradmax import GradMaxOptions
from dynarch.growth_context import GrowthContext, GrowthOptions, NewChannels, parse_options
from dynarch.initializers import _REGISTRY, check_initializer, register_initializer
from dynarch.policies import AllTargets, EveryNSteps, Grow, Prune, Schedule
from dynarch.policies.base import PolicyError
from dynarch.policies.schedule import ScheduleError


def small_net() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    return model, torch.randn(8, 1, 6, 6), torch.arange(8) % 3


def test_a_misspelt_option_is_refused_before_anything_changes() -> None:
    model, x, y = small_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DynarchError) as info:
        dynarch.grow(
            model, "0", 2, init="gradmax", data=(x, y), loss_fn=nn.CrossEntropyLoss(), epsilion=0
        )
    message = str(info.value)
    assert message == ("initializer 'gradmax' has no option 'epsilion' (did you mean: 'epsilon'?)")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_mistyped_option_names_the_key_and_the_type() -> None:
    with pytest.raises(
        DynarchError, match="option 'max_samples' of initializer 'tiny' must be int"
    ):
        check_initializer("tiny", {"max_samples": "many"})
    with pytest.raises(DynarchError, match="option 'bn_gate' of initializer 'random' must be bool"):
        check_initializer("random", {"bn_gate": 0})
    with pytest.raises(DynarchError, match=r"its options: max_samples\)"):
        check_initializer("zeros", {"scale": 2})


def test_options_are_parsed_to_their_types_once_and_frozen() -> None:
    _, options = check_initializer("gradmax", {"epsilon": "1e-6", "scale": 1, "max_samples": 64})
    assert isinstance(options, GradMaxOptions)
    assert options.epsilon == 1e-6 and isinstance(options.epsilon, float)  # YAML's "1e-6"
    assert options.scale == 1.0 and isinstance(options.scale, float)
    assert (options.max_samples, options.norm, options.bn_gamma) == (64, None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.epsilon = 0.0  # type: ignore[misc]
    assert parse_options(GradMaxOptions, options, "gradmax") is options


def test_a_policy_checks_its_init_when_it_is_built() -> None:
    with pytest.raises(PolicyError, match=r"unknown initializer 'gradmx'.*did you mean: 'gradmax'"):
        Grow(EveryNSteps(1), AllTargets(), k=1, init="gradmx")
    with pytest.raises(PolicyError, match="no option 'epsilion'"):
        Grow(EveryNSteps(1), AllTargets(), k=1, init="gradmax", init_options={"epsilion": 0})
    with pytest.raises(PolicyError, match="did you mean: 'taylor'"):
        Prune(EveryNSteps(1), AllTargets(), k=1, importance="tailor")
    entry = {
        "step": 1,
        "op": "grow",
        "target": "0",
        "k": 1,
        "init": "tiny",
        "init_options": {"held_outt": 0.2},
    }
    with pytest.raises(ScheduleError, match=r"schedule\[0\].*no option 'held_outt'"):
        Schedule([entry])


def test_a_user_initializer_declares_its_options() -> None:
    @dataclass(frozen=True)
    class ScaledOptions(GrowthOptions):
        fan_out_value: float = 0.0

    seen: list[GrowthOptions] = []

    @register_initializer("test_scaled", options=ScaledOptions)
    def scaled(ctx: GrowthContext) -> NewChannels:
        seen.append(ctx.options)
        fan_in = {p: torch.ones(ctx.fan_in_shape(p)) for p in ctx.group.producers}
        fan_out = {
            c: torch.full(ctx.fan_out_shape(c), ctx.options.fan_out_value)
            for c in ctx.group.consumers
        }
        return NewChannels(fan_in, fan_out)

    try:
        model, x, _ = small_net()
        dynarch.grow(model, "0", 1, init="test_scaled", example_inputs=x, fan_out_value=0.5)
        assert seen == [ScaledOptions(fan_out_value=0.5)]
        assert float(model[3].weight.detach()[:, 64:].min()) == 0.5
        with pytest.raises(DynarchError, match="did you mean: 'fan_out_value'"):
            dynarch.grow(model, "0", 1, init="test_scaled", fan_out_valu=1.0)
    finally:
        _REGISTRY.pop("test_scaled")
