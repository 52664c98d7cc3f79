"""*How much* to grow a chosen layer: a fixed count, a share of its width, or a measurement.

An amount is any object with ``how_many(state, target) -> (k, reason)``; ``k = 0`` means "not
this layer, not now", so the measuring amounts (:class:`North`, :class:`GradientSVD`) also
decide when and where growth happens. Budgets and width caps are applied by ``Grow`` after.
"""

from __future__ import annotations

import math
from typing import Any

from dynarch.policies.base import PolicyError, TrainState, check_fraction, check_positive
from dynarch.policies.signals import gradient_signal, north_fraction


class Fixed:
    """``k`` channels every time."""

    def __init__(self, k: int) -> None:
        self.k = check_positive("k", k)

    def how_many(self, state: TrainState, target: str) -> tuple[int, str]:
        return self.k, ""


class FractionOfInitial:
    """⌈fraction x the layer's width at the start of the run⌉: linear growth (the paper's)."""

    def __init__(self, fraction: float) -> None:
        self.fraction = check_fraction("fraction_of_initial", fraction)

    def how_many(self, state: TrainState, target: str) -> tuple[int, str]:
        width = state.initial_widths.get(target, state.width(target))
        return math.ceil(self.fraction * width), ""


class FractionOfCurrent:
    """⌈fraction x the layer's current width⌉: geometric growth."""

    def __init__(self, fraction: float) -> None:
        self.fraction = check_fraction("fraction_of_current", fraction)

    def how_many(self, state: TrainState, target: str) -> tuple[int, str]:
        return math.ceil(self.fraction * state.width(target)), ""


class North:
    """NORTH-style growth (Maile et al., AutoML-Conf 2022): grow a layer whose activations
    use most of its width.

    phi = effective dimension of the layer's activations (singular values above ``epsilon``,
    see :func:`signals.effective_dimension`) over its width; phi_ref = the running maximum of
    phi for that layer. Grows max(0, ⌊width x (phi - gamma x phi_ref)⌋) units. New units start
    near zero, so phi drops after a growth and the layer grows again only once they carry
    independent signal.
    """

    def __init__(self, epsilon: float = 0.01, gamma: float = 0.9) -> None:
        self.epsilon = check_fraction("epsilon", epsilon)
        self.gamma = check_fraction("gamma", gamma)
        self.reference: dict[str, float] = {}

    def how_many(self, state: TrainState, target: str) -> tuple[int, str]:
        phi = north_fraction(state, target, self.epsilon)
        if phi is None:
            return 0, ""
        ref = self.reference[target] = max(self.reference.get(target, 0.0), phi)
        width = state.width(target)
        k = max(0, math.floor(width * (phi - self.gamma * ref)))
        return k, f"north: phi {phi:.3f}, ref {ref:.3f}"

    def state_dict(self) -> dict[str, Any]:
        return {"reference": dict(self.reference)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = {t: float(v) for t, v in state["reference"].items()}


class GradientSVD:
    """Grow by the number of GradMax directions worth a unit: singular values of M whose new
    unit (at the existing units' mean fan-out norm) would get more than ``fraction`` x the
    existing units' mean fan-in gradient norm (see :class:`signals.GradientSignal`).

    At most ``max_k`` per firing (default: the layer's width); layers where GradMax cannot
    apply (residual streams) are left alone.
    """

    def __init__(self, fraction: float = 1.0, max_k: int | None = None) -> None:
        self.fraction = check_fraction("fraction", fraction)
        self.max_k = check_positive("max_k", max_k, allow_none=True)

    def how_many(self, state: TrainState, target: str) -> tuple[int, str]:
        signal = gradient_signal(state, target)
        if signal is None:
            return 0, ""
        ratios = signal.ratios()
        k = sum(r > self.fraction for r in ratios)
        if self.max_k is not None:
            k = min(k, self.max_k)
        top = ratios[0] if ratios else 0.0
        return k, f"gradient: {k} directions above {self.fraction:g} (top {top:.3g})"


def amount_from(
    k: int | None,
    fraction_of_initial: float | None,
    fraction_of_current: float | None,
    amount: Any,
) -> Any:
    """The one amount a Grow was given, as an object with ``how_many``."""
    given = {
        "k": k,
        "fraction_of_initial": fraction_of_initial,
        "fraction_of_current": fraction_of_current,
        "amount": amount,
    }
    named = [name for name, value in given.items() if value is not None]
    if len(named) != 1:
        raise PolicyError(
            "Grow needs exactly one of k, fraction_of_initial, fraction_of_current or amount"
            + (f" (got {', '.join(named)})" if named else "")
        )
    if k is not None:
        return Fixed(k)
    if fraction_of_initial is not None:
        return FractionOfInitial(fraction_of_initial)
    if fraction_of_current is not None:
        return FractionOfCurrent(fraction_of_current)
    if not callable(getattr(amount, "how_many", None)):
        raise PolicyError(f"amount {amount!r} has no how_many(state, target) method")
    return amount
