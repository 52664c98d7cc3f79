"""Index maps on tensors, the optimizer state that follows them, and all-or-nothing application.

A mutation is described as a list of :class:`TensorEdit`: for one tensor attribute of one
module, per changed dimension, ``src[j]`` = the old index that new index ``j`` comes from, or
-1 for a new entry. Growth and pruning both reduce to this, so the parameters, their gradients
and every optimizer state tensor (momentum, Adam moments) are carried by the same code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from dynarch.layer_kinds import size_attrs


@dataclass
class TensorEdit:
    module: str
    attr: str
    maps: list[tuple[int, torch.Tensor]] = field(default_factory=list)


def block_insertion_map(
    size: int, start: int, block: int, blocks: int, count: int, device: torch.device
) -> torch.Tensor:
    """src index for inserting ``count`` new entries after each of ``blocks`` consecutive
    blocks of ``block`` entries that begin at ``start`` (the conv groups of a grouped conv's
    channels: each keeps its own block, one block bigger by ``count``)."""
    old = torch.arange(size, device=device)
    new = torch.full((count,), -1, dtype=torch.long, device=device)
    pieces = [old[:start]]
    for b in range(blocks):
        pieces += [old[start + b * block : start + (b + 1) * block], new]
    pieces.append(old[start + blocks * block :])
    return torch.cat(pieces)


def removal_map(size: int, remove: torch.Tensor) -> torch.Tensor:
    """src index keeping every position of a ``size`` dim except ``remove``."""
    keep = torch.ones(size, dtype=torch.bool, device=remove.device)
    keep[remove] = False
    return torch.arange(size, device=remove.device)[keep]


def memory_format(tensor: torch.Tensor) -> torch.memory_format:
    """``channels_last`` for a 4-d tensor laid out that way (``trainer.channels_last``), else
    ``contiguous_format``: what a tensor replacing it is given, so a mutation keeps the
    layout the convolutions run fastest in."""
    if tensor.dim() == 4 and not tensor.is_contiguous():
        if tensor.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
    return torch.contiguous_format


def remap(tensor: torch.Tensor, maps: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Apply index maps to ``tensor``; new entries are zero."""
    out = tensor
    for dim, src in maps:
        src = src.to(out.device)
        shape = list(out.shape)
        shape[dim] = src.numel()
        result = out.new_zeros(shape)
        kept = (src >= 0).nonzero().squeeze(1)
        result.index_copy_(dim, kept, out.index_select(dim, src[kept]))
        out = result
    return out


def merge_edits(edits: list[TensorEdit]) -> list[TensorEdit]:
    """One edit per (module, attr), maps of the same tensor kept in order."""
    merged: dict[tuple[str, str], TensorEdit] = {}
    for e in edits:
        merged.setdefault((e.module, e.attr), TensorEdit(e.module, e.attr)).maps.extend(e.maps)
    return list(merged.values())


def remap_optimizer(
    optimizer: torch.optim.Optimizer, swaps: list[tuple[nn.Parameter, nn.Parameter, list]]
) -> None:
    """Point ``optimizer`` at the new parameters and carry their state through the index maps.

    State tensors shaped like the parameter (momentum, exp_avg, exp_avg_sq, ...) are remapped
    (new entries zero) and laid out as the new parameter; everything else (``step``, scalars)
    is kept as it was.
    """
    for old, new, maps in swaps:
        for group in optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        if old in optimizer.state:
            state = optimizer.state.pop(old)
            layout = memory_format(new)
            optimizer.state[new] = {
                key: remap(v, maps).contiguous(memory_format=layout)
                if torch.is_tensor(v) and v.shape == old.shape
                else v
                for key, v in state.items()
            }


@contextmanager
def all_or_nothing(
    modules: list[nn.Module], optimizer: torch.optim.Optimizer | None
) -> Iterator[None]:
    """Restore ``modules`` and ``optimizer`` exactly as they were if the body raises.

    Surgery replaces tensors rather than writing into them, so keeping references to the old
    tensors and size attributes is a complete snapshot.
    """
    saved = [
        (
            m,
            dict(m._parameters),
            dict(m._buffers),
            {a: getattr(m, a) for a in size_attrs(m) if hasattr(m, a)},
        )
        for m in modules
    ]
    opt_saved = None
    if optimizer is not None:
        opt_saved = ([list(g["params"]) for g in optimizer.param_groups], dict(optimizer.state))
    try:
        yield
    except BaseException:
        for m, params, buffers, sizes in saved:
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
            for a, v in sizes.items():
                setattr(m, a, v)
        if optimizer is not None and opt_saved is not None:
            for g, params in zip(optimizer.param_groups, opt_saved[0], strict=True):
                g["params"] = params
            optimizer.state.clear()
            optimizer.state.update(opt_saved[1])
        raise
