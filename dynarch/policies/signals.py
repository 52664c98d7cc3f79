"""Per-layer measurements that policies decide on: how full a layer's activations are (NORTH)
and how much gradient new units there would get (GradMax's singular values).

Each runs extra forwards (and a backward for gradients) on the step's batch, with BatchNorm
running statistics restored and every hook removed before it returns, and is cached in the
:class:`TrainState` for that step, so a where-policy and an amount asking for the same
measurement pay once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dynarch.gradmax import (
    GradMaxUnsupported,
    existing_fan_out_norm,
    gradient_matrix,
    top_singular_vectors,
)
from dynarch.groups import GroupMember
from dynarch.initializers import GrowthContext
from dynarch.layer_kinds import CONSUMER
from dynarch.policies.base import TrainState
from dynarch.probes import buffers_restored

# Rows of the activation matrix kept for its singular values (evenly spaced); enough for a
# stable effective dimension, bounded so wide early conv maps stay cheap.
MAX_ACTIVATION_ROWS = 16384


def activation_matrices(state: TrainState, targets: list[str]) -> dict[str, torch.Tensor]:
    """Per target: the activations the next layer sees from its channels, as (rows, width).

    Read at the input of the group's first consumer (after BatchNorm, ReLU, pooling), so the
    matrix is what the layer's channels actually pass on; a conv input gives one row per
    sample and position, a flattened input one row per sample and feature block.
    """
    missing = [t for t in targets if ("activations", t) not in state.cache]
    members = {t: _first_consumer(state, t) for t in missing}
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for t, member in members.items():
        if member is None:
            continue
        module = state.model.get_submodule(member.module)
        hooks.append(
            module.register_forward_pre_hook(
                lambda _m, args, t=t, member=member: captured.__setitem__(
                    t, _as_rows(args[0].detach(), member)
                )
            )
        )
    try:
        with buffers_restored(state.model), torch.no_grad():
            if hooks:
                state.model(state.batch[0])
    finally:
        for h in hooks:
            h.remove()
    for t in missing:
        state.cache[("activations", t)] = captured.get(t)
    return {t: state.cache[("activations", t)] for t in targets}


def _first_consumer(state: TrainState, target: str) -> GroupMember | None:
    group = state.graph.group_of(target)
    return next((m for m in group.members if m.role == CONSUMER), None)


def _as_rows(x: torch.Tensor, member: GroupMember) -> torch.Tensor:
    block = x.narrow(1, member.start, member.stop - member.start)
    if block.dim() == 2:  # flattened: width x multiplicity features per sample
        block = block.reshape(len(block), -1, member.multiplicity).transpose(1, 2)
    else:  # (B, C, *spatial)
        block = block.flatten(2).transpose(1, 2)
    rows = block.reshape(-1, block.shape[-1]).float()
    if len(rows) > MAX_ACTIVATION_ROWS:
        rows = rows[torch.linspace(0, len(rows) - 1, MAX_ACTIVATION_ROWS).long()]
    return rows


def effective_dimension(rows: torch.Tensor, epsilon: float = 0.01) -> int:
    """Number of singular values of ``rows / sqrt(len(rows))`` above ``epsilon`` (NORTH).

    Dividing by sqrt(rows) makes the singular values RMS activation magnitudes along the
    principal directions, so ``epsilon`` means the same for any batch size or map size.
    """
    gram = (rows.T.double() @ rows.double()) / len(rows)
    singular = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    return int((singular > epsilon).sum())


def north_fraction(state: TrainState, target: str, epsilon: float = 0.01) -> float | None:
    """Effective dimension of ``target``'s activations over its width (None: no consumer)."""
    key = ("north", target, epsilon)
    if key not in state.cache:
        rows = activation_matrices(state, [target])[target]
        state.cache[key] = (
            None if rows is None else effective_dimension(rows, epsilon) / rows.shape[1]
        )
    return state.cache[key]


@dataclass(frozen=True)
class GradientSignal:
    """What GradMax growth of one layer could achieve, relative to its existing units.

    ``singular_values`` of M (the top ones, descending): a new unit with a unit-norm fan-out
    along the i-th singular vector gets a fan-in gradient of norm sigma_i.
    ``fan_out_norm``: mean norm of the existing units' fan-out; ``existing_grad_norm``: mean
    norm of the existing units' fan-in gradient on the same batch.
    """

    singular_values: list[float]
    fan_out_norm: float
    existing_grad_norm: float

    def ratios(self) -> list[float]:
        """sigma_i x fan_out_norm / existing_grad_norm: the gradient a new unit of typical
        fan-out size would get, in units of what a typical existing unit gets now."""
        scale = self.fan_out_norm / max(self.existing_grad_norm, 1e-30)
        return [s * scale for s in self.singular_values]


def gradient_signal(state: TrainState, target: str) -> GradientSignal | None:
    """GradMax's singular values for ``target``'s group, as many as its width (growing more
    than that in one step is not a growth policy); None where GradMax cannot apply (a
    residual stream with several producers, grouped convs)."""
    key = ("gradient", target)
    if key in state.cache:
        return state.cache[key]
    group = state.graph.group_of(target)
    modules = {m.module: state.model.get_submodule(m.module) for m in group.members}
    ctx = GrowthContext(state.model, group, group.width, modules, state.batch, state.loss_fn)
    try:
        stats = gradient_matrix(ctx)
    except GradMaxUnsupported:
        state.cache[key] = None
        return None
    m = stats.matrix
    _, singular = top_singular_vectors(m, min(group.width, *m.shape))
    signal = GradientSignal(
        [float(s) for s in singular],
        existing_fan_out_norm(ctx),
        _fan_in_grad_norm(state, modules[group.producers[0]]),
    )
    state.cache[key] = signal
    return signal


def _fan_in_grad_norm(state: TrainState, producer: nn.Module) -> float:
    """Mean over the producer's channels of ||dL/dW_in[channel]|| on the step's batch; the
    model's ``.grad`` fields and BatchNorm statistics are left as they were."""
    x, y = state.batch
    with buffers_restored(state.model), torch.enable_grad():
        loss = state.loss_fn(state.model(x), y)
        (grad,) = torch.autograd.grad(loss, [producer.weight])
    return float(grad.flatten(1).norm(dim=1).mean())


def gradient_score(state: TrainState, target: str) -> float | None:
    """Top ratio of :class:`GradientSignal`: where a GradMax unit would learn fastest."""
    signal = gradient_signal(state, target)
    return None if signal is None or not signal.singular_values else signal.ratios()[0]


SCORES = {"north": north_fraction, "gradient": gradient_score}
