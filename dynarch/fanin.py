"""Zero fan-out growth with a gradient-chosen fan-in: GradMax for the fan-out.

New channels get an exactly zero fan-out (the function is unchanged in train and eval mode,
whatever BatchNorm does) and the fan-in that maximises the gradient their fan-out receives, so
they switch on as fast as possible. With a fan-in row ``w`` the new channel's activation is
``a = w^T p`` at every position (``p``: the producer's input patch), and the gradient of its
fan-out is ``M w`` (M of :mod:`dynarch.gradmax`: rows = consumer fan-out entries, columns =
fan-in entries). Behind a train-mode BatchNorm ``a = gamma w^T (p - mean p) / sqrt(w^T S w +
eps)``, so the gradient is ``gamma M_c w / sqrt(w^T (S + eps/|w|^2) w)`` with M_c built from
centred patches and S their covariance: at a fixed fan-in norm the best k rows are the top-k
generalised eigenvectors of ``(M_c^T M_c, S + eps/|w|^2 I)``. The ridge is BatchNorm's own eps,
so the objective is exact for the real layer, not a tuned threshold. Without BatchNorm the rows
maximise ``||M w||`` at a fixed activation RMS ``sqrt(w^T S w)`` (S: the patches' second moment),
the existing units' mean: the generalised eigenvectors of ``(M^T M, S)``. docs/gradmax.md
derives both.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynarch.basic_inits import (
    group_batchnorm,
    mean_fan_in_norm,
    start_batchnorm,
    zeros,
    zeros_init,
)
from dynarch.errors import DynarchError
from dynarch.gradmax import (
    GradientStats,
    fallback_when_unsupported,
    fill_past_rank,
    gradient_matrix,
    top_singular_vectors,
)
from dynarch.growth_context import GrowthContext, GrowthOptions, NewChannels, takes_options
from dynarch.layer_kinds import CONSUMER
from dynarch.probes import batches

# Relative floor of the covariance's eigenvalues behind a BatchNorm, against round-off only
# (the BatchNorm eps ridge is what regularises); below it a direction has no variance.
_EIG_FLOOR = 1e-12
# Without a BatchNorm nothing bounds the fan-in of a low-variance direction once it is scaled
# to a normal activation: directions below 1e-3 of the largest eigenvalue (std < 3 %) are
# dropped, as for TINY.
_NO_BN_THRESHOLD = 1e-3


@dataclass(frozen=True)
class FanInOptions(GrowthOptions):
    """``norm``: the fan-in rows' norm (default the layer's mean); ``bn_gamma``: the new
    gamma's share of the mean |gamma|; ``threshold``: relative eigenvalue floor (default 1e-12
    behind a BatchNorm, 1e-3 without)."""

    norm: float | None = None
    bn_gamma: float = 1.0
    threshold: float | None = None


@dataclass(frozen=True)
class FanInOptOptions(FanInOptions):
    steps: int = 5
    lr: float | None = None  # default 0.1 / sqrt(fan-in)


# the zero fan-out family falls back to ``zeros`` (random fan-in, zero fan-out): still exact
zeros_when_unsupported = fallback_when_unsupported(zeros_init, "zeros")


def whitening(stats: GradientStats, ridge: float, threshold: float) -> torch.Tensor:
    """(S + ridge I)^(-1/2) of the patches' second moment S, in float64, as a pseudo-inverse:
    directions whose eigenvalue is below ``threshold`` x the largest get 0. With fewer patches
    than fan-in entries (``stats.rows``) the eigenvectors come from the patches' Gram matrix
    (S has no other directions with a non-zero eigenvalue), which is far cheaper."""
    assert stats.cov is not None, "whitening needs gradient_matrix(with_cov=True)"
    if stats.rows is not None:
        p = stats.rows  # S = p^T p
        evals, u = torch.linalg.eigh(p @ p.T)
        keep = evals > float(evals.max()) * threshold
        evals, u = evals[keep], u[:, keep]
        evecs = (p.T @ u) / evals.sqrt()
    else:
        evals, evecs = torch.linalg.eigh(stats.cov.double())
        keep = evals > float(evals.max()) * threshold
        evals, evecs = evals[keep], evecs[:, keep]
    return (evecs * (evals + ridge).rsqrt()) @ evecs.T


def best_directions(
    m: torch.Tensor, white: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(fan_in, k) unit columns maximising ||M w|| / sqrt(w^T C w) (C = whitening^-2) and
    their objective values. The columns are C-orthogonal: the new channels' pre-activations
    are uncorrelated on the growth batch, not copies of one best unit."""
    a = m.double() @ white
    u, s = top_singular_vectors(a.T, min(k, a.shape[1]))  # right singular vectors of a
    # M was built in float32: below its round-off a direction is noise
    u, rank, info = fill_past_rank(u, s, k, a, torch.finfo(torch.float32).eps)
    if rank < k:
        s = torch.cat([s[:rank], s.new_zeros(k - rank)])
    w = white @ u
    return w / w.norm(dim=0, keepdim=True).clamp_min(1e-300), s, info


def fan_out_gradients(
    m: torch.Tensor, cov: torch.Tensor | None, rows: torch.Tensor, gamma: float, eps: float
) -> torch.Tensor:
    """Per new channel, the norm of its fan-out's gradient in the linearised network (rows:
    (k, fan_in) fan-ins at their real scale)."""
    g = rows.double() @ m.double().T  # (k, fan-out entries)
    norms = g.norm(dim=1)
    if cov is None:
        return norms
    var = ((rows.double() @ cov.double()) * rows.double()).sum(1)
    return gamma * norms / (var + eps).sqrt()


def zeros_baseline(
    ctx: GrowthContext,
    m: torch.Tensor,
    cov: torch.Tensor | None,
    gamma: float,
    eps: float,
    norm: float,
) -> float:
    """What ``zeros`` growth would get on the same linearisation: the median over 8 draws of
    its random fan-ins (rescaled to the fan-in norm ``norm``) of the new fan-out's gradient."""
    w = ctx.modules[ctx.group.producers[0]].weight.detach()
    gen = torch.Generator(device=w.device).manual_seed(0)  # leaves the global RNG alone
    values = []
    for _ in range(8):
        rows = torch.rand(ctx.fan_in_shape(ctx.group.producers[0]), generator=gen, device=w.device)
        rows = (rows * 2 - 1).flatten(1)
        rows = rows / rows.norm(dim=1, keepdim=True) * norm
        values.append(float(fan_out_gradients(m, cov, rows, gamma, eps).norm()))
    return statistics.median(values)


def closed_form(
    ctx: GrowthContext, running_stats: bool = True
) -> tuple[NewChannels, GradientStats]:
    """The fan-in rows of ``gradmax_fanin`` and the statistics they came from; new BatchNorm
    running statistics are measured only with ``running_stats`` (a forward pass)."""
    opts = ctx.options
    norm_info = group_batchnorm(ctx)
    behind_bn = norm_info is not None
    stats = gradient_matrix(
        ctx,
        opts.max_samples,
        centre=behind_bn,
        with_cov=True,
        mean_column=behind_bn,
    )
    producer_name = ctx.group.producers[0]
    if behind_bn:
        # the last column: what a constant activation adds to the fan-out gradient
        mean_grad, stats.matrix = stats.matrix[:, -1], stats.matrix[:, :-1]
        rows, gamma, eps, info = _rows_behind_batchnorm(ctx, stats, norm_info[1], mean_grad)
    else:
        rows, info = _rows_without_batchnorm(ctx, stats)
        gamma, eps = 1.0, 0.0
    rows = rows.to(ctx.modules[producer_name].weight.dtype)
    new = NewChannels(
        fan_in={producer_name: rows.reshape(ctx.fan_in_shape(producer_name))},
        fan_out={
            c: zeros(ctx.fan_out_shape(c), ctx.modules[c].weight) for c in ctx.group.consumers
        },
        info=info,
    )
    norm_cov = stats.cov if behind_bn else None  # what the activation is normalised by
    predicted = fan_out_gradients(stats.matrix, norm_cov, rows, gamma, eps)
    row_norm = float(rows.norm(dim=1).mean())
    new.info |= {
        "samples": stats.samples,
        "predicted_fan_out_grad_norm": float(predicted.norm()),
        "zeros_fan_out_grad_norm": zeros_baseline(
            ctx, stats.matrix, norm_cov, gamma, eps, row_norm
        ),
    }
    if behind_bn:
        start_batchnorm(ctx, new, gamma, running_stats)
        new.info["bn_gamma"] = gamma
    return new, stats


def _rows_behind_batchnorm(
    ctx: GrowthContext, stats: GradientStats, bn: nn.Module, mean_grad: torch.Tensor
) -> tuple[torch.Tensor, float, float, dict[str, Any]]:
    """Generalised eigenvectors of (M_c^T M_c, S_c + eps/c^2) at the mean fan-in norm c; the
    new gamma (``bn_gamma`` x the mean |gamma|) and BatchNorm's eps."""
    opts = ctx.options
    norm = float(opts.norm or mean_fan_in_norm(ctx))
    gamma = opts.bn_gamma * float(bn.weight.detach().abs().mean())
    eps = float(bn.eps)
    threshold = _EIG_FLOOR if opts.threshold is None else opts.threshold
    white = whitening(stats, eps / norm**2, threshold)
    cols, _, info = best_directions(stats.matrix, white, ctx.k)
    # After BatchNorm (beta 0) a ReLU gives ~gamma (0.40 + 0.5 x_hat): the mean part adds
    # gamma 0.40 mean_grad to every unit's fan-out gradient, whatever its fan-in. w and -w
    # are equal to the linearisation; the sign whose gradient adds to that part is larger.
    align = mean_grad.double() @ (stats.matrix.double() @ cols)
    cols = cols * torch.where(align < 0, -1.0, 1.0).to(cols.dtype)
    return cols.T * norm, gamma, eps, info


def _rows_without_batchnorm(
    ctx: GrowthContext, stats: GradientStats
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Generalised eigenvectors of (M^T M, S) (S: the patches' second moment), each scaled so
    that its pre-activation has the existing units' mean RMS: at a fixed activation scale, the
    largest fan-out gradient. (At a fixed weight norm the plain right singular vectors of M
    pick the inputs' largest directions instead, units several times louder than their
    neighbours whose first SGD steps set back training: docs/gradmax.md.)"""
    threshold = ctx.options.threshold
    white = whitening(stats, 0.0, _NO_BN_THRESHOLD if threshold is None else threshold)
    cols, _, info = best_directions(stats.matrix, white, ctx.k)
    cov = stats.cov.double()
    rms = ((cols.T @ cov) * cols.T).sum(1).clamp_min(1e-300).sqrt()
    return cols.T * (existing_rms(ctx, cov) / rms)[:, None], info


def existing_rms(ctx: GrowthContext, cov: torch.Tensor) -> float:
    """The existing units' mean pre-activation RMS, sqrt(w^T S w), S the patches' moment."""
    w = ctx.modules[ctx.group.producers[0]].weight.detach().flatten(1).double()
    return float(((w @ cov.double()) * w).sum(1).clamp_min(0).sqrt().mean())


@takes_options(FanInOptions)
@zeros_when_unsupported
def gradmax_fanin_init(ctx: GrowthContext) -> NewChannels:
    """Zero fan-out; fan-in rows = the top-k (generalised) singular directions above, each at
    the mean fan-in norm of the layer (``norm=`` to override). Behind a BatchNorm the new
    channels start on: gamma = ``bn_gamma`` (default 1) x the layer's mean |gamma|, beta 0,
    running statistics from the growth batch."""
    return closed_form(ctx)[0]


class _Reached(Exception):
    """Raised by a hook to end a forward once every consumer has been run."""


def refine_fan_in(
    ctx: GrowthContext,
    new: NewChannels,
    steps: int,
    lr: float | None,
    scale: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, list[float]]:
    """Projected gradient ascent on the new fan-in rows of the real fan-out gradient
    ||dL/dW_out_new||, through a grown copy of the model in train mode (ReLU, BatchNorm and
    pooling exact). The ascent moves unit-norm rows; ``scale`` (differentiable) turns them into
    fan-in rows (a fixed norm behind a BatchNorm, a fixed activation RMS without one). The
    consumers' output gradients do not depend on the new fan-in (their new fan-out is zero), so
    they are taken once; each step then runs the forward only up to the last consumer and back
    through the new channels. Returns the best rows and the objective at every step (the
    first is the closed form's)."""
    producer_name = ctx.group.producers[0]
    data = [(x, y) for x, y in batches(ctx.data, ctx.options.max_samples)]
    probe = grown_copy(ctx, new)
    weight = probe.get_submodule(producer_name).weight
    first = ctx.modules[producer_name].weight.shape[0]
    consumers = [m for m in ctx.group.members if m.role == CONSUMER]
    deltas = [_consumer_deltas(probe, consumers, x, y, ctx.loss_fn) for x, y in data]
    start = new.fan_in[producer_name].flatten(1).double()
    unit = (start / start.norm(dim=1, keepdim=True)).clone()
    optimizer = torch.optim.Adam([unit], lr=lr or 0.1 / unit.shape[1] ** 0.5)
    best, values = unit.detach().clone(), []
    for step in range(steps + 1):
        unit.requires_grad_(True)
        rows = scale(unit)
        with torch.no_grad():
            weight[first:] = rows.reshape(weight[first:].shape).to(weight.dtype)
        surrogate, value = _fan_out_objective(ctx, probe, consumers, data, deltas, weight, first)
        (grad,) = torch.autograd.grad(surrogate, weight)
        if ctx.reduce_sum is not None:  # every process takes the same step
            grad = ctx.reduce_sum(grad)
        (grad,) = torch.autograd.grad(rows, unit, grad[first:].flatten(1).to(rows.dtype))
        values.append(value)
        if values[-1] >= max(values):
            best = unit.detach().clone()
        if step == steps:
            break
        with torch.no_grad():  # ascend: minus the tangent part of the gradient
            g = -grad
            g -= unit * (unit * g).sum(1, keepdim=True)
            unit.grad = g
            optimizer.step()
            unit.copy_(unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-30))
    with torch.no_grad():
        return scale(best).reshape(new.fan_in[producer_name].shape), values


def grown_copy(ctx: GrowthContext, new: NewChannels) -> nn.Module:
    """A deep copy of the model grown with ``new`` (by the surgery, ``ctx.grown_copy``), in
    train mode, with only the producer's weight trainable (autograd then builds the graph from
    the new channels on)."""
    if ctx.grown_copy is None:
        raise DynarchError(f"initializer {ctx.init_name!r} needs the context dynarch.grow gives")
    probe = ctx.grown_copy(copy.deepcopy(new)).train()
    for p in probe.parameters():
        p.requires_grad_(False)
    probe.get_submodule(ctx.group.producers[0]).weight.requires_grad_(True)
    return probe


def _consumer_deltas(
    probe: nn.Module, consumers: list, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable
) -> list[torch.Tensor]:
    """dL/d(output) of every consumer on one batch (full forward and backward)."""
    outs: dict[str, torch.Tensor] = {}
    hooks = [
        probe.get_submodule(m.module).register_forward_hook(_keep_output(outs, m.module))
        for m in consumers
    ]
    device = next(probe.parameters()).device
    try:
        with torch.enable_grad():
            loss = loss_fn(probe(x.to(device)), y.to(device))
            grads = torch.autograd.grad(loss, [outs[m.module] for m in consumers])
    finally:
        for h in hooks:
            h.remove()
    return [g.detach() for g in grads]


def _keep_output(store: dict, key: str):
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        store[key] = output

    return hook


def _fan_out_objective(
    ctx, probe, consumers, data, deltas, weight, first
) -> tuple[torch.Tensor, float]:
    """The new fan-out's gradient G over all the data (every process's, with ``reduce_sum``):
    its norm, and a surrogate <G(w), G> whose gradient in the producer's weight is that of
    ||G||^2 / 2 (G held fixed on the right, so a sum over processes stays exact)."""
    samples = sum(len(x) for x, _ in data)
    device = weight.device
    grads: dict[int, torch.Tensor] = {}  # per consumer, summed over batches
    for (x, _), batch_deltas in zip(data, deltas, strict=True):
        inputs: dict[str, torch.Tensor] = {}
        hooks = [
            probe.get_submodule(m.module).register_forward_hook(
                _stop_when_all_seen(inputs, m.module, len(consumers))
            )
            for m in consumers
        ]
        try:
            with torch.enable_grad():
                probe(x.to(device))
        except _Reached:
            pass
        finally:
            for h in hooks:
                h.remove()
        for i, (member, delta) in enumerate(zip(consumers, batch_deltas, strict=True)):
            module = probe.get_submodule(member.module)
            count = (weight.shape[0] - first) * member.multiplicity
            part = _weight_grad(module, inputs[member.module], delta, member.stop, count)
            part = part * (len(x) / samples)
            grads[i] = grads[i] + part if i in grads else part
    totals = [g.detach() for g in grads.values()]
    if ctx.reduce_sum is not None:
        world = ctx.reduce_sum(torch.ones((), device=device))
        totals = [ctx.reduce_sum(t) / world for t in totals]
    surrogate = sum((g * t).sum() for g, t in zip(grads.values(), totals, strict=True))
    value = sum(float(t.pow(2).sum()) for t in totals) ** 0.5
    return surrogate, value


def _stop_when_all_seen(store: dict, key: str, count: int):
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        store[key] = inputs[0]
        if len(store) == count:
            raise _Reached

    return hook


def _weight_grad(
    module: nn.Module, inp: torch.Tensor, delta: torch.Tensor, start: int, count: int
) -> torch.Tensor:
    """The consumer's weight gradient restricted to input entries [start, start + count)."""
    if isinstance(module, nn.Linear):
        return delta.reshape(len(delta), -1).T @ inp.flatten(1)[:, start : start + count]
    return torch.nn.grad.conv2d_weight(
        inp[:, start : start + count],
        (module.out_channels, count, *module.kernel_size),
        delta,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
    )


@takes_options(FanInOptOptions)
@zeros_when_unsupported
def gradmax_fanin_opt_init(ctx: GrowthContext) -> NewChannels:
    """``gradmax_fanin``'s closed form refined by ``steps`` (default 5) Adam steps of
    projected ascent on the real fan-out gradient (ReLU, BatchNorm, pooling exact), the
    reference code's GradMax-Opt with a zero fan-out; the best iterate is kept and the new
    BatchNorm running statistics are measured again for it."""
    new, stats = closed_form(ctx, running_stats=False)
    steps, lr = ctx.options.steps, ctx.options.lr
    if "bn_gamma" in new.info:  # BatchNorm normalises the activation: keep the weight norm
        norm = float(new.fan_in[ctx.group.producers[0]].flatten(1).norm(dim=1).mean())

        def scale(unit: torch.Tensor) -> torch.Tensor:
            return unit * norm

    else:  # keep the activation RMS (a louder unit would only be a larger step size)
        cov, target = stats.cov.double(), existing_rms(ctx, stats.cov)

        def scale(unit: torch.Tensor) -> torch.Tensor:
            return unit * (target / ((unit @ cov) * unit).sum(1, keepdim=True).sqrt())

    rows, values = refine_fan_in(ctx, new, steps, float(lr) if lr else None, scale)
    producer_name = ctx.group.producers[0]
    new.fan_in[producer_name] = rows.to(new.fan_in[producer_name].dtype)
    if "bn_gamma" in new.info:
        start_batchnorm(ctx, new, new.info["bn_gamma"])
    new.info |= {"steps": steps, "opt_fan_out_grad_norm": values}
    return new
