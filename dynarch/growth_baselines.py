"""Growth baselines to compare GradMax against: Net2Net splitting and Firefly candidate search.

- ``net2net`` (Chen et al., 2016, "Net2Net: accelerating learning via knowledge transfer"):
  new channels are copies of existing ones and each copied channel's fan-out is shared between
  the original and its copies, so the function is preserved exactly without any zero weights.
- ``firefly`` (Wu et al., 2020, "Firefly neural architecture descent"): many random candidate
  fan-outs, each improved by a few steps of gradient ascent on its own fan-in gradient norm, and
  the k best kept; fan-in is GradMax's tiny step along the new gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from dynarch.basic_inits import gate_batchnorm
from dynarch.errors import DynarchError
from dynarch.gradmax import (
    GradMaxOptions,
    fan_in_from_gradient,
    fan_out_from_columns,
    fan_out_norm,
    gradient_matrix,
    random_when_unsupported,
)
from dynarch.groups import GroupMember
from dynarch.growth_context import GrowthContext, GrowthOptions, NewChannels, takes_options
from dynarch.layer_kinds import CHANNELWISE, CONSUMER, PRODUCER, channel_tensors, mixes_channels
from dynarch.probes import mean_weight_grads, seeded_generator


@dataclass(frozen=True)
class Net2NetOptions(GrowthOptions):
    pick: str = "random"  # or "largest" fan-in norm
    noise: float = 0.0
    seed: int | None = None  # None draws from the global RNG (torch.manual_seed)


@dataclass(frozen=True)
class FireflyOptions(GradMaxOptions):
    candidates: int | None = None  # default 4k
    seed: int | None = None
    steps: int = 10
    lr: float = 1.0


@takes_options(Net2NetOptions)
def net2net_init(ctx: GrowthContext) -> NewChannels:
    """Split k existing channels (Net2Net's wider operator): exact function preservation with
    non-zero fan-in, the classic alternative to zero-initialised growth.

    Options: ``pick`` ("random", seeded by ``seed``, or "largest" fan-in norm), ``noise`` (each
    new fan-out entry gets share - n and the original share + n, n ~ U(-noise, noise), so the
    halves still add up exactly). Channels are picked without replacement while k <= width; a
    channel picked r times shares its fan-out 1/(r+1) ways. Every producer's rows and bias,
    every channel-wise entry (BatchNorm affine and running stats, depthwise kernels) are copied;
    consumers after a flatten split the channel's whole block.
    """
    opts = ctx.options
    group = ctx.group
    noise = opts.noise
    if noise < 0:
        raise DynarchError(f"net2net noise must be >= 0, got {noise}")
    first = ctx.modules[group.producers[0]].weight
    gen = seeded_generator(first.device, opts.seed)
    chosen = _pick_channels(ctx, opts.pick, gen)
    copies = torch.bincount(chosen, minlength=group.width)  # r_c: copies made of channel c
    share = 1.0 / (copies + 1).to(first.dtype)  # noise-free fan-out share of every copy

    fan_in: dict[str, torch.Tensor] = {}
    fan_out: dict[str, torch.Tensor] = {}
    new_values: dict[tuple[str, str], torch.Tensor] = {}
    existing: dict[tuple[str, str], torch.Tensor] = {}
    info: dict[str, Any] = {"split": [int(c) for c in chosen]}
    for member in group.members:
        module = ctx.modules[member.module]
        if member.role == PRODUCER:
            rows = _entries(member, chosen.to(module.weight.device))
            fan_in[member.module] = module.weight.detach().index_select(0, rows).clone()
            if module.bias is not None:
                new_values[(member.module, "bias")] = module.bias.detach().index_select(0, rows)
        elif member.role == CHANNELWISE:
            if mixes_channels(module):  # a copied channel shifts their statistics
                info["not_exact"] = f"{member.module} normalises across channels"
            for ct in channel_tensors(module, CHANNELWISE):
                t = getattr(module, ct.attr).detach()
                idx = _entries(member, chosen.to(t.device))
                new_values[(member.module, ct.attr)] = t.index_select(ct.dim, idx).clone()
        elif member.role == CONSUMER:
            key = (member.module, "weight")
            weight = existing.get(key, module.weight.detach().clone())
            fan_out[member.module], existing[key] = _split_fan_out(
                weight, member, chosen, share, noise, gen
            )
    if ctx.data is not None and ctx.loss_fn is not None:
        grad_norm = _split_fan_in_grad_norm(ctx, chosen, share)
        if grad_norm is not None:
            info["fan_in_grad_norm"] = grad_norm
    return NewChannels(fan_in, fan_out, info=info, new_values=new_values, existing=existing)


def _pick_channels(ctx: GrowthContext, pick: str, gen: torch.Generator) -> torch.Tensor:
    """k channel indices on the producers' device: each channel once before any repeats."""
    width, k = ctx.group.width, ctx.k
    device = ctx.modules[ctx.group.producers[0]].weight.device
    rounds = math.ceil(k / width)
    if pick == "random":
        orders = [torch.randperm(width, generator=gen, device=device) for _ in range(rounds)]
    elif pick == "largest":
        sq = torch.zeros(width, device=device)
        for member in ctx.group.members:
            if member.role == PRODUCER:
                w = ctx.modules[member.module].weight.detach()
                rows = w.narrow(0, member.start, member.stop - member.start)
                sq = sq + rows.reshape(width, -1).float().pow(2).sum(1).to(device)
        orders = [sq.argsort(descending=True, stable=True)] * rounds
    else:
        raise DynarchError(f"net2net pick must be 'random' or 'largest', got {pick!r}")
    return torch.cat(orders)[:k]


def _entries(member: GroupMember, channels: torch.Tensor) -> torch.Tensor:
    """Indices along a member's channel dimension of ``channels`` (each a block of
    ``multiplicity`` consecutive entries, channel-major, starting at ``member.start``)."""
    mult = member.multiplicity
    offsets = torch.arange(mult, device=channels.device)
    return (member.start + channels[:, None] * mult + offsets).reshape(-1)


def _split_fan_out(
    weight: torch.Tensor,
    member: GroupMember,
    chosen: torch.Tensor,
    share: torch.Tensor,
    noise: float,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New fan-out columns (share - n) W[:, c] and the existing weight with W[:, c] scaled to
    share + sum of its copies' n: the columns of a channel and its copies sum to the old one."""
    chosen, share = chosen.to(weight.device), share.to(weight.device, weight.dtype)
    k, mult = len(chosen), member.multiplicity
    width = (member.stop - member.start) // mult
    out, kernel = weight.shape[0], weight.shape[2:]
    block = weight.narrow(1, member.start, width * mult).reshape(out, width, mult, *kernel)
    picked = block.index_select(1, chosen)  # (out, k, mult, *kernel)
    n = torch.zeros_like(picked)
    if noise > 0:
        rand = torch.rand(picked.shape, generator=gen, device=gen.device, dtype=picked.dtype)
        n = (rand.to(picked.device) * 2 - 1) * noise
    view = (1, -1) + (1,) * (picked.dim() - 2)
    new = picked * (share[chosen].view(view) - n)
    factor = share.view(view).expand_as(block).clone()
    factor.index_add_(1, chosen, n)
    weight = weight.clone()
    weight[:, member.start : member.start + width * mult] = (block * factor).reshape(
        out, width * mult, *kernel
    )
    return new.reshape(out, k * mult, *kernel), weight


def _split_fan_in_grad_norm(
    ctx: GrowthContext, chosen: torch.Tensor, share: torch.Tensor
) -> float | None:
    """||dL/dW_in|| of the new channels right after the split, from one backward pass on the old
    model: a copy computes what its original does and reaches the loss through ``share`` of the
    original's fan-out, so its fan-in gradient is share x the original's (exact for noise 0)."""
    members = [m for m in ctx.group.members if m.role == PRODUCER]
    weights = [ctx.modules[m.module].weight for m in members]
    if not all(w.requires_grad for w in weights):
        return None
    max_samples = ctx.options.max_samples
    means, samples = mean_weight_grads(ctx.model, weights, ctx.data, ctx.loss_fn, max_samples)
    if samples == 0:
        return None
    sq = 0.0
    for member, mean in zip(members, means, strict=True):
        picked = chosen.to(mean.device)
        rows = mean.index_select(0, _entries(member, picked)).reshape(len(picked), -1)
        factor = share.to(mean.device, mean.dtype)[picked]
        sq += float((rows * factor[:, None]).pow(2).sum())
    return math.sqrt(sq)


@takes_options(FireflyOptions)
@random_when_unsupported
def firefly_init(ctx: GrowthContext) -> NewChannels:
    """Firefly-style search: ``candidates`` (default 4k) random unit fan-outs, ``steps`` (10)
    projected gradient-ascent steps each on its own ||M^T u||, keep the k best, scale like
    GradMax. A cheap, parallel stand-in for an exact eigen-solve on large M.

    Each step is u <- normalise(u + lr * M M^T u / ||M^T u||^2): the gradient of ||M^T u||
    with step size lr / ||M^T u||, i.e. a shifted power iteration, so the step is invariant to
    the scale of M and no candidate's score ever decreases (``lr`` default 1).
    """
    opts = ctx.options
    stats = gradient_matrix(ctx, opts.max_samples)
    m = stats.matrix
    target_norm = fan_out_norm(ctx, opts)
    count = max(opts.candidates or 4 * ctx.k, ctx.k)
    steps, lr = opts.steps, opts.lr
    gen = seeded_generator(m.device, opts.seed)
    u = torch.randn(m.shape[0], count, device=m.device, dtype=m.dtype, generator=gen)
    u = u / u.norm(dim=0, keepdim=True).clamp_min(1e-30)
    start_scores = (m.T @ u).norm(dim=0)
    for _ in range(steps):
        proj = m.T @ u  # (fan_in, candidates)
        rayleigh = proj.pow(2).sum(0, keepdim=True).clamp_min(1e-30)
        u = u + lr * (m @ proj) / rayleigh
        u = u / u.norm(dim=0, keepdim=True).clamp_min(1e-30)
    scores = (m.T @ u).norm(dim=0)
    top = scores.topk(ctx.k).indices
    cols = u[:, top] * target_norm
    epsilon = opts.epsilon
    new = fan_in_from_gradient(ctx, m, cols, epsilon)
    info: dict[str, Any] = {
        "samples": stats.samples,
        "fan_in_grad_norm": float((cols.T @ m).norm()),
        "candidates": count,
        # the same objective for the k best candidates before the ascent
        "start_fan_in_grad_norm": float(start_scores.topk(ctx.k).values.norm()) * target_norm,
    }
    channels = NewChannels(
        fan_in=new, fan_out=fan_out_from_columns(ctx, stats.row_blocks, cols), info=info
    )
    return gate_batchnorm(ctx, channels, epsilon)
