"""GradMax (Evci et al., ICLR 2022): fan-out of new neurons that maximises their fan-in gradient.

For a new channel with zero fan-in ``w_in`` and fan-out ``w_out``, treating the path from the
producer's pre-activation to the consumer's input as linear (activation derivative 1 at 0,
BatchNorm as identity, pooling as averaging), the gradient of the loss w.r.t. ``w_in`` is

    dL/dw_in = M^T w_out,   M = sum_b  dL/dz_consumer[b]  (x)  patches of the producer input[b]

with rows of M indexed like the consumer's fan-out entries and columns like the producer's
fan-in entries. The k fan-outs of fixed norm that maximise ||dL/dW_in||_F are the top-k left
singular vectors of M. We build M exactly from unfolded patches (no composite-kernel border
approximation) on the model's device, and take singular vectors from the Gram matrix of the
smaller side with ``torch.linalg.eigh``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynarch.basic_inits import epsilon_fan_in, gate_batchnorm, random_init
from dynarch.errors import DynarchError, some_of
from dynarch.groups import grouped_convs
from dynarch.growth_context import (
    EpsilonOptions,
    GrowthContext,
    Initializer,
    NewChannels,
    takes_options,
)
from dynarch.layer_kinds import CONSUMER
from dynarch.probes import batches, buffers_restored, check_finite, seeded_generator

# (consumer name, consumer, its input, dL/d its output) -> the gradient to build M from
DeltaMap = Callable[[str, nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GradMaxOptions(EpsilonOptions):
    """GradMax's fan-out norm: ``norm``, or ``scale`` x the existing channels' mean fan-out
    norm (:func:`fan_out_norm`)."""

    scale: float = 0.5
    norm: float | None = None


@dataclass(frozen=True)
class GradMaxOptOptions(GradMaxOptions):
    seed: int | None = None  # None draws from the global RNG (torch.manual_seed)
    steps: int = 100
    lr: float | None = None  # default 0.3 / sqrt(rows of M)
    orthogonal: bool = False


class GradMaxUnsupported(DynarchError):
    """The group's shape is outside what GradMax statistics handle (one producer, conv/linear)."""


@dataclass
class GradientStats:
    """M per consumer (rows = that consumer's fan-out entries), stacked over consumers."""

    matrix: torch.Tensor
    row_blocks: dict[str, tuple[int, int]]
    samples: int
    # (fan_in, fan_in) second moment of the producer's patches over samples and positions
    # (per-batch centred with ``centre=True``); only with ``with_cov=True``
    cov: torch.Tensor | None = None
    # the patches themselves (one row per sample and position, cov = rows^T rows / len) when
    # there are fewer rows than fan-in entries and one process: their Gram is the cheap way to
    # the covariance's eigenvectors (fc1 of a VGG: 128 rows, 4096 entries)
    rows: torch.Tensor | None = None


def gradient_matrix(
    ctx: GrowthContext,
    max_samples: int = 512,
    *,
    centre: bool = False,
    with_cov: bool = False,
    mean_column: bool = False,
    delta_map: DeltaMap | None = None,
) -> GradientStats:
    """Accumulate M over ``ctx.data`` (one forward/backward per batch; model left unchanged).

    ``centre`` subtracts each batch's mean patch first (what train-mode BatchNorm does to a new
    channel's pre-activation), ``with_cov`` also sums the patches' second moment, and
    ``delta_map(name, consumer, consumer_input, delta)`` replaces a consumer's output gradient
    before it enters M (TINY's projected desired update). ``mean_column`` appends one column to
    M for a constant patch of ones: the fan-out gradient that a channel's mean activation adds.
    """
    if ctx.data is None or ctx.loss_fn is None:
        raise DynarchError(f"init {ctx.init_name!r} needs data=(x, y) (or batches) and loss_fn")
    producers = ctx.group.producers
    if len(producers) != 1:
        raise GradMaxUnsupported(
            f"group {ctx.group.name!r} has {len(producers)} producers (a residual stream)"
        )
    producer = ctx.modules[producers[0]]
    consumers = {c: ctx.modules[c] for c in ctx.group.consumers}
    multiplicity = {m.module: m.multiplicity for m in ctx.group.members if m.role == CONSUMER}

    captured: dict[str, Any] = {}
    hooks = [producer.register_forward_hook(_capture(captured, "producer"))]
    hooks += [c.register_forward_hook(_capture(captured, name)) for name, c in consumers.items()]
    blocks: dict[str, torch.Tensor] = {}
    moments = _PatchMoments(keep_rows=ctx.reduce_sum is None) if with_cov else None
    samples = 0
    device = producer.weight.device
    try:
        with buffers_restored(ctx.model):  # BatchNorm running stats
            for x, y in batches(ctx.data, max_samples):
                x, y = x.to(device), y.to(device)
                captured.clear()
                with torch.enable_grad():
                    loss = ctx.loss_fn(ctx.model(x), y)
                    called = [name for name in consumers if name in captured]
                    grads = torch.autograd.grad(
                        loss, [captured[name][1] for name in called], allow_unused=True
                    )
                # a consumer this mode does not run (a training-only head in eval mode) gets
                # no gradient, like an unused one: zero rows in M
                found = dict(zip(called, grads, strict=True))
                deltas = [found.get(name) for name in consumers]
                p_in, p_out = captured["producer"]
                cols = _producer_patches(producer, p_in)  # (B, F) or (B, F, L)
                if centre:
                    cols = cols - cols.mean([d for d in range(cols.dim()) if d != 1], keepdim=True)
                if moments is not None:
                    moments.add(cols)
                if mean_column:
                    cols = torch.cat([cols, torch.ones_like(cols[:, :1])], dim=1)
                for (name, consumer), delta in zip(consumers.items(), deltas, strict=True):
                    if delta is None:
                        continue
                    delta = delta.detach()
                    if delta_map is not None:
                        delta = delta_map(name, consumer, captured[name][0], delta)
                    part = _consumer_block(
                        cols,
                        p_out.shape,
                        consumer,
                        captured[name][0].shape,
                        delta,
                        multiplicity[name],
                    )
                    blocks[name] = blocks.get(name, 0) + part * len(x)  # weight batches by size
                samples += len(x)
    finally:
        for h in hooks:
            h.remove()
    return _stacked(ctx, blocks, moments, samples)


def _stacked(
    ctx: GrowthContext,
    blocks: dict[str, torch.Tensor],
    moments: _PatchMoments | None,
    samples: int,
) -> GradientStats:
    """Per-consumer sums -> M (the mean over samples, consumers stacked in group order),
    summed over processes first; a consumer that got no gradient has zero rows."""
    producer = ctx.modules[ctx.group.producers[0]]
    device = producer.weight.device
    multiplicity = {m.module: m.multiplicity for m in ctx.group.members if m.role == CONSUMER}
    consumers = list(dict.fromkeys(ctx.group.consumers))
    for name in consumers:
        if name not in blocks:
            blocks[name] = torch.zeros(
                _fan_out_size(ctx.modules[name], multiplicity[name]),
                _fan_in_size(producer),
                device=device,
            )
    if ctx.reduce_sum is not None:  # every process's batches, as if they were one
        blocks = {name: ctx.reduce_sum(block) for name, block in blocks.items()}
        if moments is not None:
            moments.total = ctx.reduce_sum(moments.total)
        samples = int(ctx.reduce_sum(torch.tensor(float(samples), device=device)))
    if samples == 0:
        raise DynarchError(f"init {ctx.init_name!r} got no data samples")
    rows, row_blocks, offset = [], {}, 0
    for name in consumers:
        block = blocks[name]
        rows.append(block / samples)
        row_blocks[name] = (offset, offset + block.shape[0])
        offset += block.shape[0]
    cov, patches = moments.result(samples) if moments is not None else (None, None)
    # after the sums over processes: every process refuses together
    matrix = check_finite(torch.cat(rows), f"the gradient matrix M of init {ctx.init_name!r}")
    if cov is not None:
        check_finite(cov, f"the input covariance of init {ctx.init_name!r}")
    return GradientStats(matrix, row_blocks, samples, cov, patches)


class _PatchMoments:
    """The producer patches' second moment over samples and positions (each sample weighs
    the same, whatever its number of positions), and the patches themselves while there are
    fewer rows than fan-in entries (``keep_rows``)."""

    def __init__(self, keep_rows: bool) -> None:
        self.total: torch.Tensor | None = None
        self.rows: list[torch.Tensor] | None = [] if keep_rows else None

    def add(self, cols: torch.Tensor) -> None:
        """``cols``: one batch's (B, F) or (B, F, L) patches."""
        flat = cols.movedim(1, -1).reshape(-1, cols.shape[1])
        weight = len(cols) / len(flat)
        part = (flat.T @ flat).double() * weight
        self.total = part if self.total is None else self.total + part
        if self.rows is not None:
            self.rows.append(flat * weight**0.5)
            if sum(map(len, self.rows)) >= flat.shape[1]:
                self.rows = None  # the moment is the smaller side

    def result(self, samples: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = torch.cat(self.rows).double() / samples**0.5 if self.rows else None
        return self.total / samples, rows


def _capture(store: dict[str, Any], key: str):
    """Keep (input, output) of a module; hand on a copy so in-place ops after it (ReLU(inplace))
    cannot overwrite the captured pre-activation."""

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        store[key] = (inputs[0].detach().clone(), output)
        return output.clone()

    return hook


def _fan_in_size(producer: nn.Module) -> int:
    return producer.weight[0].numel()


def _fan_out_size(consumer: nn.Module, multiplicity: int) -> int:
    w = consumer.weight
    return w.shape[0] * multiplicity * (w[0, 0].numel() if w.dim() > 2 else 1)


def _producer_patches(producer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, fan_in, *spatial of the producer output): what each fan-in entry multiplies."""
    if isinstance(producer, nn.Linear):
        return x.reshape(x.shape[0], -1)
    if not isinstance(producer, nn.Conv2d) or producer.groups != 1:
        raise GradMaxUnsupported(
            f"GradMax needs a Linear or ungrouped Conv2d producer, got {type(producer).__name__}"
        )
    if isinstance(producer.padding, str) or producer.padding_mode != "zeros":
        raise GradMaxUnsupported("GradMax needs a conv with numeric zero padding")
    cols = F.unfold(x, producer.kernel_size, producer.dilation, producer.padding, producer.stride)
    return cols


def _consumer_block(
    cols: torch.Tensor,
    p_out_shape: torch.Size,
    consumer: nn.Module,
    c_in_shape: torch.Size,
    delta: torch.Tensor,
    multiplicity: int,
) -> torch.Tensor:
    """Sum over the batch of dL/dz_consumer (x) producer patches, routed along the path.

    With a batch-averaged loss this is exactly the gradient of the new fan-in.

    The spatial path producer-output -> consumer-input (identity, pooling, flatten) is taken
    as adaptive average pooling from the producer's to the consumer's spatial size.
    """
    batch, fan_in = cols.shape[0], cols.shape[1]
    if cols.dim() == 2:  # linear producer
        if not isinstance(consumer, nn.Linear) or multiplicity != 1:
            raise GradMaxUnsupported("a linear producer must feed linear consumers directly")
        return delta.reshape(batch, -1).T @ cols
    h, w = p_out_shape[-2:]
    image = cols.reshape(batch, fan_in, h, w)
    if isinstance(consumer, nn.Linear):  # conv -> (pool) -> flatten -> linear
        ph, pw = _pooled_size(h, w, multiplicity)
        pooled = F.adaptive_avg_pool2d(image, (ph, pw)).reshape(batch, fan_in, ph * pw)
        return torch.einsum("bo,bfs->osf", delta, pooled).reshape(-1, fan_in)
    if not isinstance(consumer, nn.Conv2d) or consumer.groups != 1:
        raise GradMaxUnsupported(
            f"GradMax needs Linear or ungrouped Conv2d consumers, got {type(consumer).__name__}"
        )
    if isinstance(consumer.padding, str) or consumer.padding_mode != "zeros":
        raise GradMaxUnsupported("GradMax needs consumer convs with numeric zero padding")
    if tuple(c_in_shape[-2:]) != (h, w):
        image = F.adaptive_avg_pool2d(image, c_in_shape[-2:])
    # M[(o, u), f] = sum_b,t delta[b, o, t] * image[b, f, pos(u, t)]: the weight gradient of a
    # conv with the consumer's geometry whose input is the producer-patch image.
    grad = torch.nn.grad.conv2d_weight(
        image,
        (consumer.out_channels, fan_in, *consumer.kernel_size),
        delta,
        stride=consumer.stride,
        padding=consumer.padding,
        dilation=consumer.dilation,
    )  # (out, fan_in, kh, kw)
    return grad.flatten(2).transpose(1, 2).reshape(-1, fan_in)


def _pooled_size(h: int, w: int, multiplicity: int) -> tuple[int, int]:
    """Spatial size that a (h, w) map is pooled to before a flatten of ``multiplicity`` entries."""
    factor = math.sqrt(h * w / multiplicity)
    ph, pw = round(h / factor), round(w / factor)
    if ph * pw != multiplicity:
        raise GradMaxUnsupported(f"cannot map a {h}x{w} map onto {multiplicity} flat features")
    return ph, pw


def top_singular_vectors(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k left singular vectors (columns) and singular values of ``m``.

    Small sides: exact, from ``eigh`` of the Gram matrix of the smaller side (float64). When
    k is much smaller than both sides (wide late layers: M of 4608 x 2304 in resnet18's
    layer4), a randomized truncated SVD (``torch.svd_lowrank``) costs O(rows * cols * k)
    instead of a cubic eigen-solve.
    """
    # all-zero columns (units whose consumer entries never see a gradient, e.g. 1x1 maps
    # padded by a 3x3 kernel) change neither the left singular vectors nor the values, and
    # make the Gram matrix degenerate enough that LAPACK's eigen-solver can fail to converge
    m = m[:, (m != 0).any(dim=0)] if m.numel() else m
    small = min(m.shape)
    if small > 512 and 8 * k <= small:
        u, s, _ = torch.svd_lowrank(m.double(), q=min(k + 16, small), niter=6)
        return u[:, :k].to(m.dtype), s[:k].to(m.dtype)
    work = m.double()
    try:
        u, s = _top_by_gram(work, k)
    except torch.linalg.LinAlgError:  # still degenerate: the SVD itself, slower but robust
        u, s, _ = torch.linalg.svd(work, full_matrices=False)
        u, s = u[:, :k], s[:k]
    return u.to(m.dtype), s.to(m.dtype)


def _top_by_gram(work: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k left singular vectors and values from ``eigh`` of the smaller Gram matrix."""
    if work.shape[0] <= work.shape[1]:
        evals, evecs = torch.linalg.eigh(work @ work.T)
        order = evals.argsort(descending=True)[:k]
        return evecs[:, order], evals[order].clamp_min(0).sqrt()
    evals, evecs = torch.linalg.eigh(work.T @ work)
    order = evals.argsort(descending=True)[:k]
    s = evals[order].clamp_min(0).sqrt()
    return (work @ evecs[:, order]) / s.clamp_min(1e-300), s


def orthogonal_fill(u: torch.Tensor, count: int, generator: torch.Generator | None = None):
    """``count`` random unit columns orthogonal to ``u``'s columns and to each other, as far as
    the space has room; past its dimension (more new units than a consumer has fan-out
    entries, e.g. growing the layer before a 10-way classifier by 32) plain random unit columns."""
    room = max(0, min(count, u.shape[0] - u.shape[1]))
    rand = torch.randn(u.shape[0], count, device=u.device, dtype=u.dtype, generator=generator)
    orth = rand[:, :room]
    if u.shape[1]:
        orth = orth - u @ (u.T @ orth)
    q, _ = torch.linalg.qr(orth)
    extra = rand[:, room:]
    return torch.cat([q, extra / extra.norm(dim=0, keepdim=True).clamp_min(1e-30)], dim=1)


def fill_past_rank(
    u: torch.Tensor, s: torch.Tensor, k: int, matrix: torch.Tensor, eps: float
) -> tuple[torch.Tensor, int, dict[str, Any]]:
    """The singular vectors ``u`` of ``matrix`` whose singular value is above its round-off
    (``eps`` x the largest x the larger side), filled up to ``k`` columns with random ones
    orthogonal to them; the rank, and an info dict that says what was filled and why."""
    tol = float(s[0]) * max(matrix.shape) * eps if len(s) else 0.0
    rank = int((s > tol).sum()) if float(matrix.abs().max()) > 0 else 0
    if rank >= k:
        return u, rank, {}
    info = {
        "random_fill": k - rank,
        "reason": "zero gradient" if rank == 0 else f"rank of M is {rank} < k",
    }
    return torch.cat([u[:, :rank], orthogonal_fill(u[:, :rank], k - rank)], dim=1), rank, info


def existing_fan_out_norm(ctx: GrowthContext) -> float:
    """Mean norm of the existing channels' fan-out vectors (all consumers concatenated)."""
    total = None
    for member in ctx.group.members:
        if member.role != CONSUMER:
            continue
        w = ctx.modules[member.module].weight.detach()
        block = w.narrow(1, member.start, member.stop - member.start)
        per_channel = block.reshape(w.shape[0], ctx.group.width, member.multiplicity, -1)
        sq = per_channel.pow(2).sum(dim=(0, 2, 3))
        total = sq if total is None else total + sq
    return float(total.sqrt().mean()) if total is not None else 1.0


def fan_out_norm(ctx: GrowthContext, options: GradMaxOptions) -> float:
    """The norm of every new fan-out column: ``norm``, or ``scale`` x the existing mean."""
    return float(options.norm or options.scale * existing_fan_out_norm(ctx))


def fan_out_from_columns(
    ctx: GrowthContext, row_blocks: dict[str, tuple[int, int]], cols: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Split stacked fan-out columns (rows like M, ``GradientStats.row_blocks``) into each
    consumer's new weight slice."""
    fan_out = {}
    for name, (a, b) in row_blocks.items():
        shape = ctx.fan_out_shape(name)  # (out, k*mult, *kernel)
        w = ctx.modules[name].weight
        mult = shape[1] // ctx.k
        block = cols[a:b].reshape(w.shape[0], mult, *w.shape[2:], ctx.k)
        block = block.movedim(-1, 1)  # (out, k, mult, *kernel)
        fan_out[name] = block.reshape(shape).to(w.dtype)
    return fan_out


def _check_not_grouped(ctx: GrowthContext) -> None:
    """The statistics are one matrix per layer, for outputs that read every new channel; a
    grouped conv's output reads its own block's only (GradMax per block is not done)."""
    grouped = grouped_convs(ctx.group, ctx.modules)
    if grouped:
        raise GradMaxUnsupported(f"grouped convolutions ({some_of(grouped)}) are not supported")


def fallback_when_unsupported(
    fallback: Initializer, name: str
) -> Callable[[Initializer], Initializer]:
    """Decorator: groups outside the statistics (a residual stream with several producers,
    grouped convs) grow with ``fallback`` instead of failing a run; the record's
    ``info["fallback"]`` says which and why."""

    def decorate(init: Initializer) -> Initializer:
        @functools.wraps(init)
        def wrapped(ctx: GrowthContext) -> NewChannels:
            try:
                _check_not_grouped(ctx)
                return init(ctx)
            except GradMaxUnsupported as exc:
                new = fallback(ctx)
                new.info["fallback"] = f"{name}: {exc}"
                return new

        return wrapped

    return decorate


# the zero fan-in family falls back to zero fan-in units with a random fan-out
random_when_unsupported = fallback_when_unsupported(random_init, "random")


@takes_options(GradMaxOptions)
@random_when_unsupported
def gradmax_init(ctx: GrowthContext) -> NewChannels:
    """Fan-out = top-k left singular vectors of M, each scaled to ``scale`` x the mean existing
    fan-out norm (or ``norm``); fan-in = ``epsilon`` x the mean fan-in norm along the new
    gradient's descent direction, so new units sit just off zero and ReLUs pass gradient."""
    opts = ctx.options
    stats = gradient_matrix(ctx, opts.max_samples)
    m = stats.matrix
    target_norm = fan_out_norm(ctx, opts)
    u, s = top_singular_vectors(m, ctx.k)
    u, _, info = fill_past_rank(u, s, ctx.k, m, torch.finfo(m.dtype).eps)
    info["samples"] = stats.samples
    cols = u * target_norm
    epsilon = opts.epsilon
    new = fan_in_from_gradient(ctx, m, cols, epsilon)
    info["fan_in_grad_norm"] = float((cols.T @ m).norm())
    info["singular_values"] = [float(v) for v in s[: ctx.k]]
    channels = NewChannels(
        fan_in=new, fan_out=fan_out_from_columns(ctx, stats.row_blocks, cols), info=info
    )
    return gate_batchnorm(ctx, channels, epsilon)


def fan_in_from_gradient(ctx: GrowthContext, m: torch.Tensor, cols: torch.Tensor, epsilon: float):
    """Tiny fan-in along minus the new fan-in gradient (one SGD-like step of relative size eps)."""
    producer = ctx.group.producers[0]
    grad = cols.T @ m  # (k, fan_in): dL/dw_in for each new unit
    direction = torch.where(grad.abs().sum(1, keepdim=True) > 0, -grad, torch.randn_like(grad))
    return {producer: epsilon_fan_in(ctx, producer, epsilon, direction)}


def fan_in_gradient_norm(ctx: GrowthContext, new: NewChannels) -> float | None:
    """||dL/dW_in|| of the new channels for any initializer's fan-out (None where the group is
    outside GradMax's statistics), so the history can compare initializers."""
    try:
        stats = gradient_matrix(ctx, ctx.options.max_samples)
    except GradMaxUnsupported:
        return None
    cols = torch.cat([_columns(ctx, name, new.fan_out[name]) for name in stats.row_blocks])
    return float((cols.T @ stats.matrix).norm())


def _columns(ctx: GrowthContext, name: str, fan_out: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fan_out_from_columns` for one consumer: (rows like M, k)."""
    w = ctx.modules[name].weight
    mult = fan_out.shape[1] // ctx.k
    block = fan_out.reshape(w.shape[0], ctx.k, mult, *w.shape[2:]).movedim(1, -1)
    return block.reshape(-1, ctx.k)


@takes_options(GradMaxOptOptions)
@random_when_unsupported
def gradmax_opt_init(ctx: GrowthContext) -> NewChannels:
    """GradMax by optimisation (the paper's GradMax-Opt): Adam on the fan-out instead of an SVD.

    A baseline for the closed form, and a route for objectives without one. Starts from random
    fan-out columns at GradMax's norm and takes ``steps`` Adam steps on ``-||W^T M||_F``,
    projecting every column back to that norm after each step (``orthogonal=True`` keeps the
    columns orthogonal instead, GradMax's own constraint). The gradient is first projected onto
    the tangent space of the constraint: its radial part, which the projection would undo
    anyway, otherwise dominates Adam's per-coordinate scaling and stalls the ascent (measured:
    ~0.5-0.9 of the optimum after 100 steps, against 1.000 with the tangent projection).

    With per-column norms the columns are decoupled, so each one converges to the top singular
    vector of M: the objective exceeds GradMax's (up to sqrt(k) sigma_1 vs. sqrt(sum sigma_i^2))
    but the k new units become (anti)parallel copies. The best iterate seen is returned. Uses
    the single ``gradient_matrix`` pass; everything else runs on M's device.
    """
    opts = ctx.options
    stats = gradient_matrix(ctx, opts.max_samples)
    m = stats.matrix
    target_norm = fan_out_norm(ctx, opts)
    steps = opts.steps
    orthogonal = opts.orthogonal and ctx.k <= m.shape[0]
    # The ascent runs on unit columns, scaled to ``target_norm`` at the end. Adam moves every
    # coordinate by about lr per step (less as the tangent gradient fades) and unit columns have
    # coordinates of about 1/sqrt(rows), so the default turns a column by a sizeable fraction of
    # its length at first and then settles. Measured on the test models after 100 steps: 0.1
    # reaches 1.000 of the optimum per column but only 0.979 with ``orthogonal``; 0.3 >= 0.996.
    lr = float(opts.lr or 0.3 / math.sqrt(m.shape[0]))
    gen = seeded_generator(m.device, opts.seed)
    start = torch.randn(m.shape[0], ctx.k, device=m.device, dtype=m.dtype, generator=gen)
    unit = _project(start, orthogonal)
    optimizer = torch.optim.Adam([unit], lr=lr)
    best, best_value = unit.clone(), -1.0
    with torch.no_grad():
        for step in range(steps + 1):
            proj = unit.T @ m
            value = float(proj.norm())
            if value > best_value:
                best, best_value = unit.clone(), value
            if step == steps:
                break
            # gradient of -||U^T M||_F in closed form, projected onto the constraint's tangent
            # space (sphere per column, or the Stiefel manifold)
            grad = -(m @ proj.T) / max(value, 1e-30)
            if orthogonal:
                grad -= unit @ (0.5 * (unit.T @ grad + grad.T @ unit))
            else:
                grad -= unit * (unit * grad).sum(0, keepdim=True)
            unit.grad = grad
            optimizer.step()
            unit.copy_(_project(unit, orthogonal))
    cols = best * target_norm
    epsilon = opts.epsilon
    new = fan_in_from_gradient(ctx, m, cols, epsilon)
    info: dict[str, Any] = {
        "samples": stats.samples,
        "fan_in_grad_norm": float((cols.T @ m).norm()),
        "steps": steps,
    }
    channels = NewChannels(
        fan_in=new, fan_out=fan_out_from_columns(ctx, stats.row_blocks, cols), info=info
    )
    return gate_batchnorm(ctx, channels, epsilon)


def _project(cols: torch.Tensor, orthogonal: bool) -> torch.Tensor:
    """Unit columns (or, with ``orthogonal``, the orthonormal frame of QR, signs kept)."""
    if orthogonal:
        q, r = torch.linalg.qr(cols)
        signs = torch.sign(torch.diagonal(r))
        return q * torch.where(signs == 0, torch.ones_like(signs), signs)
    return cols / cols.norm(dim=0, keepdim=True).clamp_min(1e-30)
