"""The Torch-Pruning adapter for tracing: the one module that touches Torch-Pruning's internals.

Torch-Pruning's ``DependencyGraph`` traces a model and couples its channels; this module runs
that trace (in training mode when that mode runs more layers, without leaving the model in eval
mode), turns its failures into one line (the op it was handling, read from the traceback's
frames), gives each traced node a stable name, and mends what its index mappings get wrong for
us: a concatenation's offsets behind a flatten (written into its private index mapping), and a
refresh of every mapping on each ``get_pruning_group`` call (switched off while groups are
enumerated). Everything here reads or writes Torch-Pruning's private names (``_ConcatOp``,
``_param_to_name``, ``index_mapping``); ``tests/test_structure.py`` keeps it that way.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from dynarch.errors import DynarchError, UnsupportedOpError, first_line
from dynarch.layer_kinds import torch_pruning_pruners
from dynarch.probes import modes_restored, state_restored
from dynarch.tp_adapter import index_mapping as tp_index_mapping
from dynarch.tp_adapter import tp


def trace(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    """Torch-Pruning's trace, without leaving the model in eval mode; a failure is one line."""
    # Torch-Pruning calls model(*inputs): a bare batch of one would be unpacked to one sample
    inputs = (example_inputs,) if torch.is_tensor(example_inputs) else example_inputs
    try:
        with modes_restored(model), torch.enable_grad():
            training = bool(_training_only_layers(model, inputs))
            dg = _dependency_graph(model, inputs, training)
    except Exception as exc:
        raise trace_error(model, example_inputs, exc) from exc
    _place_concat_inputs(dg)
    return dg


def _dependency_graph(model: nn.Module, inputs: Any, training: bool) -> tp.DependencyGraph:
    """Torch-Pruning's trace, which puts the model in eval mode; ``training``: of the
    training-mode forward instead (batch statistics and random state as they were)."""
    forward = _training_forward if training else None
    return tp.DependencyGraph().build_dependency(
        model, inputs, forward_fn=forward, verbose=False, customized_pruners=torch_pruning_pruners()
    )


def _training_forward(model: nn.Module, inputs: Any) -> Any:
    with state_restored(model):
        return model.train()(*_two_samples(inputs))


def _training_only_layers(model: nn.Module, inputs: Any) -> list[str]:
    """Layers with parameters that the training-mode forward runs and the eval-mode one does
    not (GoogLeNet's ``aux = self.aux(x) if self.training else None``): Torch-Pruning traces
    in eval mode, where their inputs' channels would be grown without them (the next training
    step failed). One forward per mode, no gradients, statistics and random state kept."""
    called: dict[bool, set[str]] = {True: set(), False: set()}
    mode = [False]
    hooks = [
        m.register_forward_hook(lambda *_, name=name: called[mode[0]].add(name))
        for name, m in model.named_modules()
        if next(m.parameters(recurse=False), None) is not None
    ]
    try:
        with torch.no_grad(), state_restored(model):
            for mode[0] in (False, True):
                model.train(mode[0])(*_two_samples(inputs))
    except Exception:  # noqa: BLE001  (a forward that fails here fails the trace with its line)
        return []
    finally:
        for hook in hooks:
            hook.remove()
    return sorted(called[True] - called[False])


def _two_samples(inputs: Any) -> Any:
    """A batch of one repeated twice: train-mode BatchNorm refuses one value per channel."""
    return tuple(x.repeat(2, *[1] * (x.dim() - 1)) if _one_sample(x) else x for x in inputs)


def _one_sample(x: Any) -> bool:
    return torch.is_tensor(x) and x.dim() > 0 and len(x) == 1


def trace_error(model: nn.Module, example_inputs: Any, exc: Exception) -> DynarchError:
    """One line for a failed trace: the model's own forward failing on the inputs, or
    Torch-Pruning's tracer failing at an op (named from the node its code was handling)."""
    frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
    what = f"{type(exc).__name__}: {first_line(exc)}"
    name = type(model).__name__
    if isinstance(exc, DynarchError) or not frames:
        return exc if isinstance(exc, DynarchError) else DynarchError(f"{name}: {what}")
    if "torch_pruning" not in frames[-1].f_code.co_filename:
        first = exc.__context__ or exc  # Torch-Pruning retries model(inputs) after model(*inputs)
        what = f"{type(first).__name__}: {first_line(first)}"
        shape = tuple(example_inputs.shape) if torch.is_tensor(example_inputs) else "given"
        return DynarchError(f"{name} fails on example inputs of shape {shape} ({what})")
    nodes = [v for f in reversed(frames) for v in f.f_locals.values() if isinstance(v, tp.Node)]
    op = f" at {_describe(model, nodes[0])}" if nodes else ""
    return UnsupportedOpError(f"cannot trace {name}: Torch-Pruning's tracer fails{op} ({what})")


def _describe(model: nn.Module, node: Any) -> str:
    """A traced node for a message: the module's name, or the op and the module it follows."""
    names = {m: n for n, m in model.named_modules()}
    if node.module in names:
        return f"module {names[node.module]!r}"
    grad_fn = getattr(node, "grad_fn", None)
    label = grad_fn.name().split("Backward")[0].lower() if grad_fn else op_label(node.module)
    seen, todo = set(), list(node.inputs)
    while todo:  # breadth-first back to the nearest module
        prev = todo.pop(0)
        if prev.module in names:
            return f"op {label} after {names[prev.module]!r}"
        if id(prev) not in seen:
            seen.add(id(prev))
            todo.extend(prev.inputs)
    return f"op {label}"


def _cat_layout(node: Any) -> tuple[int, int] | None:
    """(concatenated dim, output size along it) of a traced cat, from its autograd node."""
    grad_fn = node.grad_fn
    metadata = getattr(grad_fn, "_input_metadata", ())
    if not hasattr(grad_fn, "_saved_dim") or len(metadata) != 1:
        return None
    shape = list(metadata[0].shape)
    dim = grad_fn._saved_dim
    dim = dim + len(shape) if dim < 0 else dim
    return (dim, shape[dim]) if 0 <= dim < len(shape) else None


def _place_concat_inputs(dg: tp.DependencyGraph) -> None:
    """Give each input of a channel concatenation its offset where Torch-Pruning left none.

    Torch-Pruning checks a cat's width against the layers after it; behind a flatten -> linear
    that check fails and every input is mapped to offset 0 (a wrong group). The cat's own output
    shape settles it. A cat whose inputs still cannot be placed is refused (see ``cat_problem``).
    """
    for node in dg.module2node.values():
        cat = node.module
        if node.type != tp.ops.OPTYPE.CONCAT or cat.offsets is not None:
            continue
        sizes, layout = cat.concat_sizes or [], _cat_layout(node)
        if (
            layout is None
            or layout[0] != 1
            or None in sizes
            or sum(sizes) != layout[1]
            or len(set(node.inputs)) != len(node.inputs)
            or len(sizes) != len(node.inputs)
        ):
            continue
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        cat.offsets = offsets
        for i, source in enumerate(node.inputs):
            span = offsets[i : i + 2]
            for dep in node.dependencies:
                if dep.target is source:
                    dep.index_mapping[1] = tp_index_mapping._ConcatIndexMapping(span, reverse=True)
            for dep in source.dependencies:
                if dep.target is node:
                    dep.index_mapping[1] = tp_index_mapping._ConcatIndexMapping(span)


def cat_problem(node: Any) -> str | None:
    """Why a traced cat cannot carry a channel group: it joins channels at unknown offsets."""
    if node.module.offsets is not None:
        return None
    layout = _cat_layout(node)
    return (
        "joins channels at offsets that cannot be inferred" if layout and layout[0] == 1 else None
    )


@contextmanager
def index_mapping_frozen() -> Iterator[None]:
    """Skip Torch-Pruning's index-mapping refresh inside ``get_pruning_group``.

    ``build_dependency`` has just computed the mappings and the model does not change while we
    enumerate groups, but the refresh runs on every call and dominates (seconds for densenet121).
    """
    original = tp_index_mapping.update_index_mapping
    tp_index_mapping.update_index_mapping = lambda graph: None
    try:
        yield
    finally:
        tp_index_mapping.update_index_mapping = original


def op_label(module: nn.Module) -> str:
    """Short readable kind of a traced op node ('add', 'relu', 'cat', 'flatten', ...)."""
    if isinstance(module, tp.ops._ConcatOp):
        return "cat"
    if isinstance(module, tp.ops._ReshapeOp):
        return "flatten"
    if isinstance(module, tp.ops._OutputOp):
        return "output"
    raw = str(getattr(module, "_grad_fn", type(module).__name__))
    for suffix in ("Backward0", "Backward1", "Backward"):
        raw = raw.replace(suffix, "")
    return raw.lower() or "op"


def node_names(model: nn.Module, dg: tp.DependencyGraph) -> tuple[dict[nn.Module, str], dict]:
    """Module paths, and stable names for every traced node (ops numbered per kind)."""
    module_names = {m: n for n, m in model.named_modules()}
    ids: dict[Any, str] = {}
    counters: dict[str, int] = {}
    for node in sorted(
        dg.module2node.values(),
        key=lambda n: (n.module not in module_names, getattr(n.module, "id", 0)),
    ):
        if node.module in module_names:
            ids[node] = module_names[node.module]
        else:
            label = op_label(node.module)
            ids[node] = f"{label}_{counters.get(label, 0)}"
            counters[label] = counters.get(label, 0) + 1
    return module_names, ids


def unknown_layer(dg: tp.DependencyGraph, parameter: nn.Parameter) -> str:
    """A parameter Torch-Pruning found outside any layer it knows: name its module's type."""
    name = dg._param_to_name.get(parameter, "a parameter")
    owner = name.rpartition(".")[0]
    try:
        kind = type(dg.model.get_submodule(owner)).__name__ if owner else "the model"
    except AttributeError:
        kind = "an unknown module"
    return (
        f"{owner or name}: {kind} is a layer type dynarch does not know (its parameter {name} "
        "is per channel); register a LayerKind for it (docs/architecture.md)"
    )


def _channel_count(node: Any) -> tuple[int, int] | None:
    """(rank, size of dim 1) of a traced node's single output, when autograd recorded it."""
    metadata = getattr(node.grad_fn, "_input_metadata", ())
    if len(metadata) != 1 or len(metadata[0].shape) < 2:
        return None
    shape = metadata[0].shape
    return len(shape), shape[1]


def changes_channel_count(node: Any) -> bool:
    """An op Torch-Pruning treats as channel-preserving whose output has another channel count
    than one of its inputs (``F.pad`` over channels, ``x.sum(1, keepdim=True)``, ``x * mask``
    with a one-channel mask)."""
    out = _channel_count(node)
    ins = [_channel_count(n) for n in node.inputs]
    return out is not None and any(i is not None and i[0] == out[0] and i != out for i in ins)
