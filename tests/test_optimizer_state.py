"""The same optimizer object keeps working across mutations, its state carried entry by entry."""

from __future__ import annotations

import pytest
import torch
from archs import build

import dynarch

LOSS = torch.nn.CrossEntropyLoss()


def _step(model, opt, x, y) -> None:
    opt.zero_grad()
    LOSS(model(x), y).backward()
    opt.step()


def _setup(opt_name: str):
    model, x = build("vgg_small")
    model.train()
    y = torch.arange(x.shape[0]) % 10
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = getattr(torch.optim, opt_name)(model.parameters(), lr=1e-2)
    _step(model, opt, x, y)
    _step(model, opt, x, y)
    return model, x, y, opt


def _optimizer_params(opt) -> list:
    return [p for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("opt_name", ["sgd", "Adam", "AdamW"])
def test_grow_zero_pads_state_and_keeps_step(opt_name: str) -> None:
    model, x, y, opt = _setup(opt_name)
    keys = ["momentum_buffer"] if opt_name == "sgd" else ["exp_avg", "exp_avg_sq"]
    conv2, conv3, bn2 = model.features.conv2, model.features.conv3, model.features.bn2
    old = {
        (n, k): opt.state[p][k].clone()
        for n, p in [("conv2", conv2.weight), ("conv3", conv3.weight), ("bn2", bn2.weight)]
        for k in keys
    }
    old_step = None if opt_name == "sgd" else opt.state[conv2.weight]["step"].clone()

    dynarch.grow(model, "features.conv2", 3, optimizer=opt, example_inputs=x)

    assert {id(p) for p in _optimizer_params(opt)} == {id(p) for p in model.parameters()}
    assert len(opt.state) == len(list(model.parameters()))
    for k in keys:
        s2, s3, sb = (
            opt.state[conv2.weight][k],
            opt.state[conv3.weight][k],
            opt.state[bn2.weight][k],
        )
        assert s2.shape == conv2.weight.shape and s3.shape == conv3.weight.shape
        assert torch.equal(s2[:8], old[("conv2", k)]) and s2[8:].abs().sum() == 0
        assert torch.equal(s3[:, :8], old[("conv3", k)]) and s3[:, 8:].abs().sum() == 0
        assert torch.equal(sb[:8], old[("bn2", k)]) and sb[8:].abs().sum() == 0
    if old_step is not None:
        assert torch.equal(opt.state[conv2.weight]["step"], old_step)
    _step(model, opt, x, y)  # the optimizer still steps with the new shapes


def test_sgd_step_after_growth_uses_old_momentum_and_trains_new_weights() -> None:
    model, x, y, opt = _setup("sgd")
    dynarch.grow(model, "features.conv2", 2, init="zeros", optimizer=opt, example_inputs=x)
    conv3 = model.features.conv3
    w_before = conv3.weight.detach().clone()
    buf_before = opt.state[conv3.weight]["momentum_buffer"].clone()
    opt.zero_grad()
    LOSS(model(x), y).backward()
    grad = conv3.weight.grad.clone()
    opt.step()
    # torch SGD: buf = 0.9 * buf + grad; w -= lr * buf (independent computation)
    expected = w_before - 0.1 * (0.9 * buf_before + grad)
    torch.testing.assert_close(conv3.weight.detach(), expected)
    # the new fan-out columns of the grown channels moved (zeros init: random fan-in)
    assert (conv3.weight[:, 8:] - w_before[:, 8:]).abs().sum() > 0
    assert buf_before[:, 8:].abs().sum() == 0 and buf_before[:, :8].abs().sum() > 0


@pytest.mark.parametrize("opt_name", ["sgd", "Adam"])
def test_prune_slices_state(opt_name: str) -> None:
    model, x, y, opt = _setup(opt_name)
    keys = ["momentum_buffer"] if opt_name == "sgd" else ["exp_avg", "exp_avg_sq"]
    conv4, fc1 = model.features.conv4, model.classifier.fc1
    old = {k: (opt.state[conv4.weight][k].clone(), opt.state[fc1.weight][k].clone()) for k in keys}
    removed = [2, 11]
    dynarch.prune(model, "features.conv4", idxs=removed, optimizer=opt, example_inputs=x)
    keep = [c for c in range(16) if c not in removed]
    keep_cols = [c * 16 + s for c in keep for s in range(16)]  # 4x4 features per channel
    for k in keys:
        assert torch.equal(opt.state[conv4.weight][k], old[k][0][keep])
        assert torch.equal(opt.state[fc1.weight][k], old[k][1][:, keep_cols])
    assert {id(p) for p in _optimizer_params(opt)} == {id(p) for p in model.parameters()}
    _step(model, opt, x, y)


def test_gradients_are_carried_with_the_parameters() -> None:
    model, x, y, opt = _setup("sgd")
    LOSS(model(x), y).backward()
    old_grad = model.features.conv2.weight.grad.clone()
    dynarch.grow(model, "features.conv2", 2, optimizer=opt, example_inputs=x)
    grad = model.features.conv2.weight.grad
    assert torch.equal(grad[:8], old_grad) and grad[8:].abs().sum() == 0
