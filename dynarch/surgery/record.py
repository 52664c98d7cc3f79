"""What one mutation did, as a plain record the history can store."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class MutationRecord:
    """What one mutation did: the fields every op fills, then the op's own ``info``.

    Every op: ``kind`` (its name in :mod:`dynarch.ops`), ``target``, ``group`` (the channel
    group or inserted module it changed), ``modules``, ``params_before``/``params_after``,
    ``seconds``; and, as the history's events table has a column for each, the channel
    change: ``k`` channels, chosen by ``method`` (the init, the importance, or the layer kind
    a deepen inserts), ``width_before``/``width_after``, and ``indices`` in the group's
    coordinates — the new channels for a grow, the removed ones (before removal) for a prune,
    none for an op that changes no channel. What only one op knows (a deepen's kernel size,
    a gradient init's fan-in norm) goes into ``info``, stored as JSON.
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
