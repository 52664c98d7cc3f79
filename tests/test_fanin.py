"""Zero fan-out growth with a gradient-chosen fan-in (``gradmax_fanin``): the fan-out gradient
it promises against an independent autograd optimum, exact function preservation, fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from archs import build
from torch import nn

import dynarch


def _bn_net() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """conv -> train-mode BatchNorm -> identity -> conv: the BatchNorm linearisation is exact."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.Identity(),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
    ).train()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.2, 0.2)
    # correlated input channels: the covariance matters, the plain SVD of M is not optimal
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.3, 0.0], [0.2, 0.1, 2.0]])
    x = torch.einsum("ij,bjhw->bihw", mix, torch.randn(32, 3, 6, 6, generator=gen))
    return model, x, torch.randn(32, 20, generator=gen)


def _grown(model, x, y, init: str = "gradmax_fanin", **opts):
    m = copy.deepcopy(model)
    rec = dynarch.grow(m, "0", 1, init=init, data=(x, y), loss_fn=nn.MSELoss(), **opts)
    return m, rec


def _fan_out_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||dL/d(the new fan-out column)|| by autograd through the real modules, differentiable
    in the producer's new fan-in row."""
    loss = nn.functional.mse_loss(model(x), y)
    (grad,) = torch.autograd.grad(loss, model[3].weight, create_graph=True)
    return grad[:, -1].norm()


def _real_optimum(model, x, y, norm: float, restarts: int = 12, steps: int = 150) -> float:
    """Best fan-out gradient over fan-in rows of norm ``norm``: projected gradient ascent
    through the real network from many random starts (independent of the closed form)."""
    best = 0.0
    for seed in range(restarts):
        w = torch.randn(model[0].weight[-1:].shape, generator=torch.Generator().manual_seed(seed))
        w = w / w.norm() * norm
        for step in range(steps):
            w.requires_grad_(True)
            with torch.no_grad():
                model[0].weight[-1:] = w
            value = _fan_out_grad(model, x, y)
            best = max(best, float(value.detach()))
            (g,) = torch.autograd.grad(value, model[0].weight)
            g = g[-1:]
            with torch.no_grad():
                g = g - (g * w).sum() / norm**2 * w  # tangent to the sphere
                w = w + (0.5 / (1 + step) ** 0.5) * norm * g / g.norm().clamp_min(1e-30)
                w = w / w.norm() * norm
    return best


def test_fanin_reaches_the_real_optimum_behind_train_mode_batchnorm() -> None:
    model, x, y = _bn_net()
    grown, rec = _grown(model, x, y)
    w = grown[0].weight[-1:].detach()
    norm = float(w.norm())
    # the fan-in is at the layer's mean fan-in norm; the new gamma is the mean |gamma|
    mean_norm = float(model[0].weight.detach().flatten(1).norm(dim=1).mean())
    assert norm == pytest.approx(mean_norm, rel=1e-5)
    gamma = float(model[1].weight.detach().abs().mean())
    assert float(grown[1].weight[-1].detach()) == pytest.approx(gamma)
    got = rec.info["fan_out_grad_norm"]
    assert float(_fan_out_grad(grown, x, y).detach()) == pytest.approx(got, rel=1e-4)
    assert rec.info["predicted_fan_out_grad_norm"] == pytest.approx(got, rel=1e-3)
    optimum = _real_optimum(copy.deepcopy(grown), x, y, norm)
    assert got >= 0.98 * optimum, (got, optimum)
    randoms = []
    for seed in range(15):
        probe = copy.deepcopy(grown)
        r = torch.randn(w.shape, generator=torch.Generator().manual_seed(100 + seed))
        with torch.no_grad():
            probe[0].weight[-1:] = r / r.norm() * norm
        randoms.append(float(_fan_out_grad(probe, x, y)))
    assert got >= 2 * torch.tensor(randoms).median(), (got, randoms)


def test_fanin_k_rows_are_the_generalised_eigenvectors() -> None:
    """k > 1: the rows span the top-k generalised eigenvectors of (M_c^T M_c, S + eps/c^2),
    checked with scipy's solver on M_c and S computed here from the patches by hand."""
    import scipy.linalg

    model, x, y = _bn_net()
    m = copy.deepcopy(model)
    dynarch.grow(m, "0", 3, init="gradmax_fanin", data=(x, y), loss_fn=nn.MSELoss())
    rows = m[0].weight[-3:].detach().flatten(1).double()
    # independent M_c: gradient of the new fan-out wrt a unit activation per fan-in entry
    patches = nn.functional.unfold(x, 3, padding=1)  # (B, 27, 36)
    centred = patches - patches.mean((0, 2), keepdim=True)
    out = model(x)
    hooks = {}
    h = model[3].register_forward_hook(lambda mod, i, o: hooks.setdefault("z", o))
    loss = nn.functional.mse_loss(model(x), y)
    h.remove()
    (delta,) = torch.autograd.grad(loss, hooks["z"])
    image = centred.reshape(32, 27, 6, 6)
    g = torch.nn.grad.conv2d_weight(image, (5, 27, 3, 3), delta, padding=1)
    mc = g.flatten(2).transpose(1, 2).reshape(-1, 27).double()
    flat = centred.transpose(1, 2).reshape(-1, 27).double()
    cov = flat.T @ flat / len(flat)
    norm = float(rows[0].norm())
    evals, evecs = scipy.linalg.eigh(
        (mc.T @ mc).numpy(),
        (cov + model[1].eps / norm**2 * torch.eye(27, dtype=torch.float64)).numpy(),
    )
    top = torch.from_numpy(evecs[:, -3:])
    # same span: projecting the rows onto the top-3 eigenvectors loses nothing
    q, _ = torch.linalg.qr(top)
    residual = rows.T - q @ (q.T @ rows.T)
    assert float(residual.norm() / rows.norm()) < 1e-4
    assert out.shape == (32, 20)


@pytest.mark.parametrize(
    "arch,target",
    [
        ("vgg_small", "features.conv1"),
        ("vgg_small", "features.conv4"),
        ("vgg_small", "classifier.fc1"),
        ("resnet_small", "layer2.0.conv1"),
        ("resnet18", "layer2.0.conv1"),
    ],
)
def test_fanin_growth_keeps_the_function_in_train_and_eval_mode(arch: str, target: str) -> None:
    model, x = build(arch)
    y = torch.arange(len(x)) % 10
    before = {mode: _outputs(model, x, mode) for mode in ("train", "eval")}
    rec = dynarch.grow(
        model, target, 3, init="gradmax_fanin", data=(x, y), loss_fn=nn.CrossEntropyLoss()
    )
    for mode in ("train", "eval"):  # equal up to float summation order (extra zero columns)
        torch.testing.assert_close(_outputs(model, x, mode), before[mode], atol=1e-6, rtol=0)
    assert "fallback" not in rec.info
    assert rec.info["fan_out_grad_norm"] > 0 and rec.info["fan_in_grad_norm"] == 0
    assert model.get_submodule(target).weight[-3:].abs().sum() > 0


def _outputs(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    m = copy.deepcopy(model)
    m.train(mode == "train")
    with torch.no_grad():
        return m(x)


def test_new_batchnorm_channels_start_on_with_the_batch_statistics() -> None:
    model, x = build("vgg_small")
    y = torch.arange(len(x)) % 10
    bn = model.features.bn2
    gamma = float(bn.weight.abs().mean())
    rec = dynarch.grow(
        model, "features.conv2", 2, init="gradmax_fanin", data=(x, y), loss_fn=nn.CrossEntropyLoss()
    )
    assert torch.allclose(bn.weight[-2:], torch.full((2,), gamma))
    assert torch.equal(bn.bias[-2:], torch.zeros(2))
    captured = {}
    probe = copy.deepcopy(model).train()  # statistics as training sees them
    h = probe.features.conv2.register_forward_hook(lambda m, i, o: captured.setdefault("z", o))
    with torch.no_grad():
        probe(x)
    h.remove()
    z = captured["z"][:, -2:]
    torch.testing.assert_close(bn.running_mean[-2:], z.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var[-2:], z.var((0, 2, 3)))
    assert rec.info["bn_gamma"] == pytest.approx(gamma)


def test_residual_stream_falls_back_to_zeros_and_says_why() -> None:
    model, x = build("resnet18")
    y = torch.arange(len(x)) % 10
    before = _outputs(model, x, "train")
    rec = dynarch.grow(
        model, "layer1.0.conv2", 4, init="gradmax_fanin", data=(x, y), loss_fn=nn.CrossEntropyLoss()
    )
    assert rec.info["fallback"].startswith("zeros: ") and "3 producers" in rec.info["fallback"]
    torch.testing.assert_close(_outputs(model, x, "train"), before, atol=1e-6, rtol=0)
    assert model.layer1[0].conv2.weight[-4:].abs().sum() > 0  # random fan-in, as zeros
    assert model.layer2[0].conv1.weight[:, -4:].abs().sum() == 0  # zero fan-out


def _fc1_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """vgg_small with a batch of 32 noisy copies of its two inputs: fc1 (no BatchNorm) sees
    more samples than build()'s two."""
    model, x = build("vgg_small")
    gen = torch.Generator().manual_seed(5)
    x = x.repeat(16, 1, 1, 1) + 0.5 * torch.randn(32, *x.shape[1:], generator=gen)
    return model, x, torch.arange(len(x)) % 10


def test_without_batchnorm_rows_are_generalised_eigenvectors_at_the_units_rms() -> None:
    """fc1 (no BatchNorm): the rows maximise ||M w|| at a fixed activation RMS, i.e. they are
    w = S^+ M^T c with c the top eigenvectors of M S^+ M^T (S: fc1's input second moment,
    pseudo-inverse with the same 1e-3 cut), each scaled to the existing units' mean RMS."""
    model, x, y = _fc1_case()
    m = copy.deepcopy(model)
    rec = dynarch.grow(
        m, "classifier.fc1", 2, init="gradmax_fanin", data=(x, y), loss_fn=nn.CrossEntropyLoss()
    )
    store = {}

    def keep(key, value):
        store[key] = value  # a hook returning None leaves the output alone

    hooks = [
        model.classifier.fc1.register_forward_hook(lambda mod, i, o: keep("in", i[0])),
        model.classifier.fc2.register_forward_hook(lambda mod, i, o: keep("out", o)),
    ]
    loss = nn.CrossEntropyLoss()(model(x), y)
    for h in hooks:
        h.remove()
    (delta,) = torch.autograd.grad(loss, store["out"])
    inputs = store["in"].detach().double()
    mat = delta.double().T @ inputs  # M for fc1 -> fc2, by hand
    moment = inputs.T @ inputs / len(inputs)
    pinv = torch.linalg.pinv(moment, rtol=1e-3, hermitian=True)
    evals, evecs = torch.linalg.eigh(mat @ pinv @ mat.T)
    expected = pinv @ mat.T @ evecs[:, -2:]
    rows = m.classifier.fc1.weight[-2:].detach().double()
    q, _ = torch.linalg.qr(expected)
    assert float((rows.T - q @ (q.T @ rows.T)).norm() / rows.norm()) < 1e-4
    rms = ((rows @ moment) * rows).sum(1).sqrt()
    old = model.classifier.fc1.weight.detach().double()
    target = ((old @ moment) * old).sum(1).sqrt().mean()
    torch.testing.assert_close(rms, torch.full((2,), float(target), dtype=torch.float64))
    assert rec.info["predicted_fan_out_grad_norm"] > rec.info["zeros_fan_out_grad_norm"]


def test_whitening_from_few_patches_equals_the_covariance_route() -> None:
    from dynarch.fanin import whitening
    from dynarch.gradmax import GradientStats

    gen = torch.Generator().manual_seed(0)
    patches = torch.randn(12, 40, generator=gen, dtype=torch.float64)
    cov = patches.T @ patches
    few = GradientStats(torch.zeros(1, 40), {}, 12, cov, patches)
    full = GradientStats(torch.zeros(1, 40), {}, 12, cov, None)
    for ridge in (0.0, 1e-3):
        torch.testing.assert_close(whitening(few, ridge, 1e-6), whitening(full, ridge, 1e-6))


def test_opt_refines_the_real_fan_out_gradient_and_keeps_the_function() -> None:
    """Through the real ReLU/max-pool network the ascent improves on the closed form, and the
    objective it reports is the gradient measured after the surgery."""
    model, x = build("vgg_small")
    model.train()
    y = torch.arange(len(x)) % 10
    x, y = x.repeat(16, 1, 1, 1) + 0.3 * torch.randn(32, *x.shape[1:]), y.repeat(16)
    before = _outputs(model, x, "train")
    closed = dynarch.grow(
        copy.deepcopy(model),
        "features.conv2",
        2,
        init="gradmax_fanin",
        data=(x, y),
        loss_fn=nn.CrossEntropyLoss(),
    )
    rec = dynarch.grow(
        model,
        "features.conv2",
        2,
        init="gradmax_fanin_opt",
        data=(x, y),
        loss_fn=nn.CrossEntropyLoss(),
        steps=8,
    )
    values = rec.info["opt_fan_out_grad_norm"]
    assert values[0] == pytest.approx(closed.info["fan_out_grad_norm"], rel=1e-4)
    assert rec.info["fan_out_grad_norm"] == pytest.approx(max(values), rel=1e-4)
    assert max(values) > 1.05 * values[0]
    norms = model.features.conv2.weight[-2:].detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full((2,), norms.mean().item()), rtol=1e-5, atol=0)
    torch.testing.assert_close(_outputs(model, x, "train"), before, atol=1e-6, rtol=0)


def test_opt_without_batchnorm_keeps_the_units_activation_rms() -> None:
    model, x, y = _fc1_case()
    store = {}
    h = model.classifier.fc1.register_forward_hook(lambda mod, i, o: store.update(x=i[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    inputs = store["x"].double()
    moment = inputs.T @ inputs / len(inputs)
    old = model.classifier.fc1.weight.detach().double()
    target = float(((old @ moment) * old).sum(1).sqrt().mean())
    rec = dynarch.grow(
        model,
        "classifier.fc1",
        2,
        init="gradmax_fanin_opt",
        data=(x, y),
        loss_fn=nn.CrossEntropyLoss(),
    )
    rows = model.classifier.fc1.weight[-2:].detach().double()
    rms = ((rows @ moment) * rows).sum(1).sqrt()
    torch.testing.assert_close(
        rms, torch.full((2,), target, dtype=torch.float64), rtol=1e-4, atol=0
    )
    assert rec.info["fan_out_grad_norm"] == pytest.approx(max(rec.info["opt_fan_out_grad_norm"]))


def test_frozen_consumers_are_not_measured() -> None:
    """A frozen next layer (fine-tuning) has no gradient to measure: the growth still happens,
    the record says None instead of failing after the surgery."""
    model, x = build("vgg_small")
    y = torch.arange(len(x)) % 10
    model.features.conv3.weight.requires_grad_(False)
    rec = dynarch.grow(
        model, "features.conv2", 2, init="zeros", data=(x, y), loss_fn=nn.CrossEntropyLoss()
    )
    assert rec.info["fan_out_grad_norm"] is None
    assert model.features.conv3.weight.shape[1] == rec.width_after
