"""The data-free initializers (``random``, ``zeros``) and the pieces the others share.

Default weight scales, the epsilon fan-in that puts a zero-fan-in unit just off zero, and the
BatchNorm gate that moves that near-zero onto the BatchNorm's gamma (docs/gradmax.md).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dynarch.growth_context import (
    EpsilonOptions,
    GrowthContext,
    GrowthOptions,
    NewChannels,
    takes_options,
)
from dynarch.layer_kinds import CHANNELWISE, receptive_field
from dynarch.probes import batches, buffers_restored, modes_restored


def default_uniform(shape: tuple[int, ...], fan_in: int, like: torch.Tensor) -> torch.Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default conv/linear weight scale."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return torch.empty(shape, device=like.device, dtype=like.dtype).uniform_(-bound, bound)


def zeros(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(shape, device=like.device, dtype=like.dtype)


def epsilon_fan_in(
    ctx: GrowthContext, producer: str, epsilon: float, direction: torch.Tensor | None = None
) -> torch.Tensor:
    """A fan-in that is zero for all practical purposes: ``epsilon`` (initializer option,
    default 1e-8) x the mean norm of the existing fan-in rows, along ``direction`` (random if
    None).

    Exactly zero fan-in behind a ReLU never learns (PyTorch's relu'(0) = 0); this tiny fan-in
    puts the new unit just off zero, so the ReLU passes gradient to it, while the output moves
    by ~epsilon (reported as ``output_change``). ``epsilon=0`` gives exact zeros.
    """
    w = ctx.modules[producer].weight.detach()
    shape = ctx.fan_in_shape(producer)
    if direction is None:
        direction = torch.randn(shape, device=w.device, dtype=w.dtype)
    direction = direction.reshape(shape[0], -1)
    unit = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-30)
    scale = epsilon * mean_fan_in_norm(ctx, producer)
    return (unit * scale).reshape(shape).to(w.dtype)


def gate_batchnorm(ctx: GrowthContext, new: NewChannels, epsilon: float) -> NewChannels:
    """Move the "near zero" of an epsilon fan-in onto the BatchNorm scale when a BatchNorm
    normalises the producer's output.

    In train mode BatchNorm divides each channel by its *batch* std. An epsilon fan-in gives
    the new channel a batch std far below ``bn.eps``, so BatchNorm passes it with a gain of
    gamma/sqrt(bn.eps) (~316) on the forward and the backward: the first SGD step moves the
    fan-in ~316x further than GradMax's linearisation (BatchNorm as identity) assumes, and the
    next forward renormalises the channel to unit variance -- the unit is fully on after one
    step whatever the learning rate, with running statistics (var 1) orders of magnitude off
    in eval mode. Instead the fan-in keeps its direction at the mean norm of the existing
    fan-in rows (a normal-scale BatchNorm input), the new gamma is ``epsilon`` x the mean
    |gamma| of the existing channels (the output still moves by ~epsilon, in train *and* eval
    mode) and the running statistics are the new channels' statistics on ``ctx.data``. The
    unit then phases in at the learning rate through gamma, whose gradient is
    sum(dL/dy * x_hat): for GradMax's fan-in (minus the fan-in gradient) and fan-out that is
    the GradMax objective again.

    Applies to groups with one producer and exactly one affine BatchNorm (Conv-BN-act);
    ``bn_gamma`` (initializer option, default ``epsilon``) sets the new gamma's share of the
    mean |gamma| on its own: ``bn_gamma=1`` starts the units fully on (the function changes;
    docs/study.md measures that gated units barely switch on within a short run).
    ``bn_gate=False`` keeps the plain epsilon fan-in, and ``epsilon=0`` the exact zeros (a
    unit that never trains).
    """
    if not ctx.options.bn_gate or epsilon <= 0:
        return new
    norm = group_batchnorm(ctx)
    if norm is None or (norm[0], "weight") in new.new_values:
        return new
    bn_name, bn = norm
    producer_name = ctx.group.producers[0]
    producer = ctx.modules[producer_name]
    w = producer.weight.detach()
    rows = new.fan_in[producer_name].reshape(ctx.k, -1)
    norms = rows.norm(dim=1, keepdim=True)
    direction = torch.where(norms > 0, rows, torch.randn_like(rows))
    unit = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-30)
    fan_in = unit * mean_fan_in_norm(ctx, producer_name)
    new.fan_in[producer_name] = fan_in.reshape(ctx.fan_in_shape(producer_name)).to(w.dtype)
    share = epsilon if ctx.options.bn_gamma is None else ctx.options.bn_gamma
    gamma = share * float(bn.weight.detach().abs().mean())
    start_batchnorm(ctx, new, gamma)
    new.info["bn_gate"] = {"module": bn_name, "gamma": gamma}
    return new


def mean_fan_in_norm(ctx: GrowthContext, producer: str | None = None) -> float:
    """Mean norm of a producer's existing fan-in rows (default: the group's first): the scale
    new rows are given."""
    w = ctx.modules[producer or ctx.group.producers[0]].weight.detach()
    return float(w.flatten(1).norm(dim=1).mean())


def group_batchnorm(ctx: GrowthContext) -> tuple[str, nn.Module] | None:
    """The one affine BatchNorm that normalises the single producer's output (Conv-BN-act),
    or None for any other group shape."""
    if len(ctx.group.producers) != 1:
        return None
    norms = [
        m.module
        for m in ctx.group.members
        if m.role == CHANNELWISE
        and isinstance(ctx.modules[m.module], nn.modules.batchnorm._BatchNorm)
    ]
    if len(norms) != 1 or ctx.modules[norms[0]].weight is None:
        return None
    return norms[0], ctx.modules[norms[0]]


def start_batchnorm(
    ctx: GrowthContext, new: NewChannels, gamma: float | torch.Tensor, running_stats: bool = True
) -> None:
    """New channels of the group's BatchNorm (:func:`group_batchnorm`): scale ``gamma``,
    beta 0, and (``running_stats``, a forward pass) running statistics measured on
    ``ctx.data`` with the new fan-in, so that eval mode sees what train mode sees."""
    norm = group_batchnorm(ctx)
    assert norm is not None, "start_batchnorm needs a Conv-BN group"
    bn_name, bn = norm
    weight = bn.weight.detach()
    new.new_values[(bn_name, "weight")] = (
        torch.as_tensor(gamma, dtype=weight.dtype, device=weight.device).expand(ctx.k).clone()
    )
    if not running_stats:
        return
    producer = ctx.modules[ctx.group.producers[0]]
    stats = _new_channel_stats(ctx, producer, new.fan_in[ctx.group.producers[0]])
    if stats is not None and bn.running_mean is not None and bn.running_var is not None:
        mean, var = stats
        new.new_values[(bn_name, "running_mean")] = mean.to(bn.running_mean.dtype)
        new.new_values[(bn_name, "running_var")] = var.to(bn.running_var.dtype)


def _new_channel_stats(ctx: GrowthContext, producer: nn.Module, fan_in: torch.Tensor):
    """Per-channel mean and (unbiased) variance of the new channels' pre-BatchNorm output on
    ``ctx.data`` in train mode (running statistics restored), or None without data."""
    if ctx.data is None or not isinstance(producer, (nn.Conv2d, nn.Linear)):
        return None
    inputs: list[torch.Tensor] = []
    hook = producer.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach()))
    try:
        with buffers_restored(ctx.model), modes_restored(ctx.model, True), torch.no_grad():
            for x, _ in batches(ctx.data, ctx.options.max_samples):
                ctx.model(x.to(producer.weight.device))
    finally:
        hook.remove()
    if not inputs:
        return None
    x = torch.cat(inputs)
    w = fan_in.to(producer.weight.dtype)
    if isinstance(producer, nn.Linear):
        z = nn.functional.linear(x, w)
        dims: tuple[int, ...] = (0,)
    else:
        z = nn.functional.conv2d(
            x, w, None, producer.stride, producer.padding, producer.dilation, producer.groups
        )
        dims = (0, 2, 3)
    if z.numel() // z.shape[1] < 2:
        return None
    return z.mean(dims), z.var(dims)


@takes_options(EpsilonOptions)
def random_init(ctx: GrowthContext) -> NewChannels:
    """Zero fan-in (up to ``epsilon``), random fan-out at the layer's default scale; behind a
    BatchNorm the near-zero is on the BatchNorm scale instead (:func:`gate_batchnorm`)."""
    epsilon = ctx.options.epsilon
    fan_in = {p: epsilon_fan_in(ctx, p, epsilon) for p in ctx.group.producers}
    fan_out = {
        c: default_uniform(ctx.fan_out_shape(c), ctx.consumer_fan_in(c), ctx.modules[c].weight)
        for c in ctx.group.consumers
    }
    return gate_batchnorm(ctx, NewChannels(fan_in, fan_out), epsilon)


@takes_options(GrowthOptions)
def zeros_init(ctx: GrowthContext) -> NewChannels:
    """Random fan-in at the layer's default scale, zero fan-out (function unchanged)."""
    fan_in = {}
    for p in ctx.group.producers:
        w = ctx.modules[p].weight
        fan_in[p] = default_uniform(ctx.fan_in_shape(p), w.shape[1] * receptive_field(w), w)
    fan_out = {c: zeros(ctx.fan_out_shape(c), ctx.modules[c].weight) for c in ctx.group.consumers}
    return NewChannels(fan_in, fan_out)
