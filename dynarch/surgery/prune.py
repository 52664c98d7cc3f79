"""Pruning: remove channels of a group through Torch-Pruning, carrying optimizer state."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dynarch.errors import DynarchError, InvalidMutationError, close_matches
from dynarch.groups import ChannelGroup
from dynarch.layer_kinds import channel_tensors
from dynarch.models import count_params
from dynarch.probes import buffers_restored, check_finite, check_finite_data
from dynarch.scalars import as_integer
from dynarch.surgery.edits import TensorEdit, all_or_nothing, removal_map
from dynarch.surgery.guard import one_line_failures
from dynarch.surgery.plan import (
    check_blocks,
    check_forward,
    check_k,
    check_widths,
    optimizer_swaps_after_replacement,
    resolve,
)
from dynarch.surgery.record import MutationRecord
from dynarch.tp_adapter import tp

IMPORTANCES: dict[str, Callable[[], tp.importance.Importance]] = {
    "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),
    "lamp": lambda: tp.importance.LAMPImportance(p=2),
    "random": lambda: tp.importance.RandomImportance(),
}


def check_importance(importance: str) -> str:
    """``importance`` if it names a Torch-Pruning importance, else one line with the names."""
    if importance not in IMPORTANCES:
        raise DynarchError(
            f"unknown importance {importance!r}; known: {', '.join(IMPORTANCES)}"
            + close_matches(importance, IMPORTANCES)
        )
    return importance


@one_line_failures("pruning")
def prune(
    model: nn.Module,
    target: str,
    k: int | None = None,
    idxs: Sequence[int] | None = None,
    importance: str = "magnitude",
    optimizer: torch.optim.Optimizer | None = None,
    example_inputs: Any = None,
    data: Any = None,
    loss_fn: Callable | None = None,
) -> MutationRecord:
    """Remove channels from ``target``'s group: the given ``idxs``, or the ``k`` least important.

    ``importance`` names a Torch-Pruning importance (magnitude, l1, taylor, bn_scale, lamp,
    random); ``taylor`` needs ``data=(x, y)`` and ``loss_fn`` to compute gradients. The
    optimizer's state is sliced to the kept entries. On any error nothing is changed.
    """
    start = time.perf_counter()
    if (k is None) == (idxs is None):
        raise InvalidMutationError("give exactly one of k (how many) or idxs (which channels)")
    check_importance(importance)
    check_finite_data(data)  # before it is remembered as the example inputs, or scores
    group, dg, modules = resolve(model, target, example_inputs, data)
    if idxs is not None:
        chosen = _check_idxs(idxs, group)
    else:
        chosen = None
        k = check_k(k)
    n_remove = len(chosen) if chosen is not None else k
    if n_remove >= group.width:
        raise InvalidMutationError(
            f"pruning {n_remove} of {group.width} channels would leave group {group.name!r} empty"
        )
    check_blocks(group, modules, n_remove, f"pruning {target!r}")
    if chosen is not None:
        _check_same_in_every_block(chosen, group)
    check_widths(group, modules, -n_remove)
    root = group.root(target)  # not target when its channels join several groups (graph.py)
    if chosen is None:
        scores = _scores(model, dg, root, importance, data, loss_fn)
        chosen = _least_important(scores, k, group)
    params_before = count_params(model)

    remove = torch.tensor(chosen, dtype=torch.long)
    edits = _edits(group, modules, remove)
    before = {(e.module, e.attr): getattr(modules[e.module], e.attr) for e in edits}
    module = model.get_submodule(root)
    with all_or_nothing(list(modules.values()), optimizer):
        dg.get_pruning_group(
            module, dg.get_pruner_of_module(module).prune_out_channels, chosen
        ).prune(record_history=False)
        _check_shapes(modules, edits, before)
        optimizer_swaps_after_replacement(modules, edits, before, optimizer)
        check_forward(model, f"pruning {target!r}")
    return MutationRecord(
        kind="prune",
        target=target,
        group=group.name,
        k=len(chosen),
        method=importance,
        width_before=group.width,
        width_after=group.width - len(chosen),
        indices=chosen,
        modules=group.member_modules(),
        params_before=params_before,
        params_after=count_params(model),
        seconds=time.perf_counter() - start,
    )


def _check_idxs(idxs: Sequence[int], group: ChannelGroup) -> list[int]:
    """The channels as sorted ``int``s (integers of any kind; 1.5 is refused, not rounded)."""
    given = [as_integer(i) for i in idxs]
    if None in given:
        raise InvalidMutationError(f"idxs must be integers, got {list(idxs)}")
    chosen = sorted(i for i in given if i is not None)
    if not chosen:
        raise InvalidMutationError("idxs is empty: nothing to prune")
    if len(set(chosen)) != len(chosen):
        raise InvalidMutationError(f"idxs has repeated channels: {list(idxs)}")
    if chosen[0] < 0 or chosen[-1] >= group.width:
        raise InvalidMutationError(
            f"idxs must be in 0..{group.width - 1} for group {group.name!r}, got {list(idxs)}"
        )
    return chosen


def _check_same_in_every_block(chosen: list[int], group: ChannelGroup) -> None:
    """A grouped conv's weight holds one conv group's inputs: every block must lose the same
    positions (what Torch-Pruning's grouped-conv pruner assumes too)."""
    width = group.block_width
    per_block = [{i % width for i in chosen if i // width == b} for b in range(group.blocks)]
    if any(positions != per_block[0] for positions in per_block):
        raise InvalidMutationError(
            f"idxs must remove the same positions in each of the {group.blocks} blocks of "
            f"{width} channels of group {group.name!r} (grouped convs), got {chosen}"
        )


def _least_important(scores: torch.Tensor, k: int, group: ChannelGroup) -> list[int]:
    """The k channels of lowest score; with several blocks the ``k / blocks`` positions of
    lowest score summed over the blocks, in every block (as Torch-Pruning's grouped pruning)."""
    width = group.block_width
    per_position = scores.reshape(group.blocks, width).sum(0)
    positions = torch.argsort(per_position, stable=True)[: k // group.blocks]
    return sorted(b * width + j for b in range(group.blocks) for j in positions.tolist())


def _scores(
    model: nn.Module,
    dg: tp.DependencyGraph,
    target: str,
    importance: str,
    data: Any,
    loss_fn: Callable | None,
) -> torch.Tensor:
    """Torch-Pruning's importance score of every channel of the group."""
    module = model.get_submodule(target)
    width = dg.get_out_channels(module)
    tp_group = dg.get_pruning_group(
        module, dg.get_pruner_of_module(module).prune_out_channels, list(range(width))
    )
    if importance == "taylor":
        if data is None or loss_fn is None:
            raise InvalidMutationError("importance 'taylor' needs data=(x, y) and loss_fn")
        grads = {p: p.grad for p in model.parameters()}
        try:
            model.zero_grad(set_to_none=True)
            x, y = data
            with buffers_restored(model):  # a probe: BatchNorm statistics stay as they were
                loss_fn(model(x), y).backward()
            for p in model.parameters():  # a layer this mode does not run (a training-only
                if p.grad is None:  # head in eval mode) changes the loss by nothing
                    p.grad = torch.zeros_like(p)
            scores = IMPORTANCES[importance]()(tp_group)
            if scores is not None:  # gradients of a diverged model would choose at random
                check_finite(scores, f"the taylor importance of {target!r}'s channels")
        finally:
            for p, g in grads.items():
                p.grad = g
    else:
        scores = IMPORTANCES[importance]()(tp_group)
    if scores is None:
        raise InvalidMutationError(f"importance {importance!r} has nothing to score in {target!r}")
    return scores


def _edits(
    group: ChannelGroup, modules: dict[str, nn.Module], remove: torch.Tensor
) -> list[TensorEdit]:
    """Index maps of every member tensor: each removed channel takes its whole block."""
    edits: dict[tuple[str, str], TensorEdit] = {}
    for member in group.members:
        module = modules[member.module]
        mult = member.multiplicity
        positions = (member.start + remove[:, None] * mult + torch.arange(mult)).flatten()
        for ct in channel_tensors(module, member.role):
            tensor = getattr(module, ct.attr)
            size = tensor.shape[ct.dim]
            # a grouped conv's weight: the first conv group's positions (the same in each)
            at = positions[positions < size] if ct.folds > 1 else positions
            src = removal_map(size, at.to(tensor.device))
            edits.setdefault(
                (member.module, ct.attr), TensorEdit(member.module, ct.attr)
            ).maps.append((ct.dim, src))
    return list(edits.values())


def _check_shapes(modules, edits, before) -> None:
    """Torch-Pruning must have resized exactly as our index maps predict."""
    for e in edits:
        expected = list(before[(e.module, e.attr)].shape)
        for dim, src in e.maps:
            expected[dim] = src.numel()
        got = list(getattr(modules[e.module], e.attr).shape)
        if got != expected:
            raise DynarchError(
                f"internal: {e.module}.{e.attr} became {got} after pruning, expected {expected}"
            )
