"""Layers by role instead of by name, so that one preset fits every model.

``conv[1]`` is the second growable convolution, ``linear[-1]`` the last growable hidden linear
layer, ``layer[:2]`` the first two growable layers of any type, ``conv[:]`` all the convs. The
pool is :meth:`TrainState.targets` (one layer per channel group, in model order). A name without
brackets is a module name and is kept as it is. Selectors are resolved once, against the model
as the run starts; the policies that take them keep the resolved names in their state, so a
resumed run uses the same layers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from dynarch.policies.base import PolicyError, TrainState

ROLES: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "linear": (nn.Linear,),
    "layer": (nn.Module,),
}
_SELECTOR = re.compile(r"^(\w+)\[\s*(-?\d*)\s*(:)?\s*(-?\d*)\s*\]$")


def is_selector(name: str) -> bool:
    """Whether ``name`` is a selector (module names never hold brackets)."""
    return "[" in name


def select(selector: str, state: TrainState) -> list[str]:
    """The targets ``selector`` names in the model of ``state``, in model order; one line
    naming the selector when it is malformed or selects nothing."""
    match = _SELECTOR.match(selector.strip())
    if match is None or match.group(1) not in ROLES:
        raise PolicyError(
            f"bad layer selector {selector!r}: use ROLE[i] or ROLE[i:j] with ROLE one of "
            f"{', '.join(ROLES)} (e.g. conv[0], linear[-1], layer[:2])"
        )
    role, first, colon, last = match.groups()
    pool = [t for t in state.targets() if isinstance(state.model.get_submodule(t), ROLES[role])]
    if colon:
        chosen = pool[_bound(first) : _bound(last)]
    elif first and -len(pool) <= int(first) < len(pool):
        chosen = [pool[int(first)]]
    else:
        chosen = []
    if not chosen:
        raise PolicyError(
            f"{selector!r} selects no layer of this model (its {role} targets: "
            f"{', '.join(pool) or 'none'})"
        )
    return chosen


def resolve(names: Iterable[str], state: TrainState) -> list[str]:
    """Module names as given and selectors expanded, each layer once, in the given order."""
    resolved: list[str] = []
    for name in names:
        for target in select(name, state) if is_selector(name) else [name]:
            if target not in resolved:
                resolved.append(target)
    return resolved


def resolve_one(name: str, state: TrainState) -> str:
    """A module name, or the one layer a selector names (``conv[:]`` is refused here)."""
    if not is_selector(name):
        return name
    chosen = select(name, state)
    if len(chosen) != 1:
        raise PolicyError(f"{name!r} selects {len(chosen)} layers; name one, e.g. conv[0]")
    return chosen[0]


def _bound(text: str) -> int | None:
    return int(text) if text else None
