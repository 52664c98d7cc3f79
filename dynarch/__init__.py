"""dynarch: grow (GradMax) and prune (Torch-Pruning) convolutional networks while they train.

The public names are imported on first use (PEP 562), so ``import dynarch.cli`` does not pay
for torch before it knows whether the command line is even valid.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # for type checkers only; at run time __getattr__ imports from _HOMES
    from dynarch.errors import DynarchError  # noqa: F401
    from dynarch.graph import ArchGraph  # noqa: F401
    from dynarch.groups import ChannelGroup, GroupMember  # noqa: F401
    from dynarch.growth_context import GrowthContext, GrowthOptions, NewChannels  # noqa: F401
    from dynarch.initializers import register_initializer  # noqa: F401
    from dynarch.layer_kinds import (  # noqa: F401
        ChannelwiseKind,
        LayerKind,
        register_layer_kind,
    )
    from dynarch.session import Session  # noqa: F401
    from dynarch.surgery.deepen import deepen  # noqa: F401
    from dynarch.surgery.grow import grow  # noqa: F401
    from dynarch.surgery.prune import prune  # noqa: F401
    from dynarch.surgery.record import MutationRecord  # noqa: F401
    from dynarch.trained import load  # noqa: F401

_HOMES = {
    "ArchGraph": "dynarch.graph",
    "ChannelGroup": "dynarch.groups",
    "DynarchError": "dynarch.errors",
    "GroupMember": "dynarch.groups",
    "ChannelwiseKind": "dynarch.layer_kinds",
    "GrowthContext": "dynarch.growth_context",
    "GrowthOptions": "dynarch.growth_context",
    "LayerKind": "dynarch.layer_kinds",
    "MutationRecord": "dynarch.surgery.record",
    "Session": "dynarch.session",
    "NewChannels": "dynarch.growth_context",
    "deepen": "dynarch.surgery.deepen",
    "grow": "dynarch.surgery.grow",
    "load": "dynarch.trained",
    "prune": "dynarch.surgery.prune",
    "register_initializer": "dynarch.initializers",
    "register_layer_kind": "dynarch.layer_kinds",
}
__all__ = sorted(_HOMES)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'dynarch' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
