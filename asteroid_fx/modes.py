"""Train and eval mode: a model traced in both, and stages that run the graph of their mode.

[Note: train and eval mode]
torch.fx runs ``forward`` once with ``self.training`` a plain bool, so the traced graph
holds one mode: ``F.dropout(x, p, self.training)`` becomes ``dropout(x, p, training=True)``,
``if self.training:`` keeps one branch, and a model that returns auxiliary outputs only in
training (googlenet) has the output structure of that mode. Modules kept as leaves
(``nn.Dropout``, ``nn.BatchNorm2d``) read their own flag when they run, so only what the
model's Python code decides on the flag is baked in.

We capture both modes. :func:`trace_both_modes` traces the model in train mode (the mode
asteroid-fx plans, profiles and runs) and again in eval mode; when the two graphs differ,
the eval one is kept as ``LayerGraph.eval_graph``, a layer graph of its own with its own
cuts. Layers, costs, the model hash and plans are those of the train graph.
:func:`eval_stage_layers` maps the eval graph's layers onto the stages of a plan of the
train graph:

1. a parameter or buffer lives in one place: an eval layer that calls a module with
   parameters or buffers, or reads one (``get_attr``), goes to a stage that holds it in
   train mode (a train-only module, such as an aux head, constrains nothing);
2. other eval layers follow their counterparts in the train graph, found by aligning the
   two node sequences (kind, target, enclosing module) with ``difflib``;
3. stages are contiguous ranges of eval layers (the assignment never decreases), so every
   cut of the eval mode is a cut of the eval layer graph, crossed only by batched tensors;
   a stage may hold no eval layer (it passes its inputs through in eval mode), except the
   last, which returns the model output.

The partitioner splits the eval graph along those ranges and :class:`ModeStage` joins a
train stage and its eval stage into one ``GraphModule``: one module tree (the union; a
tensor used in both modes is one tensor), the train graph as ``graph`` and the eval graph
as ``eval_graph``, and a ``forward`` that runs ``forward_train`` when ``self.training``
and ``forward_eval`` otherwise. The stage source (``asteroid_fx.stage_code``) writes the
same three methods, so the device needs nothing new. A stage whose two graphs are the same
code stays a plain ``GraphModule``. The eval mode of a stage may take and return other
tensors than its train mode (``StageInfo.eval_inputs``/``eval_outputs``): the pipeline
runtime trains, and only trains, so its boundaries are the train ones.
"""

from __future__ import annotations

import copy
import difflib
import inspect
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from contracts.errors import PartitionError, TraceError

if TYPE_CHECKING:  # pragma: no cover
    from asteroid_fx.trace import LayerGraph

__all__ = [
    "ModeStage",
    "trace_both_modes",
    "eval_stage_layers",
    "dispatch_source",
    "graph_targets",
]

_SKIP = ("placeholder", "output")


# -- tracing ----------------------------------------------------------------------------------
def trace_both_modes(model: nn.Module, trace_one: Callable[[], LayerGraph],
                     graph_code: Callable[[], str | None]) -> LayerGraph:
    """Run ``trace_one`` with ``model`` in train mode, then in eval mode; see
    [Note: train and eval mode].

    ``graph_code`` is a cheap capture of the code in the current mode (None when there is
    none): when it is the same in both modes, the eval mode is not traced again. A model
    already in train mode keeps its submodules' flags (a frozen BatchNorm stays in eval
    mode); one in eval mode is switched with ``model.train()``. Every flag is restored
    afterwards.

    Returns:
        The train-mode graph, with ``eval_graph`` set when the eval-mode graph differs.

    Raises:
        TraceError: the model traces in train mode but not in eval mode (or the reverse).
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        if not model.training:
            model.train()
        graph = trace_one()
        code = graph_code()
        model.eval()
        if code is not None and graph_code() == code:
            return graph
        try:
            other = trace_one()
        except TraceError as exc:
            raise TraceError(f"{type(model).__name__} traces in train mode but not in eval "
                             f"mode (its forward decides on self.training): {exc}") from exc
    finally:
        for module, training in flags:
            module.training = training
    if other.graph_module.code != graph.graph_module.code:
        graph.eval_graph = other
    return graph


# -- eval layers -> stages --------------------------------------------------------------------
def eval_stage_layers(graph: LayerGraph, layer_stage: Sequence[int]) -> list[tuple[int, int]]:
    """The eval layers of every stage, as half-open ranges ``(start, stop)`` (possibly empty).

    Args:
        graph: a train-mode layer graph with ``eval_graph`` set.
        layer_stage: the stage of every train layer (non-decreasing).

    Raises:
        PartitionError: no assignment keeps every parameter in the stage that holds it in
            train mode, or the last stage would hold no eval layer.
    """
    evals = graph.eval_graph
    if evals is None:
        raise PartitionError("the layer graph has no eval-mode graph (internal error)")
    num_stages = max(layer_stage) + 1
    train_stage = _train_node_stages(graph, layer_stage)
    holders = _holders(graph.graph_module, train_stage)
    hints = _aligned_stages(evals.graph_module, graph.graph_module, train_stage)
    members: list[list[fx.Node]] = [[] for _ in evals.layers]
    owner = evals.node_to_layer()
    for node in evals.graph_module.graph.nodes:
        if node.name in owner:
            members[owner[node.name]].append(node)
    allowed: list[set[int] | None] = []
    for nodes in members:
        sets = [holders[t] for t in _state_targets(evals.graph_module, nodes) if t in holders]
        allowed.append(set.intersection(*sets) if sets else None)
    upper = [num_stages - 1] * len(members)
    bound = num_stages - 1
    for j in range(len(members) - 1, -1, -1):
        choices = allowed[j]
        if choices:
            bound = min(bound, max(choices))
        upper[j] = bound
    stages: list[int] = []
    low = 0
    for j, nodes in enumerate(members):
        choices = allowed[j]
        last = j == len(members) - 1
        if choices is not None:
            fits = sorted(c for c in choices if low <= c <= upper[j])
            if last and num_stages - 1 in fits:
                fits = [num_stages - 1]
            if not fits:
                raise PartitionError(
                    f"in eval mode {graph.model_name or 'the model'} runs "
                    f"{sorted(_state_targets(evals.graph_module, nodes))} (eval layer {j} "
                    f"{evals.layers[j].name!r}) in another order than in train mode, where "
                    f"stage(s) {sorted(choices)} hold them, so no stage of this plan can run "
                    f"that layer next to its parameters; put the cut elsewhere, or make the "
                    f"mode-dependent code a leaf module (leaf_modules=[...])")
            stage = fits[0]
        else:
            wanted = max((hints[n.name] for n in nodes if n.name in hints), default=low)
            stage = num_stages - 1 if last else max(low, min(wanted, upper[j]))
        stages.append(stage)
        low = stage
    if not stages or stages[-1] != num_stages - 1:
        raise PartitionError(
            f"in eval mode the last stage of this plan would run no layer of "
            f"{graph.model_name or 'the model'} (its last eval layer uses parameters of stage "
            f"{stages[-1] if stages else 0}); choose a plan whose last stage holds the model's "
            f"last layer in both modes")
    ranges = []
    start = 0
    for s in range(num_stages):
        stop = start + stages.count(s)
        ranges.append((start, stop))
        start = stop
    return ranges


def _train_node_stages(graph: LayerGraph, layer_stage: Sequence[int]) -> dict[str, int]:
    return {name: layer_stage[layer] for name, layer in graph.node_to_layer().items()}


def _state_targets(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> set[str]:
    """Qualified names of the modules with tensors, and the tensors, that ``nodes`` use."""
    targets: set[str] = set()
    for node in nodes:
        if node.op == "call_module" and _has_state(gm.get_submodule(str(node.target))):
            targets.add(str(node.target))
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                targets.add(str(arg.target))
    return targets


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _holders(gm: fx.GraphModule, stage_of: dict[str, int]) -> dict[str, set[int]]:
    """Stateful target -> the stages of the train graph that use it."""
    out: dict[str, set[int]] = {}
    for node in gm.graph.nodes:
        if node.op in _SKIP or node.name not in stage_of:
            continue
        for target in _state_targets(gm, [node]):
            out.setdefault(target, set()).add(stage_of[node.name])
    return out


def _signature(node: fx.Node) -> tuple[str, str, str]:
    target = node.target
    if callable(target):
        target = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', target)}"
    stack = node.meta.get("nn_module_stack") or {}
    scope = str(list(stack)[-1]) if stack else ""
    return node.op, str(target), scope


def _aligned_stages(evals: fx.GraphModule, train: fx.GraphModule,
                    train_stage: dict[str, int]) -> dict[str, int]:
    """Eval node name -> the train stage of its counterpart (aligned node sequences)."""
    a = [n for n in evals.graph.nodes if n.op not in _SKIP]
    b = [n for n in train.graph.nodes if n.op not in _SKIP]
    matcher = difflib.SequenceMatcher(None, [_signature(n) for n in a],
                                      [_signature(n) for n in b], autojunk=False)
    out: dict[str, int] = {}
    for i, j, size in matcher.get_matching_blocks():
        for k in range(size):
            stage = train_stage.get(b[j + k].name)
            if stage is not None:
                out[a[i + k].name] = stage
    return out


# -- two-mode stages --------------------------------------------------------------------------
def graph_targets(graph: fx.Graph) -> list[str]:
    """The ``call_module``/``get_attr`` targets of ``graph``, shallowest first."""
    targets = {str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")}
    return sorted(targets, key=lambda t: (t.count("."), t))


def dispatch_source(train_params: Sequence[str] | None,
                    eval_params: Sequence[str] | None) -> str:
    """Source of the ``forward`` that calls ``forward_train`` or ``forward_eval`` by mode.

    The parameters are the two methods' positional parameter names (None when a method has
    others: defaults, ``*args``); when they are the same, ``forward`` has them too, else it
    takes ``*args``.
    """
    same = train_params is not None and list(train_params) == list(eval_params or ())
    names = list(train_params or ())
    params = ", ".join(["self", *names]) if same else "self, *args"
    call = ", ".join(names) if same else "*args"
    return (f"def forward({params}):\n"
            f"    if self.training:\n"
            f"        return self.forward_train({call})\n"
            f"    return self.forward_eval({call})\n")


class ModeStage(fx.GraphModule):
    """A stage that runs ``graph`` in train mode and ``eval_graph`` in eval mode.

    See [Note: train and eval mode]. ``root`` maps every target of both graphs to its
    module or tensor (as ``torch.fx.GraphModule`` takes a dict root).
    """

    def __init__(self, root: dict[str, Any], graph: fx.Graph, eval_graph: fx.Graph,
                 class_name: str = "GraphModule") -> None:
        train_targets = {str(n.target) for n in graph.nodes
                         if n.op in ("call_module", "get_attr")}
        super().__init__({t: root[t] for t in train_targets}, graph, class_name)
        for target in graph_targets(eval_graph):
            if not _has_path(self, target):
                _put(self, target, root[target])
        self._eval_graph = eval_graph
        self.recompile()

    @property
    def eval_graph(self) -> fx.Graph:
        """The graph ``forward`` runs in eval mode."""
        graph: fx.Graph = self.__dict__["_eval_graph"]
        return graph

    def eval_module(self) -> fx.GraphModule:
        """The eval mode as a plain ``GraphModule`` sharing this stage's modules and tensors.

        Tools that read ``graph`` instead of calling ``forward`` (``torch.export``, fx
        passes) see the train graph of a ``ModeStage``; give them this module for the eval
        mode.
        """
        module = fx.GraphModule(self, copy.deepcopy(self.eval_graph), type(self).__name__)
        module.train(False)
        return module

    def recompile(self) -> Any:
        python = super().recompile()
        eval_graph = self.__dict__.get("_eval_graph")
        if eval_graph is not None:
            cls = type(self)
            train = cls.forward
            evaluate = _compile(eval_graph.python_code(root_module="self"), "forward")
            cls.forward_train = train  # type: ignore[attr-defined]
            cls.forward_eval = evaluate  # type: ignore[attr-defined]
            source = dispatch_source(_params(train), _params(evaluate))
            cls.forward = _compile_text(source, {}, "forward")
        return python

    def __deepcopy__(self, memo: dict[int, Any]) -> ModeStage:
        targets = graph_targets(self.graph) + graph_targets(self.eval_graph)
        attrs = copy.deepcopy({t: _get(self, t) for t in targets}, memo)
        result = ModeStage(attrs, copy.deepcopy(self.graph, memo),
                           copy.deepcopy(self.eval_graph, memo), type(self).__name__)
        memo[id(self)] = result
        modules = dict(result.named_modules())
        for name, module in self.named_modules():
            if name in modules:
                modules[name].training = module.training
        result.meta = copy.deepcopy(getattr(self, "meta", {}), memo)
        return result

    def __copy__(self) -> ModeStage:
        targets = graph_targets(self.graph) + graph_targets(self.eval_graph)
        result = ModeStage({t: _get(self, t) for t in targets}, self.graph, self.eval_graph,
                           type(self).__name__)
        result.meta = getattr(self, "meta", {})
        return result

    def __reduce__(self) -> Any:
        raise TypeError("a two-mode stage is not pickled; save it with "
                        "asteroid_fx.save_partition (source and weights)")


def _params(function: Callable[..., Any]) -> list[str] | None:
    params = list(inspect.signature(function).parameters.values())[1:]
    plain = all(p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in params)
    return [p.name for p in params] if plain else None


def _compile(python: Any, name: str) -> Callable[..., Any]:
    return _compile_text(python.src, dict(python.globals), name)


def _compile_text(source: str, namespace: dict[str, Any], name: str) -> Callable[..., Any]:
    # generated code of our own graphs (fx's python_code), as GraphModule.recompile runs it
    exec(compile(source, f"<asteroid-fx {name}>", "exec"), namespace)
    function: Callable[..., Any] = namespace[name]
    return function


def _get(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _has_path(root: nn.Module, target: str) -> bool:
    try:
        _get(root, target)
    except AttributeError:
        return False
    return True


def _put(root: nn.Module, target: str, value: Any) -> None:
    """Install ``value`` at ``target`` as ``torch.fx.GraphModule`` does for a dict root."""
    *path, leaf = target.split(".")
    module = root
    for part in path:
        child = getattr(module, part, None)
        if child is None:
            child = nn.Module()
            module.add_module(part, child)
        module = child
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        module.register_buffer(leaf, value)
    else:
        setattr(module, leaf, value)
