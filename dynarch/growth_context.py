"""The contract between the growth surgery and an initializer.

An initializer receives a :class:`GrowthContext` (the model before growth, the channel group,
k, optional data, its parsed options) and returns :class:`NewChannels`: the new fan-in rows of
every producer and the new fan-out columns of every consumer. Options are a frozen dataclass
per initializer (:class:`GrowthOptions` and subclasses), parsed once from the user's keys by
:func:`parse_options`, so a misspelt key is refused before anything runs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dynarch.errors import DynarchError, close_matches
from dynarch.groups import ChannelGroup
from dynarch.layer_kinds import CONSUMER, channel_tensors, receptive_field
from dynarch.scalars import as_integer, as_number


@dataclass(frozen=True)
class GrowthOptions:
    """Options every initializer takes. Subclass it (a frozen dataclass) for your own and set
    it as the initializer's ``options_type`` (``register_initializer(name, options=...)``)."""

    max_samples: int = 512  # samples of the growth data that statistics read


@dataclass(frozen=True)
class EpsilonOptions(GrowthOptions):
    """Zero fan-in initializers: ``epsilon`` x the mean fan-in norm puts new units just off
    zero; behind a BatchNorm the near-zero is a gamma of ``bn_gamma`` (default ``epsilon``) x
    the mean |gamma| instead (``bn_gate=False``: the plain epsilon fan-in)."""

    epsilon: float = 1e-8
    bn_gate: bool = True
    bn_gamma: float | None = None


@dataclass
class GrowthContext:
    """Everything an initializer may look at; the model is still at its old width."""

    model: nn.Module
    group: ChannelGroup
    k: int
    modules: dict[str, nn.Module]
    data: Any = None
    loss_fn: Callable | None = None
    options: GrowthOptions = field(default_factory=GrowthOptions)
    # sums a statistic over all training processes (multi-process runs); None: one process
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
    init_name: str = "custom"  # for messages
    # the surgery's own growth applied to a deep copy of the model (for initializers that
    # measure the grown network, e.g. by autograd); set by dynarch.grow
    grown_copy: Callable[[NewChannels], nn.Module] | None = None

    def fan_in_shape(self, producer: str) -> tuple[int, ...]:
        w = self.modules[producer].weight
        return (self.k, *w.shape[1:])

    def fan_out_shape(self, consumer: str) -> tuple[int, ...]:
        """(out, new inputs, *kernel): ``k`` x its multiplicity new inputs (after a flatten);
        a grouped conv's output reads only its own group's ``k / groups``."""
        w = self.modules[consumer].weight
        mult = next(
            m.multiplicity
            for m in self.group.members
            if m.module == consumer and m.role == CONSUMER
        )
        folds = channel_tensors(self.modules[consumer], CONSUMER)[0].folds
        return (w.shape[0], self.k * mult // folds, *w.shape[2:])

    def consumer_fan_in(self, consumer: str) -> int:
        """Fan-in of a consumer after growth (for default-scale random weights)."""
        shape = self.fan_out_shape(consumer)
        w = self.modules[consumer].weight
        return (w.shape[1] + shape[1]) * receptive_field(w)


@dataclass
class NewChannels:
    """Values for the k new channels: fan-in rows per producer, fan-out columns per consumer.

    ``new_values`` overrides the default new slice of any other member tensor, keyed by
    ``(module, attr)`` (e.g. a producer's bias or a BatchNorm's running stats when splitting
    units); ``existing`` replaces a member tensor's *existing* entries (same shape as now),
    e.g. the halved fan-out of a split unit. Both are applied inside the atomic surgery.
    """

    fan_in: dict[str, torch.Tensor]
    fan_out: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)
    new_values: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    existing: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)

    def zero_fan_out(self) -> bool:
        """Nobody reads the new channels yet (their fan-out gradient is what matters)."""
        return bool(self.fan_out) and not any(t.any() for t in self.fan_out.values())


Initializer = Callable[[GrowthContext], NewChannels]


class InitOptionError(DynarchError):
    """An initializer option that does not exist or has the wrong type."""


def takes_options(cls: type[GrowthOptions]) -> Callable[[Initializer], Initializer]:
    """Decorator: the initializer reads ``ctx.options`` as a ``cls``."""

    def decorate(fn: Initializer) -> Initializer:
        fn.options_type = cls  # type: ignore[attr-defined]
        return fn

    return decorate


def options_type(init: Initializer) -> type[GrowthOptions]:
    """The options class an initializer declares (``init.options_type``), or the shared one."""
    return getattr(init, "options_type", GrowthOptions)


def parse_options(
    cls: type[GrowthOptions], raw: Mapping[str, Any] | GrowthOptions | None, init_name: str
) -> GrowthOptions:
    """``cls`` built from the user's ``raw`` keys: unknown keys and wrong types are one line
    naming the key (with a "did you mean")."""
    if isinstance(raw, cls):
        return raw
    if isinstance(raw, GrowthOptions):
        raw = dataclasses.asdict(raw)
    known = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in (raw or {}).items():
        if key not in known:
            raise InitOptionError(
                f"initializer {init_name!r} has no option {key!r}"
                + (close_matches(key, known) or f" (its options: {', '.join(sorted(known))})")
            )
        values[key] = _coerce(value, hints[key], f"option {key!r} of initializer {init_name!r}")
    return cls(**values)


_SCALARS = (bool, int, float, str)


def _coerce(value: Any, hint: Any, what: str) -> Any:
    """``value`` as the scalar type ``hint`` names (``float | None`` accepts None; a float
    accepts an int or a numeric string such as YAML's ``1e-8``); other hints pass it through."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = typing.get_args(hint) if union else (hint,)
    if value is None and type(None) in allowed:
        return None
    scalar = next((t for t in allowed if t in _SCALARS), None)
    if scalar is None:
        return value
    if scalar is bool:
        ok = isinstance(value, bool)
    elif scalar in (int, float):
        number = _number(value, scalar)
        ok, value = number is not None, value if number is None else number
    else:
        ok = isinstance(value, str)
    if not ok:
        raise InitOptionError(f"{what} must be {scalar.__name__}, got {value!r}")
    return scalar(value)


def _number(value: Any, scalar: type) -> int | float | None:
    """An int option takes an integer of any kind (``np.int64``, a 0-d tensor); a float option
    any real number or a numeric string (YAML's ``1e-8``); None for anything else."""
    if scalar is int:
        return as_integer(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return as_number(value)
