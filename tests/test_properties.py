"""Random sequences of grow/prune mutations: the model always runs, the graph always matches it,
and every growth with a function-preserving init leaves the model's outputs as they were."""

from __future__ import annotations

import pytest
import torch
import torchvision
from archs import SelfConcat, randomize_norms
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import dynarch
from dynarch.models import resnet_small, vgg_small

ARCHS = {
    "vgg_small": lambda: vgg_small(num_classes=10, in_channels=3, width=6, image_size=8),
    "resnet_small": lambda: resnet_small(num_classes=10, in_channels=3, width=6),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25),
    "self_concat": SelfConcat,
}
# Inits whose growth must leave the eval-mode outputs unchanged. "random" is zero fan-in only up
# to an epsilon: close to the same function, not equal. (net2net's split is exact too, but only
# up to float32 rounding, which a trained mobilenet amplifies to ~1e-4; test_inits checks it.)
FUNCTION_PRESERVING = ("zeros",)
MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["grow", "prune"]),
        st.integers(0, 10_000),
        st.integers(1, 3),
        st.sampled_from([*FUNCTION_PRESERVING, "random"]),
        st.sampled_from([None, float("nan"), float("inf")]),  # first try growth data with this
    ),
    min_size=20,
    max_size=20,
)


def assert_graph_matches_modules(model) -> None:
    """Every group's width equals the real tensor shapes of every member."""
    graph = dynarch.ArchGraph.from_module(model)
    for group in graph.groups:
        for m in group.members:
            module = model.get_submodule(m.module)
            assert m.stop - m.start == group.width * m.multiplicity, (group.name, m)
            if m.role == "producer":
                assert module.weight.shape[0] == group.width, (group.name, m)
            elif m.role == "consumer":
                assert module.weight.shape[1] >= m.stop, (group.name, m)
            else:
                size = next(
                    t.shape[0]
                    for t in (module.weight, getattr(module, "running_mean", None))
                    if t is not None
                )
                assert size >= m.stop, (group.name, m)
    for name, attrs in graph.nx.nodes(data=True):
        if attrs.get("kind") == "module" and attrs["op"] in ("Conv2d", "Linear"):
            assert attrs["out_channels"] == model.get_submodule(name).weight.shape[0]


def assert_poisoned_data_refused(model, opt, target, k, init, data, value: float) -> None:
    """Growth data holding a NaN or Inf is refused; model and optimizer stay as they were."""
    x, y = data
    x = x.clone()
    x[-1, 0, 0, 0] = value
    params = {n: t.clone() for n, t in model.state_dict().items()}
    state = {p: {n: t.clone() for n, t in s.items()} for p, s in opt.state.items()}
    with pytest.raises(dynarch.DynarchError, match="NaN or infinite"):
        dynarch.grow(model, target, k, init, (x, y), F.cross_entropy, optimizer=opt)
    assert model.state_dict().keys() == params.keys()
    assert all(torch.equal(t, params[n]) for n, t in model.state_dict().items())
    assert opt.state.keys() == state.keys()
    assert all(torch.equal(t, state[p][n]) for p, s in opt.state.items() for n, t in s.items())


def reproducible(examples: int) -> settings:
    """Derandomized so CI is reproducible; no shrinking, so a failure is reported in seconds."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
        phases=[Phase.explicit, Phase.generate],
    )


@pytest.mark.parametrize("arch", list(ARCHS))
@reproducible(examples=4)
@given(mutations=MUTATIONS)
def test_random_mutation_sequences(arch: str, mutations) -> None:
    torch.manual_seed(0)
    model = randomize_norms(ARCHS[arch]())
    x = torch.randn(4, 3, 32 if arch == "mobilenet_v2" else 8, 8 if arch != "mobilenet_v2" else 32)
    y = torch.arange(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    targets = dynarch.ArchGraph.from_module(model, x).targets()
    for kind, pick, k, init, poison in mutations:
        target = targets[pick % len(targets)]
        if kind == "grow":
            model.eval()
            with torch.no_grad():
                before = model(x)
            if poison is not None:
                assert_poisoned_data_refused(model, opt, target, k, init, (x, y), poison)
            dynarch.grow(model, target, k, init=init, optimizer=opt)
            if init in FUNCTION_PRESERVING:
                with torch.no_grad():
                    change = float((model(x) - before).abs().max())
                assert change <= 1e-5, f"{init} growth of {target} changed the outputs by {change}"
        else:
            width = model.get_submodule(target).weight.shape[0]
            if width - k < 1:
                continue
            dynarch.prune(model, target, k=k, optimizer=opt)
        model.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        assert_graph_matches_modules(model)


PLACES = ["stem", "stem.relu", "layer1.0", "layer1.0.relu1", "layer2.0.conv1", "layer3.0"]
DEPTH_MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["deepen", "grow", "prune"]),
        st.integers(0, 10_000),
        st.integers(1, 3),
        st.sampled_from(["conv", "residual"]),
    ),
    min_size=20,
    max_size=20,
)


@reproducible(examples=2)
@given(mutations=DEPTH_MUTATIONS)
def test_random_sequences_mixing_depth_width_and_pruning(mutations) -> None:
    """Deepen (conv or residual, anywhere in a ResNet), grow and prune in any order: every
    deepen and every zeros growth keeps the eval outputs, the graph always matches the
    modules, and the new layers are grown and pruned like the others."""
    torch.manual_seed(0)
    model = randomize_norms(ARCHS["resnet_small"]())
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dynarch.ArchGraph.from_module(model, x)
    for op, pick, k, kind in mutations:
        targets = dynarch.ArchGraph.from_module(model).targets()
        model.eval()
        with torch.no_grad():
            before = model(x)
        if op == "deepen":
            dynarch.deepen(model, PLACES[pick % len(PLACES)], kind, optimizer=opt)
        elif op == "grow":
            dynarch.grow(model, targets[pick % len(targets)], k, init="zeros", optimizer=opt)
        else:
            target = targets[pick % len(targets)]
            if model.get_submodule(target).weight.shape[0] - k < 1:
                continue
            dynarch.prune(model, target, k=k, optimizer=opt)
        if op != "prune":
            with torch.no_grad():
                change = float((model(x) - before).abs().max())
            assert change <= 1e-5, f"{op} changed the outputs by {change}"
        model.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        assert_graph_matches_modules(model)
    assert any(name.endswith("_deep0") for name, _ in model.named_modules())
