"""Per-layer-type knowledge: which tensors carry a channel dimension, and how new channels look.

Every layer kind dynarch can resize is described here once, and both growth (our own
insertion) and pruning (Torch-Pruning's handlers, then our optimizer-state remap) read it.

Roles of a module inside a channel group:
- ``producer``: a conv/linear whose *output* channels are the group (new rows = fan-in);
- ``consumer``: a conv/linear whose *input* channels contain the group (new columns = fan-out);
- ``channelwise``: a layer with one entry per channel (norms, PReLU, depthwise conv), which gets
  neutral values so that the function is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

PRODUCER, CONSUMER, CHANNELWISE = "producer", "consumer", "channelwise"

_NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)
# Attributes that record a module's channel counts; restored together with tensors on rollback.
SIZE_ATTRS = (
    "in_channels",
    "out_channels",
    "groups",
    "in_features",
    "out_features",
    "num_features",
    "num_channels",
    "normalized_shape",
    "num_parameters",
)


@dataclass(frozen=True)
class ChannelTensor:
    """One tensor attribute of a module and the dimension that indexes the group's channels."""

    attr: str
    dim: int


def is_depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def is_weighted(module: nn.Module) -> bool:
    """Conv or linear layers whose channels can be a growth target."""
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and not is_depthwise(module)


def role_of(module: nn.Module, side: str) -> str:
    """The role of ``module`` when its ``side`` ('out' or 'in') dimension is in a group."""
    if isinstance(module, _NORMS) or isinstance(module, nn.PReLU) or is_depthwise(module):
        return CHANNELWISE
    return PRODUCER if side == "out" else CONSUMER


def unsupported_reason(module: nn.Module) -> str | None:
    """Why this module cannot be resized consistently, or None when it can."""
    name = type(module).__name__
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            return f"{name} (transposed convolution) is not supported"
        if module.groups > 1 and not is_depthwise(module):
            return f"{name} with groups={module.groups} (grouped, not depthwise) is not supported"
        return None
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
        return f"LayerNorm over shape {tuple(module.normalized_shape)} is not supported"
    if isinstance(module, nn.PReLU) and module.num_parameters == 1:
        return None
    if isinstance(module, _NORMS) or isinstance(module, nn.PReLU):
        return None
    return f"{name} has channel-coupled state dynarch does not know how to resize"


def channel_tensors(module: nn.Module, role: str) -> list[ChannelTensor]:
    """Tensors of ``module`` that change size when its channels in the group change."""
    if role == PRODUCER:
        out = [ChannelTensor("weight", 0)]
        return out + ([ChannelTensor("bias", 0)] if module.bias is not None else [])
    if role == CONSUMER:
        return [ChannelTensor("weight", 1)]
    if isinstance(module, nn.PReLU) and module.num_parameters == 1:
        return []
    names = ["weight", "bias", "running_mean", "running_var"]
    return [ChannelTensor(n, 0) for n in names if getattr(module, n, None) is not None]


def neutral_values(module: nn.Module, attr: str, count: int) -> torch.Tensor:
    """Values for ``count`` new channels of a channel-wise layer that leave the function unchanged
    for channels whose input is zero: BN gamma=1, beta=0, mean 0, var 1; depthwise identity."""
    old = getattr(module, attr)
    shape = (count, *old.shape[1:])
    if is_depthwise(module) and attr == "weight":
        kernel = torch.zeros(shape, device=old.device, dtype=old.dtype)
        centre = tuple(s // 2 for s in old.shape[2:])
        kernel[(slice(None), 0, *centre)] = 1.0
        return kernel
    if attr in ("weight", "running_var"):
        fill = 0.25 if isinstance(module, nn.PReLU) else 1.0
        return torch.full(shape, fill, device=old.device, dtype=old.dtype)
    return torch.zeros(shape, device=old.device, dtype=old.dtype)


def sync_sizes(module: nn.Module) -> None:
    """Set the size attributes (out_channels, num_features, ...) from the resized tensors."""
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups > 1 and module.groups == module.in_channels
        module.out_channels = module.weight.shape[0]
        if depthwise:
            module.in_channels = module.groups = module.out_channels
        else:
            module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(
        module, nn.modules.instancenorm._InstanceNorm
    ):
        ref = module.weight if module.weight is not None else module.running_mean
        if ref is not None:
            module.num_features = ref.shape[0]
    elif isinstance(module, nn.GroupNorm):
        if module.weight is not None:
            module.num_channels = module.weight.shape[0]
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            module.normalized_shape = (module.weight.shape[0],)
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.shape[0]


def receptive_field(weight: torch.Tensor) -> int:
    """Number of kernel positions of a conv weight (1 for a linear weight)."""
    return int(torch.tensor(weight.shape[2:]).prod().item()) if weight.dim() > 2 else 1
