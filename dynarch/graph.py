"""ArchGraph: the traced architecture as a networkx graph, plus its channel groups.

Tracing and coupling come from Torch-Pruning's DependencyGraph (:mod:`dynarch.tracing`, the
adapter). We turn its nodes into a ``networkx.DiGraph`` (what users query and export) and its
full-width pruning groups into :class:`~dynarch.groups.ChannelGroup` objects
(:mod:`dynarch.groups`).
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import nn

from dynarch.errors import UnknownTargetError, close_matches
from dynarch.groups import ChannelGroup, GroupMember, channel_group, groups_json
from dynarch.layer_kinds import CHANNELWISE, PRODUCER, is_weighted, node_attrs
from dynarch.tp_adapter import tp
from dynarch.tracing import index_mapping_frozen, node_names, op_label, trace

__all__ = [
    "ArchGraph",
    "ChannelGroup",
    "GroupMember",
    "groups_json",
    "remember_example_inputs",
    "trace_group",
]

# Example inputs remembered per model, so later mutations can re-trace without being given them.
_EXAMPLE_INPUTS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


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
        dg = trace(model, example_inputs)
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


def _node_attrs(module: nn.Module, name: str | None) -> dict[str, Any]:
    """Node attributes for the networkx graph (GraphML-safe scalars only)."""
    if name is None:
        return {"kind": "op", "op": op_label(module)}
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
    dg = trace(model, example_inputs)
    module_names, ids = node_names(model, dg)
    module = model.get_submodule(target)
    if module not in dg.module2node:
        raise UnknownTargetError(f"{target!r} is not used in the model's forward pass")
    with index_mapping_frozen():
        return channel_group(dg, module, module_names, ids), dg


def _build(model: nn.Module, dg: tp.DependencyGraph) -> ArchGraph:
    module_names, ids = node_names(model, dg)
    nodes = list(dg.module2node.values())
    g = nx.DiGraph()
    for node in nodes:
        g.add_node(ids[node], **_node_attrs(node.module, module_names.get(node.module)))
    for node in nodes:
        for out in node.outputs:
            g.add_edge(ids[node], ids[out])

    groups: list[ChannelGroup] = []
    group_of: dict[str, ChannelGroup] = {}
    with index_mapping_frozen():
        for name, module in model.named_modules():
            if not is_weighted(module) or name in group_of or module not in dg.module2node:
                continue
            group = channel_group(dg, module, module_names, ids)
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
