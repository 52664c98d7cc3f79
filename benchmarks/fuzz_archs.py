"""The fuzz harness's round-three architectures (issue 22): the shapes that broke the engine
before or that no earlier round tried. Each builder gives a model in eval mode with non-trivial
BatchNorm statistics and a fixed input batch, by ``archs.build``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from archs import ARCHS  # noqa: E402


def _conv_bn(cin: int, cout: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class _Head(nn.Module):
    """Global average pool -> linear to 10 classes."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


class DepthwiseSE(nn.Module):
    """MobileNet/EfficientNet's block: depthwise 3x3, a squeeze-excitation gate, pointwise 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 16)
        self.dw = _conv_bn(16, 16, groups=16)
        self.squeeze, self.excite = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.pw = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.head = _Head(24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(self.stem(x))
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        return self.head(self.pw(x * gate))


class IdentityDropout(nn.Module):
    """Identity and Dropout modules between the layers (no-ops in eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.skip = nn.Conv2d(3, 8, 3, padding=1), nn.Identity()
        self.bn1, self.drop1 = nn.BatchNorm2d(8), nn.Dropout(0.2)
        self.conv2, self.drop2 = nn.Conv2d(8, 12, 3, padding=1), nn.Dropout2d(0.1)
        self.head = _Head(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(torch.relu(self.bn1(self.skip(self.conv1(x)))))
        return self.head(self.drop2(torch.relu(self.conv2(x))))


class TwoStems(nn.Module):
    """Two stems on the same input merged by an add: their outputs are one channel group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem_a, self.stem_b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 5, padding=2)
        self.bn = nn.BatchNorm2d(8)
        self.body = _conv_bn(8, 12)
        self.head = _Head(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(torch.relu(self.bn(self.stem_a(x) + self.stem_b(x)))))


class ConvTwice(nn.Module):
    """One conv module called twice (weight sharing): its input and output are one group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = _Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        return self.head(torch.relu(self.shared(torch.relu(self.shared(x)))))


class TrainingBranch(nn.Module):
    """GoogLeNet's auxiliary head in small: a branch that runs only in training mode. No
    BatchNorm or dropout, so train-mode outputs are deterministic and compared as well."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 12, 3, padding=1)
        self.aux = _Head(8)
        self.head = _Head(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        out = self.head(torch.relu(self.conv2(x)))
        aux = self.aux(x) if self.training else None
        return out if aux is None else out + 0.3 * aux


class ConcatResidual(nn.Module):
    """A residual add onto a concat: ``z = cat([a(x), b(x)]); z = z + c(relu(z))``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 10, 3, padding=1)
        self.head = _Head(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.head(z + self.c(torch.relu(z)))


# Checked in training mode too: outputs there depend on the branch that eval mode skips.
TRAIN_MODE_CHECKED = {"training_branch"}

SMALL = {
    "depthwise_se": DepthwiseSE,
    "identity_dropout": IdentityDropout,
    "two_stems": TwoStems,
    "conv_twice": ConvTwice,
    "training_branch": TrainingBranch,
    "concat_residual": ConcatResidual,
}
TORCHVISION = {
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),
    "regnet_y_400mf": lambda: torchvision.models.regnet_y_400mf(num_classes=10),
    "googlenet": lambda: torchvision.models.googlenet(
        num_classes=10, aux_logits=False, init_weights=False
    ),
}


def register() -> list[str]:
    """Adds the round-three architectures to the test architectures' table (``archs.ARCHS``,
    built by ``archs.build``: eval mode, randomised norms, outputs of order 1) and names them:
    16x16 inputs for the small ones, 32x32 for torchvision's."""
    for name, make in SMALL.items():
        ARCHS[name] = (make, (2, 3, 16, 16))
    for name, make in TORCHVISION.items():
        ARCHS[name] = (make, (2, 3, 32, 32))
    return [*SMALL, *TORCHVISION]
