"""dynarch imports Torch-Pruning without timm (3 s of every start) and counts MACs as
Torch-Pruning's own import would: timm's attention hooks are added once timm is there."""

from __future__ import annotations

import subprocess
import sys

import torch
from test_cli import child_pythonpath

from dynarch.tp_adapter import count_ops_and_params

# a small ViT: without timm's attention hooks its MACs are 91 015 306 instead of 92 544 046
VIT = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "num_classes": 10})
COUNT = (
    "import torch, timm; import torch_pruning as tp; torch.manual_seed(0); "
    f"m = timm.create_model({VIT[0]!r}, **{VIT[1]!r}); "
    "print(int(tp.utils.count_ops_and_params(m, torch.randn(1, 3, 32, 32))[0]))"
)


def _python(code: str) -> str:
    env = {"PYTHONPATH": child_pythonpath(), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_starting_dynarch_imports_no_timm() -> None:
    code = "import sys, dynarch.controller, dynarch.surgery.prune; print('timm' in sys.modules)"
    assert _python(code) == "False"


def test_macs_of_a_timm_vit_are_torch_prunings_own_count() -> None:
    import timm

    torch.manual_seed(0)
    vit = timm.create_model(VIT[0], **VIT[1])
    macs, params = count_ops_and_params(vit, torch.randn(1, 3, 32, 32))
    assert params == sum(p.numel() for p in vit.parameters())
    assert macs == int(_python(COUNT))  # timm imported first: Torch-Pruning's own hooks
