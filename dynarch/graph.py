"""ArchGraph: the traced architecture as a networkx graph, plus its channel groups.

Tracing and coupling come from Torch-Pruning's DependencyGraph. We turn its nodes into a
``networkx.DiGraph`` (what users query and export) and its full-width pruning groups into
:class:`ChannelGroup` objects: for every coupled tensor dimension, *where* the group's channels
sit (offset inside a concat, block size after a flatten). Growth and pruning are planned from
these groups only.
"""

from __future__ import annotations

import json
import math
import traceback
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx
import torch
from torch import nn

from dynarch.errors import (
    DynarchError,
    UnknownTargetError,
    UnsupportedOpError,
    close_matches,
    first_line,
)
from dynarch.layer_kinds import (
    CHANNELWISE,
    CONSUMER,
    PRODUCER,
    channel_blocks,
    channel_size,
    channel_tensors,
    is_weighted,
    kind_of,
    node_attrs,
    role_of,
    torch_pruning_pruners,
    unsupported_reason,
)
from dynarch.probes import modes_restored, state_restored
from dynarch.tp_adapter import index_mapping as tp_index_mapping
from dynarch.tp_adapter import tp

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

# Example inputs remembered per model, so later mutations can re-trace without being given them.
_EXAMPLE_INPUTS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


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


@dataclass
class ArchGraph:
    """Architecture of a model at one moment: graph of layers/ops and its channel groups.

    Every node, edge and graph attribute of ``nx`` is a scalar (str, int), so any networkx
    writer (GraphML, GEXF, node-link JSON, ...) takes the graph as it is. The channel groups
    are therefore in ``nx.graph["groups"]`` as JSON text (a list of
    :meth:`ChannelGroup.to_dict`); ``groups`` holds them as objects.
    """

    nx: nx.DiGraph
    groups: list[ChannelGroup]
    group_by_module: dict[str, ChannelGroup] = field(default_factory=dict, repr=False)

    @classmethod
    def from_module(cls, model: nn.Module, example_inputs: Any = None) -> ArchGraph:
        """Trace ``model`` on ``example_inputs`` (or the inputs it was last traced with)."""
        example_inputs = remember_example_inputs(model, example_inputs)
        dg = _trace(model, example_inputs)
        return _build(model, dg)

    # -- queries -------------------------------------------------------------------------------
    def targets(self) -> list[str]:
        """Module names whose output channels can grow or shrink."""
        return [
            name
            for name, g in self.group_by_module.items()
            if not g.at_output and g.unsupported is None and name in g.producers
        ]

    def group_of(self, target: str) -> ChannelGroup:
        """The channel group formed by ``target``'s output channels."""
        if target not in self.group_by_module:
            raise UnknownTargetError(
                f"no conv/linear layer named {target!r} in the traced model"
                + close_matches(target, self.group_by_module)
            )
        return self.group_by_module[target]

    def widths(self) -> dict[str, int]:
        """Width of every channel group, by group name."""
        return {g.name: g.width for g in self.groups}

    # -- export --------------------------------------------------------------------------------
    def to_node_link(self) -> dict[str, Any]:
        """networkx node-link data of ``nx`` (the channel groups as JSON text in
        ``data["graph"]["groups"]``), what the history stores and ``architecture.json`` holds."""
        return nx.node_link_data(self.nx, edges="edges")

    def to_json(self) -> str:
        return json.dumps(self.to_node_link(), sort_keys=True)

    def write_graphml(self, path: str) -> None:
        nx.write_graphml(self.nx, path)


def groups_json(groups: Sequence[ChannelGroup]) -> str:
    """The graph attribute ``groups``: JSON text of the groups' :meth:`ChannelGroup.to_dict`."""
    return json.dumps([g.to_dict() for g in groups], sort_keys=True, separators=(",", ":"))


def remember_example_inputs(model: nn.Module, example_inputs: Any) -> Any:
    """Store ``example_inputs`` for ``model`` (moved to its device) or fetch the stored ones."""
    if example_inputs is None:
        if model not in _EXAMPLE_INPUTS:
            raise UnknownTargetError(
                "example_inputs are needed to trace this model the first time "
                "(pass a batch, e.g. example_inputs=x[:1])"
            )
        return _EXAMPLE_INPUTS[model]
    device = next((p.device for p in model.parameters()), None)
    if isinstance(example_inputs, torch.Tensor) and device is not None:
        example_inputs = example_inputs.detach()[:1].to(device)
    _EXAMPLE_INPUTS[model] = example_inputs
    return example_inputs


def _trace(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    """Torch-Pruning's trace, without leaving the model in eval mode; a failure is one line."""
    # Torch-Pruning calls model(*inputs): a bare batch of one would be unpacked to one sample
    inputs = (example_inputs,) if torch.is_tensor(example_inputs) else example_inputs
    try:
        with modes_restored(model), torch.enable_grad():
            training = bool(_training_only_layers(model, inputs))
            dg = _dependency_graph(model, inputs, training)
    except Exception as exc:
        raise _trace_error(model, example_inputs, exc) from exc
    _place_concat_inputs(dg)
    return dg


def _dependency_graph(model: nn.Module, inputs: Any, training: bool) -> tp.DependencyGraph:
    """Torch-Pruning's trace, which puts the model in eval mode; ``training``: of the
    training-mode forward instead (batch statistics and random state as they were)."""
    forward = _training_forward if training else None
    return tp.DependencyGraph().build_dependency(
        model, inputs, forward_fn=forward, verbose=False, customized_pruners=torch_pruning_pruners()
    )


def _training_forward(model: nn.Module, inputs: Any) -> Any:
    with state_restored(model):
        return model.train()(*_two_samples(inputs))


def _training_only_layers(model: nn.Module, inputs: Any) -> list[str]:
    """Layers with parameters that the training-mode forward runs and the eval-mode one does
    not (GoogLeNet's ``aux = self.aux(x) if self.training else None``): Torch-Pruning traces
    in eval mode, where their inputs' channels would be grown without them (the next training
    step failed). One forward per mode, no gradients, statistics and random state kept."""
    called: dict[bool, set[str]] = {True: set(), False: set()}
    mode = [False]
    hooks = [
        m.register_forward_hook(lambda *_, name=name: called[mode[0]].add(name))
        for name, m in model.named_modules()
        if next(m.parameters(recurse=False), None) is not None
    ]
    try:
        with torch.no_grad(), state_restored(model):
            for mode[0] in (False, True):
                model.train(mode[0])(*_two_samples(inputs))
    except Exception:  # noqa: BLE001  (a forward that fails here fails the trace with its line)
        return []
    finally:
        for hook in hooks:
            hook.remove()
    return sorted(called[True] - called[False])


def _two_samples(inputs: Any) -> Any:
    """A batch of one repeated twice: train-mode BatchNorm refuses one value per channel."""
    return tuple(x.repeat(2, *[1] * (x.dim() - 1)) if _one_sample(x) else x for x in inputs)


def _one_sample(x: Any) -> bool:
    return torch.is_tensor(x) and x.dim() > 0 and len(x) == 1


def _trace_error(model: nn.Module, example_inputs: Any, exc: Exception) -> DynarchError:
    """One line for a failed trace: the model's own forward failing on the inputs, or
    Torch-Pruning's tracer failing at an op (named from the node its code was handling)."""
    frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
    what = f"{type(exc).__name__}: {first_line(exc)}"
    name = type(model).__name__
    if isinstance(exc, DynarchError) or not frames:
        return exc if isinstance(exc, DynarchError) else DynarchError(f"{name}: {what}")
    if "torch_pruning" not in frames[-1].f_code.co_filename:
        first = exc.__context__ or exc  # Torch-Pruning retries model(inputs) after model(*inputs)
        what = f"{type(first).__name__}: {first_line(first)}"
        shape = tuple(example_inputs.shape) if torch.is_tensor(example_inputs) else "given"
        return DynarchError(f"{name} fails on example inputs of shape {shape} ({what})")
    nodes = [v for f in reversed(frames) for v in f.f_locals.values() if isinstance(v, tp.Node)]
    op = f" at {_describe(model, nodes[0])}" if nodes else ""
    return UnsupportedOpError(f"cannot trace {name}: Torch-Pruning's tracer fails{op} ({what})")


def _describe(model: nn.Module, node: Any) -> str:
    """A traced node for a message: the module's name, or the op and the module it follows."""
    names = {m: n for n, m in model.named_modules()}
    if node.module in names:
        return f"module {names[node.module]!r}"
    grad_fn = getattr(node, "grad_fn", None)
    label = grad_fn.name().split("Backward")[0].lower() if grad_fn else _op_label(node.module)
    seen, todo = set(), list(node.inputs)
    while todo:  # breadth-first back to the nearest module
        prev = todo.pop(0)
        if prev.module in names:
            return f"op {label} after {names[prev.module]!r}"
        if id(prev) not in seen:
            seen.add(id(prev))
            todo.extend(prev.inputs)
    return f"op {label}"


def _cat_layout(node: Any) -> tuple[int, int] | None:
    """(concatenated dim, output size along it) of a traced cat, from its autograd node."""
    grad_fn = node.grad_fn
    metadata = getattr(grad_fn, "_input_metadata", ())
    if not hasattr(grad_fn, "_saved_dim") or len(metadata) != 1:
        return None
    shape = list(metadata[0].shape)
    dim = grad_fn._saved_dim
    dim = dim + len(shape) if dim < 0 else dim
    return (dim, shape[dim]) if 0 <= dim < len(shape) else None


def _place_concat_inputs(dg: tp.DependencyGraph) -> None:
    """Give each input of a channel concatenation its offset where Torch-Pruning left none.

    Torch-Pruning checks a cat's width against the layers after it; behind a flatten -> linear
    that check fails and every input is mapped to offset 0 (a wrong group). The cat's own output
    shape settles it. A cat whose inputs still cannot be placed is refused (see ``_cat_problem``).
    """
    for node in dg.module2node.values():
        cat = node.module
        if node.type != tp.ops.OPTYPE.CONCAT or cat.offsets is not None:
            continue
        sizes, layout = cat.concat_sizes or [], _cat_layout(node)
        if (
            layout is None
            or layout[0] != 1
            or None in sizes
            or sum(sizes) != layout[1]
            or len(set(node.inputs)) != len(node.inputs)
            or len(sizes) != len(node.inputs)
        ):
            continue
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        cat.offsets = offsets
        for i, source in enumerate(node.inputs):
            span = offsets[i : i + 2]
            for dep in node.dependencies:
                if dep.target is source:
                    dep.index_mapping[1] = tp_index_mapping._ConcatIndexMapping(span, reverse=True)
            for dep in source.dependencies:
                if dep.target is node:
                    dep.index_mapping[1] = tp_index_mapping._ConcatIndexMapping(span)


def _cat_problem(node: Any) -> str | None:
    """Why a traced cat cannot carry a channel group: it joins channels at unknown offsets."""
    if node.module.offsets is not None:
        return None
    layout = _cat_layout(node)
    return (
        "joins channels at offsets that cannot be inferred" if layout and layout[0] == 1 else None
    )


@contextmanager
def _index_mapping_frozen() -> Iterator[None]:
    """Skip Torch-Pruning's index-mapping refresh inside ``get_pruning_group``.

    ``build_dependency`` has just computed the mappings and the model does not change while we
    enumerate groups, but the refresh runs on every call and dominates (seconds for densenet121).
    """
    original = tp_index_mapping.update_index_mapping
    tp_index_mapping.update_index_mapping = lambda graph: None
    try:
        yield
    finally:
        tp_index_mapping.update_index_mapping = original


def _op_label(module: nn.Module) -> str:
    """Short readable kind of a traced op node ('add', 'relu', 'cat', 'flatten', ...)."""
    if isinstance(module, tp.ops._ConcatOp):
        return "cat"
    if isinstance(module, tp.ops._ReshapeOp):
        return "flatten"
    if isinstance(module, tp.ops._OutputOp):
        return "output"
    raw = str(getattr(module, "_grad_fn", type(module).__name__))
    for suffix in ("Backward0", "Backward1", "Backward"):
        raw = raw.replace(suffix, "")
    return raw.lower() or "op"


def _node_attrs(module: nn.Module, name: str | None) -> dict[str, Any]:
    """Node attributes for the networkx graph (GraphML-safe scalars only)."""
    if name is None:
        return {"kind": "op", "op": _op_label(module)}
    attrs: dict[str, Any] = {
        "kind": "module",
        "op": type(module).__name__,
        "module": name,
        "params": sum(p.numel() for p in module.parameters(recurse=False)),
    }
    attrs.update(node_attrs(module))
    return attrs


def trace_group(
    model: nn.Module, target: str, example_inputs: Any = None
) -> tuple[ChannelGroup, tp.DependencyGraph]:
    """Trace ``model`` and compute only the channel group of ``target``'s output channels.

    This is what a mutation needs; building every group (``ArchGraph.from_module``) costs a
    second per hundred layers.
    """
    example_inputs = remember_example_inputs(model, example_inputs)
    dg = _trace(model, example_inputs)
    module_names, ids = _names(model, dg)
    module = model.get_submodule(target)
    if module not in dg.module2node:
        raise UnknownTargetError(f"{target!r} is not used in the model's forward pass")
    with _index_mapping_frozen():
        return _channel_group(dg, module, module_names, ids), dg


def _names(model: nn.Module, dg: tp.DependencyGraph) -> tuple[dict[nn.Module, str], dict]:
    """Module paths, and stable names for every traced node (ops numbered per kind)."""
    module_names = {m: n for n, m in model.named_modules()}
    ids: dict[Any, str] = {}
    counters: dict[str, int] = {}
    for node in sorted(
        dg.module2node.values(),
        key=lambda n: (n.module not in module_names, getattr(n.module, "id", 0)),
    ):
        if node.module in module_names:
            ids[node] = module_names[node.module]
        else:
            label = _op_label(node.module)
            ids[node] = f"{label}_{counters.get(label, 0)}"
            counters[label] = counters.get(label, 0) + 1
    return module_names, ids


def _build(model: nn.Module, dg: tp.DependencyGraph) -> ArchGraph:
    module_names, ids = _names(model, dg)
    nodes = list(dg.module2node.values())
    g = nx.DiGraph()
    for node in nodes:
        g.add_node(ids[node], **_node_attrs(node.module, module_names.get(node.module)))
    for node in nodes:
        for out in node.outputs:
            g.add_edge(ids[node], ids[out])

    groups: list[ChannelGroup] = []
    group_of: dict[str, ChannelGroup] = {}
    with _index_mapping_frozen():
        for name, module in model.named_modules():
            if not is_weighted(module) or name in group_of or module not in dg.module2node:
                continue
            group = _channel_group(dg, module, module_names, ids)
            groups.append(group)
            for member in group.members:
                if _owns_dimension(member, g):
                    group_of.setdefault(member.module, group)
                    g.nodes[member.module]["group"] = group.name
            group_of.setdefault(name, group)
    by_module = {n: group_of[n] for n in module_names.values() if n in group_of}  # module order
    g.graph["groups"] = groups_json(groups)
    return ArchGraph(nx=g, groups=groups, group_by_module=by_module)


def _owns_dimension(member: GroupMember, g: nx.DiGraph) -> bool:
    """A producer whose last output channels are the group's (all of them, or ``c``'s
    channels 4..10 in ``cat([a(x), b(x)]) + c(z)``: growing ``c`` grows ``b``, see
    :func:`_joined_group`), or a channel-wise layer (BN, depthwise) whose whole channel
    dimension is the group's; one after a concatenation serves several groups and belongs to
    none."""
    size = g.nodes[member.module].get("out_channels")
    if member.role == PRODUCER:
        return size is None or member.stop == size
    return member.role == CHANNELWISE and member.stop - member.start == size


def _channel_group(
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
        group = _channel_group(dg, last[0], module_names, ids, join=False)
        if group.unsupported or any(
            m.module == name and m.role == PRODUCER and m.stop == width for m in group.members
        ):
            return group
    own = _channel_group(dg, module, module_names, ids, join=False)
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
        return _unknown_layer(dg, op)
    if node.type == tp.ops.OPTYPE.CONCAT:
        problem = _cat_problem(node)
        return f"op {name} {problem}" if problem else None
    if node.type in _OP_TYPES_UNSUPPORTED:
        return f"op {name} ({_OP_TYPES_UNSUPPORTED[node.type]})"
    if any(
        k in name.lower() or k in str(getattr(op, "_grad_fn", "")) for k in _CHANNEL_REARRANGING
    ):
        return f"op {name} rearranges channels"
    if node.type == tp.ops.OPTYPE.ELEMENTWISE and _changes_channel_count(node):
        return f"op {name} changes the channel count (e.g. pad, sum or broadcast over channels)"
    return None


def _channel_count(node: Any) -> tuple[int, int] | None:
    """(rank, size of dim 1) of a traced node's single output, when autograd recorded it."""
    metadata = getattr(node.grad_fn, "_input_metadata", ())
    if len(metadata) != 1 or len(metadata[0].shape) < 2:
        return None
    shape = metadata[0].shape
    return len(shape), shape[1]


def _changes_channel_count(node: Any) -> bool:
    """An op Torch-Pruning treats as channel-preserving whose output has another channel count
    than one of its inputs (``F.pad`` over channels, ``x.sum(1, keepdim=True)``, ``x * mask``
    with a one-channel mask)."""
    out = _channel_count(node)
    ins = [_channel_count(n) for n in node.inputs]
    return out is not None and any(i is not None and i[0] == out[0] and i != out for i in ins)


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


def _unknown_layer(dg: tp.DependencyGraph, parameter: nn.Parameter) -> str:
    """A parameter Torch-Pruning found outside any layer it knows: name its module's type."""
    name = dg._param_to_name.get(parameter, "a parameter")
    owner = name.rpartition(".")[0]
    try:
        kind = type(dg.model.get_submodule(owner)).__name__ if owner else "the model"
    except AttributeError:
        kind = "an unknown module"
    return (
        f"{owner or name}: {kind} is a layer type dynarch does not know (its parameter {name} "
        "is per channel); register a LayerKind for it (docs/architecture.md)"
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
