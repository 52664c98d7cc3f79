"""The last line of defence of a mutation: whatever fails inside it, the model is as it was and
the caller gets one line naming the target, never a traceback from deep in the surgery."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from dynarch.errors import DynarchError, MutationFailedError, first_line
from dynarch.surgery.edits import all_or_nothing

F = TypeVar("F", bound=Callable[..., Any])


def one_line_failures(action: str) -> Callable[[F], F]:
    """Run a mutation (``fn(model, target, ..., optimizer=...)``) all-or-nothing over the whole
    model, turning an unexpected exception into :class:`MutationFailedError`.

    The surgery checks what it can before changing anything; this catches what it could not
    foresee (a graph Torch-Pruning got wrong, a forward that asserts its own width).
    """

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                arguments = signature.bind(*args, **kwargs).arguments
            except TypeError:
                return fn(*args, **kwargs)  # a wrong call: Python's own message
            model = arguments.get("model")
            modules = list(model.modules()) if isinstance(model, nn.Module) else []
            try:
                with all_or_nothing(modules, arguments.get("optimizer")):
                    return fn(*args, **kwargs)
            except DynarchError:
                raise
            except Exception as exc:
                what = f"{type(exc).__name__}: {first_line(exc)}"
                raise MutationFailedError(
                    f"{action} {arguments.get('target')!r} failed ({what}); nothing was changed"
                ) from exc

        return run  # type: ignore[return-value]

    return decorate
