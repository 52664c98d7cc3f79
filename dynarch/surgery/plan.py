"""Shared steps of grow and prune: resolve the target, check it, swap tensors, count params."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from dynarch.errors import (
    InvalidMutationError,
    UnknownTargetError,
    UnsupportedOpError,
    close_matches,
    first_line,
    some_of,
)
from dynarch.graph import remember_example_inputs, trace_group
from dynarch.groups import ChannelGroup, grouped_convs
from dynarch.layer_kinds import (
    channel_blocks,
    channel_size,
    channel_tensors,
    is_weighted,
    sync_sizes,
    width_problem,
)
from dynarch.probes import modes_restored
from dynarch.scalars import as_positive
from dynarch.surgery.edits import TensorEdit, memory_format, remap, remap_optimizer
from dynarch.tp_adapter import tp


def resolve(
    model: nn.Module, target: str, example_inputs: Any, data: Any = None
) -> tuple[ChannelGroup, tp.DependencyGraph, dict[str, nn.Module]]:
    """Trace ``model`` and return the group formed by ``target``'s output channels.

    Without ``example_inputs``, the remembered ones or the inputs of ``data=(x, y)`` serve.
    Raises a one-line :class:`DynarchError` for anything that cannot be mutated consistently.
    """
    named = dict(model.named_modules())
    if target not in named:
        layers = [n for n, m in named.items() if is_weighted(m)]
        raise UnknownTargetError(f"no module named {target!r}" + close_matches(target, layers))
    module = named[target]
    if not is_weighted(module):
        raise UnknownTargetError(
            f"{target!r} is a {type(module).__name__}; targets are conv or linear layers "
            "(not depthwise)"
        )
    group, dg = trace_group(model, target, example_or_batch(example_inputs, data))
    if group.unsupported:
        raise UnsupportedOpError(f"cannot change the channels of {target!r}: {group.unsupported}")
    if group.at_output:
        raise InvalidMutationError(
            f"{target!r} produces the model's output; its width is fixed by the task"
        )
    return group, dg, {name: named[name] for name in group.member_modules()}


def example_or_batch(example_inputs: Any, data: Any) -> Any:
    """``example_inputs``, or the inputs of ``data=(x, y)`` when none are given."""
    if example_inputs is None and isinstance(data, (tuple, list)) and torch.is_tensor(data[0]):
        return data[0]
    return example_inputs


def check_k(k: Any, what: str = "k") -> int:
    """``k`` as an ``int``: any integer > 0 (``np.int64(4)``, ``torch.tensor(4)``), not a bool
    or a float (:func:`dynarch.scalars.as_integer`)."""
    n = as_positive(k)
    if n is None:
        raise InvalidMutationError(f"{what} must be a positive integer, got {k!r}")
    return n


def check_blocks(group: ChannelGroup, modules: dict[str, nn.Module], count: int, what: str) -> None:
    """A group holding grouped convs changes by the same count in each of its blocks (each conv
    group keeps its own channels): ``count`` must be a multiple of the number of blocks."""
    if count % group.blocks == 0:
        return
    grouped = [f"{n} (groups={channel_blocks(modules[n])})" for n in grouped_convs(group, modules)]
    raise InvalidMutationError(
        f"{what} by {count}: its channels are in {group.blocks} blocks of "
        f"{group.block_width} (grouped convs {some_of(grouped)}), so they "
        f"change by a multiple of {group.blocks}"
    )


def check_widths(group: ChannelGroup, modules: dict[str, nn.Module], change: int) -> None:
    """Width constraints of the members' layer kinds after adding ``change`` channels to the
    group (GroupNorm: divisible by its number of groups)."""
    for m in group.members:
        module = modules[m.module]
        tensors = channel_tensors(module, m.role)
        if not tensors:
            continue
        size = channel_size(module, tensors[0])
        problem = width_problem(module, size + change * m.multiplicity)
        if problem:
            raise InvalidMutationError(f"{m.module}: {problem}")


def growth_bytes(
    group: ChannelGroup,
    modules: dict[str, nn.Module],
    k: int,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Bytes that growing ``group`` by ``k`` channels allocates, roughly: every member tensor
    gains ``k`` (x multiplicity) slices, held about 4 times during the surgery (the
    initializer's values, the resized tensor, its gradient, a working copy) plus once per
    state tensor the optimizer keeps for a parameter (SGD's momentum, Adam's two moments).
    An initializer's own statistics (GradMax's M) have the size of one channel, not k."""
    copies = 4 + _optimizer_states(optimizer)
    total = 0
    for m in group.members:
        module = modules[m.module]
        for ct in channel_tensors(module, m.role):
            tensor = getattr(module, ct.attr)
            per_channel = tensor.numel() // max(1, tensor.shape[ct.dim])
            total += per_channel * k * m.multiplicity * tensor.element_size() * copies
    return total


def _optimizer_states(optimizer: torch.optim.Optimizer | None) -> int:
    """The most per-parameter state tensors ``optimizer`` holds for one parameter."""
    if optimizer is None:
        return 0
    counts = (
        sum(torch.is_tensor(v) and v.dim() > 0 for v in state.values())
        for state in optimizer.state.values()
    )
    return max(counts, default=0)


def device_memory(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes (the machine's RAM for the CPU), None if unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[1]
        if device.type == "cpu":
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError, RuntimeError):  # no sysconf, no such name
        return None
    return None


def check_memory(
    group: ChannelGroup,
    modules: dict[str, nn.Module],
    k: int,
    what: str,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Refuse a growth whose allocations (:func:`growth_bytes`) exceed the total memory of the
    device holding the group: ``k=10**8`` would otherwise die allocating 100+ GB (or swap the
    machine to a halt). Total, not free, memory: the same request gets the same answer every
    time and in every process; a growth near the bound may still fail, as any allocation."""
    device = modules[group.producers[0]].weight.device
    needed, limit = growth_bytes(group, modules, k, optimizer), device_memory(device)
    if limit is not None and needed > limit:
        raise InvalidMutationError(
            f"{what} by {k} channels needs ~{needed / 1e9:.3g} GB, more than the "
            f"{limit / 1e9:.3g} GB of memory of {device}; choose a smaller k"
        )


def eval_output(model: nn.Module) -> Any:
    """The model's output on its remembered example inputs, in eval mode, with no side effects."""
    with modes_restored(model, training=False), torch.no_grad():
        return model(remember_example_inputs(model, None))


def check_forward(model: nn.Module, action: str) -> Any:
    """:func:`eval_output` after a mutation; a model whose code hard-codes a size
    (``x.view(-1, 256)``) fails here, and the caller's ``all_or_nothing`` restores it."""
    try:
        return eval_output(model)
    except RuntimeError as exc:
        raise UnsupportedOpError(
            f"the model's forward fails after {action} ({first_line(exc)}); nothing was changed"
        ) from exc


def swap_tensors(
    modules: dict[str, nn.Module],
    edits: list[TensorEdit],
    new_tensors: dict[tuple[str, str], torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
) -> None:
    """Install resized tensors, carrying gradients and optimizer state through the index maps."""
    swaps = []
    for e in edits:
        module = modules[e.module]
        old = getattr(module, e.attr)
        layout = memory_format(old)
        new = new_tensors[(e.module, e.attr)].contiguous(memory_format=layout)
        if isinstance(old, nn.Parameter):
            param = nn.Parameter(new, requires_grad=old.requires_grad)
            if old.grad is not None:  # laid out as the parameter, as autograd expects
                param.grad = remap(old.grad, e.maps).contiguous(memory_format=layout)
            setattr(module, e.attr, param)
            swaps.append((old, param, e.maps))
        else:
            setattr(module, e.attr, new)
    for module in modules.values():
        sync_sizes(module)
    if optimizer is not None:
        remap_optimizer(optimizer, swaps)


def optimizer_swaps_after_replacement(
    modules: dict[str, nn.Module],
    edits: list[TensorEdit],
    before: dict[tuple[str, str], torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
) -> None:
    """After a third party (Torch-Pruning) replaced parameters, carry optimizer state to them."""
    swaps = []
    for e in edits:
        old = before[(e.module, e.attr)]
        new = getattr(modules[e.module], e.attr)
        if new.dim() == 4 and memory_format(old) != memory_format(new):
            new.data = new.data.contiguous(memory_format=memory_format(old))
            if new.grad is not None:
                new.grad = new.grad.contiguous(memory_format=memory_format(old))
        if isinstance(old, nn.Parameter):
            new.requires_grad_(old.requires_grad)
            swaps.append((old, new, e.maps))
    if optimizer is not None:
        remap_optimizer(optimizer, swaps)
