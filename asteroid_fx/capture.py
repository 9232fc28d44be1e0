"""Capturing a model with ``torch.export(strict=False)`` as the fx graph tracing groups."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import operator
import os
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from contracts.errors import ModelOutputError, TraceError

__all__: list[str] = []

log = logging.getLogger(__name__)

#: ``node.meta`` key: ``((qualified module name, class name), ...)``, outermost first, of the
#: modules whose ``forward`` made the node (captured graphs only).
MODULE_STACK_KEY = "asteroid.module_stack"

# [Note: capture by torch.export]
# torch.fx symbolic tracing runs ``forward`` on proxies, so Python code that looks at
# sizes or values (``if seq_len > n``, slicing with a traced size, ``torch.finfo(mask.dtype)``,
# building a ``ModelOutput``) fails; Hugging Face models are full of it. When fx fails,
# :func:`asteroid_fx.trace.trace` captures the model with ``torch.export(strict=False)``
# instead: ``forward`` runs as plain Python on fake tensors, so that code runs, and the
# graph records the aten operators it dispatched. The result is rewritten into the form
# the rest of asteroid-fx expects from fx tracing:
#
# * placeholders are the model inputs (positional, or the keyword inputs in the order the
#   mapping gives them), parameters and buffers are ``get_attr`` nodes under their
#   qualified names (a tied parameter under its first name in ``model.named_parameters()``),
#   and the graph returns the model's output structure: tensors, tuples, lists, dicts,
#   and a ``ModelOutput`` built again from its (non-None) fields;
# * export's guard module and metadata assertions are dropped, and ``node.meta`` keeps
#   only the module stack (:data:`MODULE_STACK_KEY`, and ``nn_module_stack``) that names
#   layers and finds leaves;
# * the batch dimension of every input is dynamic (so micro-batches of any size run);
#   the other dimensions are specialised to the example inputs (sequence length, image
#   size), as a pipeline trains on batches of one shape.
#
# Operators run exactly the kernels the eager model runs, so the stages compose to the
# model's outputs and gradients. A graph fixes the train/eval mode it was captured in
# (dropout's ``train`` argument); ``trace`` captures both modes (asteroid_fx/modes.py).

# operators that only check metadata at run time: no value, dropped from captured graphs
_ASSERT_PREFIXES = ("_assert", "sym_constrain_range", "_check")
# what a stage's source cannot run: functorch transforms and higher-order operators
_UNSUPPORTED_HINTS = ("_vmap", "_add_batch_dim", "_remove_batch_dim", "flat_apply",
                      "lazy_load_decompositions")

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_THIS_DIR = os.path.dirname(os.path.abspath(__file__))


def export_graph(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    names: tuple[str, ...] | None,
    class_name: str,
) -> fx.GraphModule:
    """Capture ``model`` on ``inputs`` with ``torch.export(strict=False)``.

    Args:
        model: the model, in the train/eval mode the graph should compute.
        inputs: the example inputs (batch in dimension 0).
        names: the keyword names of ``inputs`` (None: they are positional).
        class_name: the class name of the returned ``GraphModule``.

    Returns:
        A ``GraphModule`` following [Note: capture by torch.export].

    Raises:
        TraceError: export fails (the message names the construct and the line of user
            code), or the graph holds what a stage cannot run (a functorch transform).
        ModelOutputError: the model returns something other than tensors in tuples, lists
            and mappings.
    """
    export = getattr(torch, "export", None)
    if export is None or not hasattr(export, "Dim"):  # pragma: no cover - torch < 2.2
        raise TraceError(f"torch {torch.__version__} has no torch.export(strict=False)")
    batch = export.Dim("batch")
    with capture_context(model):
        if names is None:
            args: tuple[Any, ...] = inputs
            kwargs: dict[str, Any] = {}
            dynamic: Any = tuple({0: batch} for _ in inputs)
        else:
            args, kwargs = (), dict(zip(names, inputs))
            dynamic = {name: {0: batch} for name in names}
        try:
            with _quiet():
                program = export.export(model, args, kwargs, strict=False,
                                        dynamic_shapes=dynamic)
        except Exception as exc:
            raise TraceError(_export_failure(model, exc)) from exc
        spec = program.call_spec.out_spec
        gm = program.module()
    graph = gm.graph
    _inline_wrappers(gm, graph)
    _drop_checks(gm, graph)
    _functionalize_fresh(graph)
    _reshape_views(graph)
    _order_placeholders(graph, names)
    _rebuild_output(graph, spec)
    _keep_module_stacks(graph)
    _check_supported(graph, model)
    graph._codegen = fx.graph.CodeGen()  # plain forward(inputs) -> output, no pytree specs
    graph.lint()
    return fx.GraphModule(_tensor_holder(gm, graph, model), graph, class_name=class_name)


# torch loggers that report a failed export at warning or error level (the error says it
# already; a failed meta kernel logs its whole traceback)
_NOISY_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch.export", "torch._export",
                  "torch._subclasses.fake_tensor")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep a failing export from printing its partial graph and warnings on stderr (the
    text goes to this module's debug log instead)."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    text = io.StringIO()
    try:
        with contextlib.redirect_stderr(text):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if text.getvalue().strip():
            log.debug("torch.export printed:\n%s", text.getvalue())


@contextlib.contextmanager
def capture_context(model: nn.Module) -> Iterator[None]:
    """Model-family adjustments while capturing (Hugging Face: see asteroid_fx.hf)."""
    if any(type(m).__module__.startswith("transformers.") for m in model.modules()):
        from asteroid_fx.hf import capture_context as hf_context

        with hf_context(model):
            yield
    else:
        yield


def _export_failure(model: nn.Module, exc: Exception) -> str:
    text = str(exc).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    where = _user_frame(exc)
    return (f"torch.export(strict=False) cannot capture {type(model).__name__}: "
            f"{type(exc).__name__}: {first[:300]}" + (f"\n  at {where}" if where else ""))


def _user_frame(exc: BaseException) -> str:
    """``file:line: code`` of the deepest traceback frame outside torch and asteroid_fx."""
    best = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        filename = os.path.abspath(frame.filename)
        if frame.filename.startswith("<") or filename.startswith(_THIS_DIR + os.sep):
            continue
        if filename.startswith(_TORCH_DIR + os.sep):
            continue
        best = f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return best


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target._overloadpacket.__name__)
    return str(getattr(target, "__name__", target))


def _inline_wrappers(gm: fx.GraphModule, graph: fx.Graph) -> None:
    """Inline export's ``torch.no_grad()`` and disabled-autocast regions.

    A ``no_grad`` region becomes its operators followed by ``detach`` of its results (same
    values, and no gradient flows through them, as in the model); a region with autocast
    turned off runs as it is (stages run without autocast). Autocast turned on is left in
    place, and :func:`_check_supported` refuses it.
    """
    pending = True
    while pending:
        pending = False
        for node in list(graph.nodes):
            if node.op != "call_function" or not isinstance(
                    node.target, torch._ops.HigherOrderOperator):
                continue
            name = node.target.name()
            if name == "wrap_with_set_grad_enabled":
                detach, sub, operands = not node.args[0], node.args[1], node.args[2:]
            elif name == "wrap_with_autocast" and node.args[2] is False:
                detach, sub, operands = False, node.args[4], node.args[5:]
            else:
                continue
            _inline(gm, graph, node, str(sub.target), tuple(operands), detach)
            pending = True


def _inline(gm: fx.GraphModule, graph: fx.Graph, node: fx.Node, path: str,
            operands: tuple[Any, ...], detach: bool) -> None:
    sub = gm.get_submodule(path)
    if not isinstance(sub, fx.GraphModule):  # pragma: no cover - export makes GraphModules
        raise TraceError(f"cannot inline {node.format_node()}: {path!r} is not a graph")
    env: dict[fx.Node, Any] = {}
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    env.update(zip(placeholders, operands))
    results: Any = ()
    with graph.inserting_before(node):
        for inner in sub.graph.nodes:
            if inner.op == "placeholder":
                continue
            if inner.op == "output":
                results = fx.map_arg(inner.args[0], env.__getitem__)
                continue
            copy = graph.node_copy(inner, env.__getitem__)
            if inner.op == "get_attr":
                copy.target = f"{path}.{inner.target}"
            copy.meta = dict(inner.meta) or dict(node.meta)
            env[inner] = copy
        values = list(results) if isinstance(results, (tuple, list)) else [results]
        if detach:
            values = [graph.call_function(torch.ops.aten.detach.default, (v,))
                      if isinstance(v, fx.Node) else v for v in values]
            for value in values:
                if isinstance(value, fx.Node):
                    value.meta = dict(node.meta)
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem:
            index: Any = user.args[1]
            user.replace_all_uses_with(values[int(index)])
            graph.erase_node(user)
    if node.users:  # pragma: no cover - export reads wrapper results by index
        raise TraceError(f"cannot inline {node.format_node()}: its result is used whole")
    graph.erase_node(node)


def _drop_checks(gm: fx.GraphModule, graph: fx.Graph) -> None:
    """Erase export's guard module call and the run-time metadata assertions."""
    for node in reversed(list(graph.nodes)):
        if node.users:
            continue
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
        elif node.op == "call_function" and _op_name(node.target).startswith(_ASSERT_PREFIXES):
            graph.erase_node(node)
    for name, _ in list(gm.named_children()):
        if name.startswith("_guards"):
            delattr(gm, name)
    graph.eliminate_dead_code()


def _functionalize_fresh(graph: fx.Graph) -> None:
    """Make in-place operators on fresh, unshared tensors out-of-place.

    ``buckets += torch.where(...)`` on a tensor the graph just made, and that nothing else
    reads, changes nothing but the value it returns; written out of place
    (``aten.add_.Tensor`` -> ``aten.add.Tensor``) the node is pure, so layer grouping may
    recompute it in every stage that needs it instead of merging layers. In-place
    operators on inputs, parameters, views or shared tensors are left as they are.
    """
    for node in list(graph.nodes):
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        name = target.overloadpacket.__name__
        if not (name.endswith("_") and not name.endswith("__")) or not node.args:
            continue
        base = node.args[0]
        if not (isinstance(base, fx.Node) and base.op == "call_function"
                and isinstance(base.target, torch._ops.OpOverload)
                and len(base.users) == 1 and not _aliases(base.target)):
            continue
        packet = getattr(torch.ops.aten, name[:-1], None)
        pure = getattr(packet, target._overloadname, None) if packet is not None else None
        if pure is None or pure._schema.is_mutable:
            continue
        node.target = pure


def _reshape_views(graph: fx.Graph) -> None:
    """``aten.view`` -> ``aten.reshape`` where nothing writes through the view.

    A captured ``view`` is only valid for the memory layout its input had at capture:
    ``x.transpose(1, 2).contiguous().view(...)`` loses its ``contiguous`` when the
    transpose happened to be contiguous then. A stage receives its inputs in whatever
    layout the runtime delivers them (contiguous after a send), so its views must not
    depend on the layout; ``reshape`` is the same view when the layout allows one, and a
    copy of the same values otherwise.
    """
    views = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in views:
            continue
        if any(isinstance(u.target, torch._ops.OpOverload) and u.target._schema.is_mutable
               for u in node.users):
            continue
        node.target = torch.ops.aten.reshape.default


def _aliases(target: Any) -> bool:
    """The operator's result may share memory with an argument (a view, an in-place op)."""
    return bool(target._schema.is_mutable) or any(
        r.alias_info is not None for r in target._schema.returns)


def _order_placeholders(graph: fx.Graph, names: Sequence[str] | None) -> None:
    """Put the placeholders in the order of the keyword inputs (positional: as they are)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if names is None:
        return
    by_name = {str(n.target): n for n in placeholders}
    if set(by_name) != set(names):  # pragma: no cover - export keeps one per input
        raise TraceError(f"the captured graph takes {sorted(by_name)}, expected {list(names)}")
    first = next(n for n in graph.nodes if n.op != "placeholder")
    for name in names:
        first.prepend(by_name[name])


def _rebuild_output(graph: fx.Graph, spec: Any) -> None:
    """Return the output structure from the graph (instead of export's pytree codegen)."""
    output = next(n for n in graph.nodes if n.op == "output")
    flat = output.args[0]
    leaves = iter(flat if isinstance(flat, (tuple, list)) else (flat,))
    with graph.inserting_before(output):
        structure = _unflatten(graph, spec, leaves, "output")
    output.args = (structure,)


def _children(spec: Any) -> list[Any]:
    children = getattr(spec, "children", None)
    return list(children()) if callable(children) else list(spec.children_specs)


def _unflatten(graph: fx.Graph, spec: Any, leaves: Iterator[Any], where: str) -> Any:
    if spec.is_leaf():
        return next(leaves)
    kind = spec.type
    items = [_unflatten(graph, child, leaves, f"{where}[{i}]")
             for i, child in enumerate(_children(spec))]
    if kind is type(None):
        return None
    if isinstance(kind, type) and issubclass(kind, tuple) and hasattr(kind, "_fields"):
        return kind(*items)  # a named tuple stays one (fx imports its class)
    if kind is tuple or kind is list:
        return kind(items)
    if isinstance(kind, type) and issubclass(kind, Mapping):
        keys = list(spec.context)
        if all(isinstance(k, str) for k in keys):
            if dataclasses.is_dataclass(kind):  # a ModelOutput: built again, by its fields
                return graph.call_function(kind, (), dict(zip(keys, items)))
            return dict(zip(keys, items))
    raise ModelOutputError(
        f"the model's {where} is a {getattr(kind, '__module__', '?')}."
        f"{getattr(kind, '__qualname__', kind)}, not a tensor: a model must return a "
        f"tensor, or tuples, lists or dicts of tensors; return the tensors you train on "
        f"instead (e.g. from a wrapper module)")


def _tensor_holder(gm: fx.GraphModule, graph: fx.Graph, model: nn.Module) -> nn.Module:
    """The tensors the graph reads, under the model's own (first) qualified names.

    Export may name a tied parameter by any of its names (``lm_head.weight`` for GPT-2's
    token embedding); the stages name it as ``model.named_parameters()`` does, so that a
    parameter is found under one name in the model and in every stage.
    """
    first: dict[int, str] = {}
    persistent: dict[str, bool] = {}
    named = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in (*named.items(), *model.named_buffers(remove_duplicate=False)):
        first.setdefault(id(tensor), name)
    for prefix, module in model.named_modules(remove_duplicate=False):
        for key in module._buffers:
            full = f"{prefix}.{key}" if prefix else key
            persistent[full] = key not in module._non_persistent_buffers_set
    holder = nn.Module()
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        value = _fetch(gm, str(node.target))
        name = first.get(id(value), str(node.target))
        node.target = name
        owner_name, _, leaf = name.rpartition(".")
        owner = holder
        for part in owner_name.split(".") if owner_name else ():
            child = owner._modules.get(part)
            if child is None:
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        if isinstance(value, nn.Parameter):
            owner.register_parameter(leaf, value)
        elif isinstance(value, torch.Tensor):
            owner.register_buffer(leaf, value, persistent=persistent.get(name, True))
        else:
            setattr(owner, leaf, value)
    return holder


def _fetch(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _keep_module_stacks(graph: fx.Graph) -> None:
    """Replace export's node metadata (fake values, traces) by the module stack alone."""
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        entries: list[tuple[str, str]] = []
        for value in stack.values():
            path, cls = value if isinstance(value, tuple) else (str(value), "")
            path = str(path)
            if not path or path.startswith("_empty_nn_module_stack"):
                continue
            name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
            entries.append((path, name))
        node.meta = {MODULE_STACK_KEY: tuple(entries), "nn_module_stack": dict(stack)} \
            if entries else {}


def _check_supported(graph: fx.Graph, model: nn.Module) -> None:
    """Refuse functorch transforms and higher-order operators a stage cannot run."""
    for node in graph.nodes:
        if node.op != "call_function" or isinstance(node.target, torch._ops.OpOverload):
            continue
        name = _op_name(node.target)
        if isinstance(node.target, torch._ops.HigherOrderOperator):
            name = node.target.name()
        elif not name.startswith(_UNSUPPORTED_HINTS):
            continue
        stack = node.meta.get(MODULE_STACK_KEY) or ()
        module = f" in module {stack[-1][0]!r} ({stack[-1][1]})" if stack else ""
        raise TraceError(
            f"torch.export captured {type(model).__name__} with a functorch transform "
            f"or higher-order operator ({name}){module}, which a pipeline stage cannot run"
            f"\n  fix: compute the value without torch.vmap (e.g. by broadcasting) and "
            f"without autocast in forward")
