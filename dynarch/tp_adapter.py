"""Torch-Pruning, imported once for all of dynarch: the one place that knows how.

Torch-Pruning's FLOP counter imports timm when timm is installed (``op_counter``: 2.4–3.7 s,
more than torch itself, on every ``dynarch`` start, for two hooks that count timm's ViT and
Swin attention blocks). It is imported here with timm hidden, unless timm is imported
already; :func:`count_ops_and_params` adds those two hooks once timm is there (a timm model
has been built by then), so the counts are the same as with Torch-Pruning's own import.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

if "torch_pruning" not in sys.modules and "timm" not in sys.modules:
    sys.modules["timm"] = None  # type: ignore[assignment]  # an import of it fails: no timm
    try:
        import torch_pruning as tp
    finally:
        del sys.modules["timm"]
else:
    import torch_pruning as tp
from torch_pruning.dependency import index_mapping
from torch_pruning.utils import op_counter

__all__ = ["count_ops_and_params", "index_mapping", "tp"]


def count_ops_and_params(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """Torch-Pruning's MAC and parameter counts, timm's attention hooks in place if timm is
    imported (as Torch-Pruning's own import would have put them)."""
    timm = sys.modules.get("timm")
    if timm is not None and not op_counter.has_timm:
        from timm.models import swin_transformer, vision_transformer

        op_counter.MODULES_MAPPING[vision_transformer.Attention] = (
            op_counter.timm_multihead_attention_counter_hook
        )
        op_counter.MODULES_MAPPING[swin_transformer.WindowAttention] = (
            op_counter.timm_multihead_attention_counter_hook
        )
        op_counter.has_timm = True
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)
