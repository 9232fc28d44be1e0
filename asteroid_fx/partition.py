"""Split a traced model into per-stage ``torch.fx.GraphModule``s along a plan's layer ranges.

Example::

    import asteroid_fx as afx
    stages = afx.partition(model, (x,), plan)      # one GraphModule per plan stage
    out = (x,)
    for stage in stages:
        out = stage(*out) if isinstance(out, tuple) else stage(out)
    # ``out`` equals ``model(x)``; ``out.backward()`` gives the unsplit parameter gradients

[Note: stage calling convention]
Stage ``i`` takes, positionally, the tensors crossing the cut before it (stage 0: the model
inputs) and returns a tuple of the tensors crossing the cut after it, in graph order; a
tensor that skips over several stages is passed through the stages in between. The last
stage returns the model output unchanged (a tensor, tuple or dict, as the model does).
Parameters and buffers keep their original qualified names and live only in the stages
that use them; every stage is an independent copy (no storage shared with ``model``).

[Note: in-place ops at a cut]
A stage never mutates its inputs: when an in-place op (``relu_``, ``inplace=True`` modules
or functions, ``operator.setitem`` ...) writes into a stage input or a view of one, the
stage clones that input first and uses the clone everywhere (pass-through included), so the
values seen downstream are exactly those of the unsplit model and a runtime may feed the
stage leaf tensors that require grad. Detection is by name (trailing ``_``), by the
``inplace`` flag, and by the ``operator.i*`` / ``setitem`` targets; an in-place op hidden
inside a custom leaf module is not detected.

[Note: tied parameters]
A parameter used by several stages (the same name reached from two stages, or one tensor
under two names as in tied embeddings) is copied into every stage that uses it.
:func:`tied_parameters` lists them so that a runtime sums their gradients across the
holding stages (and keeps the copies equal); without that the copies drift apart.
"""

from __future__ import annotations

import copy
import inspect
import logging
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from asteroid_fx.modes import ModeStage, eval_stage_layers, graph_targets
from contracts.errors import PartitionError
from contracts.plan import Plan
from runtime.stage_io import STAGE_META_KEY

if TYPE_CHECKING:  # pragma: no cover
    from asteroid_fx.trace import LayerGraph

__all__ = [
    "STAGE_META_KEY",
    "StageInfo",
    "partition",
    "stage_info",
    "stage_io_names",
    "tied_parameters",
]

log = logging.getLogger(__name__)

_TENSOR_META_KEY = "asteroid.tensor_meta"  # written by asteroid_fx.shape_prop

_INPLACE_FUNCTIONS: frozenset[Any] = frozenset({
    operator.iadd, operator.iand, operator.ifloordiv, operator.ilshift, operator.imod,
    operator.imul, operator.imatmul, operator.ior, operator.ipow, operator.irshift,
    operator.isub, operator.itruediv, operator.ixor, operator.setitem,
})
_VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose",
    "permute", "t", "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select",
    "unbind", "split", "chunk", "contiguous", "detach", "movedim", "diagonal", "as_strided",
    "__getitem__", "swapaxes", "swapdims", "unfold",
})
_VIEW_FUNCTIONS: frozenset[Any] = frozenset({
    operator.getitem, getattr, torch.flatten, torch.reshape, torch.transpose, torch.permute,
    torch.squeeze, torch.unsqueeze, torch.narrow, torch.select, torch.t, torch.split,
    torch.chunk, torch.unbind, torch.movedim, torch.detach, torch.diagonal, torch.swapaxes,
})
_VIEW_MODULES = (torch.nn.Flatten, torch.nn.Unflatten, torch.nn.Identity)


@dataclass(frozen=True)
class StageInfo:
    """Names at the boundary of one stage, as written into ``partition.json``.

    ``inputs``/``outputs`` are node names of the original traced graph, in the order the
    stage takes/returns them (the last stage's outputs are the tensors of the model output,
    flattened); ``eval_inputs``/``eval_outputs`` are those of the eval mode when they differ
    (names of the eval graph, see [Note: train and eval mode] in ``asteroid_fx.modes``).
    ``tied`` maps a local parameter name to the canonical name of its tie group.
    """

    index: int
    layers: tuple[int, int]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: tuple[str, ...]
    buffers: tuple[str, ...]
    cloned_inputs: tuple[str, ...] = ()
    tied: Mapping[str, str] | None = None
    eval_inputs: tuple[str, ...] | None = None   # None: the same as in train mode
    eval_outputs: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "index": self.index, "layers": list(self.layers), "inputs": list(self.inputs),
            "outputs": list(self.outputs), "params": list(self.params),
            "buffers": list(self.buffers), "cloned_inputs": list(self.cloned_inputs),
            "tied": dict(self.tied or {}),
        }
        if self.eval_inputs is not None:
            data["eval_inputs"] = list(self.eval_inputs)
        if self.eval_outputs is not None:
            data["eval_outputs"] = list(self.eval_outputs)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageInfo:
        layers = tuple(int(v) for v in data["layers"])
        return cls(
            index=int(data["index"]), layers=(layers[0], layers[1]),
            inputs=tuple(data["inputs"]), outputs=tuple(data["outputs"]),
            params=tuple(data["params"]), buffers=tuple(data["buffers"]),
            cloned_inputs=tuple(data.get("cloned_inputs", ())),
            tied=dict(data.get("tied", {})),
            eval_inputs=_names_or_none(data.get("eval_inputs")),
            eval_outputs=_names_or_none(data.get("eval_outputs")),
        )


def _names_or_none(value: Any) -> tuple[str, ...] | None:
    return None if value is None else tuple(str(v) for v in value)


# -- public API -----------------------------------------------------------------------------
def partition(
    model: torch.nn.Module,
    example_inputs: tuple[Any, ...] | torch.Tensor | Mapping[str, torch.Tensor],
    plan: Plan,
    *,
    leaf_modules: Sequence[type[torch.nn.Module] | str] = (),
    graph: LayerGraph | None = None,
    check_batch_dim: bool = True,
) -> list[fx.GraphModule]:
    """Split ``model`` into one ``GraphModule`` per stage of ``plan``.

    Args:
        model: the model (used only when ``graph`` is not given, to trace it).
        example_inputs: the model inputs (batch dimension 0): a tuple of tensors, or a
            mapping of keyword inputs (stage 0 then takes them in the mapping's order, see
            [Note: named inputs] in ``asteroid_fx/trace.py``); used to check that only
            tensors with a batch dimension cross a cut.
        plan: the plan; ``plan.stages[i].layers`` are layer indices of the layer graph.
        leaf_modules: passed to :func:`asteroid_fx.trace.trace` when tracing here.
        graph: an existing :class:`LayerGraph` of ``model`` (skips tracing).
        check_batch_dim: reject cut tensors whose dimension 0 is not the batch size (a
            runtime splits every cut tensor by sample ranges along dimension 0).

    Returns:
        The stages, following [Note: stage calling convention]; each carries its
        :class:`StageInfo` in ``stage.meta[STAGE_META_KEY]``. A stage runs what the model
        runs in its train/eval mode: when the model's code decides on ``self.training``,
        a stage whose two modes differ is a :class:`~asteroid_fx.modes.ModeStage` (see
        [Note: train and eval mode] in ``asteroid_fx.modes``).

    Raises:
        PartitionError: the plan does not match the graph, or a non-tensor value (or a
            tensor without the batch dimension) would cross a cut.
    """
    from asteroid_fx.trace import check_graph, leaf_tuple, trace
    from contracts.arguments import check_plan
    from contracts.inputs import model_inputs

    check_plan(plan)
    if graph is None:
        traced: Any = example_inputs if isinstance(example_inputs, Mapping) else \
            model_inputs(example_inputs)
        graph = trace(model, traced, leaf_modules=leaf_tuple(leaf_modules))
    graph = check_graph(graph)
    inputs = model_inputs(example_inputs)
    stages = _Partitioner(graph, plan, inputs, check_batch_dim).run()
    if graph.eval_graph is not None:
        stages = _join_eval_mode(stages, graph, plan, inputs, check_batch_dim)
    return stages


def stage_info(stage: torch.nn.Module) -> StageInfo:
    """The :class:`StageInfo` recorded in a stage made by :func:`partition`."""
    meta = getattr(stage, "meta", None)
    data = meta.get(STAGE_META_KEY) if isinstance(meta, dict) else None
    if data is None:
        raise PartitionError(f"{type(stage).__name__} carries no stage information; "
                             f"make stages with asteroid_fx.partition(...)")
    return StageInfo.from_dict(data)


def stage_io_names(stages: Sequence[torch.nn.Module]) -> list[tuple[tuple[str, ...],
                                                                     tuple[str, ...]]]:
    """``(input names, output names)`` of every stage, in stage order."""
    return [(info.inputs, info.outputs) for info in map(stage_info, stages)]


def tied_parameters(stages: Sequence[torch.nn.Module]) -> dict[str, tuple[tuple[int, str], ...]]:
    """Parameters held by more than one stage: canonical name -> ``((stage, local name), ...)``.

    The canonical name is the parameter's first qualified name in the original model.
    A runtime must sum the gradients of all holders (e.g. an all-reduce between the holding
    stages) before the optimizer step so that every copy gets the unsplit gradient.
    """
    if isinstance(stages, torch.nn.Module) or not isinstance(stages, Sequence):
        raise PartitionError(f"tied_parameters takes the list of stages of afx.partition, got "
                             f"{type(stages).__name__}")
    groups: dict[str, list[tuple[int, str]]] = {}
    for position, stage in enumerate(stages):
        info = stage_info(stage)
        index = info.index if info.index >= 0 else position
        for local, canonical in (info.tied or {}).items():
            groups.setdefault(canonical, []).append((index, local))
    return {name: tuple(holders) for name, holders in groups.items()
            if len({s for s, _ in holders}) > 1}


# -- implementation ---------------------------------------------------------------------------
class _Partitioner:
    """One partitioning job: node -> stage map, cut sets, per-stage graph surgery."""

    def __init__(self, graph: LayerGraph, plan: Plan, inputs: tuple[Any, ...],
                 check_batch_dim: bool) -> None:
        self.lg = graph
        self.gm = graph.graph_module
        self.plan = plan
        self.inputs = inputs
        self.check_batch_dim = check_batch_dim
        self.num_stages = plan.num_stages
        self.nodes = list(self.gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        outputs = [n for n in self.nodes if n.op == "output"]
        if len(outputs) != 1:
            raise PartitionError(f"the traced graph has {len(outputs)} output nodes, expected 1")
        self.output = outputs[0]

    # stage assignment ---------------------------------------------------------------------
    def _check_plan(self) -> list[int]:
        num_layers = len(self.lg.layers)
        if self.plan.num_layers and self.plan.num_layers != num_layers:
            raise PartitionError(
                f"the plan is for a model of {self.plan.num_layers} layers but "
                f"{self.lg.model_name or 'this model'} traces to {num_layers} layers; re-plan "
                f"with costs of this model (same leaf_modules)")
        last = self.plan.stages[-1].last
        if last != num_layers - 1:
            raise PartitionError(
                f"the plan's stages cover layers 0..{last} but the model has {num_layers} "
                f"layers (0..{num_layers - 1}); re-plan with costs of this model")
        if (self.plan.model_hash and self.lg.model_hash
                and self.plan.model_hash != self.lg.model_hash):
            log.warning("plan model_hash %s differs from the traced model's %s; the layer "
                        "counts agree, partitioning anyway", self.plan.model_hash,
                        self.lg.model_hash)
        layer_stage = [0] * num_layers
        for s, stage in enumerate(self.plan.stages):
            for layer in range(stage.first, stage.last + 1):
                layer_stage[layer] = s
        return layer_stage

    def _assign(self) -> dict[fx.Node, int]:
        layer_stage = self._check_plan()
        node_layer = self.lg.node_to_layer()
        stage_of: dict[fx.Node, int] = {}
        for node in self.nodes:
            if node.op == "placeholder":
                stage_of[node] = 0
            elif node.op == "output":
                stage_of[node] = self.num_stages - 1
            elif node.op == "get_attr":
                continue  # free: recreated in every stage that reads it
            elif node.name in node_layer:
                stage_of[node] = layer_stage[node_layer[node.name]]
            else:
                raise PartitionError(f"graph node {node.format_node()} belongs to no layer of "
                                     f"the layer graph; re-trace the model")
        return stage_of

    # cuts ------------------------------------------------------------------------------------
    def _cuts(self, stage_of: dict[fx.Node, int]) -> list[list[fx.Node]]:
        crossing: list[set[fx.Node]] = [set() for _ in range(self.num_stages - 1)]
        for node, s_def in stage_of.items():
            if node.op == "output":
                continue
            for user in node.users:
                s_use = stage_of.get(user)
                if s_use is None:
                    continue
                if s_use < s_def:
                    raise PartitionError(
                        f"node {node.name!r} (stage {s_def}) is used by {user.name!r} in an "
                        f"earlier stage {s_use}; the layer order is not topological, re-trace")
                for cut in range(s_def, s_use):
                    crossing[cut].add(node)
        return [sorted(c, key=self.order.__getitem__) for c in crossing]

    def _check_cut_values(self, cuts: list[list[fx.Node]], stage_of: dict[fx.Node, int]) -> None:
        needed = {n for cut in cuts for n in cut}
        if not needed:
            return
        metas = {n: n.meta.get(_TENSOR_META_KEY) for n in needed}
        values: dict[fx.Node, Any]
        if all(m is not None for m in metas.values()):
            values = {n: _MetaValue.from_meta(m) for n, m in metas.items()}
            batch = getattr(self.lg, "example_batch", 0)
        else:
            values = _run_collect(self.gm, self.inputs, needed)
            batch = _batch_of(self.inputs)
        for cut, nodes in enumerate(cuts):
            for node in nodes:
                value = values[node]
                problem = _cut_problem(value, batch if self.check_batch_dim else 0)
                if problem is None:
                    continue
                users = sorted({u.name for u in node.users
                                if stage_of.get(u, -1) > cut}, key=str)
                raise PartitionError(
                    f"{problem} would cross the cut between stage {cut} and stage {cut + 1}: "
                    f"node {node.name!r} ({node.format_node()}) made in stage "
                    f"{stage_of[node]}{self._layer_text(node)} is used by {users}. Only "
                    f"tensors with the batch dimension may cross a cut: move the cut (choose "
                    f"different stage boundaries), or compute the value inside the stage "
                    f"that uses it (e.g. from a tensor's shape there), or make the code that "
                    f"produces it a leaf module (leaf_modules=[...])")

    def _layer_text(self, node: fx.Node) -> str:
        index = self.lg.node_to_layer().get(node.name)
        if index is None:
            return ""
        return f" (layer {index} {self.lg.layers[index].name!r})"

    # surgery -----------------------------------------------------------------------------
    def run(self) -> list[fx.GraphModule]:
        stage_of = self._assign()
        cuts = self._cuts(stage_of)
        self._check_cut_values(cuts, stage_of)
        canonical = _canonical_param_names(self.gm)
        stages: list[fx.GraphModule] = []
        for s in range(self.num_stages):
            inputs = self.placeholders if s == 0 else cuts[s - 1]
            outputs = cuts[s] if s < self.num_stages - 1 else None
            body = [n for n in self.nodes if stage_of.get(n) == s and n.op not in
                    ("placeholder", "output")]
            stages.append(self._build(s, inputs, body, outputs, canonical))
        self._keep_cross_stage_ties(stages)
        return stages

    def _build(self, s: int, inputs: list[fx.Node], body: list[fx.Node],
               outputs: list[fx.Node] | None,
               canonical: Mapping[str, str]) -> fx.GraphModule:
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        free: dict[str, fx.Node] = {}

        def lookup(node: fx.Node) -> fx.Node:
            if node.op == "get_attr":
                target = str(node.target)
                if target not in free:
                    free[target] = graph.get_attr(target)
                    free[target].meta = dict(node.meta)
                return free[target]
            if node not in env:
                raise PartitionError(f"stage {s} needs {node.name!r}, which neither crosses "
                                     f"its input cut nor is computed in it (internal error)")
            return env[node]

        for node in inputs:
            if node.op == "placeholder":
                env[node] = graph.node_copy(node)
            else:
                env[node] = graph.placeholder(node.name)
            env[node].meta = dict(node.meta)
        mutated = _mutated_inputs(self.gm, body, set(inputs))
        for node in inputs:
            if node in mutated:
                clone = graph.call_method("clone", (env[node],))
                clone.meta = dict(node.meta)
                env[node] = clone
        if mutated:
            log.info("stage %d clones inputs %s before in-place ops on them", s,
                     [n.name for n in mutated])
        for node in body:
            env[node] = graph.node_copy(node, lookup)
        if outputs is not None:
            graph.output(tuple(lookup(n) for n in outputs))
            out_names = tuple(n.name for n in outputs)
        else:
            graph.output(fx.map_arg(self.output.args[0], lookup))
            out_names = tuple(_node_names(self.output.args[0]))
        for node in graph.nodes:
            if isinstance(node.type, str):  # annotations under `from __future__ import
                node.type = None  # annotations` are strings, which GraphModule cannot pickle
        graph.lint()
        shell = fx.GraphModule(self.gm, graph, class_name=f"Stage{s}")
        stage = copy.deepcopy(shell)
        params = tuple(name for name, _ in stage.named_parameters(remove_duplicate=False))
        buffers = tuple(name for name, _ in stage.named_buffers(remove_duplicate=False))
        info = StageInfo(
            index=s, layers=self.plan.stages[s].layers,
            inputs=tuple(n.name for n in inputs), outputs=out_names, params=params,
            buffers=buffers, cloned_inputs=tuple(n.name for n in inputs if n in mutated),
            tied={name: canonical.get(name, name) for name, _ in stage.named_parameters()},
        )
        stage.meta[STAGE_META_KEY] = info.to_dict()
        return stage

    @staticmethod
    def _keep_cross_stage_ties(stages: list[fx.GraphModule]) -> None:
        """Reduce every stage's ``tied`` map to the groups held by more than one stage."""
        holders: dict[str, set[int]] = {}
        for s, stage in enumerate(stages):
            for canonical in stage.meta[STAGE_META_KEY]["tied"].values():
                holders.setdefault(canonical, set()).add(s)
        for stage in stages:
            meta = stage.meta[STAGE_META_KEY]
            meta["tied"] = {local: canonical for local, canonical in meta["tied"].items()
                            if len(holders[canonical]) > 1}
            if meta["tied"]:
                log.info("stage %d holds tied parameters %s", meta["index"],
                         sorted(meta["tied"]))


def _join_eval_mode(train: list[fx.GraphModule], graph: LayerGraph, plan: Plan,
                    inputs: tuple[Any, ...], check_batch_dim: bool) -> list[fx.GraphModule]:
    """Split the eval graph along ``plan`` and join each train stage with its eval stage.

    See [Note: train and eval mode] in ``asteroid_fx.modes``.
    """
    evals = graph.eval_graph
    if evals is None:  # pragma: no cover - the caller checks
        return train
    layer_stage = [s for s, stage in enumerate(plan.stages)
                   for _ in range(stage.first, stage.last + 1)]
    ranges = eval_stage_layers(graph, layer_stage)
    kept = [s for s, (start, stop) in enumerate(ranges) if stop > start]
    eval_plan = replace(
        plan, model_hash=evals.model_hash, num_layers=evals.num_layers, predicted=None,
        replicas={}, stages=tuple(replace(plan.stages[s], layers=(ranges[s][0],
                                                                  ranges[s][1] - 1))
                                  for s in kept))
    made = _Partitioner(evals, eval_plan, inputs, check_batch_dim).run()
    by_stage = dict(zip(kept, made, strict=True))
    names = [n.name for n in evals.graph_module.graph.nodes if n.op == "placeholder"]
    canonical = {**_canonical_param_names(evals.graph_module),
                 **_canonical_param_names(graph.graph_module)}
    joined: list[fx.GraphModule] = []
    for s, stage in enumerate(train):
        other = by_stage.get(s)
        if other is None:
            other = _pass_through(names, s)
        else:
            names = list(stage_info(other).outputs)
        joined.append(_join(stage, other, canonical))
    _Partitioner._keep_cross_stage_ties(joined)
    return joined


def _pass_through(names: Sequence[str], index: int) -> fx.GraphModule:
    """A stage that returns its inputs (a stage that runs no eval layer)."""
    graph = fx.Graph()
    graph.output(tuple(graph.placeholder(name) for name in names))
    stage = fx.GraphModule(torch.nn.Module(), graph, class_name=f"Stage{index}")
    info = StageInfo(index=index, layers=(0, 0), inputs=tuple(names), outputs=tuple(names),
                     params=(), buffers=())
    stage.meta[STAGE_META_KEY] = info.to_dict()
    return stage


def _join(train: fx.GraphModule, evals: fx.GraphModule,
          canonical: Mapping[str, str]) -> fx.GraphModule:
    """One stage of both modes: ``train`` itself when both run the same code."""
    info = stage_info(train)
    other = stage_info(evals)
    same_io = (info.inputs, info.outputs) == (other.inputs, other.outputs)
    if same_io and train.code == evals.code:
        stage = train
    else:
        root = {t: _attr(train, t) for t in graph_targets(train.graph)}
        for target in graph_targets(evals.graph):
            root.setdefault(target, _attr(train, target) if _has_attr(train, target)
                            else _attr(evals, target))
        stage = ModeStage(root, copy.deepcopy(train.graph), copy.deepcopy(evals.graph),
                          class_name=type(train).__name__)
        for name, module in stage.named_modules():   # the flags the train stage had
            if _has_attr(train, name):
                module.training = _attr(train, name).training
    stage.meta[STAGE_META_KEY] = replace(
        info,
        params=tuple(name for name, _ in stage.named_parameters(remove_duplicate=False)),
        buffers=tuple(name for name, _ in stage.named_buffers(remove_duplicate=False)),
        tied={name: canonical.get(name, name) for name, _ in stage.named_parameters()},
        eval_inputs=None if other.inputs == info.inputs else other.inputs,
        eval_outputs=None if other.outputs == info.outputs else other.outputs,
    ).to_dict()
    return stage


def _attr(root: torch.nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split(".") if target else ():
        value = getattr(value, part)
    return value


def _has_attr(root: torch.nn.Module, target: str) -> bool:
    try:
        _attr(root, target)
    except AttributeError:
        return False
    return True


@dataclass(frozen=True)
class _MetaValue:
    """What the cut check needs to know of a value: tensor shape, or the type name."""

    is_tensor: bool
    shape: tuple[int, ...]
    type_name: str

    @classmethod
    def from_meta(cls, meta: Any) -> _MetaValue:
        shape = getattr(meta, "shape", None)
        if shape is not None and hasattr(meta, "dtype"):
            return cls(True, tuple(int(d) for d in shape), "Tensor")
        name = getattr(meta, "type_name", None) or type(meta).__name__
        return cls(False, (), str(name))


def _cut_problem(value: Any, batch: int) -> str | None:
    if isinstance(value, torch.Tensor):
        value = _MetaValue(True, tuple(value.shape), "Tensor")
    elif not isinstance(value, _MetaValue):
        value = _MetaValue(False, (), type(value).__name__)
    if not value.is_tensor:
        return f"a non-tensor value (a {value.type_name})"
    if batch > 1 and (not value.shape or value.shape[0] != batch):
        return (f"a tensor of shape {list(value.shape)} without the batch dimension "
                f"(batch size {batch} expected as dimension 0)")
    return None


def _node_names(arg: Any) -> list[str]:
    """Names of the nodes inside a (nested) output argument, in flattening order (the
    fields of a mapping built in the graph, such as a ``ModelOutput``, by field)."""
    names: list[str] = []

    def record(node: fx.Node) -> fx.Node:
        target = node.target
        if node.op == "call_function" and isinstance(target, type) and issubclass(
                target, Mapping):
            fx.map_arg((node.args, node.kwargs), record)
        else:
            names.append(node.name)
        return node

    fx.map_arg(arg, record)
    return names


def _batch_of(inputs: Iterable[Any]) -> int:
    for value in inputs:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0


def _run_collect(gm: fx.GraphModule, inputs: tuple[Any, ...],
                 wanted: set[fx.Node]) -> dict[fx.Node, Any]:
    """Run ``gm`` once (eval mode, no grad, module modes restored) keeping ``wanted`` values."""
    values: dict[fx.Node, Any] = {}

    class _Collect(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if n in wanted:
                values[n] = result
            return result

    modes = {m: m.training for m in gm.modules()}
    try:
        gm.eval()
        with torch.no_grad():
            _Collect(gm).run(*inputs)
    except Exception as exc:
        raise PartitionError(f"running the traced model on the example inputs failed: "
                             f"{exc}; check example_inputs") from exc
    finally:
        for module, training in modes.items():
            module.training = training
    return values


def _canonical_param_names(gm: torch.nn.Module) -> dict[str, str]:
    """Qualified name -> first qualified name of the same parameter object."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, param in gm.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(param), name)
    return out


def _is_inplace(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("__")
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS:
            return True
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.startswith("__"):
            return True
        if node.kwargs.get("inplace") is True:
            return True
        return _positional_inplace(node.target, node.args, node.kwargs)
    if node.op == "call_module":
        try:
            module = gm.get_submodule(str(node.target))
        except AttributeError:
            return False
        return getattr(module, "inplace", False) is True
    return False


def _positional_inplace(target: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    if not callable(target) or len(args) < 2:
        return False
    try:
        bound = inspect.signature(target).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("inplace") is True


def _alias_root(gm: fx.GraphModule, node: Any) -> Any:
    """Follow view-like ops back to the tensor whose storage they share."""
    seen = 0
    while isinstance(node, fx.Node) and node.args and seen < 1000:
        seen += 1
        is_view = (
            (node.op == "call_method" and node.target in _VIEW_METHODS)
            or (node.op == "call_function" and node.target in _VIEW_FUNCTIONS)
            or (node.op == "call_module"
                and isinstance(_maybe_submodule(gm, str(node.target)), _VIEW_MODULES))
        )
        if not is_view:
            break
        node = node.args[0]
    return node


def _maybe_submodule(gm: fx.GraphModule, target: str) -> torch.nn.Module | None:
    try:
        return gm.get_submodule(target)
    except AttributeError:
        return None


def _mutated_inputs(gm: fx.GraphModule, body: Iterable[fx.Node],
                    inputs: set[fx.Node]) -> set[fx.Node]:
    mutated: set[fx.Node] = set()
    for node in body:
        if node.args and _is_inplace(gm, node):
            root = _alias_root(gm, node.args[0])
            if root in inputs:
                mutated.add(root)
    return mutated
