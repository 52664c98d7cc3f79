"""Numbers given as scalars of any kind: Python, NumPy, or a 0-d tensor.

Counts and fractions reach dynarch from NumPy loops, configs and tensors (``argmax``); one
rule for all of them: the value counts, its type does not, and a bool is never a number.
"""

from __future__ import annotations

import numbers
import operator
from typing import Any

import torch


def as_integer(value: Any) -> int | None:
    """``value`` as an ``int`` when it is an integer of any kind, else None.

    ``np.int64(4)`` and ``torch.tensor(4)`` are the same count as ``4``; a bool, a float (even
    ``4.0``) or a tensor of several elements is a mistake to point out, not a value to round.
    """
    if isinstance(value, bool):
        return None
    if torch.is_tensor(value) and (value.dim() != 0 or value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)  # the integer protocol (PEP 357); NumPy bools refuse it
    except TypeError:
        return None


def as_positive(value: Any) -> int | None:
    """``value`` as an ``int`` when it is an integer > 0 of any kind (:func:`as_integer`)."""
    n = as_integer(value)
    return n if n is not None and n > 0 else None


def as_number(value: Any) -> float | None:
    """``value`` as a ``float`` when it is a real number of any kind (an integer, a float, a
    NumPy scalar, a 0-d tensor), else None (a bool, a string, a tensor of several elements)."""
    if isinstance(value, bool) or (torch.is_tensor(value) and value.dtype == torch.bool):
        return None
    if torch.is_tensor(value):
        return float(value) if value.dim() == 0 and not value.is_complex() else None
    return float(value) if isinstance(value, numbers.Real) else None
