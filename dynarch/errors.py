"""User-facing errors: one clear line each, raised before anything is changed."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


class DynarchError(ValueError):
    """A request dynarch refuses; the message is one line naming the problem."""


class ConfigError(DynarchError):
    """A run configuration that cannot work; the message names the key and the value."""


class UnknownTargetError(DynarchError):
    """The named module does not exist or cannot change its output channels."""


class UnsupportedOpError(DynarchError):
    """A channel group passes through an op whose channel layout dynarch cannot keep consistent."""


class InvalidMutationError(DynarchError):
    """A grow/prune request with impossible arguments (k <= 0, pruning a group to zero, ...)."""


class MutationFailedError(DynarchError):
    """A grow/prune failed where no check foresaw it; the model was restored as it was."""


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """A ' (did you mean: a, b?)' suffix for error messages, or '' when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(repr(m) for m in matches)}?)" if matches else ""


def some_of(names: Sequence[str], shown: int = 3) -> str:
    """``names`` for a one-line message: the first ``shown``, then how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message (its type's name if it has none): what a
    user-facing error shows of an exception from below (torch, zipfile, SQLite)."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__
