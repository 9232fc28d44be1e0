"""Parallel adapters (PAC): a trainable side network on tapped layers of a frozen, traced model.

Example::

    import asteroid_fx as afx
    model = build_model()
    pac = afx.parallel_adapters(model, (ids,), rank=8)      # taps every transformer block
    out = pac(ids)                                           # = model(ids) before training
    opt = torch.optim.SGD(pac.trainable_parameters(), lr=0.01)

[Note: parallel adapters]
The traced model (``asteroid_fx.trace``) is cut after every tapped layer ``t_1 < ... <
t_k`` with ``asteroid_fx.partition``: ``k`` frozen *segments* (the backbone) and the
*head* (everything after ``t_k``). Segment ``j`` returns the tensors crossing the cut
after ``t_j``, among them the tapped hidden state ``h_j``. Adapter ``j`` is
``g_j * up_j(relu(down_j(h_j)))`` (down: hidden -> rank, up: rank -> hidden, zero
initialised; gate ``g_j``: a scalar, 1 initially), and the side path is their sum
``s = sum_j adapter_j(h_j)``. The head runs on the last cut with ``h_k`` replaced by
``h_k + s``. So before training the model computes exactly what the original does, the
backbone gets no gradient (its parameters have ``requires_grad=False``), and the
trainable state is the adapters (and the head's own copy when ``train_head``).

Because the backbone is frozen, the side path needs only the taps and the head's
inputs: a *cache entry* (:meth:`AdapterModel.cache_entry`) holds ``h_1 .. h_{k-1}`` and
the head's inputs (``h_k`` among them), per sample along dimension 0; PAC computes the
backbone once per sample and trains on cache entries afterwards (docs/finetune.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from asteroid_fx.errors import AdapterError
from asteroid_fx.trace import LayerGraph
from runtime.adapter_model import Adapter, AdapterModel, cache_dtype_of

__all__ = ["Adapter", "AdapterModel", "block_taps", "resolve_taps", "parallel_adapters"]


def _module_names(model: nn.Module | None) -> set[str]:
    return set() if model is None else {name for name, _ in model.named_modules() if name}


def block_taps(graph: LayerGraph, model: nn.Module | None = None) -> list[int]:
    """The layer index of every repeated block's output: the last layer of each child of an
    ``nn.ModuleList`` / ``nn.Sequential`` of at least two modules of one class (the
    transformer blocks), extended over the unnamed layers of the same output shape that
    follow it (residual adds written in the parent's code).

    Without ``model`` the blocks are found from the layer names alone (``a.b.<i>.c``)."""
    names = _module_names(model)
    containers: list[str] = []
    if model is not None:
        for qual, module in model.named_modules():
            if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2 \
                    and len({type(child) for child in module}) == 1:
                containers.append(qual)
    blocks: dict[str, int] = {}      # block prefix -> last layer index naming it
    for layer in graph.layers:
        for container in containers or [""]:
            prefix = f"{container}." if container else ""
            match = _BLOCK_RE.match(layer.name[len(prefix):]) \
                if layer.name.startswith(prefix) else None
            if match is not None and (containers or "." in layer.name):
                blocks[prefix + match.group(1)] = layer.index
                break
    taps = []
    for last in blocks.values():
        shape = _layer_shape(graph, last)
        end = last
        while end + 1 < graph.num_layers:
            after = graph.layers[end + 1]
            if after.name in names or _BLOCK_RE.match(after.name) or after.param_names \
                    or any(after.name.startswith(b + ".") or after.name.startswith(b + "@")
                           for b in blocks) or _layer_shape(graph, end + 1) != shape:
                break
            end += 1
        taps.append(end)
    return _same_shape(graph, sorted(set(taps)))


def _same_shape(graph: LayerGraph, taps: list[int]) -> list[int]:
    """Move a tap whose output shape differs from the first block's (a block's last layer
    merged with a cheap op after it, e.g. BERT's final LayerNorm with ``x[:, 0]``) back to
    the latest earlier layer of that shape, so the side path can add them."""
    if not taps:
        return taps
    shape = _layer_shape(graph, taps[0])
    moved = []
    for tap in taps:
        index = tap
        while index > 0 and _layer_shape(graph, index) != shape:
            index -= 1
        moved.append(index)
    return sorted(set(moved))


_BLOCK_RE = re.compile(r"^(\d+)(?:[.@]|$)")


def _layer_shape(graph: LayerGraph, index: int) -> tuple[int, ...] | None:
    node = graph.layers[index].node_names[-1]
    for n in graph.graph_module.graph.nodes:
        if n.name == node:
            shape = getattr(_meta_of(n.meta.get("asteroid.tensor_meta")), "shape", None)
            return None if shape is None else tuple(int(d) for d in shape[1:])
    return None


def resolve_taps(graph: LayerGraph, model: nn.Module | None,
                 layers: Sequence[int | str] | None) -> list[int]:
    """Layer indices to tap: ``layers`` given as layer indices, layer names, or qualified
    names of modules (a module's tap is the output of its last layer, as for blocks);
    ``None`` taps every block (:func:`block_taps`).

    Raises:
        AdapterError: nothing to tap, an unknown name, or a tap at the model's last layer
            (nothing would be left for the head).
    """
    if layers is None:
        taps = block_taps(graph, model)
        if not taps:
            raise AdapterError(
                f"{graph.model_name or 'the model'} has no repeated blocks to tap (no "
                f"nn.ModuleList/nn.Sequential of two or more modules of one class among its "
                f"{graph.num_layers} layers); pass layers=[...] (layer indices or names from "
                f"`asteroid-fx trace`)")
    else:
        by_name = {layer.name: layer.index for layer in graph.layers}
        taps = []
        if isinstance(layers, (str, int)) or not isinstance(layers, Iterable):
            raise AdapterError(f"layers must be a list of layer indices or names (from "
                               f"`asteroid-fx trace`), got {layers!r}; for one layer pass "
                               f"[{layers!r}]")
        for item in layers:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise AdapterError(f"a tap layer is a layer index or a name, got {item!r}")
            if isinstance(item, int):
                if not 0 <= item < graph.num_layers:
                    raise AdapterError(f"tap layer {item} is out of range "
                                       f"0..{graph.num_layers - 1}")
                taps.append(item)
            elif item in by_name:
                taps.append(by_name[item])
            else:
                inside = [layer.index for layer in graph.layers
                          if layer.name.startswith(item + ".")]
                if not inside:
                    raise AdapterError(f"no layer or module named {item!r} to tap; see the "
                                       f"layer names of `asteroid-fx trace`")
                taps.append(max(inside))
        taps = sorted(set(taps))
        if not taps:
            raise AdapterError("layers=[] taps nothing; pass at least one layer, or "
                               "layers=None to tap every block")
    if taps[-1] >= graph.num_layers - 1:
        raise AdapterError(f"tap at layer {taps[-1]} ({graph.layers[taps[-1]].name}) is the "
                           f"model's last layer: nothing is left for the head; tap an "
                           f"earlier layer")
    return taps


def _inputs_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    from asteroid_fx.model_spec import model_inputs

    return model_inputs(example_inputs)


def parallel_adapters(model: nn.Module | LayerGraph, example_inputs: Any, *,
                      layers: Sequence[int | str] | None = None, rank: int = 8,
                      train_head: bool = False, leaf_modules: Sequence[Any] = (),
                      graph: LayerGraph | None = None,
                      cache_dtype: str | None = None) -> AdapterModel:
    """Attach parallel adapters of ``rank`` to the tapped layers of ``model``.

    Args:
        model: the model (traced here), or its :class:`LayerGraph`.
        example_inputs: model inputs with the batch in dimension 0 (as ``sample_batch``
            gives them: a tuple, a tensor or a mapping of keyword inputs).
        layers: what to tap (see :func:`resolve_taps`); default every block's output.
        rank: the adapters' bottleneck width (>= 1).
        train_head: also train (a copy of) the head; the backbone stays frozen.
        leaf_modules: passed to :func:`asteroid_fx.trace.trace`.
        graph: an existing trace of ``model``.
        cache_dtype: the dtype the activation cache keeps floating-point entries in
            (``"bfloat16"``, ``"float16"``, ``"float32"``; default: as the backbone makes
            them), see [Note: cache dtype] in ``runtime.adapter_model``.

    Returns:
        An :class:`AdapterModel` whose output equals ``model``'s until it is trained; the
        adapters' random parts draw from torch's global generator (seed before calling).

    Raises:
        AdapterError: ``rank < 1``, nothing to tap, a tapped tensor whose shape differs
            from the head input it is added to, or an unknown ``cache_dtype``.
    """
    from asteroid_fx.partition import partition, stage_info
    from contracts.plan import Plan, Stage

    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"adapter rank must be an integer >= 1, got {rank!r}; try rank=8")
    cached = cache_dtype_of(cache_dtype)
    module = None if isinstance(model, LayerGraph) else model
    if isinstance(model, LayerGraph):
        graph = model
    if graph is not None:
        from asteroid_fx.trace import check_graph

        graph = check_graph(graph)
    else:
        from asteroid_fx.trace import leaf_tuple, trace

        traced = example_inputs if isinstance(example_inputs, Mapping) else \
            _inputs_tuple(example_inputs)
        graph = trace(model, traced, leaf_modules=leaf_tuple(leaf_modules))  # type: ignore[arg-type]
    taps = resolve_taps(graph, module, layers)
    inputs = _inputs_tuple(example_inputs)
    batch = int(inputs[0].shape[0])
    bounds = [*taps, graph.num_layers - 1]
    stages, first = [], 0
    for index, last in enumerate(bounds):
        stages.append(Stage(layers=(first, last), devices=(f"segment{index}",), shares=(batch,)))
        first = last + 1
    plan = Plan(model_hash=graph.model_hash, cluster_hash="", batch_size=batch,
                micro_batch_size=batch, num_micro_batches=1, stages=tuple(stages),
                num_layers=graph.num_layers, model_name=graph.model_name)
    parts = partition(module if module is not None else graph.graph_module, inputs, plan,
                      graph=graph)
    meta = graph.graph_module.graph
    shapes = {n.name: n.meta.get("asteroid.tensor_meta") for n in meta.nodes}
    positions, tap_shapes = [], []
    for index, tap in enumerate(taps):
        outputs = stage_info(parts[index]).outputs
        layer = graph.layers[tap]
        hit = [n for n in reversed(layer.node_names) if n in outputs]
        if not hit:
            raise AdapterError(f"the output of tapped layer {tap} ({layer.name}) does not "
                               f"reach the next layers, so it cannot feed an adapter; tap "
                               f"another layer")
        positions.append(outputs.index(hit[0]))
        tap_shapes.append(_per_sample_shape(shapes.get(hit[0]), layer.name))
    head_inputs = stage_info(parts[-1]).inputs
    last_out = stage_info(parts[len(taps) - 1]).outputs[positions[-1]]
    head_position = head_inputs.index(last_out)
    if any(shape != tap_shapes[-1] for shape in tap_shapes):
        raise AdapterError(f"tapped tensors have different per-sample shapes {tap_shapes}; "
                           f"the side path adds them, so tap layers of one shape")
    hidden = tap_shapes[-1][-1]
    adapters = [Adapter(hidden, rank) for _ in taps]
    result = AdapterModel(parts[:-1], parts[-1], adapters, positions, head_position, taps,
                          tap_shapes, train_head=train_head)
    # the cache entry's tensors (AdapterModel.cache_entry), as made and as cached
    entry = [*(stage_info(parts[i]).outputs[positions[i]] for i in range(len(taps) - 1)),
             *head_inputs]
    result.entry_sizes = tuple(_sample_bytes(shapes.get(name), cached) for name in entry)
    result.cache_dtype = cached
    result.made_entry_bytes = sum(_sample_bytes(shapes.get(name)) for name in entry)
    result.segment_plan = plan
    return result


def _meta_of(meta: Any) -> Any:
    return meta[0] if isinstance(meta, (tuple, list)) and meta else meta


def _per_sample_shape(meta: Any, name: str) -> tuple[int, ...]:
    meta = _meta_of(meta)
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) < 2:
        raise AdapterError(f"tapped layer {name} does not give a (batch, ..., hidden) "
                           f"tensor (shape {shape}); tap a layer with a feature dimension")
    return tuple(int(d) for d in shape[1:])


def _sample_bytes(meta: Any, cache_dtype: torch.dtype | None = None) -> int:
    """Bytes of one sample of the traced tensor ``meta`` as the cache keeps it."""
    meta = _meta_of(meta)
    shape = getattr(meta, "shape", None)
    dtype = getattr(meta, "dtype", torch.float32)
    if cache_dtype is not None and dtype.is_floating_point:
        dtype = cache_dtype
    if shape is None:
        return 0
    count = 1
    for d in shape[1:]:
        count *= int(d)
    return count * torch.empty((), dtype=dtype).element_size()
