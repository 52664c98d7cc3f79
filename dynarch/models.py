"""Small CNNs built from plain ``torch.nn`` modules, so torch-pruning can trace them.

Layers carry readable, stable names (``features.conv1``, ``layer2.0.conv1``, ...) because grow and
prune requests, logs and checkpoints refer to modules by name.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dynarch.errors import DynarchError, first_line
from dynarch.timm_models import TIMM_PREFIX, build_timm

BUILTIN_MODELS = ("vgg_small", "resnet_small", "wrn")
TORCHVISION_PREFIX = "torchvision:"


class ModelInputError(DynarchError):
    """The model cannot take the data's images (too small for its pooling, wrong shape)."""


class TargetError(DynarchError):
    """A ``model._target_`` refused before anything is called or imported from it."""


def vgg_small(
    num_classes: int = 10,
    in_channels: int = 1,
    width: int = 16,
    image_size: int = 8,
    norm: bool = True,
) -> nn.Sequential:
    """VGG-style net whose conv->flatten->linear head exercises spatial multiplicity > 1.

    Plan ``[w, w, M, 2w, 2w, M]`` of Conv3x3-BN-ReLU blocks; a max-pool is skipped when it would
    shrink the feature map below 1x1, so tiny inputs still work. ``norm=False`` leaves out
    BatchNorm (then the convs have biases): a net whose every batch statistic is a plain sum,
    e.g. to compare multi-process with single-process training exactly.
    """
    _check_positive(
        num_classes=num_classes, in_channels=in_channels, width=width, image_size=image_size
    )
    plan: list[int | str] = [width, width, "M", 2 * width, 2 * width, "M"]
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels, size, conv_index, pool_index = in_channels, image_size, 0, 0
    for item in plan:
        if item == "M":
            if size // 2 < 1:
                continue
            pool_index += 1
            layers[f"pool{pool_index}"] = nn.MaxPool2d(2)
            size //= 2
            continue
        assert isinstance(item, int)
        conv_index += 1
        layers[f"conv{conv_index}"] = nn.Conv2d(channels, item, 3, padding=1, bias=not norm)
        if norm:
            layers[f"bn{conv_index}"] = nn.BatchNorm2d(item)
        layers[f"relu{conv_index}"] = nn.ReLU()
        channels = item
    classifier = nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            fc1=nn.Linear(channels * size * size, 4 * width),
            relu=nn.ReLU(),
            fc2=nn.Linear(4 * width, num_classes),
        )
    )
    return nn.Sequential(OrderedDict(features=nn.Sequential(layers), classifier=classifier))


class BasicBlock(nn.Module):
    """ResNet basic block; the residual add ties conv2's and the shortcut's output channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                    bn=nn.BatchNorm2d(out_channels),
                )
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResidualBlock(nn.Module):
    """x + f(x), f = conv-BN-ReLU-conv(-BN) at the input's width and resolution: what depth
    growth inserts. ``zero_last`` makes f(x) = 0 in train and eval mode: the last BatchNorm's
    gamma and beta are zero, or without one (``last_norm=False``) the last conv's weights.
    ``inner`` is the width between the convs (default ``channels``)."""

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        zero_last: bool = False,
        inner: int | None = None,
        last_norm: bool = True,
    ) -> None:
        super().__init__()
        padding, inner = kernel_size // 2, inner or channels
        self.conv1 = nn.Conv2d(channels, inner, kernel_size, padding=padding, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(inner, channels, kernel_size, padding=padding, bias=False)
        self.bn2 = nn.BatchNorm2d(channels) if last_norm else None
        if zero_last and self.bn2 is not None:
            nn.init.zeros_(self.bn2.weight)
            nn.init.zeros_(self.bn2.bias)
        elif zero_last:
            nn.init.zeros_(self.conv2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu(self.bn1(self.conv1(x))))
        return x + (self.bn2(out) if self.bn2 is not None else out)


class ResNetSmall(nn.Module):
    """CIFAR-style ResNet: stem, three stages (w, 2w, 4w; strides 1, 2, 2), global pool, linear."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 16,
        blocks: Sequence[int] = (1, 1, 1),
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(width),
                relu=nn.ReLU(),
            )
        )
        channels = width
        for stage, (count, stride) in enumerate(zip(blocks, (1, 2, 2), strict=True), start=1):
            out_channels = width * 2 ** (stage - 1)
            stage_blocks = []
            for index in range(count):
                stage_blocks.append(
                    BasicBlock(channels, out_channels, stride=stride if index == 0 else 1)
                )
                channels = out_channels
            self.add_module(f"layer{stage}", nn.Sequential(*stage_blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def resnet_small(
    num_classes: int = 10,
    in_channels: int = 1,
    width: int = 16,
    blocks: Sequence[int] = (1, 1, 1),
) -> ResNetSmall:
    """A residual net, so growth and pruning must keep channels tied across skip connections."""
    _check_positive(num_classes=num_classes, in_channels=in_channels, width=width)
    if len(blocks) != 3 or any(int(b) < 1 for b in blocks):
        raise ValueError(f"resnet_small needs 3 positive block counts, got {tuple(blocks)}")
    return ResNetSmall(num_classes, in_channels, width, tuple(int(b) for b in blocks))


class WideBlock(nn.Module):
    """Pre-activation wide-ResNet block (BN-ReLU-conv, BN-ReLU-conv) with a 1x1 shortcut conv
    when the shape changes; conv1 -> bn2 -> relu -> conv2 is the hidden layer GradMax grows."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        shortcut = x if isinstance(self.shortcut, nn.Identity) else self.shortcut(out)
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return out + shortcut


def wrn(
    num_classes: int = 10, in_channels: int = 3, width: int = 16, depth: int = 28
) -> nn.Sequential:
    """Wide ResNet depth-k (Zagoruyko & Komodakis 2016) with first-stage width ``width``
    (16k; WRN-28-10 is width=160): stages width, 2*width, 4*width at strides 1, 2, 2."""
    _check_positive(num_classes=num_classes, in_channels=in_channels, width=width)
    if (depth - 4) % 6 or depth < 10:
        raise ValueError(f"wrn depth must be 6n + 4 (10, 16, 22, 28, ...), got {depth}")
    per_stage = (depth - 4) // 6
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        stem=nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
    )
    channels = 16
    for stage, stride in enumerate((1, 2, 2), start=1):
        out_channels = width * 2 ** (stage - 1)
        blocks = [
            WideBlock(channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1)
            for i in range(per_stage)
        ]
        layers[f"stage{stage}"] = nn.Sequential(*blocks)
        channels = out_channels
    layers["bn"] = nn.BatchNorm2d(channels)
    layers["relu"] = nn.ReLU()
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(channels, num_classes)
    return nn.Sequential(layers)


def build_model(
    name: str, num_classes: int, in_channels: int, image_size: int, **kwargs: object
) -> nn.Module:
    """Build a model by name (``vgg_small``, ``resnet_small``, ``wrn``, ``torchvision:<name>``
    or ``timm:<name>``).

    Extra keyword arguments go to the builder (e.g. ``width``); ``image_size`` only matters to
    ``vgg_small``, whose linear head depends on it.
    """
    model: nn.Module | None = None
    if name == "vgg_small":
        model = vgg_small(num_classes, in_channels, image_size=image_size, **kwargs)  # type: ignore[arg-type]
    elif name == "resnet_small":
        model = resnet_small(num_classes, in_channels, **kwargs)  # type: ignore[arg-type]
    elif name == "wrn":
        model = wrn(num_classes, in_channels, **kwargs)  # type: ignore[arg-type]
    elif name.startswith(TORCHVISION_PREFIX):
        tv_name = name[len(TORCHVISION_PREFIX) :]
        if tv_name in _torchvision_names():
            model = _build_torchvision(tv_name, num_classes, in_channels, **kwargs)
    elif name.startswith(TIMM_PREFIX):
        model = build_timm(name[len(TIMM_PREFIX) :], num_classes, in_channels, **kwargs)
    if model is not None:
        _check_input_fits(model, name, num_classes, in_channels, image_size)
        return model
    valid = list(BUILTIN_MODELS) + [TORCHVISION_PREFIX + n for n in _torchvision_names()]
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = (
        f"did you mean: {', '.join(close)}?"
        if close
        else (
            f"valid: {', '.join(BUILTIN_MODELS)}, torchvision:<name> (e.g. torchvision:resnet18) "
            "or timm:<name> (e.g. timm:resnet18d)"
        )
    )
    raise ValueError(f"unknown model {name!r}; {hint}")


def build_target(
    target: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    code_outside: Path | None = None,
    **kwargs: object,
) -> nn.Module:
    """A user's model class by import path, ``pkg.module.Class``, called with ``kwargs`` plus
    whichever of ``num_classes``, ``in_channels`` and ``image_size`` it takes and ``kwargs``
    does not give; then checked on a blank input like the built-ins.

    The path comes from a config or a run dir's model.json, so nothing is called unless it is
    an ``nn.Module`` subclass (``os.system`` would run a command; docs/reliability.md), and
    no module whose file lies in ``code_outside`` (the run dir being loaded) is imported."""
    builder = _locate(target, code_outside)
    _check_model_class(target, builder)
    data = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    try:
        parameters = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        parameters = {}
    given = {k: v for k, v in data.items() if k in parameters and k not in kwargs}
    model = builder(**given, **kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{target} returned {type(model).__name__}, not an nn.Module")
    _check_input_fits(model, target, num_classes, in_channels, image_size)
    return model


def _check_model_class(target: str, found: object) -> None:
    """Refuse, before any call, what is not an nn.Module subclass. Functions too, even when
    annotated ``-> nn.Module``: torch.fx's ``reduce_graph_module(body, import_block)`` is one,
    and it executes ``import_block``."""
    if isinstance(found, type) and issubclass(found, nn.Module):
        return
    if inspect.isfunction(found):
        kind = "a function: name the nn.Module class it builds, or wrap it in one"
    else:
        kind = f"a {type(found).__name__}"
    raise TargetError(
        f"model._target_ {target!r} is not an nn.Module subclass ({kind}); refused without "
        "calling it"
    )


def _locate(target: str, code_outside: Path | None = None) -> object:
    """``pkg.module.Name`` imported: the longest importable module prefix, then attributes."""
    parts = target.split(".")
    problem = f"{target!r} is not a dotted path like my_models.MyNet"
    for cut in range(len(parts) - 1, 0, -1):
        if code_outside is not None:
            _refuse_code_inside(".".join(parts[:cut]), code_outside, target)
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            problem = str(exc)
            continue
        except Exception as exc:  # the user's module failed while importing
            raise ValueError(f"cannot import {target!r}: {type(exc).__name__}: {exc}") from None
        try:
            for name in parts[cut:]:
                found = getattr(found, name)
        except AttributeError as exc:
            raise ValueError(f"cannot import {target!r}: {exc}") from None
        return found
    raise ValueError(f"cannot import {target!r}: {problem}")


def _refuse_code_inside(module: str, folder: Path, target: str) -> None:
    """Importing runs a module's code, so none whose file (or package directory) lies in
    ``folder`` is imported: ``cd RUN && dynarch export .`` puts the run dir on sys.path. Each
    parent is checked before ``find_spec`` imports it to look for the child."""
    folder = folder.resolve()
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        try:
            spec = importlib.util.find_spec(name)
        except Exception:  # not there, or a parent not a package: the import says which
            return
        if spec is None:
            return
        places = list(spec.submodule_search_locations or [])
        places += [spec.origin] if spec.has_location and spec.origin else []
        inside = [p for p in places if Path(p).resolve().is_relative_to(folder)]
        if inside:
            raise TargetError(
                f"model._target_ {target!r}: module {name!r} lies inside the run dir being "
                f"loaded ({inside[0]}); code in a run dir is never imported"
            )


def _check_input_fits(
    model: nn.Module, name: str, num_classes: int, in_channels: int, image_size: int
) -> None:
    """One forward pass on a blank image, so a model that cannot take the data's shape (say
    AlexNet's pooling on 8x8 digits) is one line here instead of a traceback mid-trace.
    Eval mode and zeros: no RNG is drawn and no BatchNorm statistic moves."""
    shape = f"{in_channels}x{image_size}x{image_size}"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, in_channels, image_size, image_size))
    except Exception as exc:  # shape errors come as RuntimeError, ValueError, AssertionError...
        raise ModelInputError(f"{name} cannot take {shape} images: {first_line(exc)}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelInputError(
            f"{name} on {shape} images gives {got}, expected one row of {num_classes} logits"
        )


def build_from_config(
    model_cfg: dict,
    num_classes: int,
    in_channels: int,
    image_size: int,
    code_outside: Path | None = None,
) -> nn.Module:
    """The model a run's ``model`` config section names: a user's ``_target_`` (no module
    from ``code_outside``, the run dir a model is loaded from), or a built-in by ``name`` with
    ``width`` and ``kwargs``."""
    kwargs = dict(model_cfg.get("kwargs") or {})
    if model_cfg.get("_target_"):
        shape = (num_classes, in_channels, image_size)
        return build_target(model_cfg["_target_"], *shape, code_outside=code_outside, **kwargs)
    if model_cfg.get("width") is not None:
        kwargs["width"] = model_cfg["width"]
    return build_model(model_cfg["name"], num_classes, in_channels, image_size, **kwargs)


def model_name(model_cfg: dict) -> str:
    """What the run's log calls the model: the user's class path, or the built-in's name."""
    return str(model_cfg.get("_target_") or model_cfg["name"])


def count_params(model: nn.Module) -> int:
    """Total number of parameters, the size measure growth and pruning move."""
    return sum(p.numel() for p in model.parameters())


def _torchvision_names() -> list[str]:
    """Classification model names torchvision registers (no detection/segmentation heads)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _build_torchvision(
    name: str, num_classes: int, in_channels: int, **kwargs: object
) -> nn.Module:
    """A torchvision classifier, its first conv adapted when the input isn't RGB. Untrained,
    or with ``weights`` (e.g. ``"DEFAULT"``, torchvision's names): the pretrained net with a
    new last linear layer for ``num_classes`` and, for other than 3 input channels, a first
    conv whose kernels are the pretrained ones averaged over RGB (summed, for one channel)."""
    import torchvision

    builder = getattr(torchvision.models, name)
    weights = kwargs.pop("weights", None)
    if weights is None:
        model = builder(weights=None, num_classes=num_classes, **kwargs)
        if in_channels != 3:
            _replace_first_conv(model, in_channels, name)
        return model
    model = builder(weights=weights, **kwargs)
    _replace_last_linear(model, num_classes, name)
    if in_channels != 3:
        rgb = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).weight.detach()
        conv = _replace_first_conv(model, in_channels, name)
        with torch.no_grad():
            conv.weight.copy_(rgb.mean(1, keepdim=True).expand_as(conv.weight) * 3 / in_channels)
    return model


def _replace_last_linear(model: nn.Module, num_classes: int, model_name: str) -> None:
    """A new, untrained last ``nn.Linear`` with ``num_classes`` outputs (a pretrained head's
    classes are not the data's)."""
    last = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError(
            f"torchvision:{model_name} has no Linear head to give {num_classes} classes"
        )
    qualified, head = last[-1]
    if head.out_features == num_classes:
        return
    parent_name, _, attr = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))


def conv_like(conv: nn.Conv2d, in_channels: int | None = None) -> nn.Conv2d:
    """A newly initialised Conv2d with ``conv``'s shape and settings (kernel, stride, padding,
    dilation, groups, bias, device, dtype), optionally with other input channels."""
    return nn.Conv2d(
        conv.in_channels if in_channels is None else in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )


def _replace_first_conv(model: nn.Module, in_channels: int, model_name: str) -> nn.Conv2d:
    """Swap the first Conv2d for one with ``in_channels`` inputs and identical other settings."""
    for qualified, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        if in_channels % module.groups != 0:
            raise ValueError(
                f"torchvision:{model_name}: first conv has groups={module.groups}, "
                f"which does not divide in_channels={in_channels}"
            )
        replacement = conv_like(module, in_channels=in_channels)
        parent_name, _, attr = qualified.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, replacement)
        return replacement
    raise ValueError(f"torchvision:{model_name} has no Conv2d to adapt to {in_channels} channels")


def _check_positive(**values: int) -> None:
    """Reject non-positive sizes up front with a clear message instead of a shape error later."""
    for key, value in values.items():
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
