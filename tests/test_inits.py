"""gradmax_opt, net2net and firefly: function preserved, Net2Net's split exact, the optimisers
reach the objective they claim on a gradient matrix M computed independently of them."""

from __future__ import annotations

import copy
import functools
import math
import statistics

import pytest
import torch
from archs import build
from torch import nn

import dynarch
from dynarch.gradmax import (
    existing_fan_out_norm,
    gradient_matrix,
    gradmax_init,
    gradmax_opt_init,
    top_singular_vectors,
)
from dynarch.growth_baselines import firefly_init
from dynarch.growth_context import GrowthContext, options_type, parse_options
from dynarch.surgery.plan import resolve


@functools.cache
def _built(arch: str) -> tuple[nn.Module, torch.Tensor]:
    return build(arch)


def _fresh(arch: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model, x = _built(arch)
    return copy.deepcopy(model), x, torch.arange(len(x)) % 10


def _grow(model, x, y, target, k, init, **opts) -> dynarch.MutationRecord:
    return dynarch.grow(
        model,
        target,
        k,
        init=init,
        data=(x, y),
        loss_fn=nn.CrossEntropyLoss(),
        example_inputs=x,
        **opts,
    )


CASES = [
    ("vgg_small", "features.conv2", "gradmax_opt", {}),
    ("vgg_small", "features.conv2", "firefly", {}),
    ("vgg_small", "features.conv2", "net2net", {}),
    ("vgg_small", "features.conv4", "net2net", {"noise": 0.1}),  # conv -> flatten -> linear
    ("vgg_small", "classifier.fc1", "net2net", {"noise": 0.1, "pick": "largest"}),  # bias
    ("resnet_small", "stem.conv", "net2net", {}),  # residual stream: several producers
    ("resnet_small", "stem.conv", "net2net", {"noise": 0.1}),
    ("resnet_small", "layer2.0.conv1", "gradmax_opt", {}),
    ("resnet_small", "layer2.0.conv1", "firefly", {}),
    ("resnet_small", "layer2.0.conv1", "net2net", {"noise": 0.1}),
    ("resnet18", "layer1.0.conv1", "net2net", {}),
    ("resnet18", "layer1.0.conv1", "net2net", {"noise": 0.1}),
    ("resnet18", "layer1.0.conv1", "firefly", {}),
    # features.1.conv.1 both produces and consumes this group (x + conv(x))
    ("mobilenet_v2_narrow", "features.1.conv.1", "net2net", {"noise": 0.3}),
]


@pytest.mark.parametrize("arch,target,init,opts", CASES)
def test_growth_preserves_function(arch: str, target: str, init: str, opts: dict) -> None:
    model, x, y = _fresh(arch)
    with torch.no_grad():
        before = model(x)
    width = model.get_submodule(target).weight.shape[0]
    record = _grow(model, x, y, target, 3, init, seed=0, **opts)
    assert model.get_submodule(target).weight.shape[0] == width + 3
    with torch.no_grad():
        diff = float((model(x) - before).abs().max())
    assert diff <= 1e-5, f"{init} on {arch}:{target} changed the output by {diff}"
    grad_norm = record.info["fan_in_grad_norm"]
    assert isinstance(grad_norm, float) and math.isfinite(grad_norm) and grad_norm > 0


def test_net2net_copies_fan_in_and_norm_entries_and_splits_fan_out() -> None:
    model, x, y = _fresh("vgg_small")
    conv, bn, fc1 = model.features.conv4, model.features.bn4, model.classifier.fc1
    old = {
        "conv": conv.weight.detach().clone(),
        "fc1": fc1.weight.detach().clone(),
        **{
            a: getattr(bn, a).detach().clone()
            for a in ("weight", "bias", "running_mean", "running_var")
        },
    }
    width, k, mult = 16, 3, 16  # fc1 reads 16 channels x (4 x 4) features
    record = _grow(model, x, y, "features.conv4", k, "net2net", seed=3, noise=0.1)
    chosen = record.info["split"]
    assert len(chosen) == k and len(set(chosen)) == k  # without replacement while k <= width
    assert torch.equal(conv.weight[width:].detach(), old["conv"][chosen])
    for attr in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(bn, attr)[width:].detach(), old[attr][chosen]), attr
    new_fc1 = fc1.weight.detach()
    for j, c in enumerate(chosen):
        before = old["fc1"][:, c * mult : (c + 1) * mult]
        kept = new_fc1[:, c * mult : (c + 1) * mult]
        copy_ = new_fc1[:, (width + j) * mult : (width + j + 1) * mult]
        torch.testing.assert_close(kept + copy_, before, atol=1e-6, rtol=0)
        ratio = copy_ / before  # 1/2 - n with n ~ U(-0.1, 0.1), one n per entry
        assert 0.4 - 1e-5 <= float(ratio.min()) and float(ratio.max()) <= 0.6 + 1e-5
        assert float(ratio.std()) > 0.02  # the noise is there, entry by entry
    untouched = [c for c in range(width) if c not in chosen]
    for c in untouched:
        cols = slice(c * mult, (c + 1) * mult)
        assert torch.equal(new_fc1[:, cols], old["fc1"][:, cols])


def test_net2net_noise_zero_halves_exactly_and_largest_picks_by_fan_in_norm() -> None:
    model, x, y = _fresh("vgg_small")
    fc1, fc2 = model.classifier.fc1, model.classifier.fc2
    w1, b1, w2 = (t.detach().clone() for t in (fc1.weight, fc1.bias, fc2.weight))
    record = _grow(model, x, y, "classifier.fc1", 4, "net2net", pick="largest")
    chosen = record.info["split"]
    assert chosen == w1.norm(dim=1).argsort(descending=True)[:4].tolist()
    assert torch.equal(fc1.weight[-4:].detach(), w1[chosen])
    assert torch.equal(fc1.bias[-4:].detach(), b1[chosen])
    assert torch.equal(fc2.weight[:, -4:].detach(), w2[:, chosen] * 0.5)
    assert torch.equal(fc2.weight[:, chosen].detach(), w2[:, chosen] * 0.5)


def test_net2net_more_channels_than_width_shares_fan_out_between_all_copies() -> None:
    model, x = build("conv_flatten_linear")  # conv2 has 5 channels, fc1 reads 5 x (4 x 4)
    y = torch.arange(len(x)) % 4
    with torch.no_grad():
        before = model(x)
    old = model.fc1.weight.detach().clone()
    record = _grow(model, x, y, "conv2", 12, "net2net", seed=1, noise=0.2)
    chosen = record.info["split"]
    assert sorted(set(chosen)) == list(range(5))  # every channel before any repeats
    assert sorted(chosen.count(c) for c in range(5)) == [2, 2, 2, 3, 3]
    with torch.no_grad():
        assert float((model(x) - before).abs().max()) <= 1e-5
    new = model.fc1.weight.detach()
    for c in range(5):
        total = new[:, c * 16 : (c + 1) * 16].clone()
        for j in (j for j, cj in enumerate(chosen) if cj == c):
            total += new[:, (5 + j) * 16 : (6 + j) * 16]
        torch.testing.assert_close(total, old[:, c * 16 : (c + 1) * 16], atol=1e-6, rtol=0)


def test_net2net_copies_depthwise_kernels() -> None:
    model, x, y = _fresh("mobilenet_v2")
    dw = model.features[2].conv[1][0]
    old = dw.weight.detach().clone()
    with torch.no_grad():
        before = model(x)
    record = _grow(model, x, y, "features.2.conv.0.0", 2, "net2net", seed=0)
    assert torch.equal(dw.weight[-2:].detach(), old[record.info["split"]])
    with torch.no_grad():
        assert float((model(x) - before).abs().max()) <= 1e-5


# -- the optimisers against an M computed here -------------------------------------------------


def _conv_conv_context(k: int, init=gradmax_opt_init, **options) -> GrowthContext:
    """A conv -> conv model's growth context, with ``options`` parsed for ``init``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 10, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 10
    group, _, modules = resolve(model, "0", x)
    parsed = parse_options(options_type(init), options, "test")
    return GrowthContext(model, group, k, modules, (x, y), nn.CrossEntropyLoss(), parsed)


def _columns(ctx: GrowthContext, fan_out: torch.Tensor) -> torch.Tensor:
    """(rows like M, k) from a consumer's (out, k, kh, kw) fan-out slice."""
    return fan_out.movedim(1, -1).reshape(-1, ctx.k)


def _objective(cols: torch.Tensor, m: torch.Tensor) -> float:
    return float((cols.T @ m).norm())


def _random_objectives(m: torch.Tensor, k: int, norm: float, n: int = 50) -> list[float]:
    gen = torch.Generator().manual_seed(123)
    out = []
    for _ in range(n):
        r = torch.randn(m.shape[0], k, generator=gen)
        out.append(_objective(r / r.norm(dim=0) * norm, m))
    return out


@pytest.mark.parametrize("k", [2, 3])
def test_gradmax_opt_reaches_the_gradmax_objective(k: int) -> None:
    ctx = _conv_conv_context(k)
    m = gradient_matrix(ctx).matrix
    norm = 0.5 * existing_fan_out_norm(ctx)
    _, s = top_singular_vectors(m, k)
    gradmax = gradmax_init(ctx).info["fan_in_grad_norm"]

    new = gradmax_opt_init(_conv_conv_context(k, seed=0))
    cols = _columns(ctx, new.fan_out["2"])
    torch.testing.assert_close(cols.norm(dim=0), torch.full((k,), norm), rtol=1e-5, atol=0)
    achieved = _objective(cols, m)
    assert new.info["fan_in_grad_norm"] == pytest.approx(achieved, rel=1e-5)
    assert new.info["steps"] == 100
    # measured: 1.016 (k=2) and 1.123 (k=3) x GradMax, i.e. the per-column optimum
    # sqrt(k) sigma_1 norm: with one norm per column, every column goes to the top singular
    # vector, which beats GradMax's orthogonal columns on this objective
    assert achieved >= 0.98 * gradmax
    assert achieved <= math.sqrt(k) * float(s[0]) * norm * (1 + 1e-5)
    cosines = (cols.T @ cols / norm**2).abs()
    assert float(cosines.min()) > 0.99  # ... so the k new units are (anti)parallel copies
    assert achieved >= 2 * statistics.median(_random_objectives(m, k, norm))  # measured 6x

    orth = gradmax_opt_init(_conv_conv_context(k, seed=0, orthogonal=True))
    cols = _columns(ctx, orth.fan_out["2"])
    torch.testing.assert_close(cols.T @ cols, norm**2 * torch.eye(k), atol=1e-5 * norm**2, rtol=0)
    assert 0.98 * gradmax <= _objective(cols, m) <= gradmax * (1 + 1e-4)  # measured 1.00000


def test_firefly_improves_on_its_random_candidates() -> None:
    k = 3
    ctx = _conv_conv_context(k)
    m = gradient_matrix(ctx).matrix
    norm = 0.5 * existing_fan_out_norm(ctx)
    _, s = top_singular_vectors(m, k)
    mean_random = statistics.mean(_random_objectives(m, k, norm))

    new = firefly_init(_conv_conv_context(k, firefly_init, seed=0))
    cols = _columns(ctx, new.fan_out["2"])
    torch.testing.assert_close(cols.norm(dim=0), torch.full((k,), norm), rtol=1e-5, atol=0)
    achieved = _objective(cols, m)
    assert new.info["candidates"] == 4 * k
    assert new.info["fan_in_grad_norm"] == pytest.approx(achieved, rel=1e-5)
    assert achieved >= new.info["start_fan_in_grad_norm"]  # the best candidates it drew
    assert achieved <= math.sqrt(k) * float(s[0]) * norm * (1 + 1e-5)
    # Measured over 20 seeds: picking the best 3 of 12 random candidates alone (steps=0) gives
    # 1.07-1.9x the mean random objective, 10 ascent steps give 5.7x. 3x needs the ascent.
    assert achieved >= 3 * mean_random
    no_ascent = firefly_init(_conv_conv_context(k, firefly_init, seed=0, steps=0))
    assert no_ascent.info["fan_in_grad_norm"] < 3 * mean_random


@pytest.mark.parametrize(
    "arch,target", [("vgg_small", "features.conv4"), ("resnet_small", "stem.conv")]
)
def test_net2net_reports_the_true_fan_in_gradient_of_the_copies(arch: str, target: str) -> None:
    """A copy behaves like its original and gets half its fan-out, so half its gradient: checked
    by autograd on the grown model, over every producer of the group."""
    model, x, y = _fresh(arch)
    record = _grow(model, x, y, target, 3, "net2net", seed=0)
    producers = [model.get_submodule(n) for n in resolve(model, target, x)[0].producers]
    loss = nn.CrossEntropyLoss()(model(x), y)
    grads = torch.autograd.grad(loss, [p.weight for p in producers])
    true_norm = math.sqrt(sum(float(g[-3:].pow(2).sum()) for g in grads))
    assert len(producers) == (1 if arch == "vgg_small" else 2)
    assert record.info["fan_in_grad_norm"] == pytest.approx(true_norm, rel=1e-4)
