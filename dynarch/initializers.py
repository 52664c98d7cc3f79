"""The initializers by name: one table, options checked when an initializer is chosen.

Built-ins: ``random``, ``zeros`` (:mod:`dynarch.basic_inits`), ``gradmax``, ``gradmax_opt``
(:mod:`dynarch.gradmax`), ``gradmax_fanin``, ``gradmax_fanin_opt`` (:mod:`dynarch.fanin`),
``tiny`` (:mod:`dynarch.tiny`), ``net2net``, ``firefly`` (:mod:`dynarch.growth_baselines`).
Register your own with ``@register_initializer("name", options=MyOptions)`` or pass
``init="pkg.module:function"`` (its options class is the function's ``options_type``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from dynarch.basic_inits import random_init, zeros_init
from dynarch.errors import DynarchError, close_matches, some_of
from dynarch.fanin import gradmax_fanin_init, gradmax_fanin_opt_init
from dynarch.gradmax import fan_in_gradient_norm, gradmax_init, gradmax_opt_init
from dynarch.growth_baselines import firefly_init, net2net_init
from dynarch.growth_context import (
    GrowthContext,
    GrowthOptions,
    Initializer,
    NewChannels,
    options_type,
    parse_options,
    takes_options,
)
from dynarch.tiny import tiny_init

__all__ = [
    "GrowthContext",
    "GrowthOptions",
    "NewChannels",
    "available_initializers",
    "check_grouped",
    "check_initializer",
    "get_initializer",
    "new_channels",
    "register_initializer",
]

_REGISTRY: dict[str, Initializer] = {
    "random": random_init,
    "zeros": zeros_init,
    "gradmax": gradmax_init,
    "gradmax_opt": gradmax_opt_init,
    "gradmax_fanin": gradmax_fanin_init,
    "gradmax_fanin_opt": gradmax_fanin_opt_init,
    "tiny": tiny_init,
    "net2net": net2net_init,
    "firefly": firefly_init,
}


# Initializers whose new channels copy existing ones, which a grouped conv's block structure
# does not allow; the gradient-chosen ones fall back to random or zeros there instead
# (``gradmax.fallback_when_unsupported``, recorded in ``info["fallback"]``).
_NOT_GROUPED = {"net2net"}


def check_grouped(init: str | Initializer, grouped: list[str]) -> None:
    """Refuse an initializer that cannot grow a group holding grouped convs (``grouped``,
    their names) before anything changes; a function of the user's is given the grouped
    shapes (a grouped consumer's new columns: ``k / groups`` per output)."""
    name = init_name(init)
    if not grouped or callable(init) or name not in _NOT_GROUPED:
        return
    raise DynarchError(
        f"init {name!r} cannot grow a group with grouped convolutions ({some_of(grouped)}): it "
        "copies existing channels, each of which belongs to one conv group; use random, zeros "
        "or a gradient init"
    )


def register_initializer(
    name: str, options: type[GrowthOptions] | None = None
) -> Callable[[Initializer], Initializer]:
    """Decorator: make an initializer available as ``grow(..., init=name)``; ``options`` is the
    frozen dataclass of the options it reads from ``ctx.options`` (default: the shared ones)."""

    def decorate(fn: Initializer) -> Initializer:
        _REGISTRY[name] = takes_options(options)(fn) if options is not None else fn
        return fn

    return decorate


def available_initializers() -> list[str]:
    return sorted(_REGISTRY)


def get_initializer(init: str | Initializer) -> Initializer:
    """Resolve a registered name, an import path ``pkg.mod:fn`` / ``pkg.mod.fn``, or a callable."""
    if callable(init):
        return init
    if not isinstance(init, str):
        raise DynarchError(f"init must be a name or a function, got {init!r}")
    if init in _REGISTRY:
        return _REGISTRY[init]
    if "." in init or ":" in init:
        mod_name, _, attr = init.replace(":", ".").rpartition(".")
        try:
            fn = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise DynarchError(f"cannot import initializer {init!r}: {exc}") from None
        if callable(fn):
            return fn
    raise DynarchError(
        f"unknown initializer {init!r}; known: {', '.join(available_initializers())}"
        + close_matches(init, _REGISTRY)
    )


def init_name(init: str | Initializer) -> str:
    return init if isinstance(init, str) else getattr(init, "__name__", "custom")


def check_initializer(
    init: str | Initializer, options: Mapping[str, Any] | GrowthOptions | None = None
) -> tuple[Initializer, GrowthOptions]:
    """The initializer and its parsed options; one line for an unknown name or option (what
    policies call when they are built, so a typo fails before training starts)."""
    fn = get_initializer(init)
    return fn, parse_options(options_type(fn), options, init_name(init))


def new_channels(ctx: GrowthContext, init: Initializer) -> NewChannels:
    """Run ``init`` and, with data, record the new fan-in's gradient norm (``fan_in_grad_norm``,
    the GradMax objective) when the initializer did not: a zero fan-out passes no gradient
    back, so that is 0 without a statistics pass."""
    new = init(ctx)
    if ctx.data is not None and ctx.loss_fn is not None and "fan_in_grad_norm" not in new.info:
        zero = new.zero_fan_out()
        new.info["fan_in_grad_norm"] = 0.0 if zero else fan_in_gradient_norm(ctx, new)
    return new
