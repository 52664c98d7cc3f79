"""TINY (Verbockhaven et al., 2024, "Growing Tiny Networks: Spotting Expressivity Bottlenecks"):
new neurons that carry what the existing weights cannot express.

The consumer's *desired update* is V = -dL/dz (its pre-activation gradient). The best change
of the consumer's own weights (and bias) explains the part ``dW* p`` of V (least squares on its
input patches p); the rest, V_proj, is the expressivity bottleneck. k new neurons with fan-in
alpha and fan-out omega add ``omega (alpha^T q)`` (q: the producer's input patches,
linearised activation), and the rank-k least-squares fit of V_proj under unit-variance
pre-activations (alpha^T S alpha = 1) is the top-k SVD of ``N S^(-1/2) = sum sigma v u^T``,
N = M of :mod:`dynarch.gradmax` built from V_proj: ``alpha_k = S^(-1/2) u_k``,
``omega_k = sigma_k v_k``. Behind a BatchNorm q is centred and S is its covariance.

The new units start at the layer's scale (new gamma = the mean |gamma|; without BatchNorm the
fan-in at the mean fan-in norm) and an amplitude t scales only the fan-out, t = 1 being a
mean fan-out as large as the existing units' one; t is chosen by a line search on the real loss
of the growth batch. To first order the loss changes by ``-t * first_order_decrease``. (The
paper puts the amplitude on both sides; as the gradients shrink during training that makes the
new units' scale explode, measured on digits: the fan-in side reached 1e13.) Not function
preserving by design: the record says what the loss did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynarch.basic_inits import group_batchnorm, mean_fan_in_norm, start_batchnorm
from dynarch.errors import DynarchError
from dynarch.fanin import grown_copy, whitening, zeros_when_unsupported
from dynarch.gradmax import (
    existing_fan_out_norm,
    fan_out_from_columns,
    gradient_matrix,
    top_singular_vectors,
)
from dynarch.growth_context import GrowthContext, GrowthOptions, NewChannels, takes_options
from dynarch.layer_kinds import CONSUMER
from dynarch.probes import batches, buffers_restored

# Ridge of the consumer's input second moment, relative to its mean diagonal: dead inputs
# (a ReLU channel that is zero on the batch) make it singular.
_CONSUMER_RIDGE = 1e-4


class _ConsumerFit:
    """The least-squares best update of each consumer's own weights, dW* = G (S + rI)^-1, from
    sums over the growth batch of its input patches' second moment S and weight gradient G.
    With fewer patch rows than fan-in entries (fc1 after a flatten: 128 rows, 4096 entries)
    the solve goes through the rows' Gram matrix (Woodbury) instead of S."""

    def __init__(self) -> None:
        self.moment: dict[str, torch.Tensor] = {}
        self.grad: dict[str, torch.Tensor] = {}
        self.rows: dict[str, list[torch.Tensor] | None] = {}
        self.solution: dict[str, torch.Tensor] = {}

    def collect(self, name: str, consumer: nn.Module, inp: torch.Tensor, delta: torch.Tensor):
        p = _patches(consumer, inp).double()  # (rows, fan_in (+1 for a bias))
        d = delta.movedim(1, -1).reshape(len(p), -1).double() * len(inp)  # per-sample grads
        self.grad[name] = self.grad.get(name, 0) + d.T @ p
        rows = self.rows.setdefault(name, [])
        if rows is None:
            self.moment[name] += p.T @ p
            return delta
        rows.append(p)
        if sum(map(len, rows)) >= p.shape[1]:  # from now on the moment is the smaller side
            self.moment[name] = sum(r.T @ r for r in rows)
            self.rows[name] = None
        return delta

    def solve(self, reduce_sum=None) -> None:
        for name, g in self.grad.items():
            rows = self.rows[name]
            if reduce_sum is not None:  # other processes' rows are not here: sum the moments
                moment = self.moment[name] if rows is None else sum(r.T @ r for r in rows)
                self.solution[name] = _ridge_solve(reduce_sum(moment), reduce_sum(g))
            elif rows is None:
                self.solution[name] = _ridge_solve(self.moment[name], g)
            else:
                self.solution[name] = _woodbury_solve(torch.cat(rows), g)

    def project(self, name: str, consumer: nn.Module, inp: torch.Tensor, delta: torch.Tensor):
        """delta minus what dW* explains: the bottleneck, in the units of ``delta``."""
        p = _patches(consumer, inp)
        explained = (p.double() @ self.solution[name].T).to(delta.dtype) / len(inp)
        return delta - explained.reshape(delta.movedim(1, -1).shape).movedim(-1, 1)


def _ridge_solve(moment: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g (S + rI)^-1, r = the relative ridge x S's mean diagonal."""
    ridge = _CONSUMER_RIDGE * float(moment.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(len(moment), dtype=moment.dtype, device=moment.device)
    return torch.linalg.solve(moment + ridge * eye, g.T).T


def _woodbury_solve(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g (p^T p + rI)^-1 through the (rows x rows) Gram: (g^T - p^T (p p^T + rI)^-1 p g^T)/r."""
    ridge = _CONSUMER_RIDGE * max(float(p.pow(2).sum()) / p.shape[1], 1e-30)
    gram = p @ p.T + ridge * torch.eye(len(p), dtype=p.dtype, device=p.device)
    return ((g.T - p.T @ torch.linalg.solve(gram, p @ g.T)) / ridge).T


def _patches(consumer: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """The consumer's input patches, one row per (sample, output position), with a column of
    ones when it has a bias (the bias can explain a constant part of V too)."""
    if isinstance(consumer, nn.Linear):
        p = inp.reshape(-1, inp.shape[-1])
    else:
        cols = F.unfold(
            inp, consumer.kernel_size, consumer.dilation, consumer.padding, consumer.stride
        )
        p = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if consumer.bias is not None:
        p = torch.cat([p, torch.ones_like(p[:, :1])], dim=1)
    return p


@dataclass(frozen=True)
class TinyOptions(GrowthOptions):
    """``held_out``: share of the growth batch kept apart for the line search; ``amplitude``
    fixes the fan-out amplitude instead; ``threshold``: relative eigenvalue floor."""

    held_out: float = 0.5
    amplitude: float | None = None
    threshold: float = 1e-3


@takes_options(TinyOptions)
@zeros_when_unsupported
def tiny_init(ctx: GrowthContext) -> NewChannels:
    """TINY's k neurons from the expressivity bottleneck, amplitude by line search (``amplitude=``
    fixes it). Options: ``max_samples`` (512), ``held_out`` (default 0.5: the last half of the
    growth batch is kept apart for the line search; 0: it uses the statistics' own samples,
    which on the CIFAR subset fitted the batch and cost 0.043 accuracy, docs/study.md)."""
    max_samples = ctx.options.max_samples
    if ctx.data is None or ctx.loss_fn is None:
        raise DynarchError(f"init {ctx.init_name!r} needs data=(x, y) (or batches) and loss_fn")
    ctx, search = _split(ctx, ctx.options.held_out, max_samples)
    norm_info = group_batchnorm(ctx)
    behind_bn = norm_info is not None
    fit = _ConsumerFit()
    full = gradient_matrix(ctx, max_samples, centre=behind_bn, with_cov=True, delta_map=fit.collect)
    fit.solve(ctx.reduce_sum)
    proj = gradient_matrix(ctx, max_samples, centre=behind_bn, delta_map=fit.project)
    norm = mean_fan_in_norm(ctx)
    ridge = float(norm_info[1].eps) / norm**2 if behind_bn else 0.0
    white = whitening(full, ridge, ctx.options.threshold)
    n_proj = -proj.matrix.double()  # rows: fan-out entries; columns: fan-in entries
    v, s = _numerical_rank(*top_singular_vectors(n_proj @ white, min(ctx.k, *n_proj.shape)))
    right = (white @ n_proj.T @ v) / s.clamp_min(1e-300)  # right singular vectors
    u = white @ right  # alpha: unit-variance pre-activations, alpha^T (S + ridge) alpha = 1
    if v.shape[1] < ctx.k:  # more neurons than M has directions: the rest start off
        pad = ctx.k - v.shape[1]
        v = torch.cat([v, v.new_zeros(v.shape[0], pad)], dim=1)
        s = torch.cat([s, s.new_zeros(pad)])
        u = torch.cat([u, white @ torch.randn(u.shape[0], pad, dtype=u.dtype, device=u.device)], 1)
    omega = v * s  # (fan-out entries, k); at t = 1 their mean norm is the existing units'
    omega *= existing_fan_out_norm(ctx) / float(omega.norm(dim=0).mean().clamp_min(1e-30))
    new, gains = _channels(ctx, u, omega, norm, behind_bn, full.row_blocks)
    decrease = float(((-full.matrix.double()) @ (u * gains) * omega).sum())
    amplitude, losses = _line_search(ctx, new, search)
    for name in new.fan_out:
        new.fan_out[name] = new.fan_out[name] * amplitude
    new.info |= {
        "samples": full.samples,
        "singular_values": [float(x) for x in s],
        "first_order_decrease": decrease,  # -dL/dt at t = 0
        "amplitude": amplitude,
        "loss_before": losses[0.0],
        "loss_after": losses[amplitude],
        "predicted_loss_after": losses[0.0] - amplitude * decrease,
    }
    return new


def _numerical_rank(v: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The singular pairs above float32 round-off of the largest (M is built in float32). On a
    rank-deficient batch (2 samples behind a BatchNorm at 1x1: centred, rank 1) the others are
    noise, and dividing by their ~0 value gave non-finite fan-ins for 8 of 60 seeds."""
    largest = float(s.max()) if s.numel() else 0.0
    keep = s > largest * torch.finfo(torch.float32).eps
    return v[:, keep], s[keep]


def _channels(ctx, alpha, omega, norm, behind_bn, row_blocks) -> tuple[NewChannels, torch.Tensor]:
    """NewChannels with fan-in alpha at the layer's scale and fan-out omega, and each unit's
    activation per unit of alpha^T q (the gain: gamma behind a BatchNorm, which normalises
    alpha^T q to unit variance; the fan-in's rescaling without one)."""
    producer_name = ctx.group.producers[0]
    w = ctx.modules[producer_name].weight
    lengths = alpha.norm(dim=0).clamp_min(1e-300)
    rows = alpha.T / lengths[:, None] * norm
    new = NewChannels(
        fan_in={producer_name: rows.to(w.dtype).reshape(ctx.fan_in_shape(producer_name))},
        fan_out=fan_out_from_columns(ctx, row_blocks, omega),
    )
    if behind_bn:
        gamma = float(group_batchnorm(ctx)[1].weight.detach().abs().mean())
        start_batchnorm(ctx, new, gamma)
        return new, torch.full_like(lengths, gamma)
    return new, norm / lengths


def _split(ctx: GrowthContext, held_out: float, max_samples: int) -> tuple[GrowthContext, list]:
    """The context whose data the statistics use, and the batches of the line search: the
    same, or with ``held_out`` in (0, 1) that share of the samples, kept apart (a line search
    on the samples that chose the neurons fits them, not the data). Fewer than 4 samples are
    not split: a 1-sample half cannot pass a train-mode BatchNorm at 1x1 resolution."""
    data = list(batches(ctx.data, max_samples))
    if not 0 < held_out < 1 or sum(len(b[0]) for b in data) < 4:
        return ctx, data
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    cut = min(max(1, round(len(x) * (1 - held_out))), len(x) - 1)
    return dataclasses.replace(ctx, data=(x[:cut], y[:cut])), [(x[cut:], y[cut:])]


def _line_search(
    ctx: GrowthContext, new: NewChannels, data: list
) -> tuple[float, dict[float, float]]:
    """The fan-out amplitude t that minimises the real training-mode loss on ``data``,
    among 0 and 2^-j for j = 0..12 (larger new fan-outs than the existing ones fit the one
    growth batch, not the data). The grid is walked from t = 1 down and stops two points past
    the best (the loss along the line is taken to be unimodal). When t = 0 wins, the smallest t
    tried is used: the units are still added, nearly off."""
    probe = grown_copy(ctx, new)
    fixed = ctx.options.amplitude is not None
    grid = [ctx.options.amplitude] if fixed else [2.0**-j for j in range(13)]
    slices = {
        m.module: probe.get_submodule(m.module).weight.data.narrow(
            1, m.stop, ctx.k * m.multiplicity
        )
        for m in ctx.group.members
        if m.role == CONSUMER
    }
    originals = {name: t.clone() for name, t in slices.items()}
    losses: dict[float, float] = {}
    with torch.no_grad(), buffers_restored(probe):
        for a in [0.0, *grid]:
            for name, t in slices.items():
                t.copy_(originals[name] * a)
            losses[a] = _loss(probe, data, ctx.loss_fn, ctx.reduce_sum)
            tried = [v for k, v in losses.items() if k > 0]
            if len(tried) >= 3 and min(tried) < min(tried[-2:]):
                break
    best = min(losses, key=losses.get)
    if best == 0.0 and not fixed:
        best = min(k for k in losses if k > 0)
    return best, losses


def _loss(model: nn.Module, data: list, loss_fn: Any, reduce_sum: Any = None) -> float:
    """Mean loss over ``data`` (and over every process's data with ``reduce_sum``, so that all
    processes choose the same amplitude)."""
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in data:
        total[0] += float(loss_fn(model(x.to(device)), y.to(device))) * len(x)
        total[1] += len(x)
    if reduce_sum is not None:
        total = reduce_sum(total)
    return float(total[0] / total[1])
