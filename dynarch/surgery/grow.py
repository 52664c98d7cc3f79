"""Growth: append k channels to every member of a channel group, in place."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dynarch.errors import DynarchError
from dynarch.graph import remember_example_inputs
from dynarch.groups import ChannelGroup, GroupMember, grouped_convs
from dynarch.initializers import (
    GrowthContext,
    NewChannels,
    check_grouped,
    check_initializer,
    init_name,
    new_channels,
)
from dynarch.layer_kinds import (
    CHANNELWISE,
    CONSUMER,
    ChannelTensor,
    channel_tensors,
    neutral_values,
)
from dynarch.models import count_params
from dynarch.probes import (
    batches_to_reread,
    check_finite,
    check_finite_data,
    mean_weight_grads,
    modes_restored,
)
from dynarch.surgery.edits import TensorEdit, all_or_nothing, block_insertion_map, remap
from dynarch.surgery.guard import one_line_failures
from dynarch.surgery.plan import (
    check_blocks,
    check_forward,
    check_k,
    check_memory,
    check_widths,
    eval_output,
    resolve,
    swap_tensors,
)
from dynarch.surgery.record import MutationRecord


@one_line_failures("growing")
def grow(
    model: nn.Module,
    target: str,
    k: int,
    init: str | Callable = "random",
    data: Any = None,
    loss_fn: Callable | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    example_inputs: Any = None,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **init_options: Any,
) -> MutationRecord:
    """Add ``k`` output channels to ``target`` and to everything coupled with them.

    New channels are appended after the group's existing channels in every member (at the
    right offset inside concatenations, as ``k * H * W`` features after a flatten). ``init``
    chooses the new fan-in/fan-out values; channel-wise layers get neutral values (BatchNorm
    gamma=1, beta=0, mean 0, var 1; depthwise identity kernels). ``optimizer`` keeps working
    with its state zero-padded for the new entries. On any error nothing is changed.
    ``reduce_sum`` sums data statistics (GradMax's M) over the processes of a multi-process
    run, so every process grows the same channels.
    """
    start = time.perf_counter()
    k = check_k(k)
    initializer, options = check_initializer(init, init_options)
    data = batches_to_reread(data, options.max_samples)
    device = next((p.device for p in model.parameters()), None)
    check_finite_data(data, options.max_samples, reduce_sum, device)  # before it is remembered
    group, _, modules = resolve(model, target, example_inputs, data)
    check_blocks(group, modules, k, f"growing {target!r}")
    check_grouped(init, grouped_convs(group, modules))
    check_widths(group, modules, k)
    check_memory(group, modules, k, f"growing {target!r}", optimizer)
    params_before = count_params(model)

    name = init_name(init)
    ctx = GrowthContext(
        model,
        group,
        k,
        modules,
        data,
        loss_fn,
        options,
        reduce_sum,
        name,
        grown_copy=lambda new: _grown_copy(model, target, k, new),
    )
    new = new_channels(ctx, initializer)
    _check_new_channels(ctx, new)
    _check_finite(ctx, new)

    edits, tensors = _plan(group, modules, k, new)
    before = eval_output(model)
    with all_or_nothing(list(modules.values()), optimizer):
        swap_tensors(modules, edits, tensors, optimizer)
        after = check_forward(model, f"growing {target!r}")
    if torch.is_tensor(before) and torch.is_tensor(after):
        # 0 for function-preserving inits; the eps fan-in of gradmax shows up here
        new.info["output_change"] = float((after - before).abs().max())
    if data is not None and loss_fn is not None and new.zero_fan_out():
        new.info["fan_out_grad_norm"] = new_fan_out_grad_norm(
            model, group, modules, k, data, loss_fn, options.max_samples
        )
    return MutationRecord(
        kind="grow",
        target=target,
        group=group.name,
        k=k,
        method=name,
        width_before=group.width,
        width_after=group.width + k,
        indices=new_indices(group, k),
        modules=group.member_modules(),
        params_before=params_before,
        params_after=count_params(model),
        seconds=time.perf_counter() - start,
        info=new.info,
    )


def _grown_copy(model: nn.Module, target: str, k: int, new: NewChannels) -> nn.Module:
    """A deep copy of ``model`` with ``target`` grown by ``k`` channels holding ``new``."""
    copy_of_model = copy.deepcopy(model)
    grow(
        copy_of_model,
        target,
        k,
        init=lambda _: new,
        example_inputs=remember_example_inputs(model, None),
    )
    return copy_of_model


def new_fan_out_grad_norm(
    model: nn.Module,
    group: ChannelGroup,
    modules: dict[str, nn.Module],
    k: int,
    data: Any,
    loss_fn: Callable,
    max_samples: int = 512,
) -> float | None:
    """||dL/d(new fan-out)||_F of a grown model on ``data``, in train mode with BatchNorm's
    running statistics kept: the real gradient that zero fan-out units start from (``group``
    and ``modules`` as before the growth, whose new columns start at each member's ``stop``;
    None when every consumer is frozen)."""
    consumers = [
        m for m in group.members if m.role == CONSUMER and modules[m.module].weight.requires_grad
    ]
    if not consumers:  # frozen consumers: nothing to measure
        return None
    weights = [modules[m.module].weight for m in consumers]
    with modes_restored(model, training=True):
        means, _ = mean_weight_grads(model, weights, data, loss_fn, max_samples)
    sq = 0.0
    for m, mean in zip(consumers, means, strict=True):
        ct = channel_tensors(modules[m.module], m.role)[0]
        size_before = modules[m.module].weight.shape[ct.dim] - k * m.multiplicity // ct.folds
        src = insertion(group, m, ct, size_before, k, mean.device)
        new_at = (src < 0).nonzero().squeeze(1)
        sq += float(mean.index_select(1, new_at).pow(2).sum())
    return sq**0.5


def insertion(
    group: ChannelGroup,
    member: GroupMember,
    ct: ChannelTensor,
    size: int,
    k: int,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The src map (-1: new) of dimension ``ct.dim`` (of ``size`` entries) of one member
    tensor when its group grows by ``k``: ``k / blocks`` channels appended to each of the
    group's blocks (one block: all ``k`` after the group's channels at ``member.stop``); a
    grouped conv's weight, which holds one conv group's inputs (``ct.folds``), holds
    ``blocks / folds`` of them."""
    mult, per_block = member.multiplicity, k // group.blocks
    start = 0 if ct.folds > 1 else member.start
    blocks = group.blocks // ct.folds
    return block_insertion_map(
        size,
        start,
        group.block_width * mult,
        blocks,
        per_block * mult,
        device or torch.device("cpu"),
    )


def new_indices(group: ChannelGroup, k: int) -> list[int]:
    """The channels of the grown group that are new (the last ``k`` for one block)."""
    src = block_insertion_map(
        group.width, 0, group.block_width, group.blocks, k // group.blocks, torch.device("cpu")
    )
    return (src < 0).nonzero().squeeze(1).tolist()


def _check_new_channels(ctx: GrowthContext, new: NewChannels) -> None:
    """An initializer must give exactly one correctly shaped tensor per producer/consumer."""
    expected = {("fan_in", p): ctx.fan_in_shape(p) for p in ctx.group.producers}
    expected |= {("fan_out", c): ctx.fan_out_shape(c) for c in ctx.group.consumers}
    for (kind, name), shape in expected.items():
        got = getattr(new, kind).get(name)
        if got is None or tuple(got.shape) != tuple(shape):
            have = None if got is None else tuple(got.shape)
            raise DynarchError(
                f"initializer gave {kind}[{name!r}] of shape {have}, expected {shape}"
            )
    members = {
        (m.module, ct.attr): (ct.dim, ctx.k * m.multiplicity // ct.folds)
        for m in ctx.group.members
        for ct in channel_tensors(ctx.modules[m.module], m.role)
    }
    for key, tensor in new.existing.items():
        current = getattr(ctx.modules[key[0]], key[1]) if key in members else None
        if current is None or tensor.shape != current.shape:
            raise DynarchError(f"initializer's existing{key} is not a member tensor of that shape")
    for key, tensor in new.new_values.items():
        if key not in members:
            raise DynarchError(f"initializer's new_values{key} is not a member tensor")
        dim, count = members[key]
        if tensor.shape[dim] != count:
            raise DynarchError(
                f"initializer's new_values{key} has {tensor.shape[dim]} entries along dim "
                f"{dim}, expected {count}"
            )


def _check_finite(ctx: GrowthContext, new: NewChannels) -> None:
    """NaN or Inf in the new values (statistics of a diverged model: GradMax's gradients, the
    new BatchNorm's running statistics, firefly's split) is refused, not installed."""
    tensors = {f"fan_in[{n!r}]": t for n, t in new.fan_in.items()}
    tensors |= {f"fan_out[{n!r}]": t for n, t in new.fan_out.items()}
    tensors |= {f"new_values{key}": t for key, t in new.new_values.items()}
    tensors |= {f"existing{key}": t for key, t in new.existing.items()}
    for name, tensor in tensors.items():
        check_finite(tensor, f"{name} from initializer {ctx.init_name!r}")


def _plan(
    group: ChannelGroup, modules: dict[str, nn.Module], k: int, new: NewChannels
) -> tuple[list[TensorEdit], dict[tuple[str, str], torch.Tensor]]:
    """Index maps and resized tensors for every member tensor of the group."""
    edits: dict[tuple[str, str], TensorEdit] = {}
    tensors: dict[tuple[str, str], torch.Tensor] = {}
    for member in group.members:
        module = modules[member.module]
        for ct in channel_tensors(module, member.role):
            count = k * member.multiplicity // ct.folds
            key = (member.module, ct.attr)
            current = tensors.get(key, new.existing.get(key, getattr(module, ct.attr)))
            if key in new.new_values:
                values = new.new_values[key]
            elif member.role == CHANNELWISE:
                values = neutral_values(module, ct.attr, count)
            elif member.role == CONSUMER:
                values = new.fan_out[member.module]
            elif ct.attr == "weight":
                values = new.fan_in[member.module]
            else:  # producer bias: zero, so that zero fan-in means zero output
                values = current.new_zeros(count)
            edit = edits.setdefault(key, TensorEdit(member.module, ct.attr))
            # A module both producing and consuming the group (x + conv(x)) has already grown
            # along its other dimension: bring the new values to that size (zeros).
            values = remap(values, [(d, src) for d, src in edit.maps if d != ct.dim])
            values = values.to(device=current.device, dtype=current.dtype)
            src = insertion(group, member, ct, current.shape[ct.dim], k, current.device)
            grown = remap(current.detach(), [(ct.dim, src)])
            tensors[key] = grown.index_copy_(ct.dim, (src < 0).nonzero().squeeze(1), values)
            edit.maps.append((ct.dim, src))
    return list(edits.values()), tensors
