"""*Where* to act: choosers that name the layers a firing policy changes.

A chooser is any object with ``choose(state) -> list[target]``. By default the pool is every
growable layer, one per channel group (see :meth:`TrainState.targets`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dynarch.errors import close_matches
from dynarch.policies.base import PolicyError, TrainState, check_positive
from dynarch.policies.select import resolve
from dynarch.policies.signals import SCORES


class AllTargets:
    """Every growable layer (or the given ones), except ``exclude``: the paper's all-at-once.
    ``targets`` and ``exclude`` take module names or selectors (``conv[:2]``, ``linear[-1]``:
    select.py), resolved against the model as the run starts."""

    def __init__(self, targets: list[str] | None = None, exclude: list[str] | None = None) -> None:
        self.targets, self.exclude = targets, list(exclude or [])
        self.resolved: dict[str, list[str]] | None = None  # targets / exclude as names

    def check(self, state: TrainState) -> None:
        self._resolve(state)

    def choose(self, state: TrainState) -> list[str]:
        resolved = self._resolve(state)
        pool = resolved["targets"] if self.targets is not None else state.targets()
        return [t for t in pool if t not in resolved["exclude"]]

    def _resolve(self, state: TrainState) -> dict[str, list[str]]:
        if self.resolved is None:
            self.resolved = {
                "targets": resolve(self.targets or [], state),
                "exclude": resolve(self.exclude, state),
            }
        return self.resolved

    def state_dict(self) -> dict[str, Any]:
        return {"resolved": self.resolved}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resolved = state.get("resolved")


class RoundRobin(AllTargets):
    """One target per firing, cycling through the list: the paper's round-robin."""

    def __init__(self, targets: list[str] | None = None, exclude: list[str] | None = None) -> None:
        super().__init__(targets, exclude)
        self.position = 0

    def choose(self, state: TrainState) -> list[str]:
        pool = super().choose(state)
        if not pool:
            return []
        target = pool[self.position % len(pool)]
        self.position += 1
        return [target]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.position = int(state["position"])


class TopScored(AllTargets):
    """The ``n`` targets with the highest ``score`` now (lowest with ``largest=False``).

    ``score`` names a built-in measurement (``gradient``: the gradient a GradMax unit would
    get relative to the layer's existing units; ``north``: the effective dimension of the
    layer's activations over its width) or is a callable ``(state, target) -> float | None``.
    Targets a score cannot measure (None) are left out. Ties keep module order.
    """

    def __init__(
        self,
        score: str | Callable[[TrainState, str], float | None] = "gradient",
        n: int = 1,
        largest: bool = True,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
    ) -> None:
        super().__init__(targets, exclude)
        n = check_positive("n", n)
        self.score_name = score if isinstance(score, str) else getattr(score, "__name__", "score")
        if isinstance(score, str):
            if score not in SCORES:
                raise PolicyError(
                    f"unknown score {score!r}; known: {', '.join(SCORES)}"
                    + close_matches(score, SCORES)
                )
            score = SCORES[score]
        if not callable(score):
            raise PolicyError(f"score must be a name or a callable, got {score!r}")
        self.score, self.n, self.largest = score, n, largest
        self.last_scores: dict[str, float] = {}

    def choose(self, state: TrainState) -> list[str]:
        scored = {t: self.score(state, t) for t in super().choose(state)}
        self.last_scores = {t: float(v) for t, v in scored.items() if v is not None}
        sign = -1.0 if self.largest else 1.0
        ranked = sorted(self.last_scores, key=lambda t: sign * self.last_scores[t])
        return ranked[: self.n]

    def describe(self, target: str) -> str:
        """Why ``target`` was chosen, for the mutation's reason."""
        return f"top {self.score_name} {self.last_scores[target]:.4g}"
