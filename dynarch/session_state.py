"""A session's state: what :meth:`dynarch.Session.state_dict` holds, and how a fresh session
continues from it.

The optimizer's parameters are kept by name (``param_names``): after the mutations are replayed
on a freshly built model its parameters are new objects, so the loop's optimizer is pointed at
them by name, group by group, before its saved state is loaded. A state is tried on a copy of
the model first, so one that does not fit changes nothing.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

import dynarch.checkpoint as checkpoint
from dynarch.errors import DynarchError
from dynarch.graph import ArchGraph
from dynarch.models import count_params
from dynarch.policies.base import count_macs

Session = Any  # a dynarch.session.Session (not imported: session imports this module)

FORMAT = 1
KEYS = (
    "session_format",
    "step",
    "model",
    "optimizer",
    "param_names",
    "policy",
    "mutations",
    "events",
    "metrics",
    "train_losses",
    "example",
    "initial_widths",
    "initial_sizes",
    "rng",
    "history",
)


class SessionError(DynarchError):
    """A session used in a way that cannot work; the message says which."""


def check_owned(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Surgery carries the optimizer's state for the model's parameters: every trainable one
    must be in the optimizer (one line naming the first that is not)."""
    if not isinstance(model, nn.Module):
        raise SessionError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise SessionError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise SessionError(
            f"the optimizer does not hold the model's parameter {missing[0]!r} "
            f"({len(missing)} in all): build it on model.parameters()"
        )


def collect(session: Session, weights: bool = True) -> dict[str, Any]:
    """The state of ``session`` (see :data:`KEYS`), tensors and plain values only; without
    ``weights`` the model and optimizer are left out (Lightning saves them itself)."""
    names = {id(p): n for n, p in session.model.named_parameters()}
    policy = session.policy
    return {
        "session_format": FORMAT,
        "step": session.step,
        "model": session.model.state_dict() if weights else None,
        "optimizer": session.optimizer.state_dict() if weights else None,
        "param_names": [
            [names[id(p)] for p in g["params"]] for g in session.optimizer.param_groups
        ],
        "policy": policy.state_dict() if hasattr(policy, "state_dict") else None,
        "mutations": list(session.mutations),
        "events": list(session.events),
        "metrics": list(session.metrics),
        "train_losses": list(session.train_losses),
        "example": session.example.cpu() if session.example is not None else None,
        "initial_widths": dict(session.initial_widths),
        "initial_sizes": dict(session.initial_sizes),
        "rng": checkpoint.rng_states(),
        "history": session.history.marks(),
    }


def restore(session: Session, state: dict[str, Any]) -> None:
    """Give ``session``'s fresh model the state's shapes and values, its optimizer the state's
    parameters and moments, and the session its step, lists and random generators."""
    _check_keys(state)
    if state["model"] is None or state["optimizer"] is None:
        raise SessionError("this state holds no weights (state_dict(weights=False))")
    model, optimizer = session.model, session.optimizer
    example = _example(state, model)
    _fit(copy.deepcopy(model), optimizer, state, example)  # one line if not; nothing changed
    _load(model, optimizer, state, example)
    continue_from(session, state)


def continue_from(session: Session, state: dict[str, Any]) -> None:
    """The session's own part of ``state`` (its model and optimizer hold the rest already):
    the step, the lists, the policy's state, the random generators."""
    _check_keys(state)
    model, example = session.model, _example(state, session.model)
    if state["policy"] is not None and hasattr(session.policy, "load_state_dict"):
        session.policy.load_state_dict(state["policy"])
    session.step = int(state["step"])
    session.mutations, session.events = list(state["mutations"]), list(state["events"])
    session.metrics, session.train_losses = list(state["metrics"]), list(state["train_losses"])
    session.initial_widths = dict(state["initial_widths"])
    session.initial_sizes = dict(state["initial_sizes"])
    if example is not None:
        session.example = example
        session.graph = ArchGraph.from_module(model, example)
        session.params, session.macs = count_params(model), count_macs(model)
    session.net = session._wrapped()
    checkpoint.set_rng_states(state["rng"])


def _check_keys(state: Any) -> None:
    if not isinstance(state, dict):
        raise SessionError(f"load_state_dict expects a session's state_dict, got {type(state)}")
    missing = [key for key in KEYS if key not in state]
    if missing:
        raise SessionError(f"not a session's state_dict (no {missing[0]!r})")
    if state["session_format"] != FORMAT:
        raise SessionError(
            f"a session state of format {state['session_format']!r}; this dynarch reads {FORMAT}"
        )


def _example(state: dict[str, Any], model: nn.Module) -> torch.Tensor | None:
    example = state["example"]
    if example is None:
        return None
    return example.to(device_of(model))


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _replayed(
    model: nn.Module, state: dict[str, Any], example: torch.Tensor | None
) -> dict[str, nn.Parameter]:
    """``model`` with the state's mutations replayed and its weights loaded; its parameters
    by name (what the optimizer's groups are rebuilt from)."""
    checkpoint.replay(model, state["mutations"], example)
    model.load_state_dict(state["model"])
    return dict(model.named_parameters())


def _fit(
    trial: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    example: torch.Tensor | None,
) -> None:
    """Try the state on ``trial`` (a copy of the model): the replay, the weights, the
    optimizer's parameter names, counts and state shapes; one line if any does not fit."""
    try:
        named = _replayed(trial, state, example)
        groups, saved = state["param_names"], state["optimizer"]["param_groups"]
        if len(groups) != len(optimizer.param_groups) or len(groups) != len(saved):
            raise SessionError(
                f"the state has {len(groups)} param groups, the optimizer "
                f"{len(optimizer.param_groups)}"
            )
        params = [named[name] for names in groups for name in names]
        for index, value in state["optimizer"]["state"].items():
            for key, tensor in value.items():
                if torch.is_tensor(tensor) and tensor.dim() and tensor.shape != params[index].shape:
                    raise SessionError(f"optimizer state {key!r} of parameter {index} misfits")
    except (DynarchError, RuntimeError, KeyError, IndexError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
        raise SessionError(f"the state does not fit this model and optimizer: {detail}") from None


def _load(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    example: torch.Tensor | None,
) -> None:
    """Replay, load the weights, point the optimizer's groups at the parameters by name and
    load its state (all checked by :func:`_fit`)."""
    named = _replayed(model, state, example)
    for group, names in zip(optimizer.param_groups, state["param_names"], strict=True):
        group["params"] = [named[name] for name in names]
    optimizer.state.clear()
    optimizer.load_state_dict(state["optimizer"])
