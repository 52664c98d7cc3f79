"""timm's model zoo by name: ``model.name=timm:<name>`` (``dynarch run model=timm``).

timm builds any of its classifiers for a number of classes and input channels itself
(``num_classes``, ``in_chans``), so nothing here adapts a head or a first conv, unlike the
torchvision adapter in :mod:`dynarch.models`. Random weights by default: ``pretrained=True``
in ``model.kwargs`` downloads timm's published weights where a network is reachable.
"""

from __future__ import annotations

import difflib

from torch import nn

TIMM_PREFIX = "timm:"
INSTALL = "pip install 'dynarch[timm]'"


def build_timm(name: str, num_classes: int, in_channels: int, **kwargs: object) -> nn.Module:
    """timm's ``name`` for ``num_classes`` classes and ``in_channels`` channels; ``kwargs`` go
    to ``timm.create_model`` (e.g. ``drop_rate``, ``pretrained``). An unknown name is one line
    with timm's closest names."""
    try:
        import timm
    except ImportError:
        raise ValueError(f"model timm:{name} needs timm, an optional extra: {INSTALL}") from None
    names = timm.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = (
            f"did you mean: {', '.join(TIMM_PREFIX + n for n in close)}?"
            if close
            else ("timm.list_models() lists them")
        )
        raise ValueError(f"unknown timm model {name!r}; {hint}")
    kwargs.setdefault("pretrained", False)
    return timm.create_model(name, num_classes=num_classes, in_chans=in_channels, **kwargs)
