"""Tracing a model into a LayerGraph: fx graph, layers in topological order, cut sizes."""

from __future__ import annotations

import builtins
import difflib
import hashlib
import inspect
import logging
import operator
import os
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from asteroid_fx.modes import trace_both_modes
from asteroid_fx.shape_prop import (
    META_KEY,
    SAVED_KEY,
    MappingMeta,
    NonTensorMeta,
    ShapeProp,
    TensorMeta,
    ValueMeta,
    describe,
    iter_tensor_metas,
)
from contracts.errors import ModelOutputError, TraceError
from contracts.table import TiedWeight

__all__ = ["Layer", "LayerGraph", "trace", "BATCHED_KEY", "LAYER_KEY"]

log = logging.getLogger(__name__)

#: ``node.meta`` key: True when the node's value is a tensor with the batch in dimension 0.
BATCHED_KEY = "asteroid.batched"
#: ``node.meta`` key: index of the layer holding the node (placeholders: -1, output: absent).
LAYER_KEY = "asteroid.layer"
# Shapes are propagated with at most this many samples: per-sample sizes do not depend on
# the batch, and a large example batch would only cost time and memory.
_SHAPE_BATCH_MAX = 4
# node.meta key of the probe run at batch + 1 (removed before trace() returns).
_PROBE_KEY = "asteroid.probe_meta"
# node.meta key of captured graphs (asteroid_fx.capture.MODULE_STACK_KEY): the module stack
_STACK_KEY = "asteroid.module_stack"


@dataclass(frozen=True)
class Layer:
    """One layer of a :class:`LayerGraph`: a node that does work plus the cheap nodes around it.

    Byte counts marked *per sample* are the bytes for a batch of one sample.
    """

    index: int
    name: str  # readable, e.g. "layer1.0.conv1" or the fx node name ("add_3")
    op: str  # "conv2d", "linear", "add", "relu", "MultiheadAttention" ...
    node_names: tuple[str, ...]  # fx node names of graph_module.graph in this layer, topo order
    param_names: tuple[str, ...]  # qualified names of params/buffers first used by this layer
    param_bytes: int  # trainable parameter bytes owned by this layer
    buffer_bytes: int  # buffers (BN running stats) and frozen parameters owned by this layer
    output_bytes: int  # per sample, the layer's output(s)
    activation_bytes: int  # per sample, kept alive for backward (approximation)


@dataclass
class LayerGraph:
    """A traced model: the fx ``GraphModule`` plus per-layer metadata and cut sizes.

    ``cut_bytes[i]`` is the per-sample size of every tensor live across the cut between
    ``layers[i]`` and ``layers[i + 1]`` (model inputs and skip connections included). Only
    tensors with the batch in dimension 0 ever cross a cut (see [Note: layer grouping]).
    """

    graph_module: fx.GraphModule  # nodes carry node.meta["asteroid.tensor_meta"]
    layers: list[Layer]
    cut_bytes: list[int]
    input_bytes: int
    model_hash: str
    model_name: str
    example_batch: int
    # the model traced in eval mode, when its graph differs (see [Note: train and eval mode]
    # in asteroid_fx/modes.py); None when both modes run the same code
    eval_graph: LayerGraph | None = None
    capture: str = "fx"  # how the graph was captured: "fx" (symbolic tracing) or "export"
    # trained tensors several layers use (weight tying), counted in their first layer only
    tied: tuple[TiedWeight, ...] = ()

    @property
    def num_layers(self) -> int:
        """Number of layers."""
        return len(self.layers)

    @property
    def input_names(self) -> tuple[str, ...]:
        """The model inputs, in the order the graph (and stage 0) takes them positionally.

        For keyword inputs these are the mapping's keys in its order, and the graph's
        parameters have these names; see [Note: named inputs].
        """
        return tuple(str(n.target) for n in _nodes(self.graph_module.graph, "placeholder"))

    def node_to_layer(self) -> dict[str, int]:
        """Map every node name to its layer index (placeholders and output excluded)."""
        return {name: layer.index for layer in self.layers for name in layer.node_names}

    def cut_tensors(self, i: int) -> list[str]:
        """Names of the nodes (model inputs included) whose values cross the cut after layer i.

        The names are in graph order; every one of them is a batch-dimensioned tensor.
        """
        if not 0 <= i < len(self.layers) - 1:
            raise IndexError(
                f"cut index {i} out of range: a graph of {len(self.layers)} layers has cuts "
                f"0..{len(self.layers) - 2}"
            )
        return _cut_names(self.graph_module.graph, self.node_to_layer(), len(self.layers), i)

    def summary(self) -> str:
        """A plain-text table of the layers, one row each.

        Columns: index, name, op, parameter bytes, and per-sample output, activation and cut
        bytes (the cut after the layer).
        """
        rows = [
            f"{'#':>4}  {'name':<32} {'op':<18} {'params':>10} {'out/s':>10} "
            f"{'act/s':>10} {'cut/s':>10}"
        ]
        for layer in self.layers:
            cut = self.cut_bytes[layer.index] if layer.index < len(self.cut_bytes) else 0
            rows.append(
                f"{layer.index:>4}  {layer.name[:32]:<32} {layer.op[:18]:<18} "
                f"{layer.param_bytes:>10} {layer.output_bytes:>10} "
                f"{layer.activation_bytes:>10} {cut:>10}"
            )
        return "\n".join(rows)


# [Note: layer grouping]
# A *layer* is one node that does work (a leaf-module call or a compute function/method)
# whose value is a tensor with the batch in dimension 0 (or a tuple holding one), plus the
# cheap nodes around it. A cut between two layers may only be crossed by batch-dimensioned
# tensors, so that a pipeline stage receives nothing but activations it can shard by sample:
#
# 1. forward pass (topological order): a working node with a batched value opens a new
#    layer; a cheap node with a batched value (view, flatten, x[:, 0] ...) joins the latest
#    layer among its inputs (its producer); everything else (sizes, shapes, get_attr,
#    tensors without a batch dimension such as a position-embedding slice) is deferred.
# 2. backward pass: a deferred node joins the earliest layer among its users.
# 3. a deferred value used by several layers is duplicated into each later user's layer, so
#    ``x.size(0)``-like values are recomputed where they are used (its batched inputs cross
#    the cut instead, as tensors).
# 4. whatever non-batched value still crosses a cut (rare: a tuple result of an opaque
#    module used far away) merges the layers in between into one.
# 5. the graph is reordered so that each layer's nodes are contiguous.
# Before grouping, every use of the batch size (``b = x.size(0)``) whose user has a batched
# input of its own is rewritten to read it from that input (``y.size(0)``), so a batch size
# taken at the top of ``forward`` does not keep the model input alive across every cut.
#
# [Note: which values are batched]
# A value is *batched* when it is a tensor computed from the model inputs (not only from
# their sizes) whose dimension 0 is the batch. Dimension 0 alone is ambiguous (a stack of
# two tensors at batch 2, a sequence-first tensor whose length equals the batch), so the
# graph runs twice: at the example batch B (2 <= B <= 4) and B + 1; batched values are the
# ones whose dimension 0 follows (B, B + 1). The same probe finds batch-size integers. A
# tensor with the batch in another dimension (``batch_first=False`` attention) is not
# batched: it never crosses a cut, the ops producing it join their consumer's layer.

_CHEAP_METHODS = frozenset(
    {
        "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute",
        "transpose", "t", "contiguous", "size", "dim", "numel", "unsqueeze", "squeeze",
        "expand", "expand_as", "chunk", "split", "unbind", "narrow", "select", "movedim",
        "__getitem__",
    }
)  # fmt: skip
_CHEAP_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        operator.getitem, builtins.getattr, torch.flatten, torch.reshape, torch.permute,
        torch.transpose, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split,
        torch.unbind, torch.narrow, torch.t, torch.movedim, torch.unflatten,
    }
)  # fmt: skip
_CHEAP_MODULES: tuple[type[nn.Module], ...] = (nn.Identity, nn.Flatten, nn.Unflatten)


def _aten_packets(names: Iterable[str]) -> frozenset[Any]:
    packets = set()
    for name in names:
        try:
            packets.add(getattr(torch.ops.aten, name))
        except (AttributeError, RuntimeError):  # pragma: no cover - an older torch lacks it
            continue
    return frozenset(packets)


# aten operators (graphs captured by torch.export) that only view, size or alias a tensor
_CHEAP_ATEN = _aten_packets(
    "view _unsafe_view reshape view_as reshape_as permute transpose t unsqueeze squeeze "
    "expand expand_as slice select split split_with_sizes chunk unbind flatten unflatten "
    "alias detach narrow movedim sym_size sym_numel sym_stride".split()
)


def _cheap_target(node: fx.Node) -> bool:
    """The node is a view, size or indexing method / function call (fx or aten)."""
    target = node.target
    if node.op == "call_method":
        return target in _CHEAP_METHODS
    if node.op != "call_function":
        return False
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket in _CHEAP_ATEN
    if isinstance(target, type) and issubclass(target, Mapping):
        return True  # a ModelOutput built again at the end of a captured graph
    return target in _CHEAP_FUNCTIONS

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_THIS_FILE = os.path.abspath(__file__)

_BATCHED, _CONTAINER, _OTHER = "B", "C", "N"


class _LeafTracer(fx.Tracer):
    """fx tracer that also keeps ``nn.MultiheadAttention`` and user-named modules opaque."""

    def __init__(self, leaf_classes: tuple[type[nn.Module], ...], leaf_names: frozenset[str]):
        super().__init__()
        self.leaf_classes: tuple[type[nn.Module], ...] = (nn.MultiheadAttention, *leaf_classes)
        self.leaf_names = leaf_names
        self.failed_module: tuple[str, str] | None = None  # (qualified name, class name)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_classes) or module_qualified_name in self.leaf_names:
            return True
        return bool(super().is_leaf_module(m, module_qualified_name))

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module sees the error first
                try:
                    path = self.path_of_module(m)
                except Exception:  # pragma: no cover - module not registered under root
                    path = "?"
                self.failed_module = (path, type(m).__name__)
            raise


def _nodes(graph: fx.Graph, op: str) -> list[fx.Node]:
    """The graph's nodes of kind ``op`` in order (``Graph.find_nodes`` needs torch >= 2.3;
    the device side runs on torch >= 2.0)."""
    return [n for n in graph.nodes if n.op == op]


def trace(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor | Mapping[str, torch.Tensor],
    *,
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    model_name: str = "",
) -> LayerGraph:
    """Capture ``model`` as an fx graph and group its nodes into layers.

    The graph comes from torch.fx symbolic tracing; when that fails (Python code on
    traced sizes or values, as in Hugging Face models), from ``torch.export(strict=False)``
    (see [Note: capture by torch.export] in ``asteroid_fx/capture.py``).

    Args:
        model: the model; traced in train mode, and in eval mode when its code decides on
            ``self.training`` (see [Note: train and eval mode] in ``asteroid_fx.modes``).
            Its parameters, buffers and train/eval flags are left unchanged (BatchNorm
            running statistics are restored after the run).
        example_inputs: a tuple of tensors (or one tensor) passed positionally, or a mapping
            ``{name: tensor}`` passed as keyword inputs (``input_ids``, ``attention_mask``
            ...), with the batch in dimension 0. The model is run on them, resized to a batch
            of 2 to 4 samples (recorded as ``example_batch``), and once more on one sample
            more, to tell batched values apart (see [Note: which values are batched]).
        leaf_modules: module classes, class names or qualified module names to keep whole:
            not traced through by torch.fx, never split by a cut in a captured graph;
            ``nn.MultiheadAttention`` always is.
        model_name: recorded in the result (default: the model's class name).

    Returns:
        A :class:`LayerGraph` of the train mode; its ``eval_graph`` is the eval mode's when
        the two differ. See [Note: named inputs] for how it takes its inputs.

    Raises:
        TraceError: neither torch.fx nor torch.export can capture the model (the message
            names the module, the line of user code and a fix), it cannot run on
            ``example_inputs``, or it only runs at one fixed batch size.
        ModelOutputError: the model returns something other than tensors in tuples, lists
            and mappings (a ``TraceError``).

    Example::

        graph = trace(model, (torch.randn(2, 3, 32, 32),))
        graph.layers[0].name, graph.cut_bytes[:3]
        graph = trace(bert, {"input_ids": ids, "attention_mask": mask})
    """
    from contracts.arguments import require

    require(model, nn.Module, TraceError, "model",
            "pass the module itself, e.g. build_model()"
            + (f" or {model.__name__}()" if isinstance(model, type) else ""))
    require(model_name, str, TraceError, "model_name", "give a string or leave it out")
    leaves = leaf_tuple(leaf_modules)
    return trace_both_modes(
        model,
        lambda: _trace_mode(model, example_inputs, leaf_modules=leaves, model_name=model_name),
        lambda: _graph_code(model, example_inputs, leaves),
    )


def check_graph(graph: object) -> LayerGraph:
    """``graph`` if it is a ``LayerGraph`` (of ``trace``), else ``TraceError``: the functions
    that take one instead of tracing (``graph="g"`` was AttributeError: 'str' object has no
    attribute 'graph_module')."""
    from contracts.arguments import require

    require(graph, LayerGraph, TraceError, "graph", "pass afx.trace(model, inputs), or leave "
            "it out")
    return graph  # type: ignore[return-value]


def leaf_tuple(leaf_modules: object) -> tuple[Any, ...]:
    """``leaf_modules`` (of ``trace`` and the functions that trace) as a tuple: None is
    none, one class or one string is one entry (a string was iterated letter by letter:
    "leaf_modules names 'L'"), any other iterable its items; ``TraceError`` otherwise."""
    if leaf_modules is None:
        return ()
    if isinstance(leaf_modules, (str, type)):
        return (leaf_modules,)
    if not isinstance(leaf_modules, Iterable):
        raise TraceError(f"leaf_modules must be a list of nn.Module classes, class names or "
                         f"qualified module names, got {leaf_modules!r}")
    return tuple(leaf_modules)


def _graph_code(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor | Mapping[str, torch.Tensor],
    leaf_modules: tuple[type[nn.Module] | str, ...],
) -> str | None:
    """The code torch.fx captures in the model's current mode, before any of our passes (a
    cheap test of whether two modes differ); None when it cannot be captured."""
    from asteroid_fx.capture import capture_context

    try:
        inputs, names = _check_inputs(example_inputs)
        classes, leaf_names = _check_leaf_modules(model, leaf_modules)
        with capture_context(model):
            return str(_symbolic_trace(model, inputs, names, classes, leaf_names, "Model").code)
    except TraceError:
        return None


def _trace_mode(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor | Mapping[str, torch.Tensor],
    *,
    leaf_modules: Iterable[type[nn.Module] | str],
    model_name: str,
) -> LayerGraph:
    """:func:`trace` in the model's current train/eval mode."""
    inputs, names = _check_inputs(example_inputs)
    leaf_classes, leaf_names = _check_leaf_modules(model, leaf_modules)
    name = model_name or type(model).__name__

    # see [Note: which values are batched]
    batch = min(max(int(inputs[0].shape[0]), 2), _SHAPE_BATCH_MAX)
    inputs = tuple(_resize_batch(t, batch) for t in inputs)
    gm, capture = _capture(model, inputs, names, leaf_classes, leaf_names, name, batch)
    output = _nodes(gm.graph, "output")[0]
    _check_model_output(output.meta.get(META_KEY))
    _plain_mapping_output(gm.graph, output)

    kinds = _classify(gm, batch)
    _retarget_batch_sizes(gm, kinds, batch)
    for node in gm.graph.nodes:
        node.meta.pop(_PROBE_KEY, None)
    layer_of, anchors = _group(gm, kinds)
    _duplicate_shared(gm, kinds, layer_of, anchors, len(anchors))
    layer_of, anchors = _merge_crossings(gm, kinds, layer_of, anchors)
    if capture == "export":
        layer_of, anchors = _merge_leaves(gm, layer_of, anchors, leaf_classes, leaf_names)
    num_layers = len(anchors)
    _sort_by_layer(gm.graph, layer_of)
    gm.graph.lint()
    gm.recompile()

    for node in gm.graph.nodes:
        node.meta[BATCHED_KEY] = kinds[node] == _BATCHED
        if node.op != "output":
            node.meta[LAYER_KEY] = layer_of[node]
    layers = _build_layers(gm, layer_of, anchors, batch)
    node_layer = {n.name: i for n, i in layer_of.items() if n.op != "placeholder"}
    cut_bytes = _all_cut_bytes(gm.graph, node_layer, num_layers, batch)
    input_bytes = sum(_per_sample(n, batch) for n in _nodes(gm.graph, "placeholder"))
    graph = LayerGraph(
        graph_module=gm,
        layers=layers,
        cut_bytes=cut_bytes,
        input_bytes=input_bytes,
        model_hash=_model_hash(gm),
        model_name=name,
        example_batch=batch,
        capture=capture,
        tied=_tied_weights(gm, layer_of, num_layers),
    )
    log.debug("traced %s (%s): %d layers, %d nodes", name, capture, num_layers,
              len(gm.graph.nodes))
    return graph


# [Note: named inputs]
# A model called with keyword inputs (``model(input_ids=..., attention_mask=...)``) is
# traced from a mapping ``{name: tensor}``. Its graph, and stage 0 of every partition, take
# those tensors positionally in the mapping's order, and their ``forward`` parameters carry
# the names, so ``stage0(**inputs)`` works as well as ``stage0(*inputs.values())``.
# Forward parameters the mapping leaves out keep their defaults. A ``sample_batch`` that
# returns such a mapping is fed to the runtime in the same order. Outputs are unchanged by
# this: the last stage returns the model's output structure without its None fields; a
# ``ModelOutput`` stays one when torch.export captured the model (its class is imported
# from transformers by the last stage's source), and is a plain dict when torch.fx traced
# it (fx does not keep the class).


# --------------------------------------------------------------------------- checks


def _check_inputs(example_inputs: Any) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...] | None]:
    """The example tensors in order, and their keyword names (None: positional)."""
    names: tuple[str, ...] | None = None
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if isinstance(inputs, Mapping):
        bad = [k for k in inputs if not (isinstance(k, str) and k.isidentifier())]
        if bad:
            raise TraceError(f"keyword example_inputs must have identifier keys (the forward "
                             f"parameters' names), got {bad[0]!r}")
        names = tuple(inputs)
        inputs = tuple(inputs.values())
    if not isinstance(inputs, (tuple, list)) or not inputs:
        raise TraceError(
            f"example_inputs must be a non-empty tuple of tensors or mapping of named tensors, "
            f"got {type(example_inputs)}"
        )
    batches = set()
    for i, t in enumerate(inputs):
        label = f"example_inputs[{names[i]!r}]" if names else f"example_inputs[{i}]"
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            raise TraceError(
                f"{label} must be a tensor with the batch in dimension 0, "
                f"got {type(t).__name__}{' (0-d)' if isinstance(t, torch.Tensor) else ''}"
            )
        batches.add(int(t.shape[0]))
    if len(batches) != 1:
        shapes = [tuple(t.shape) for t in inputs]
        raise TraceError(f"example_inputs disagree on the batch size (dimension 0): {shapes}")
    if 0 in batches:
        raise TraceError("example_inputs have an empty batch (dimension 0 is 0)")
    return tuple(inputs), names


def _check_leaf_modules(
    model: nn.Module, leaf_modules: Iterable[type[nn.Module] | str]
) -> tuple[tuple[type[nn.Module], ...], frozenset[str]]:
    """Split ``leaf_modules`` into classes and qualified names.

    A string is a qualified submodule name, or else the class name (``BertEmbeddings``) or
    qualified class name of a submodule.
    """
    classes: list[type[nn.Module]] = []
    names: set[str] = set()
    known = dict(model.named_modules())
    by_class: dict[str, type[nn.Module]] = {}
    for module in known.values():
        cls = type(module)
        by_class.setdefault(cls.__name__, cls)
        by_class.setdefault(f"{cls.__module__}.{cls.__qualname__}", cls)
    for leaf in leaf_modules:
        if isinstance(leaf, str):
            if leaf in known and leaf:
                names.add(leaf)
            elif leaf in by_class:
                classes.append(by_class[leaf])
            else:
                raise TraceError(_unknown_leaf(model, leaf, known, by_class))
        elif isinstance(leaf, type) and issubclass(leaf, nn.Module):
            classes.append(leaf)
        else:
            raise TraceError(
                f"leaf_modules entries must be nn.Module classes, class names or qualified "
                f"module names, got {leaf!r}"
            )
    return tuple(classes), frozenset(names)


def _unknown_leaf(model: nn.Module, leaf: str, known: Mapping[str, nn.Module],
                  by_class: Mapping[str, type[nn.Module]]) -> str:
    candidates = [n for n in known if n] + [n for n in by_class if "." not in n]
    close = difflib.get_close_matches(leaf, candidates, n=5, cutoff=0.6)
    if not close:  # a misspelt dotted name: compare its last part with the last parts
        tail = leaf.rsplit(".", 1)[-1]
        close = [n for n in candidates if n.rsplit(".", 1)[-1] in
                 difflib.get_close_matches(tail, [c.rsplit(".", 1)[-1] for c in candidates],
                                           n=5, cutoff=0.7)][:5]
    hint = (f"close names: {', '.join(close)}" if close else
            f"submodules include: {', '.join(list(n for n in known if n)[:8])}")
    return (f"leaf_modules names {leaf!r}, which is not a submodule of {type(model).__name__} "
            f"nor the class of one ({hint})")


def _check_model_output(meta: ValueMeta | None) -> None:
    """Raise :class:`ModelOutputError` unless the model's output is tensors (or None) in
    tuples, lists and mappings (``_check_output``), at least one tensor in all (a
    ``forward`` that returned None was traced, planned and partitioned, and failed only in
    the loss of a run)."""
    _check_output(meta, "output")
    if not _holds_tensor(meta):
        raise ModelOutputError(
            "the model's output holds no tensor (forward returned "
            + ("None" if meta is None or getattr(meta, "type_name", "") == "NoneType"
               else "no tensor")
            + "): a model must return a tensor, or tuples, lists or dicts of tensors; "
              "return what the loss is computed on")


def _check_output(meta: ValueMeta | None, where: str) -> None:
    """Raise :class:`ModelOutputError` unless the output is tensors (or None) in tuples,
    lists and mappings."""
    if meta is None or isinstance(meta, TensorMeta):
        return
    if isinstance(meta, tuple):
        for i, item in enumerate(meta):
            _check_output(item, f"{where}[{i}]")
        return
    if isinstance(meta, MappingMeta):
        for key, item in meta.items:
            _check_output(item, f"{where}[{key!r}]")
        return
    if meta.type_name == "NoneType":
        return
    raise ModelOutputError(
        f"the model's {where} is a {meta.type_name}, not a tensor: a model must return a "
        f"tensor, or tuples, lists or dicts of tensors; return the tensors you train on "
        f"instead (e.g. from a wrapper module)")


def _holds_tensor(meta: ValueMeta | None) -> bool:
    """Whether the output described by ``meta`` holds a tensor anywhere."""
    if isinstance(meta, TensorMeta):
        return True
    if isinstance(meta, tuple):
        return any(_holds_tensor(item) for item in meta)
    if isinstance(meta, MappingMeta):
        return any(_holds_tensor(item) for _, item in meta.items)
    return False


def _plain_mapping_output(graph: fx.Graph, output: fx.Node) -> None:
    """A mapping the model returns is a plain dict without None fields, as a ``ModelOutput``.

    torch.fx turns a returned ``ModelOutput`` into a plain dict holding every field it was
    built with, also those that are None when the model runs (the model returns only the
    others), and keeps ``forward``'s return annotation, which no longer holds.
    """
    value = output.args[0]
    if not isinstance(value, dict):
        return
    output.type = None
    kept = {}
    for key, item in value.items():
        if item is None or (isinstance(item, fx.Node) and item.meta.get(META_KEY)
                            == NonTensorMeta("NoneType", None)):
            continue
        kept[key] = item
    if len(kept) == len(value):
        return
    dropped = [item for key, item in value.items() if key not in kept]
    output.args = (kept,)
    meta = output.meta.get(META_KEY)
    if isinstance(meta, MappingMeta):
        output.meta[META_KEY] = MappingMeta(meta.type_name,
                                            tuple((k, m) for k, m in meta.items if k in kept))
    for item in dropped:
        if isinstance(item, fx.Node):
            _erase_dead_chain(graph, item)


# --------------------------------------------------------------------------- capturing


def _capture(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    names: tuple[str, ...] | None,
    leaf_classes: tuple[type[nn.Module], ...],
    leaf_names: frozenset[str],
    name: str,
    batch: int,
) -> tuple[fx.GraphModule, str]:
    """The graph, shapes propagated, and how it was captured ("fx" or "export")."""
    from asteroid_fx.capture import capture_context

    try:
        with capture_context(model):  # e.g. Hugging Face caches off (asteroid_fx/hf.py)
            gm = _symbolic_trace(model, inputs, names, leaf_classes, leaf_names, name)
            _propagate(gm, model, inputs, batch)
        return gm, "fx"
    except ModelOutputError:
        raise
    except TraceError as fx_error:
        failure = fx_error
    try:
        from asteroid_fx.capture import export_graph

        gm = export_graph(model, inputs, names, _identifier(name))
        _propagate(gm, model, inputs, batch)
    except ModelOutputError:
        raise
    except TraceError as export_error:
        _check_eager_output(model, inputs, names)
        raise _both_failed(failure, export_error) from failure
    log.info("torch.fx cannot trace %s (%s); captured it with torch.export instead", name,
             str(failure).splitlines()[0])
    return gm, "export"


def _both_failed(fx_error: TraceError, export_error: TraceError) -> TraceError:
    """fx's message (module, line) and export's reason, then the fix: export's own when it
    names one (a construct no capture supports), else fx's (a leaf module)."""
    head, sep, fix = str(fx_error).partition("\n  fix: ")
    reason, own, own_fix = str(export_error).partition("\n  fix: ")
    if own:
        sep, fix = own, own_fix
    reason = reason.replace("\n", "\n  ")
    return TraceError(f"{head}\n  and {reason}" + (f"{sep}{fix}" if sep else ""))


def _check_eager_output(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], names: tuple[str, ...] | None
) -> None:
    """Raise :class:`ModelOutputError` when the model, run eagerly, returns a bad type."""
    from asteroid_fx.capture import capture_context

    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.no_grad(), capture_context(model):
            value = model(**dict(zip(names, inputs))) if names else model(*inputs)
    except Exception:  # the model does not run: the trace error says why
        return
    finally:
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)
    _check_model_output(describe(value))


def _symbolic_trace(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    names: tuple[str, ...] | None,
    leaf_classes: tuple[type[nn.Module], ...],
    leaf_names: frozenset[str],
    name: str,
) -> fx.GraphModule:
    tracer = _LeafTracer(leaf_classes, leaf_names)
    concrete = _defaulted_args(model, len(inputs), names)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:
        raise _trace_error(model, tracer, e) from e
    _drop_specialized_placeholders(graph, len(inputs), names)
    return fx.GraphModule(tracer.root, graph, class_name=_identifier(name))


def _defaulted_args(
    model: nn.Module, num_inputs: int, names: tuple[str, ...] | None
) -> dict[str, Any]:
    """Bake forward() parameters beyond the example inputs in at their default values."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - builtin forward
        return {}
    if names is not None:
        missing = [n for n in names if n not in {p.name for p in params
                                                 if p.kind not in (p.VAR_POSITIONAL,
                                                                   p.VAR_KEYWORD)}]
        if missing:
            raise TraceError(f"torch.fx traces named forward parameters only, and "
                             f"{type(model).__name__}.forward has no parameter {missing[0]!r}")
    extra = {}
    for i, p in enumerate(params):
        given = p.name in names if names is not None else i < num_inputs
        if given or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            told = f"the keyword inputs {list(names)}" if names is not None else \
                f"only {num_inputs} example input(s)"
            raise TraceError(
                f"{type(model).__name__}.forward takes parameter {p.name!r} without a "
                f"default, but {told} were given"
            )
        extra[p.name] = p.default
    return extra


def _drop_specialized_placeholders(
    graph: fx.Graph, num_inputs: int, names: tuple[str, ...] | None
) -> None:
    placeholders = _nodes(graph, "placeholder")
    if names is None:
        baked = placeholders[num_inputs:]
    else:
        baked = [ph for ph in placeholders if str(ph.target) not in names]
    for ph in baked:
        for user in list(ph.users):
            if not user.users and getattr(user.target, "__name__", "") == "_assert_is_none":
                graph.erase_node(user)
        default = ph.args[0] if ph.args else None
        if ph.users and isinstance(default, (int, float, bool, str, type(None))):
            _write_in(ph, default)
        if not ph.users:
            graph.erase_node(ph)
    if names is not None:  # inputs in the mapping's order, then baked parameters (with
        # defaults) still read: see [Note: named inputs]
        remaining = _nodes(graph, "placeholder")
        by_name = {str(ph.target): ph for ph in remaining}
        order = [by_name[k] for k in names if k in by_name]
        for ph in order:
            ph.args = ()  # a given input has no default (``mask=None`` in forward)
        order += [ph for ph in remaining if ph not in order]
        first = next(n for n in graph.nodes if n.op != "placeholder")
        for ph in order:
            first.prepend(ph)


def _write_in(placeholder: fx.Node, value: Any) -> None:
    """Replace every use of ``placeholder`` by the plain constant ``value``."""

    def swap(node: fx.Node) -> Any:
        return value if node is placeholder else node

    for user in list(placeholder.users):
        user.args = fx.map_arg(user.args, swap)
        user.kwargs = fx.map_arg(user.kwargs, swap)


def _identifier(name: str) -> str:
    ident = "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "Model"
    return ident if not ident[0].isdigit() else f"M_{ident}"


def _trace_error(model: nn.Module, tracer: _LeafTracer, e: Exception) -> TraceError:
    path, cls = tracer.failed_module or ("", type(model).__name__)
    where = _user_frame(e)
    where_txt = f"\n  at {where}" if where else ""
    module_txt = f"{cls} (module '{path}')" if path else f"{cls} (the root module)"
    if path:
        fix = (
            f"keep the module opaque: --leaf {cls} or --leaf {path} on the command line "
            f"(leaf_modules=['{cls}'] in the API), or rewrite the data-dependent Python code"
        )
    else:
        fix = (
            "move the data-dependent code into a submodule and keep it opaque with --leaf "
            "ThatModuleClass (leaf_modules=['ThatModuleClass'] in the API), or rewrite it "
            f"without Python control flow on tensor values (--leaf {cls} would make the whole "
            "model one layer)"
        )
    return TraceError(
        f"torch.fx cannot trace {module_txt}: {type(e).__name__}: {e}{where_txt}\n  fix: {fix}"
    )


def _user_frame(e: BaseException) -> str:
    """``file:line: code`` of the deepest traceback frame outside torch and this module."""
    best = ""
    for frame in traceback.extract_tb(e.__traceback__):
        filename = os.path.abspath(frame.filename)
        if frame.filename.startswith("<") or filename == _THIS_FILE:
            continue
        if filename.startswith(_TORCH_DIR + os.sep):
            continue
        best = f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return best


def _resize_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``t`` with ``batch`` samples: cut, or grown by repeating its samples cyclically."""
    if t.shape[0] == batch:
        return t
    index = torch.arange(batch) % t.shape[0]
    return t[index]


def _propagate(
    gm: fx.GraphModule, model: nn.Module, inputs: tuple[torch.Tensor, ...], batch: int
) -> None:
    """Shape propagation at ``batch`` and a probe at ``batch + 1``; state left untouched."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    record = any(p.requires_grad for p in gm.parameters())
    try:
        ShapeProp(gm, record_saved=record).propagate(*inputs)
        probe = tuple(_resize_batch(t, batch + 1) for t in inputs)
        try:
            ShapeProp(gm, meta_key=_PROBE_KEY).propagate(*probe)
        except TraceError as e:
            raise TraceError(
                f"the model runs with a batch of {batch} but not with {batch + 1}; pipeline "
                f"training splits mini-batches into micro-batches of any size, so the model "
                f"must not depend on a fixed batch size. {e}"
            ) from e
    finally:
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)


# --------------------------------------------------------------------------- grouping


def _classify(gm: fx.GraphModule, batch: int) -> dict[fx.Node, str]:
    """Value kind of every node: batched tensor, container of one, or other.

    See [Note: which values are batched].
    """
    depends: dict[fx.Node, bool] = {}
    kinds: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        meta: ValueMeta = node.meta.get(META_KEY, NonTensorMeta("None"))
        probe: ValueMeta = node.meta.get(_PROBE_KEY, NonTensorMeta("None"))
        if node.op == "placeholder":
            depends[node] = True
        else:
            depends[node] = any(
                depends[m] and _has_tensor(m.meta.get(META_KEY)) for m in node.all_input_nodes
            )
        pairs = list(zip(iter_tensor_metas(meta), iter_tensor_metas(probe)))
        scales = [
            bool(t.shape) and bool(u.shape) and t.shape[0] == batch and u.shape[0] == batch + 1
            for t, u in pairs
        ]
        if not depends[node] or node.op == "output" or not any(scales):
            kinds[node] = _OTHER
        elif isinstance(meta, TensorMeta):
            kinds[node] = _BATCHED
        else:
            kinds[node] = _CONTAINER
    return kinds


def _is_batch_size(node: fx.Node, batch: int) -> bool:
    """True when the node's value is the batch size itself (``x.size(0)``, ``x.shape[0]``)."""
    meta, probe = node.meta.get(META_KEY), node.meta.get(_PROBE_KEY)
    return (
        isinstance(meta, NonTensorMeta)
        and isinstance(probe, NonTensorMeta)
        and meta.type_name == "int"
        and meta.value == batch
        and probe.value == batch + 1
    )


def _retarget_batch_sizes(gm: fx.GraphModule, kinds: dict[fx.Node, str], batch: int) -> None:
    """Make every use of the batch size read it from a batched input of the user itself.

    ``b = x.size(0)`` at the top of ``forward`` and ``y.view(b, -1)`` layers later would
    otherwise keep ``x`` alive across every cut in between; ``y.size(0)`` is the same value
    (dimension 0 of every batched tensor is the batch), computed where it is needed.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op not in ("call_method", "call_function") or not _is_batch_size(node, batch):
            continue
        if not _cheap_target(node):
            continue
        source = _size_source(node, kinds)
        for user in list(node.users):
            local = [m for m in user.all_input_nodes if kinds.get(m) == _BATCHED]
            if not local or source in local or user.op == "output":
                continue
            with graph.inserting_before(user):
                size = graph.call_method("size", (local[0], 0))
            size.meta = {
                META_KEY: NonTensorMeta("int", batch),
                _PROBE_KEY: NonTensorMeta("int", batch + 1),
            }
            kinds[size] = _OTHER
            user.replace_input_with(node, size)
        _erase_dead_chain(graph, node)


def _size_source(node: fx.Node, kinds: dict[fx.Node, str]) -> fx.Node | None:
    """The batched tensor a size/shape/getitem chain reads from (None if there is none)."""
    current: fx.Node | None = node
    while current is not None and kinds.get(current) != _BATCHED:
        inputs = current.all_input_nodes
        current = inputs[0] if inputs else None
    return current


def _erase_dead_chain(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` if unused, then its cheap inputs that became unused."""
    pending = [node]
    while pending:
        current = pending.pop()
        if current.users or current.op not in ("call_method", "call_function"):
            continue
        if not _cheap_target(current):
            continue
        inputs = current.all_input_nodes
        graph.erase_node(current)
        pending.extend(inputs)


def _has_tensor(meta: ValueMeta | None) -> bool:
    return meta is not None and any(True for _ in iter_tensor_metas(meta))


def _is_cheap(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op in ("call_method", "call_function"):
        return _cheap_target(node)
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _CHEAP_MODULES)
    return False


def _group(
    gm: fx.GraphModule, kinds: dict[fx.Node, str]
) -> tuple[dict[fx.Node, int], list[fx.Node]]:
    """Steps 1-2 of [Note: layer grouping]: layer of every node, and each layer's anchor."""
    layer_of: dict[fx.Node, int] = {}
    lower: dict[fx.Node, int] = {}
    anchors: list[fx.Node] = []
    deferred: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            layer_of[node] = -1
            continue
        if node.op == "output":
            continue
        low = max((layer_of.get(m, lower.get(m, -1)) for m in node.all_input_nodes), default=-1)
        lower[node] = low
        kind = kinds[node]
        if kind != _OTHER and not _is_cheap(gm, node):
            layer_of[node] = len(anchors)
            anchors.append(node)
        elif low >= 0 and (
            kind != _OTHER or any(kinds[m] == _CONTAINER for m in node.all_input_nodes)
        ):
            layer_of[node] = low  # cheap op on a batched value: stays with its producer
        else:
            deferred.append(node)
    if not anchors:
        raise TraceError(
            "the model does no work on batch-dimensioned tensors (no layer found); "
            "check that the example inputs have the batch in dimension 0"
        )
    last = len(anchors) - 1
    for node in reversed(deferred):
        users = [last if u.op == "output" else layer_of[u] for u in node.users]
        layer_of[node] = max(min(users, default=max(lower[node], 0)), lower[node], 0)
    return layer_of, anchors


def _duplicate_shared(
    gm: fx.GraphModule,
    kinds: dict[fx.Node, str],
    layer_of: dict[fx.Node, int],
    anchors: list[fx.Node],
    num_layers: int,
) -> None:
    """Step 3 of [Note: layer grouping]: copy non-batched cheap values into each user layer."""
    graph = gm.graph
    anchor_set = set(anchors)
    for node in reversed(list(graph.nodes)):
        if node.op in ("placeholder", "output") or kinds[node] == _BATCHED or node in anchor_set:
            continue
        if _is_impure(gm, node):
            continue
        home = layer_of[node]
        by_layer: dict[int, list[fx.Node]] = {}
        for user in node.users:
            layer = num_layers - 1 if user.op == "output" else layer_of[user]
            if layer != home:
                by_layer.setdefault(layer, []).append(user)
        if not by_layer:
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        for layer, users in sorted(by_layer.items()):
            first = min(users, key=order.__getitem__)
            with graph.inserting_before(first):
                copy = graph.node_copy(node)
            copy.meta = dict(node.meta)
            kinds[copy] = kinds[node]
            layer_of[copy] = layer
            for user in users:
                user.replace_input_with(node, copy)


_RANDOM_PREFIXES = ("rand", "normal", "bernoulli", "multinomial", "poisson")


def _is_impure(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Random, stateful or in-place nodes must run once: never duplicate them."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        stateful = any(True for _ in mod.buffers())  # e.g. BatchNorm running statistics
        return stateful or isinstance(mod, nn.modules.dropout._DropoutNd)
    if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
        return True
    name = _target_name(node.target).lstrip("_")
    in_place = name.endswith("_") and not name.endswith("__")
    return in_place or "dropout" in name or name.startswith(_RANDOM_PREFIXES)


def _target_name(target: Any) -> str:
    """A function's name; an aten operator's without the overload (``addmm``)."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target.overloadpacket.__name__)
    return str(getattr(target, "__name__", target))


def _merge_crossings(
    gm: fx.GraphModule,
    kinds: dict[fx.Node, str],
    layer_of: dict[fx.Node, int],
    anchors: list[fx.Node],
) -> tuple[dict[fx.Node, int], list[fx.Node]]:
    """Step 4 of [Note: layer grouping]: merge layers a non-batched value would cross."""
    num_layers = len(anchors)
    joined = [False] * num_layers  # joined[j]: layer j merges into layer j - 1
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or kinds[node] == _BATCHED:
            continue
        home = layer_of[node]
        far = max(
            (num_layers - 1 if u.op == "output" else layer_of[u] for u in node.users),
            default=home,
        )
        if far > home:
            log.warning(
                "non-batched value %s (%s) is used %d layer(s) later; merging layers %d..%d",
                node.name,
                node.format_node(),
                far - home,
                home,
                far,
            )
            for j in range(home + 1, far + 1):
                joined[j] = True
    return _join(layer_of, anchors, joined)


def _join(
    layer_of: dict[fx.Node, int], anchors: list[fx.Node], joined: list[bool]
) -> tuple[dict[fx.Node, int], list[fx.Node]]:
    """Merge every layer j with ``joined[j]`` into layer j - 1; renumber the layers."""
    if not any(joined):
        return layer_of, anchors
    new_index: list[int] = []
    for j in range(len(anchors)):
        new_index.append(new_index[-1] if joined[j] else (new_index[-1] + 1 if j else 0))
    merged = {n: (i if i < 0 else new_index[i]) for n, i in layer_of.items()}
    kept = [a for j, a in enumerate(anchors) if not joined[j]]
    return merged, kept


def _merge_leaves(
    gm: fx.GraphModule,
    layer_of: dict[fx.Node, int],
    anchors: list[fx.Node],
    leaf_classes: tuple[type[nn.Module], ...],
    leaf_names: frozenset[str],
) -> tuple[dict[fx.Node, int], list[fx.Node]]:
    """Captured graphs: the layers made by one call of a leaf module become one layer.

    torch.export has no opaque modules; a leaf is kept whole by never cutting inside it.
    A node belongs to the outermost leaf in its module stack.
    """
    leaves: tuple[type[nn.Module], ...] = (nn.MultiheadAttention, *leaf_classes)
    classes = {f"{c.__module__}.{c.__qualname__}" for c in leaves}
    spans: dict[str, list[int]] = {}
    for node, layer in layer_of.items():
        for path, cls in node.meta.get(_STACK_KEY, ()):
            if path.split("@")[0] in leaf_names or cls in classes:
                span = spans.setdefault(path, [layer, layer])
                span[0], span[1] = min(span[0], layer), max(span[1], layer)
                break
    joined = [False] * len(anchors)
    for first, last in spans.values():
        for j in range(max(first, 0) + 1, last + 1):
            joined[j] = True
    return _join(layer_of, anchors, joined)


def _sort_by_layer(graph: fx.Graph, layer_of: dict[fx.Node, int]) -> None:
    """Reorder the graph so that each layer's nodes are contiguous (stable within a layer).

    Layers never consume a later layer's values, so (layer, old position) is a topological
    order; placeholders (layer -1) stay first and the output last.
    """
    nodes = [n for n in graph.nodes if n.op != "output"]
    position = {n: i for i, n in enumerate(nodes)}
    output = _nodes(graph, "output")[0]
    for node in sorted(nodes, key=lambda n: (layer_of[n], position[n])):
        output.prepend(node)


# --------------------------------------------------------------------------- results


def _layer_members(gm: fx.GraphModule, layer_of: dict[fx.Node, int],
                   num_layers: int) -> list[list[fx.Node]]:
    """Each layer's nodes in graph order (placeholders and the output in none)."""
    members: list[list[fx.Node]] = [[] for _ in range(num_layers)]
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "output"):
            members[layer_of[node]].append(node)
    return members


def _tied_weights(gm: fx.GraphModule, layer_of: dict[fx.Node, int],
                  num_layers: int) -> tuple[TiedWeight, ...]:
    """The trained tensors that two or more layers use, under the first name a layer uses."""
    members = _layer_members(gm, layer_of, num_layers)
    named = dict(gm.named_parameters(remove_duplicate=False))
    users: dict[int, tuple[str, torch.Tensor, list[int]]] = {}
    for index, nodes in enumerate(members):
        for qual in _tensor_names_used(gm, nodes, named, {}):
            tensor = named.get(qual)
            if tensor is None or not tensor.requires_grad:
                continue
            _, _, layers = users.setdefault(id(tensor), (qual, tensor, []))
            if index not in layers:
                layers.append(index)
    return tuple(TiedWeight(qual, tuple(layers), tensor.numel() * tensor.element_size())
                 for qual, tensor, layers in users.values() if len(layers) > 1)


def _build_layers(
    gm: fx.GraphModule, layer_of: dict[fx.Node, int], anchors: list[fx.Node], batch: int
) -> list[Layer]:
    members = _layer_members(gm, layer_of, len(anchors))
    named = dict(gm.named_parameters(remove_duplicate=False))
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    owned: set[int] = set()  # ids of tensors whose bytes are counted already
    claimed: set[str] = set()  # qualified names owned by an earlier layer
    used_names: set[str] = set()
    layers = []
    for index, (anchor, nodes) in enumerate(zip(anchors, members)):
        name, op = _describe_anchor(gm, anchor)
        if name in used_names:
            name = f"{name}@{anchor.name}"
        used_names.add(name)
        param_names: list[str] = []
        param_bytes = buffer_bytes = 0
        for qual in _tensor_names_used(gm, nodes, named, buffers):
            tensor = named[qual] if qual in named else buffers.get(qual)
            if qual in claimed or tensor is None:
                continue
            claimed.add(qual)
            param_names.append(qual)
            if id(tensor) in owned:
                continue
            owned.add(id(tensor))
            size = tensor.numel() * tensor.element_size()
            if qual in named and tensor.requires_grad:
                param_bytes += size
            else:
                buffer_bytes += size
        outputs = {
            n
            for n in nodes
            if n.meta.get(BATCHED_KEY)
            and any(u.op == "output" or layer_of[u] != index for u in n.users)
        }
        saved = sum(int(n.meta.get(SAVED_KEY, 0)) for n in nodes)
        layers.append(
            Layer(
                index=index,
                name=name,
                op=op,
                node_names=tuple(n.name for n in nodes),
                param_names=tuple(param_names),
                param_bytes=param_bytes,
                buffer_bytes=buffer_bytes,
                output_bytes=sum(_per_sample(n, batch) for n in outputs),
                activation_bytes=saved // batch,
            )
        )
    return layers


def _tensor_names_used(
    gm: fx.GraphModule,
    nodes: list[fx.Node],
    named: dict[str, nn.Parameter],
    buffers: dict[str, torch.Tensor],
) -> list[str]:
    names: list[str] = []
    for node in nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            prefix = str(node.target)
            names += [f"{prefix}.{n}" for n, _ in mod.named_parameters(remove_duplicate=False)]
            names += [f"{prefix}.{n}" for n, _ in mod.named_buffers(remove_duplicate=False)]
        elif node.op == "get_attr" and (node.target in named or node.target in buffers):
            names.append(str(node.target))
    return list(dict.fromkeys(names))


def _describe_anchor(gm: fx.GraphModule, node: fx.Node) -> tuple[str, str]:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        cls = type(mod)
        builtin = cls.__module__.startswith("torch.nn.") and cls is not nn.MultiheadAttention
        return str(node.target), cls.__name__.lower() if builtin else cls.__name__
    if node.op == "call_method":
        return node.name, str(node.target)
    op = _target_name(node.target).strip("_")
    stack = node.meta.get(_STACK_KEY)
    if stack:  # captured graphs: the innermost module that made the node
        return str(stack[-1][0]), op
    return node.name, op


def _per_sample(node: fx.Node, batch: int) -> int:
    meta = node.meta.get(META_KEY)
    if meta is None:
        return 0
    return sum(
        t.nbytes // batch for t in iter_tensor_metas(meta) if t.shape and t.shape[0] == batch
    )


def _cut_nodes(
    graph: fx.Graph, node_layer: dict[str, int], num_layers: int, i: int
) -> list[fx.Node]:
    crossing = []
    for node in graph.nodes:
        if node.op == "output":
            continue
        home = -1 if node.op == "placeholder" else node_layer[node.name]
        if home > i:
            continue
        if any((num_layers if u.op == "output" else node_layer[u.name]) > i for u in node.users):
            crossing.append(node)
    return crossing


def _cut_names(graph: fx.Graph, node_layer: dict[str, int], num_layers: int, i: int) -> list[str]:
    return [n.name for n in _cut_nodes(graph, node_layer, num_layers, i)]


def _all_cut_bytes(
    graph: fx.Graph, node_layer: dict[str, int], num_layers: int, batch: int
) -> list[int]:
    """Per-sample bytes across every cut, in one pass over the graph.

    A value made in layer h and last used in layer q is live across cuts h .. q-1 (the
    output node counts as layer ``num_layers``, model inputs as layer -1).
    """
    delta = [0] * (num_layers + 1)
    for node in graph.nodes:
        if node.op == "output" or not node.users:
            continue
        home = -1 if node.op == "placeholder" else node_layer[node.name]
        last = max(num_layers if u.op == "output" else node_layer[u.name] for u in node.users)
        if last > home:
            size = _per_sample(node, batch)
            delta[max(home, 0)] += size
            delta[last] -= size
    cuts, running = [], 0
    for i in range(num_layers - 1):
        running += delta[i]
        cuts.append(running)
    return cuts


def _model_hash(gm: fx.GraphModule) -> str:
    h = hashlib.sha256(gm.code.encode())
    for qual, t in sorted(
        [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)],
        key=lambda kv: kv[0],
    ):
        h.update(f"\n{qual}:{tuple(t.shape)}:{t.dtype}".encode())
    return h.hexdigest()[:16]
