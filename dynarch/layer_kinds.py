"""Layer kinds: everything the engine knows about one layer type, in one registry.

A :class:`LayerKind` says what a layer type is inside a channel group (its role), which of its
tensors carry the channel dimension, the neutral values for new channels, how its size
attributes follow its tensors, what makes an instance unsupported, and width constraints. Growth
(our own insertion), pruning (Torch-Pruning, then our optimizer-state remap), the graph and the
surgery checks all ask :func:`kind_of` — nothing else in the package tests layer types.

Add a layer type in one small file::

    register_layer_kind(ChannelwiseKind("channel_scale", ChannelScale, tensors=("weight",),
                                        size_attr="num_channels", fill={"weight": 1.0}))

Torch-Pruning is then given a pruner for that type, so tracing, growth and pruning all work.

Roles of a module inside a channel group:
- ``producer``: a conv/linear whose *output* channels are the group (new rows = fan-in);
- ``consumer``: a conv/linear whose *input* channels contain the group (new columns = fan-out);
- ``channelwise``: a layer with one entry per channel (norms, PReLU, depthwise conv), which gets
  neutral values so that the function is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dynarch.tp_adapter import tp

PRODUCER, CONSUMER, CHANNELWISE = "producer", "consumer", "channelwise"


@dataclass(frozen=True)
class ChannelTensor:
    """One tensor attribute of a module and the dimension that indexes the group's channels.

    ``folds`` channels share one index of that dimension: a grouped conv's weight holds the
    input channels of one group (``in_channels / groups``), and index j serves channel j of
    every group."""

    attr: str
    dim: int
    folds: int = 1


class LayerKind:
    """One layer type's rules. Subclass it (or use :class:`ChannelwiseKind`) and register it."""

    name = "layer"
    types: tuple[type[nn.Module], ...] = ()
    # conv/linear: output channels can be a growth/pruning target, input channels are consumed
    weighted = False
    # has an input and an output channel dimension (conv, linear, depthwise conv)
    two_sided = False
    # normalises across channels (GroupNorm, LayerNorm): new channels change the statistics
    mixes_channels = False
    # Torch-Pruning has its own pruner for these types; otherwise dynarch gives it one
    torch_pruning_knows = False
    size_attrs: tuple[str, ...] = ()

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, self.types)

    def role(self, module: nn.Module, side: str) -> str:
        """The role of ``module`` when its ``side`` ('out' or 'in') dimension is in a group."""
        if not self.weighted:
            return CHANNELWISE
        return PRODUCER if side == "out" else CONSUMER

    def unsupported(self, module: nn.Module) -> str | None:
        """Why this instance cannot be resized consistently, or None when it can."""
        return None

    def channel_tensors(self, module: nn.Module, role: str) -> list[ChannelTensor]:
        raise NotImplementedError

    def neutral(self, module: nn.Module, attr: str, count: int) -> torch.Tensor:
        """Values for ``count`` new channels that leave the function unchanged for channels
        whose input is zero."""
        old = getattr(module, attr)
        return torch.zeros((count, *old.shape[1:]), device=old.device, dtype=old.dtype)

    def sync_sizes(self, module: nn.Module) -> None:
        """Set the size attributes (out_channels, num_features, ...) from the resized tensors."""

    def width_problem(self, module: nn.Module, width: int) -> str | None:
        """Why this module cannot have ``width`` channels, or None."""
        return None

    def blocks(self, module: nn.Module) -> int:
        """Equal blocks its channel dimensions come in (a grouped conv's ``groups``): the
        channels of a group holding it grow and shrink by the same count in every block."""
        return 1

    def node_attrs(self, module: nn.Module) -> dict[str, int | str]:
        """Scalar attributes for the architecture graph's node (channel counts, kernel, ...)."""
        return _per_channel_width(module)


def _weighted_tensors(module: nn.Module, role: str) -> list[ChannelTensor]:
    """A conv/linear's rows (and bias) for its output channels, its columns for its inputs."""
    if role == CONSUMER:
        return [ChannelTensor("weight", 1)]
    bias = [ChannelTensor("bias", 0)] if module.bias is not None else []
    return [ChannelTensor("weight", 0), *bias]


class ChannelwiseKind(LayerKind):
    """A layer with one entry per channel in each of ``tensors`` (dimension 0)."""

    def __init__(
        self,
        name: str,
        types: type[nn.Module] | tuple[type[nn.Module], ...],
        tensors: Sequence[str],
        size_attr: str,
        fill: Mapping[str, float] | None = None,
        mixes_channels: bool = False,
        torch_pruning_knows: bool = False,
    ) -> None:
        self.name = name
        self.types = types if isinstance(types, tuple) else (types,)
        self.tensors = tuple(tensors)
        self.size_attr = size_attr
        self.size_attrs = (size_attr,)
        self.fill = dict(fill or {})
        self.mixes_channels = mixes_channels
        self.torch_pruning_knows = torch_pruning_knows

    def channel_tensors(self, module: nn.Module, role: str) -> list[ChannelTensor]:
        return [ChannelTensor(n, 0) for n in self.tensors if getattr(module, n, None) is not None]

    def neutral(self, module: nn.Module, attr: str, count: int) -> torch.Tensor:
        old = getattr(module, attr)
        fill = self.fill.get(attr, 0.0)
        return torch.full((count, *old.shape[1:]), fill, device=old.device, dtype=old.dtype)

    def sync_sizes(self, module: nn.Module) -> None:
        tensors = self.channel_tensors(module, CHANNELWISE)
        if tensors:
            setattr(module, self.size_attr, getattr(module, tensors[0].attr).shape[0])


class ConvKind(LayerKind):
    name = "conv"
    types = (nn.modules.conv._ConvNd,)
    weighted = True
    two_sided = True
    torch_pruning_knows = True
    size_attrs = ("in_channels", "out_channels", "groups")

    def unsupported(self, module: nn.Module) -> str | None:
        name = type(module).__name__
        if module.transposed:
            return f"{name} (transposed convolution) is not supported"
        if module.groups == module.out_channels != module.in_channels and module.groups > 1:
            # Torch-Pruning couples such a conv's input and output channels as a depthwise one's
            return (
                f"{name} with groups={module.groups} = out_channels != in_channels="
                f"{module.in_channels} is not supported"
            )
        return None

    def channel_tensors(self, module: nn.Module, role: str) -> list[ChannelTensor]:
        if role == CONSUMER:
            return [ChannelTensor("weight", 1, folds=module.groups)]
        return _weighted_tensors(module, role)

    def blocks(self, module: nn.Module) -> int:
        return module.groups

    def sync_sizes(self, module: nn.Module) -> None:
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups

    def node_attrs(self, module: nn.Module) -> dict[str, int | str]:
        return {
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel": "x".join(map(str, module.kernel_size)),
            "stride": "x".join(map(str, module.stride)),
            "groups": module.groups,
        }


class DepthwiseConvKind(ConvKind):
    """groups == in == out channels: one filter per channel, so channel-wise in a group; new
    channels get an identity kernel (1 at the centre)."""

    name = "depthwise_conv"
    weighted = False

    def matches(self, module: nn.Module) -> bool:
        return (
            isinstance(module, nn.modules.conv._ConvNd)
            and module.groups > 1
            and module.groups == module.in_channels == module.out_channels
        )

    def unsupported(self, module: nn.Module) -> str | None:
        if module.transposed:
            return f"{type(module).__name__} (transposed convolution) is not supported"
        return None

    def channel_tensors(self, module: nn.Module, role: str) -> list[ChannelTensor]:
        return _weighted_tensors(module, PRODUCER)  # one filter (and bias) per channel

    def blocks(self, module: nn.Module) -> int:
        return 1  # one filter per channel: any count of channels

    def neutral(self, module: nn.Module, attr: str, count: int) -> torch.Tensor:
        old = getattr(module, attr)
        if attr != "weight":
            return super().neutral(module, attr, count)
        kernel = torch.zeros((count, *old.shape[1:]), device=old.device, dtype=old.dtype)
        kernel[(slice(None), 0, *(s // 2 for s in old.shape[2:]))] = 1.0
        return kernel

    def sync_sizes(self, module: nn.Module) -> None:
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.groups = module.out_channels


class LinearKind(LayerKind):
    name = "linear"
    types = (nn.Linear,)
    weighted = True
    two_sided = True
    torch_pruning_knows = True
    size_attrs = ("in_features", "out_features")

    def channel_tensors(self, module: nn.Module, role: str) -> list[ChannelTensor]:
        return _weighted_tensors(module, role)

    def sync_sizes(self, module: nn.Module) -> None:
        module.out_features, module.in_features = module.weight.shape

    def node_attrs(self, module: nn.Module) -> dict[str, int | str]:
        return {"in_channels": module.in_features, "out_channels": module.out_features}


class GroupNormKind(ChannelwiseKind):
    def width_problem(self, module: nn.Module, width: int) -> str | None:
        if width % module.num_groups:
            return f"GroupNorm with {module.num_groups} groups cannot have {width} channels"
        return None


class LayerNormKind(ChannelwiseKind):
    """Over the channel dimension only (a LayerNorm over more dims is not resizable)."""

    def unsupported(self, module: nn.Module) -> str | None:
        if len(module.normalized_shape) != 1:
            return f"LayerNorm over shape {tuple(module.normalized_shape)} is not supported"
        return None

    def sync_sizes(self, module: nn.Module) -> None:
        if module.weight is not None:
            module.normalized_shape = (module.weight.shape[0],)


class PReLUKind(ChannelwiseKind):
    """A single shared slope has no channel dimension; per-channel slopes start at 0.25."""

    def channel_tensors(self, module: nn.Module, role: str) -> list[ChannelTensor]:
        return [] if module.num_parameters == 1 else super().channel_tensors(module, role)


_NORM_STATS = ("weight", "bias", "running_mean", "running_var")
_REGISTRY: list[LayerKind] = []


def register_layer_kind(kind: LayerKind) -> LayerKind:
    """Teach the engine a layer type. Later registrations win over earlier ones (a user kind
    can override a built-in one for a subclass)."""
    if not isinstance(kind, LayerKind):
        raise TypeError(f"register_layer_kind expects a LayerKind, got {type(kind).__name__}")
    _REGISTRY.append(kind)
    return kind


def unregister_layer_kind(kind: LayerKind) -> None:
    _REGISTRY.remove(kind)


def kind_of(module: nn.Module) -> LayerKind | None:
    """The registered kind of ``module`` (the latest registered that matches), or None."""
    return next((kind for kind in reversed(_REGISTRY) if kind.matches(module)), None)


for _kind in (
    ConvKind(),
    DepthwiseConvKind(),
    LinearKind(),
    ChannelwiseKind(
        "batchnorm",
        (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm),
        _NORM_STATS,
        "num_features",
        fill={"weight": 1.0, "running_var": 1.0},
        torch_pruning_knows=True,
    ),
    GroupNormKind(
        "groupnorm",
        nn.GroupNorm,
        ("weight", "bias"),
        "num_channels",
        fill={"weight": 1.0},
        mixes_channels=True,
        torch_pruning_knows=True,
    ),
    LayerNormKind(
        "layernorm",
        nn.LayerNorm,
        ("weight", "bias"),
        "normalized_shape",
        fill={"weight": 1.0},
        mixes_channels=True,
        torch_pruning_knows=True,
    ),
    PReLUKind(
        "prelu",
        nn.PReLU,
        ("weight",),
        "num_parameters",
        fill={"weight": 0.25},
        torch_pruning_knows=True,
    ),
):
    register_layer_kind(_kind)


# -- what the rest of the package asks ----------------------------------------------------------
def is_weighted(module: nn.Module) -> bool:
    """Conv or linear layers whose channels can be a growth target (not depthwise)."""
    kind = kind_of(module)
    return kind is not None and kind.weighted


def mixes_channels(module: nn.Module) -> bool:
    kind = kind_of(module)
    return kind is not None and kind.mixes_channels


def role_of(module: nn.Module, side: str) -> str:
    """The role of ``module`` when its ``side`` ('out' or 'in') dimension is in a group."""
    return _known(module).role(module, side)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why this module cannot be resized consistently, or None when it can."""
    kind = kind_of(module)
    if kind is None:
        return (
            f"{type(module).__name__} has channel-coupled state dynarch does not know how to resize"
        )
    return kind.unsupported(module)


def channel_tensors(module: nn.Module, role: str) -> list[ChannelTensor]:
    """Tensors of ``module`` that change size when its channels in the group change."""
    return _known(module).channel_tensors(module, role)


def neutral_values(module: nn.Module, attr: str, count: int) -> torch.Tensor:
    """Values for ``count`` new channels of a channel-wise layer (its kind's neutral values)."""
    return _known(module).neutral(module, attr, count)


def sync_sizes(module: nn.Module) -> None:
    kind = kind_of(module)
    if kind is not None:
        kind.sync_sizes(module)


def width_problem(module: nn.Module, width: int) -> str | None:
    kind = kind_of(module)
    return kind.width_problem(module, width) if kind is not None else None


def channel_blocks(module: nn.Module) -> int:
    """Equal blocks ``module``'s channels come in (a grouped conv's ``groups``; else 1)."""
    kind = kind_of(module)
    return kind.blocks(module) if kind is not None else 1


def channel_size(module: nn.Module, ct: ChannelTensor) -> int:
    """Channels that tensor dimension ``ct`` stands for (its size times ``ct.folds``)."""
    return getattr(module, ct.attr).shape[ct.dim] * ct.folds


def size_attrs(module: nn.Module) -> tuple[str, ...]:
    """Attributes that record ``module``'s channel counts (restored with tensors on rollback)."""
    kind = kind_of(module)
    return kind.size_attrs if kind is not None else ()


def node_attrs(module: nn.Module) -> dict[str, int | str]:
    """Scalar channel attributes of ``module`` for the architecture graph."""
    kind = kind_of(module)
    return kind.node_attrs(module) if kind is not None else _per_channel_width(module)


def _per_channel_width(module: nn.Module) -> dict[str, int | str]:
    """in/out channels of a layer with one weight (or running mean) entry per channel."""
    for attr in ("weight", "running_mean"):
        tensor = getattr(module, attr, None)
        if isinstance(tensor, torch.Tensor) and tensor.dim() > 0:
            return {"in_channels": int(tensor.shape[0]), "out_channels": int(tensor.shape[0])}
    return {}


def receptive_field(weight: torch.Tensor) -> int:
    """Number of kernel positions of a conv weight (1 for a linear weight)."""
    return int(torch.tensor(weight.shape[2:]).prod().item()) if weight.dim() > 2 else 1


def _known(module: nn.Module) -> LayerKind:
    kind = kind_of(module)
    if kind is None:
        raise ValueError(f"no layer kind registered for {type(module).__name__}")
    return kind


# -- Torch-Pruning's side of user kinds ---------------------------------------------------------
class KindPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning pruner for a channel-wise kind it does not know: slices the kind's channel
    tensors (new tensor objects, like Torch-Pruning's own pruners, so the optimizer remap sees
    them) and syncs the size attributes. In and out channels are the same dimension."""

    TARGET_MODULES = None

    def __init__(self, kind: LayerKind) -> None:
        super().__init__(pruning_dim=0)
        self.kind = kind

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        for ct in self.kind.channel_tensors(layer, CHANNELWISE):
            old = getattr(layer, ct.attr)
            keep = torch.ones(old.shape[ct.dim], dtype=torch.bool, device=old.device)
            keep[list(idxs)] = False
            kept = old.detach()[(slice(None),) * ct.dim + (keep,)].clone()
            new = nn.Parameter(kept, requires_grad=old.requires_grad)
            setattr(layer, ct.attr, new if isinstance(old, nn.Parameter) else kept)
        self.kind.sync_sizes(layer)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int | None:
        tensors = self.kind.channel_tensors(layer, CHANNELWISE)
        return int(getattr(layer, tensors[0].attr).shape[tensors[0].dim]) if tensors else None

    get_in_channels = get_out_channels


def torch_pruning_pruners() -> dict[type[nn.Module], KindPruner]:
    """Pruners for every registered type Torch-Pruning does not know (for its tracer)."""
    return {
        t: KindPruner(kind)
        for kind in _REGISTRY
        if not kind.torch_pruning_knows
        for t in kind.types
    }
