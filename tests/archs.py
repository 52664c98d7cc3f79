"""Test architectures the engine must handle, built with non-trivial BatchNorm statistics."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from dynarch.models import resnet_small, vgg_small


class ConvFlattenLinear(nn.Module):
    """conv -> relu -> flatten -> linear -> relu -> linear, with no BatchNorm at all."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(5 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class ShuffleNetLike(nn.Module):
    """A channel shuffle between two convs: coupled channels are permuted."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.shuffle = nn.ChannelShuffle(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(self.shuffle(self.conv1(x))))).mean((2, 3))


class SelfConcat(nn.Module):
    """A tensor concatenated with a function of itself, then flatten -> linear: Torch-Pruning
    leaves this cat without offsets (its width check stops at the linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.d = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(24 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.c(x)))
        x = torch.cat([x, torch.relu(self.d(x))], 1)
        return self.fc(torch.flatten(x, 1))


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm affine params and running stats: eval outputs depend on them."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.2)
    return model


# name -> (builder, input shape); all small enough to run on a CPU in seconds.
ARCHS = {
    "vgg_small": (
        lambda: vgg_small(num_classes=10, in_channels=3, width=8, image_size=16),
        (2, 3, 16, 16),
    ),
    "resnet_small": (lambda: resnet_small(num_classes=10, in_channels=3, width=8), (2, 3, 16, 16)),
    "conv_flatten_linear": (ConvFlattenLinear, (2, 3, 8, 8)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), (2, 3, 32, 32)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 32, 32)),
    # at width 0.25 the first inverted-residual block adds its input to its own projection,
    # so one conv both produces and consumes the same channel group
    "mobilenet_v2_narrow": (
        lambda: torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25),
        (2, 3, 32, 32),
    ),
    "densenet121": (lambda: torchvision.models.densenet121(num_classes=10), (2, 3, 32, 32)),
    "self_concat": (SelfConcat, (2, 3, 8, 8)),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A model in eval mode with randomised norms, and a fixed input batch for it."""
    torch.manual_seed(seed)
    builder, shape = ARCHS[name]
    model = randomize_norms(builder(), seed).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
    # Outputs of order 1, so an absolute tolerance of 1e-5 means the same everywhere (a deep
    # random resnet50 otherwise outputs ~40, where float32 rounding alone is ~1e-5).
    with torch.no_grad():
        scale = max(1.0, float(model(x).abs().max()))
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        last.weight /= scale
        last.bias /= scale
    return model, x
