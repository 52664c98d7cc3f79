"""What one mutation did, as a plain record the history can store."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class MutationRecord:
    """One grow or prune of one channel group.

    ``indices`` are channel indices in the group's coordinates: the new channels for a grow,
    the removed ones (before removal) for a prune.
    """

    kind: str
    target: str
    group: str
    k: int
    method: str
    width_before: int
    width_after: int
    indices: list[int]
    modules: list[str]
    params_before: int
    params_after: int
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
