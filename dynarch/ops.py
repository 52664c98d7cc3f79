"""Mutation ops: everything the engine knows about one kind of mutation, in one table.

An :class:`Op` says, for one op name (``grow``, ``prune``, ``deepen``, or a user's): how a
policy's :class:`~dynarch.policies.base.Mutation` is applied (with the run's optimizer, state
carried), what a resume keeps of it and how it replays that on a freshly built model, the
mutation's line in the run's log, which schedule keys it takes, how it changes a channel
group's width, and how plots draw it. The controller, the schedule, the checkpoint's replay,
the query API and CLI and the plots all ask :func:`op_named` — nothing else compares op names.

Add an op in one file::

    register_op(Op("reinit", apply=my_apply, replay=replay_nothing, look=Look("#ff7f0e", "*")))

The built-ins import the surgery when they run, not when this module is imported: ``dynarch
query`` reads the table (names, plot looks) without paying for torch (1.4 s of import).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dynarch.errors import DynarchError, close_matches

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dynarch.policies.base import Mutation
    from dynarch.surgery.record import MutationRecord


class OpError(DynarchError):
    """An op name no op is registered under, or a bad registration."""


@dataclass(frozen=True)
class Look:
    """How plots draw an op: its colour, its matplotlib marker, the glyph and colour word the
    figure titles use."""

    colour: str = "#7f7f7f"
    marker: str = "o"
    glyph: str = "●"
    colour_name: str = "grey"


def _channels_entry(record: MutationRecord) -> dict[str, Any]:
    """A resume needs the changed channels to give a fresh model this mutation's shapes."""
    return {"kind": record.kind, "target": record.target, "k": record.k, "indices": record.indices}


def _describe_channels(m: Mutation, record: MutationRecord) -> str:
    return (
        f"{m.op} {m.target} by {record.k} ({record.method}): "
        f"width {record.width_before} -> {record.width_after}"
    )


def _no_fields(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {}


def replay_nothing(model: nn.Module, entry: dict[str, Any], example: torch.Tensor) -> None:
    """For an op that changes values only: the checkpoint's weights are all a resume needs."""


@dataclass(frozen=True)
class Op:
    """One op's rules. ``apply(m, model, optimizer, batch, loss_fn, reduce_sum)`` returns the
    :class:`MutationRecord` (``reduce_sum`` sums a statistic over torchrun's processes, None
    alone); ``replay(model, entry, example)`` gives a fresh model the shapes ``entry`` (what
    ``replay_entry(record)`` kept in the checkpoint) records, values coming after."""

    name: str
    apply: Callable[..., MutationRecord]
    replay: Callable[[nn.Module, dict[str, Any], torch.Tensor], None]
    replay_entry: Callable[[MutationRecord], dict[str, Any]] = _channels_entry
    describe: Callable[[Mutation, MutationRecord], str] = _describe_channels
    # +1: adds ``k`` channels to the target's group, -1: removes them, 0: widths unchanged
    channels: int = 0
    # inserts a module after ``target`` (a schedule names it ``after``, takes no ``k``)
    adds_layer: bool = False
    # which channels it changes depends on the local batch (Taylor importance): under
    # torchrun rank 0 applies it and the others apply the channels it chose (``idxs``)
    chosen_on_rank0: bool = False
    # schedule entry keys besides the time, ``op``, ``target`` and ``k``/``fraction``
    schedule_keys: frozenset[str] = frozenset()
    # a schedule entry's op-specific keys -> Mutation fields, checked (DynarchError if not)
    schedule_fields: Callable[[Mapping[str, Any]], dict[str, Any]] = _no_fields
    look: Look = field(default_factory=Look)


_REGISTRY: dict[str, Op] = {}


def register_op(op: Op) -> Op:
    """Teach the engine an op; a name registered again is replaced (a user's op can override a
    built-in one)."""
    if not isinstance(op, Op):
        raise OpError(f"register_op expects an Op, got {type(op).__name__}")
    if not op.name or not op.name.isidentifier():
        raise OpError(f"an op's name must be an identifier, got {op.name!r}")
    _REGISTRY[op.name] = op
    return op


def unregister_op(name: str) -> None:
    _REGISTRY.pop(name, None)


def op_names() -> tuple[str, ...]:
    """The registered op names, built-ins first."""
    return tuple(_REGISTRY)


def op_named(name: Any) -> Op:
    """The op registered as ``name``; an unknown name is one line with the closest names."""
    op = _REGISTRY.get(name) if isinstance(name, str) else None
    if op is None:
        raise OpError(
            f"unknown op {name!r}; known ops: {', '.join(_REGISTRY)}"
            + close_matches(str(name), _REGISTRY)
        )
    return op


def channel_change(name: str) -> int:
    """+1 for an op that adds channels, -1 for one that removes them, 0 otherwise (and for an
    op recorded by a run whose op is not registered in this process)."""
    op = _REGISTRY.get(name)
    return op.channels if op is not None else 0


def look_of(name: str) -> Look:
    """How plots draw ``name`` (grey dots for an op not registered in this process)."""
    op = _REGISTRY.get(name)
    return op.look if op is not None else Look()


# -- the built-ins ------------------------------------------------------------------------------
def _apply_grow(m, model, optimizer, batch, loss_fn, reduce_sum=None) -> MutationRecord:
    from dynarch.surgery.grow import grow

    return grow(
        model,
        m.target,
        m.k,
        init=m.init,
        data=batch,
        loss_fn=loss_fn,
        optimizer=optimizer,
        reduce_sum=reduce_sum,
        **m.init_options,
    )


def _replay_grow(model: nn.Module, entry: dict[str, Any], example: torch.Tensor) -> None:
    from dynarch.surgery.grow import grow

    grow(model, entry["target"], entry["k"], init="zeros", example_inputs=example)


def _grow_fields(entry: Mapping[str, Any]) -> dict[str, Any]:
    from dynarch.initializers import check_initializer

    fields = {
        "init": entry.get("init", "random"),
        "init_options": dict(entry.get("init_options") or {}),
    }
    check_initializer(fields["init"], fields["init_options"])
    return fields


def _apply_prune(m, model, optimizer, batch, loss_fn, reduce_sum=None) -> MutationRecord:
    from dynarch.surgery.prune import prune

    return prune(
        model,
        m.target,
        k=m.k,
        idxs=m.idxs,
        importance=m.importance,
        optimizer=optimizer,
        data=batch,
        loss_fn=loss_fn,
    )


def _replay_prune(model: nn.Module, entry: dict[str, Any], example: torch.Tensor) -> None:
    from dynarch.surgery.prune import prune

    prune(model, entry["target"], idxs=entry["indices"], example_inputs=example)


def _prune_fields(entry: Mapping[str, Any]) -> dict[str, Any]:
    from dynarch.surgery.prune import check_importance

    return {"importance": check_importance(entry.get("importance", "magnitude"))}


def _apply_deepen(m, model, optimizer, batch, loss_fn, reduce_sum=None) -> MutationRecord:
    from dynarch.surgery.deepen import deepen

    return deepen(
        model,
        m.target,
        m.kind,
        optimizer=optimizer,
        data=batch,
        loss_fn=loss_fn,
        init=m.init,
        reduce_sum=reduce_sum,
    )


def _replay_deepen(model: nn.Module, entry: dict[str, Any], example: torch.Tensor) -> None:
    from dynarch.surgery.deepen import deepen

    deepen(model, entry["target"], entry["method"], example_inputs=example, **entry["options"])


def _deepen_entry(record: MutationRecord) -> dict[str, Any]:
    """The inserted layer's kind and options, for the fresh model to get the same layer."""
    return {
        **_channels_entry(record),
        "method": record.method,
        "options": {"kernel_size": record.info["kernel_size"], "norm": record.info["norm"]},
    }


def _describe_deepen(m: Mutation, record: MutationRecord) -> str:
    return f"deepen after {m.target}: {record.method} ({record.group})"


def _deepen_fields(entry: Mapping[str, Any]) -> dict[str, Any]:
    from dynarch.surgery.deepen import check_choice

    after, kind, init = entry.get("after"), entry.get("kind", "conv"), entry.get("init", "random")
    if not isinstance(after, str) or not after:
        raise OpError(f"after must be a module name, got {after!r}")
    check_choice(str(kind), str(init))
    return {"target": after, "kind": kind, "init": init}


GROW, PRUNE, DEEPEN = (
    Op(
        "grow",
        apply=_apply_grow,
        replay=_replay_grow,
        channels=1,
        schedule_keys=frozenset({"init", "init_options"}),
        schedule_fields=_grow_fields,
        look=Look("#2ca02c", "^", "▲", "green"),
    ),
    Op(
        "prune",
        apply=_apply_prune,
        replay=_replay_prune,
        channels=-1,
        chosen_on_rank0=True,
        schedule_keys=frozenset({"importance"}),
        schedule_fields=_prune_fields,
        look=Look("#d62728", "v", "▼", "red"),
    ),
    Op(
        "deepen",
        apply=_apply_deepen,
        replay=_replay_deepen,
        replay_entry=_deepen_entry,
        describe=_describe_deepen,
        adds_layer=True,
        schedule_keys=frozenset({"after", "kind", "init"}),
        schedule_fields=_deepen_fields,
        look=Look("#9467bd", "D", "◆", "purple"),
    ),
)
for _op in (GROW, PRUNE, DEEPEN):
    register_op(_op)
