"""Channel groups: every tensor dimension coupled to one layer's output channels, placed.

From Torch-Pruning's full-width pruning group of a layer (traced by :mod:`dynarch.tracing`),
:func:`channel_group` computes for every coupled dimension *where* the group's channels sit
(offset inside a concat, block size after a flatten, the blocks of a grouped conv), or why the
group cannot be changed consistently (a permute, a shuffle, a layer dynarch does not know).
Growth and pruning are planned from these groups only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from dynarch.layer_kinds import (
    CONSUMER,
    PRODUCER,
    channel_blocks,
    channel_size,
    channel_tensors,
    kind_of,
    role_of,
    unsupported_reason,
)
from dynarch.tp_adapter import tp
from dynarch.tracing import cat_problem, changes_channel_count, unknown_layer

# Ops (by autograd name) that move channels around; a group through them cannot stay consistent.
_CHANNEL_REARRANGING = (
    "ChannelShuffle",
    "Transpose",
    "Permute",
    "PixelShuffle",
    "PixelUnshuffle",
    "Roll",
    "Flip",
    "Index",
    "Gather",
    "Sort",
)


_OP_TYPES_UNSUPPORTED = {
    tp.ops.OPTYPE.SPLIT: "split",
    tp.ops.OPTYPE.SLICE: "slice",
    tp.ops.OPTYPE.UNBIND: "unbind",
    tp.ops.OPTYPE.EXPAND: "expand",
    tp.ops.OPTYPE.CUSTOMIZED: "custom op",
    tp.ops.OPTYPE.PARAMETER: "bare nn.Parameter",
}


@dataclass(frozen=True)
class GroupMember:
    """One module dimension coupled to a group: channels ``start .. stop`` of its ``side``.

    ``multiplicity`` entries belong to each channel (H*W for a linear after a flatten).
    """

    module: str
    side: str
    role: str
    start: int
    stop: int
    multiplicity: int


@dataclass
class ChannelGroup:
    """A set of channel dimensions that must always have the same width."""

    name: str
    width: int
    members: tuple[GroupMember, ...]
    ops: tuple[str, ...] = ()
    at_output: bool = False
    unsupported: str | None = None
    # equal blocks the channels come in (the lcm of its grouped convs' groups): a mutation
    # adds or removes the same channels in every block, so each conv group keeps its own
    blocks: int = 1

    @property
    def producers(self) -> list[str]:
        return [m.module for m in self.members if m.role == PRODUCER]

    @property
    def consumers(self) -> list[str]:
        return [m.module for m in self.members if m.role == CONSUMER]

    def member_modules(self) -> list[str]:
        return sorted({m.module for m in self.members})

    def root(self, target: str) -> str:
        """The producer to trace this group from for ``target``: ``target`` when its output
        channels are exactly the group, else the group's name, whose are (``c`` in
        ``cat([a(x), b(x)]) + c(z)`` holds ``b``'s group at its channels 4..10, not 0..6)."""
        whole = any(
            m.module == target and m.role == PRODUCER and m.start == 0 and m.stop == self.width
            for m in self.members
        )
        return target if whole else self.name

    @property
    def block_width(self) -> int:
        """Channels per block (the whole width when there is one block)."""
        return self.width // self.blocks

    def to_dict(self) -> dict[str, Any]:
        data = {
            "name": self.name,
            "width": self.width,
            "at_output": self.at_output,
            "unsupported": self.unsupported,
            "ops": list(self.ops),
            "members": [m.__dict__ for m in self.members],
        }
        if self.blocks > 1:  # only then: the graphs of other models stay as they were
            data["blocks"] = self.blocks
        return data


def grouped_convs(group: ChannelGroup, modules: dict[str, nn.Module]) -> list[str]:
    """The members of ``group`` that are grouped convs (``groups`` > 1, not depthwise): what
    makes it come in blocks (docs/architecture.md, "Grouped convolutions")."""
    return list(
        dict.fromkeys(m.module for m in group.members if channel_blocks(modules[m.module]) > 1)
    )


def groups_json(groups: Sequence[ChannelGroup]) -> str:
    """The graph attribute ``groups``: JSON text of the groups' :meth:`ChannelGroup.to_dict`."""
    return json.dumps([g.to_dict() for g in groups], sort_keys=True, separators=(",", ":"))


def channel_group(
    dg: tp.DependencyGraph,
    module: nn.Module,
    module_names: dict[nn.Module, str],
    ids: dict[Any, str],
    join: bool = True,
) -> ChannelGroup:
    """The group of ``module``'s output channels; when they join several producers' (a
    residual add onto a concat), the group of their last channels (:func:`_joined_group`)."""
    width = dg.get_out_channels(module)
    pruner = dg.get_pruner_of_module(module)
    problem, reached = _walk_without_indices(dg, module, module_names, ids)
    if problem:
        return _refused_group(module, width, problem, reached, module_names, ids)
    tp_group = dg.get_pruning_group(module, pruner.prune_out_channels, list(range(width)))
    parts = _joined_parts(module, tp_group.items, width, module_names)
    if join and parts:
        return _joined_group(dg, module, parts, module_names, ids)
    members: list[GroupMember] = []
    whole: set[str] = set()  # producers whose output channels are exactly the group
    ops: list[str] = []
    at_output = False
    unsupported: str | None = None
    blocks = 1
    for item in tp_group.items:
        node, target = item.dep.target, item.dep.target.module
        out_side = item.dep.handler.__name__.startswith("prune_out")
        if out_side and not node.outputs:  # these channels leave the model: fixed by the task
            at_output = True
        if target not in module_names:  # a traced op, not a module
            ops.append(ids[node])
            if node.type == tp.ops.OPTYPE.OUTPUT:
                at_output = True
            else:
                unsupported = unsupported or _op_problem(dg, node, ids[node])
            continue
        mname = module_names[target]
        reason = unsupported_reason(target)
        if reason:
            unsupported = unsupported or f"{mname}: {reason}"
            continue
        kind = kind_of(target)
        # channel-wise layers (norms) have one channel dimension
        side = "out" if out_side or not (kind and kind.two_sided) else "in"
        member, problem = _placement(
            mname, side, role_of(target, side), item.idxs, item.root_idxs, width
        )
        problem = problem or _overflow(target, member) or _split_blocks(target, member)
        if problem:
            unsupported = unsupported or f"{mname}: {problem}"
            continue
        blocks = math.lcm(blocks, channel_blocks(target))
        members.append(member)
        if member.role == PRODUCER and member.start == 0:
            if member.stop == dg.get_out_channels(target):
                whole.add(mname)
    # Members in module order; named after the first whole producer, whichever was traced from.
    order = {n: i for i, n in enumerate(module_names.values())}
    unique = sorted(dict.fromkeys(members), key=lambda m: (order[m.module], m.side != "out"))
    producers = sorted(whole) or [module_names[module]]
    return ChannelGroup(
        name=min(producers, key=order.__getitem__),
        width=width,
        members=tuple(unique),
        ops=tuple(sorted(set(ops))),
        at_output=at_output,
        unsupported=unsupported,
        blocks=blocks,
    )


def _split_blocks(module: nn.Module, member: GroupMember) -> str | None:
    """A grouped conv's channels must all be the group's: when a concatenation feeds it (or it
    feeds one) the group's channels would sit in some of its blocks and not the others."""
    tensors = channel_tensors(module, member.role)
    if channel_blocks(module) == 1 or not tensors:
        return None
    size = channel_size(module, tensors[0])
    if member.start == 0 and member.stop == size:
        return None
    return (
        f"its {member.side}put channels {member.start}..{member.stop} of {size} are a part of "
        f"its {channel_blocks(module)} conv groups (a concatenation at a grouped conv)"
    )


def _joined_parts(
    module: nn.Module, items: Sequence[Any], width: int, module_names: dict
) -> list[Any]:
    """The other producers that hold only some of ``module``'s output channels: ``a`` and
    ``b`` for ``c`` in ``cat([a(x), b(x)]) + c(z)``; empty for any other group."""
    return [
        item
        for item in items
        if item.dep.target.module is not module
        and item.dep.target.module in module_names
        and item.dep.handler.__name__.startswith("prune_out")
        and role_of(item.dep.target.module, "out") == PRODUCER
        and len(item.idxs) < width
    ]


def _joined_group(
    dg: tp.DependencyGraph, module: nn.Module, parts: list[Any], module_names: dict, ids: dict
) -> ChannelGroup:
    """``module``'s output channels join several groups (a residual add onto a concat, or a
    residual block deepened behind one): it stands for the group of its *last* channels, the
    concat's last input, so growing ``c`` by k grows ``b`` and ``c``'s channels 10..10+k. When
    no layer produces those channels (the concat ends with the model's input, or a depthwise
    conv of it), the group of ``module`` is refused with that reason."""
    name, width = module_names[module], dg.get_out_channels(module)
    last = [item.dep.target.module for item in parts if width - 1 in item.root_idxs]
    if last:
        group = channel_group(dg, last[0], module_names, ids, join=False)
        if group.unsupported or any(
            m.module == name and m.role == PRODUCER and m.stop == width for m in group.members
        ):
            return group
    own = channel_group(dg, module, module_names, ids, join=False)
    joined = sorted({module_names[item.dep.target.module] for item in parts})
    return replace(
        own,
        unsupported=f"{name}: its output channels join the channel groups of "
        f"{', '.join(joined)} (a residual add onto a concat) and no layer produces its last "
        "channels",
    )


def _walk_without_indices(
    dg: tp.DependencyGraph, module: nn.Module, module_names: dict, ids: dict
) -> tuple[str | None, list[tuple[Any, Any]]]:
    """The first unsupported op or layer the group certainly holds, and the (node, handler)
    steps reached, walking Torch-Pruning's dependencies without channel indices: expanding the
    indices takes minutes per layer through MaxViT's window reshapes. Only a concat can drop
    channels on the way (each input keeps its own), so the walk stops at one."""
    root = (dg.module2node[module], dg.get_pruner_of_module(module).prune_out_channels)
    todo, seen, problem = [root], {root: None}, None
    while todo:
        node, fn = todo.pop()
        for dep in node.dependencies:
            step = (dep.target, dep.handler)
            if not dep.is_triggered_by(fn) or step in seen:
                continue
            seen[step] = None
            target = dep.target.module
            if target in module_names:
                reason = unsupported_reason(target)
                found = reason and f"{module_names[target]}: {reason}"
            else:
                found = dep.target.type != tp.ops.OPTYPE.OUTPUT and _op_problem(
                    dg, dep.target, ids[dep.target]
                )
            problem = problem or found or None
            if dep.target.type != tp.ops.OPTYPE.CONCAT:
                todo.append(step)
    return problem, list(seen)


def _refused_group(
    module: nn.Module, width: int, problem: str, reached: list, module_names: dict, ids: dict
) -> ChannelGroup:
    """An unsupported group from the walk: its members span their whole channel dimension
    (nothing will be mutated; the members say which layers the refusal concerns)."""
    members = []
    for node, handler in reached:
        target = node.module
        if target not in module_names or unsupported_reason(target):
            continue
        kind = kind_of(target)
        out_side = handler.__name__.startswith("prune_out")
        side = "out" if out_side or not (kind and kind.two_sided) else "in"
        role = role_of(target, side)
        tensors = channel_tensors(target, role)
        size = channel_size(target, tensors[0]) if tensors else width
        if size % width == 0 and (role != PRODUCER or size == width):
            members.append(GroupMember(module_names[target], side, role, 0, size, size // width))
    order = {n: i for i, n in enumerate(module_names.values())}
    unique = sorted(dict.fromkeys(members), key=lambda m: (order[m.module], m.side != "out"))
    producers = [m.module for m in unique if m.role == PRODUCER] or [module_names[module]]
    ops = sorted({ids[node] for node, _ in reached if node.module not in module_names})
    return ChannelGroup(
        name=min(producers, key=order.__getitem__),
        width=width,
        members=tuple(unique),
        ops=tuple(ops),
        unsupported=problem,
    )


def _op_problem(dg: tp.DependencyGraph, node: Any, name: str) -> str | None:
    """Why the channels of a group cannot pass through this traced op, or None."""
    op = node.module
    if node.type == tp.ops.OPTYPE.PARAMETER:
        return unknown_layer(dg, op)
    if node.type == tp.ops.OPTYPE.CONCAT:
        problem = cat_problem(node)
        return f"op {name} {problem}" if problem else None
    if node.type in _OP_TYPES_UNSUPPORTED:
        return f"op {name} ({_OP_TYPES_UNSUPPORTED[node.type]})"
    if any(
        k in name.lower() or k in str(getattr(op, "_grad_fn", "")) for k in _CHANNEL_REARRANGING
    ):
        return f"op {name} rearranges channels"
    if node.type == tp.ops.OPTYPE.ELEMENTWISE and changes_channel_count(node):
        return f"op {name} changes the channel count (e.g. pad, sum or broadcast over channels)"
    return None


def _overflow(module: nn.Module, member: GroupMember | None) -> str | None:
    """The coupled channels must exist in the member's tensors; when they do not, an op the
    tracer took for channel-preserving (a sum over channels, a broadcast) changed the count."""
    tensors = channel_tensors(module, member.role) if member else []
    if not tensors:
        return None
    size = channel_size(module, tensors[0])
    if member.stop <= size:
        return None
    return (
        f"the group needs {member.stop} {member.side}put channels but it has {size} (an op "
        "between them changes the channel count: a sum over channels or a broadcast)"
    )


def _placement(
    module: str,
    side: str,
    role: str,
    idxs: Sequence[int],
    root_idxs: Sequence[int],
    width: int,
) -> tuple[GroupMember | None, str | None]:
    """Where the group's channels sit in one member's dimension: a contiguous block, channel-major.

    Anything else (interleaved or permuted channels) cannot be grown by appending, so it is
    reported as a problem instead of producing a silently wrong model.
    """
    pairs = sorted(zip(idxs, root_idxs, strict=True))
    if len(pairs) % width:
        return None, f"{len(pairs)} coupled entries are not a multiple of width {width}"
    mult = len(pairs) // width
    start = pairs[0][0]
    for offset, (pos, root) in enumerate(pairs):
        if pos != start + offset or root != offset // mult:
            return None, "channel order is rearranged (e.g. a shuffle or permute)"
    return GroupMember(module, side, role, start, start + len(pairs), mult), None
