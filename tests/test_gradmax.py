"""GradMax: optimal fan-out against an independent autograd computation, function preserved,
new neurons train."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from archs import build
from torch import nn

import dynarch
from dynarch.gradmax import orthogonal_fill, top_singular_vectors
from dynarch.models import vgg_small


class ReLU1(nn.Module):
    """ReLU whose derivative at 0 is 1 (the paper's relu1): makes the fan-out -> fan-in
    gradient map exactly linear, so its singular values are the true optimum."""

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.clamp_min(0)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (x >= 0).to(g.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._Fn.apply(x)


def _case(kind: str):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    if kind == "linear->linear":
        model = nn.Sequential(nn.Linear(6, 5), ReLU1(), nn.Linear(5, 32))
        x, y = torch.randn(64, 6, generator=gen), torch.randn(64, 32, generator=gen)
        return model, x, y, "0", "2"
    if kind.startswith("conv->conv"):
        stride = 2 if "stride 2" in kind else 1
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            ReLU1(),
            nn.Conv2d(4, 5, 3, stride=stride, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        return (
            model,
            torch.randn(16, 3, 8, 8, generator=gen),
            torch.randn(16, 5, generator=gen),
            "0",
            "2",
        )
    pool = [nn.AvgPool2d(2)] if "pool" in kind else []
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, stride=1 if pool else 2),
        ReLU1(),
        *pool,
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    )
    return (
        model,
        torch.randn(16, 3, 8, 8, generator=gen),
        torch.randn(16, 5, generator=gen),
        "0",
        str(len(model) - 1),
    )


def _fan_in_gradient(model, x, y, producer, consumer, fan_out: torch.Tensor, k: int):
    """dL/d(new fan-in) by autograd, with zero fan-in and the given fan-out columns."""
    model = copy.deepcopy(model)
    p, c = model.get_submodule(producer), model.get_submodule(consumer)
    w0 = p.weight.shape[0] - k
    mult = c.weight.shape[1] // p.weight.shape[0]
    with torch.no_grad():
        p.weight[w0:] = 0
        c.weight[:, w0 * mult :] = fan_out
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    return p.weight.grad[w0:].flatten(1)


def _gradient_map(model, x, y, producer, consumer, k: int) -> torch.Tensor:
    """The linear map fan-out (one unit) -> its fan-in gradient, one column per basis vector."""
    c = model.get_submodule(consumer)
    shape = c.weight[:, -(c.weight.shape[1] // model.get_submodule(producer).weight.shape[0]) :]
    columns = []
    for r in range(shape.numel()):
        basis = torch.zeros(shape.numel())
        basis[r] = 1
        fan_out = torch.cat([basis.reshape(shape.shape)] * k, dim=1)
        fan_out[:, shape.shape[1] :] = 0  # only the first new unit reads the basis vector
        columns.append(_fan_in_gradient(model, x, y, producer, consumer, fan_out, k)[0])
    return torch.stack(columns, dim=1)


KINDS = [
    "linear->linear",
    "conv->conv stride 1",
    "conv->conv stride 2",
    "conv->linear",
    "conv->pool->linear",
]


@pytest.mark.parametrize("kind", KINDS)
def test_gradmax_reaches_the_top_k_optimum(kind: str) -> None:
    model, x, y, producer, consumer = _case(kind)
    k = 2
    before = model(x).detach()
    record = dynarch.grow(
        model, producer, k, init="gradmax", data=(x, y), loss_fn=nn.MSELoss(), example_inputs=x
    )
    torch.testing.assert_close(model(x).detach(), before, atol=1e-5, rtol=0)

    c = model.get_submodule(consumer)
    fan_out = c.weight[
        :,
        -(
            c.weight.shape[1] * k // model.get_submodule(producer).out_features
            if isinstance(model.get_submodule(producer), nn.Linear)
            else c.weight.shape[1] * k // model.get_submodule(producer).out_channels
        ) :,
    ]
    fan_out = fan_out.detach().clone()
    norm = fan_out.reshape(fan_out.shape[0], k, -1).norm(dim=(0, 2))
    torch.testing.assert_close(norm[0], norm[1])  # equal norms, fixed by the init
    achieved = _fan_in_gradient(model, x, y, producer, consumer, fan_out, k).norm()

    a = _gradient_map(model, x, y, producer, consumer, k)  # fan_in x fan_out, independent
    optimum = norm[0] * torch.linalg.svdvals(a)[:k].pow(2).sum().sqrt()
    assert achieved >= 0.98 * optimum, (float(achieved), float(optimum))
    assert record.info["fan_in_grad_norm"] == pytest.approx(float(achieved), rel=1e-4)

    gen = torch.Generator().manual_seed(0)
    randoms = []
    for _ in range(25):
        r = torch.randn(fan_out.shape[0], k, fan_out[0].numel() // k, generator=gen)
        r = r / r.norm(dim=(0, 2), keepdim=True) * norm[0]
        randoms.append(
            _fan_in_gradient(model, x, y, producer, consumer, r.reshape(fan_out.shape), k).norm()
        )
    assert achieved >= 2 * torch.stack(randoms).median()


def test_singular_vectors_match_svd_and_fill_is_orthogonal() -> None:
    m = torch.randn(7, 30, generator=torch.Generator().manual_seed(1))
    u, s = top_singular_vectors(m, 3)
    ref_u, ref_s, _ = torch.linalg.svd(m)
    torch.testing.assert_close(s, ref_s[:3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((u.T @ ref_u[:, :3]).abs(), torch.eye(3), atol=1e-5, rtol=0)
    fill = orthogonal_fill(u, 2)
    both = torch.cat([u, fill], 1)
    torch.testing.assert_close(both.T @ both, torch.eye(5), atol=1e-5, rtol=0)


def test_truncated_svd_on_a_large_matrix_reaches_the_optimum() -> None:
    gen = torch.Generator().manual_seed(2)
    # decaying spectrum, like a real gradient matrix
    m = torch.randn(900, 40, generator=gen) @ torch.diag(0.8 ** torch.arange(40.0))
    m = m @ torch.randn(40, 700, generator=gen)
    u, s = top_singular_vectors(m, 4)
    ref = torch.linalg.svdvals(m)[:4]
    torch.testing.assert_close(s, ref, rtol=1e-4, atol=0)
    assert (u.T @ m).norm() >= 0.999 * ref.norm()
    torch.testing.assert_close(u.T @ u, torch.eye(4), atol=1e-5, rtol=0)


def test_zero_columns_leave_the_singular_vectors_and_values_alone() -> None:
    """resnet18's layer4 on 8x8 inputs: 2048 of M's 2304 columns are zero, and LAPACK's
    eigen-solver failed to converge on the degenerate Gram matrix (the gradient trigger then
    crashed); the zero columns are dropped first, which changes nothing in the answer."""
    gen = torch.Generator().manual_seed(3)
    dense = torch.randn(300, 20, generator=gen) @ torch.randn(20, 60, generator=gen)
    padded = torch.zeros(300, 600)
    padded[:, ::10] = dense
    u, s = top_singular_vectors(padded, 8)
    ref_u, ref_s, _ = torch.linalg.svd(dense, full_matrices=False)
    torch.testing.assert_close(s, ref_s[:8], rtol=1e-4, atol=0)
    torch.testing.assert_close((u.T @ ref_u[:, :8]).abs(), torch.eye(8), atol=1e-4, rtol=0)
    u, s = top_singular_vectors(torch.zeros(5, 7), 3)  # nothing to find: no columns
    assert u.shape == (5, 0) and s.numel() == 0


def test_k_above_rank_fills_with_orthogonal_random_and_says_so() -> None:
    # a single training sample: M = delta x^T has rank 1
    model, x, y, producer, consumer = _case("linear->linear")
    record = dynarch.grow(
        model,
        producer,
        3,
        init="gradmax",
        data=(x[:1], y[:1]),
        loss_fn=nn.MSELoss(),
        example_inputs=x,
    )
    assert record.info["random_fill"] == 2 and "rank of M is 1" in record.info["reason"]
    new = model[2].weight[:, -3:].detach()
    gram = new.T @ new
    torch.testing.assert_close(gram, gram[0, 0] * torch.eye(3), atol=1e-5, rtol=0)


def test_zero_gradient_falls_back_to_random() -> None:
    model, x, _, producer, _ = _case("linear->linear")
    y = model(x).detach()  # zero loss, zero gradient
    record = dynarch.grow(
        model, producer, 2, init="gradmax", data=(x, y), loss_fn=nn.MSELoss(), example_inputs=x
    )
    assert record.info["random_fill"] == 2 and record.info["reason"] == "zero gradient"
    assert model[2].weight[:, -2:].abs().sum() > 0


@pytest.mark.parametrize("init", ["gradmax", "random"])
@pytest.mark.parametrize(
    "arch,target",
    [
        ("vgg_small", "features.conv2"),
        ("vgg_small", "features.conv4"),
        ("resnet_small", "layer2.0.conv1"),
        ("resnet18", "layer1.0.conv1"),
    ],
)
def test_new_neurons_train_with_stock_relu(arch: str, target: str, init: str) -> None:
    """nn.ReLU has derivative 0 at 0: the eps fan-in is what lets new fan-in weights learn."""
    model, x = build(arch)
    y = torch.arange(len(x)) % 10
    data, loss_fn = (x, y), nn.CrossEntropyLoss()
    before = model(x).detach()
    grads = {}
    for eps in (0.0, 1e-8):
        m = copy.deepcopy(model)
        m.eval()
        dynarch.grow(
            m, target, 2, init=init, data=data, loss_fn=loss_fn, example_inputs=x, epsilon=eps
        )
        torch.testing.assert_close(m(x).detach(), before, atol=1e-5, rtol=0)
        m.train()
        loss_fn(m(x), y).backward()
        grads[eps] = m.get_submodule(target).weight.grad[-2:].norm()
    assert grads[0.0] == 0  # behind a ReLU, exactly-zero fan-in never learns
    assert grads[1e-8] > 0


def test_gradmax_on_wide_resnet_hidden_conv_keeps_function() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    y = torch.arange(4)
    before = model(x).detach()
    record = dynarch.grow(
        model,
        "layer2.1.conv1",
        8,
        init="gradmax",
        data=(x, y),
        loss_fn=nn.CrossEntropyLoss(),
        example_inputs=x,
    )
    torch.testing.assert_close(model(x).detach(), before, atol=1e-5, rtol=0)
    assert record.info["fan_in_grad_norm"] > 0
    assert model.layer2[1].conv2.weight.shape == (128, 136, 3, 3)


@pytest.mark.parametrize("init", ["gradmax", "gradmax_opt", "firefly"])
def test_residual_stream_falls_back_to_random_and_says_why(init: str) -> None:
    model, x = build("resnet18")
    y = torch.arange(len(x)) % 10
    before = model(x).detach()
    record = dynarch.grow(
        model, "layer1.0.conv2", 4, init=init, data=(x, y), loss_fn=nn.CrossEntropyLoss()
    )
    assert "3 producers" in record.info["fallback"]
    torch.testing.assert_close(model(x).detach(), before, atol=1e-5, rtol=0)
    assert model.conv1.out_channels == 68


def test_custom_initializer_by_import_path() -> None:
    model, x = build("vgg_small")
    record = dynarch.grow(
        model, "features.conv2", 2, init="dynarch.initializers:zeros_init", example_inputs=x
    )
    assert record.method == "dynarch.initializers:zeros_init"
    assert model.features.conv3.weight[:, -2:].abs().sum() == 0


def test_statistics_in_train_mode_leave_batchnorm_running_stats_alone() -> None:
    model, x = build("vgg_small")
    model.train()
    bn = model.features.bn3
    mean, var, count = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    dynarch.grow(
        model,
        "features.conv3",
        2,
        init="gradmax",
        data=(x, torch.arange(len(x)) % 10),
        loss_fn=nn.CrossEntropyLoss(),
        example_inputs=x,
    )
    assert torch.equal(bn.running_mean[:16], mean) and torch.equal(bn.running_var[:16], var)
    assert int(bn.num_batches_tracked) == count


def test_fill_past_the_dimension_adds_random_unit_columns() -> None:
    u, _ = torch.linalg.qr(torch.randn(5, 2, generator=torch.Generator().manual_seed(4)))
    fill = orthogonal_fill(u, 6)
    assert fill.shape == (5, 6)
    torch.testing.assert_close(fill.norm(dim=0), torch.ones(6), atol=1e-5, rtol=0)
    both = torch.cat([u, fill[:, :3]], 1)  # room for 3 more orthogonal columns in R^5
    torch.testing.assert_close(both.T @ both, torch.eye(5), atol=1e-5, rtol=0)


def test_gradmax_grows_more_units_than_the_consumer_has_outputs() -> None:
    torch.manual_seed(0)
    model = vgg_small(width=4).eval()
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    before = model(x).detach()
    record = dynarch.grow(
        model,
        "classifier.fc1",
        16,
        init="gradmax",
        data=(x, y),
        loss_fn=nn.CrossEntropyLoss(),
        example_inputs=x,
    )
    assert model.classifier.fc1.out_features == 32 and model.classifier.fc2.in_features == 32
    torch.testing.assert_close(model(x).detach(), before, atol=1e-5, rtol=0)
    # fc2 has 10 outputs and cross-entropy's logit gradients sum to 0: M has rank 9, so 9
    # GradMax directions, 1 more orthogonal column, then 6 random ones
    assert record.info["random_fill"] == 7
    new = model.classifier.fc2.weight[:, 16:].detach()
    gram = new[:, :10].T @ new[:, :10]
    torch.testing.assert_close(gram, gram.diagonal().mean() * torch.eye(10), atol=1e-5, rtol=0)
