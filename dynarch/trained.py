"""The trained model back out of a run: ``dynarch.load(run)`` and ``dynarch export``.

A run directory holds the model's recipe (``model.json``: the ``model`` config section and the
data's classes, channels and image size, written when the run starts) and its checkpoint (the
mutations so far and the weights). Loading builds the model from the recipe, replays the
mutations with the same surgery (so every shape, inserted layer and renamed forward is back)
and loads the weights. Export writes a file that runs without dynarch: TorchScript (traced),
ONNX (optional extra), or the plain state dict; BatchNorm can be folded into the convs first.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynarch.atomic import replace_from_temporary, write_rendered
from dynarch.checkpoint import FILENAME as CHECKPOINT
from dynarch.checkpoint import load as load_checkpoint
from dynarch.checkpoint import replay, verify
from dynarch.errors import DynarchError, first_line
from dynarch.history_store import HistoryReader
from dynarch.models import build_from_config

SPEC = "model.json"
VERSIONS = "versions"  # v<N>.pt: the weights version N ended with (trainer.keep_versions)
_SPEC_KEYS = {"model": dict, "num_classes": int, "in_channels": int, "image_size": int}
# pt2: torch.export's ExportedProgram (torch.export.load); torchscript: traced (deprecated by
# PyTorch since 2.9, still read by torch.jit.load and C++ libtorch)
FORMATS = ("pt2", "torchscript", "onnx", "state_dict")


class LoadError(DynarchError):
    """A run whose model cannot be rebuilt or exported; the message names the file."""


def write_model_spec(run_dir: Path, model_cfg: dict[str, Any], splits: Any) -> None:
    """The recipe :func:`load` rebuilds the model from (no data set needed then)."""
    spec = {
        "model": model_cfg,
        "num_classes": splits.num_classes,
        "in_channels": splits.in_channels,
        "image_size": splits.image_size,
    }
    (run_dir / SPEC).write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")


def read_model_spec(run_dir: Path) -> dict[str, Any]:
    """``model.json``, its keys and types checked."""
    path = run_dir / SPEC
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoadError(
            f"no {SPEC} in {run_dir} (not a run dir, or a run from before it)"
        ) from None
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path} is not readable JSON ({type(exc).__name__})") from None
    for key, kind in _SPEC_KEYS.items():
        if not isinstance(spec, dict) or not isinstance(spec.get(key), kind):
            raise LoadError(f"{path}: {key!r} missing or not a {kind.__name__}")
    return spec


def example_input(spec: dict[str, Any]) -> torch.Tensor:
    """One blank input of the run's shape (what tracing and export need)."""
    return torch.zeros(1, spec["in_channels"], spec["image_size"], spec["image_size"])


def save_version_weights(run_dir: Path, version: int, model: nn.Module) -> None:
    """The weights architecture version ``version`` ended with (saved just before the
    mutations that end it; ``trainer.keep_versions``), for :func:`load` at an earlier step."""
    folder = run_dir / VERSIONS
    folder.mkdir(exist_ok=True)
    tmp = folder / f".v{version}.pt.tmp"
    torch.save(model.state_dict(), tmp)
    tmp.replace(folder / f"v{version}.pt")


def load(run: str | Path, step: int | None = None, weights: bool = True) -> nn.Module:
    """The run's model on the CPU, in eval mode: its final architecture and weights (those of
    the last checkpoint: the end of a completed run). ``step``: the architecture in force at
    that step, with the weights it ended with (kept when the run had
    ``trainer.keep_versions=true``; ``weights=False`` gives the shapes, freshly initialised)."""
    run_dir = Path(run)
    spec = read_model_spec(run_dir)
    saved = load_checkpoint(run_dir / CHECKPOINT, required=("mutations", "model", "step"))
    mutations, state = saved["mutations"], saved["model"]
    if step is not None:
        version = _mutations_until(run_dir, step)
        if version < len(mutations):
            mutations, state = mutations[:version], _version_weights(run_dir, version, weights)
    example = example_input(spec)
    try:
        shape = (spec["num_classes"], spec["in_channels"], spec["image_size"])
        model = build_from_config(spec["model"], *shape, code_outside=run_dir)
        replay(model, mutations, example)
        if weights:
            model.load_state_dict(state)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise LoadError(f"{run_dir}: cannot rebuild the model: {first_line(exc)}") from None
    return model.eval()


def _version_weights(run_dir: Path, version: int, wanted: bool) -> dict[str, Any] | None:
    """Version ``version``'s last weights, when wanted (and kept: one line if not)."""
    if not wanted:
        return None
    path = run_dir / VERSIONS / f"v{version}.pt"
    if not path.is_file():
        raise LoadError(
            f"{run_dir}: no weights of architecture version {version} (a run keeps them with "
            "trainer.keep_versions=true); load(..., weights=False) gives its shapes"
        )
    try:
        verify(path)  # damaged bytes would load as other weights
        return torch.load(path, map_location="cpu", weights_only=True)
    except DynarchError as exc:
        raise LoadError(str(exc)) from None
    except Exception as exc:  # damaged file: zip/pickle raise many kinds
        raise LoadError(f"{path} is not readable weights ({type(exc).__name__})") from None


def _mutations_until(run_dir: Path, step: int) -> int:
    """How many mutations the run had applied before step ``step``'s update."""
    reader = HistoryReader(run_dir / "history.db")
    try:
        return sum(1 for e in reader.events() if e["step"] <= step)
    finally:
        reader.close()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every BatchNorm that follows a conv folded into it (torch.fx):
    the same outputs, fewer layers at inference."""
    from torch.fx.experimental.optimization import fuse

    try:
        own_forward = "forward" in model.eval().__dict__  # re-generated by a deepen
        return fuse(_Outer(model) if own_forward else model)
    except Exception as exc:  # not symbolically traceable (data-dependent control flow)
        raise LoadError(f"cannot fold BatchNorm: {first_line(exc)}") from None


class _Outer(nn.Module):
    """fx traces a class's forward, not an instance's: a model whose own forward a deepen
    re-generated is traced as this one's child ``inner`` (its parameter names gain that
    prefix), else the fold dropped the new layers (resnet_small deepened after its stem)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> Any:  # one input, as export takes
        return self.inner(x)


def export(
    model: nn.Module, example: torch.Tensor, fmt: str, path: Path, fold_bn: bool = False
) -> Path:
    """Write ``model`` (eval mode) as ``fmt`` to ``path``; the file runs without dynarch
    (``state_dict`` excepted: it needs the architecture, e.g. from :func:`load`). It appears
    whole or not at all (dynarch/atomic.py); a failed write is one :class:`WriteError` line."""
    if fmt not in FORMATS:
        raise LoadError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    model = fold_batchnorm(model) if fold_bn else model.eval()
    batch = example.expand(2, *example.shape[1:])  # a batch of one would fix the batch size
    if fmt == "state_dict":
        return write_rendered(path, lambda f: torch.save(model.state_dict(), f))
    if fmt == "pt2":
        dims = ({0: torch.export.Dim("batch")},)
        program = torch.export.export(model, (batch,), dynamic_shapes=dims)
        return write_rendered(path, lambda f: torch.export.save(program, f))
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # asked for by name
            traced = torch.jit.trace(model, batch)
            return write_rendered(path, lambda f: torch.jit.save(traced, f))
    return replace_from_temporary(path, lambda tmp: _export_onnx(model, batch, tmp))


def _export_onnx(model: nn.Module, batch: torch.Tensor, path: Path) -> None:
    try:  # torch.onnx's exporter writes through these
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise LoadError(
            "ONNX export needs onnx and onnxscript: pip install 'dynarch[onnx]'"
        ) from None
    torch.onnx.export(
        model, (batch,), str(path), input_names=["input"], output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
    )  # fmt: skip
