"""dynarch: grow (GradMax) and prune (Torch-Pruning) convolutional networks while they train."""

from dynarch import growth_baselines  # noqa: F401  (registers net2net, firefly)
from dynarch.errors import DynarchError
from dynarch.graph import ArchGraph, ChannelGroup, GroupMember
from dynarch.initializers import GrowthContext, NewChannels, register_initializer
from dynarch.surgery.grow import grow
from dynarch.surgery.prune import prune
from dynarch.surgery.record import MutationRecord

__all__ = [
    "ArchGraph",
    "ChannelGroup",
    "DynarchError",
    "GroupMember",
    "GrowthContext",
    "MutationRecord",
    "NewChannels",
    "grow",
    "prune",
    "register_initializer",
]
__version__ = "0.1.0"
