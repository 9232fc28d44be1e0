"""Write a stage GraphModule as importable Python source plus a weights dict (no pickles).

Example::

    from asteroid_fx.stage_code import stage_source
    code = stage_source(stage, model_module="my_model", build_model=spec.build_model)
    Path("stage_1.py").write_text(code.source)
    torch.save(code.weights, "stage_1.weights.pt")      # read with weights_only=True

See [Note: stage package format 2] in ``runtime/stage_io.py`` for what the device does with
the two files. [Note: rebuilding submodules] below says how a submodule is rebuilt.

[Note: rebuilding submodules]
A stage's module tree is what ``torch.fx.GraphModule`` made of the traced model: plain
``torch.nn.Module`` containers down to the modules the code calls (``call_module``) and the
tensors it reads (``get_attr``). The source rebuilds containers as they are, a
``torch.nn`` layer from its constructor arguments (read back from the layer's attributes
of the same names, defaults left out so that older torch versions accept the call; checked
here by building it and comparing structure, ``repr`` and plain attributes), and any other
class (model-file classes, layers whose arguments cannot be read back) by taking the
submodule of that name from ``build_model()`` of the partition's model, built under the
meta device on the device. Tensors come from the weights file; parameters tied inside a
stage are re-tied by the source. A global the generated code needs is imported by name
(``from module import name``), so it must be a module-level object of an importable module
or of the model file; anything else fails here, at save time.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import logging
import math
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from asteroid_fx.modes import ModeStage, dispatch_source
from contracts.errors import PartitionError
from runtime.stage_io import STAGE_FORMAT, build_meta_model

__all__ = ["StageCode", "stage_source", "constructor_call", "tree_difference"]

log = logging.getLogger(__name__)

#: Python the generated source must parse on (the devices' oldest)
OLDEST_PYTHON = (3, 8)

# globals torch.fx puts into every generated forward, and how the source provides them
_FX_GLOBALS: dict[str, str] = {
    "torch": "import torch",
    "device": "from torch import device",
    "inf": "from math import inf",
    "nan": "from math import nan",
    "NoneType": "NoneType = type(None)",
    "fx_pytree": "import torch.fx._pytree as fx_pytree",
    "pytree": "import torch.utils._pytree as pytree",
}
_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
_SKIP_ARGS = frozenset({"self", "device", "dtype", "factory_kwargs"})


@dataclass(frozen=True)
class StageCode:
    """One stage as source text and the tensors its weights file holds."""

    source: str
    weights: dict[str, torch.Tensor]
    class_name: str
    model_submodules: tuple[str, ...]


def stage_source(
    stage: fx.GraphModule,
    *,
    index: int = 0,
    header: Iterable[str] = (),
    model_module: str | None = None,
    build_model: Callable[[], torch.nn.Module] | None = None,
) -> StageCode:
    """Generate the source and weights of ``stage`` (see [Note: rebuilding submodules]).

    Args:
        stage: a stage made by :func:`asteroid_fx.partition.partition`.
        index: the stage's index (names the class ``Stage<index>``).
        header: comment lines put at the top of the file.
        model_module: the module name the model file is imported under on the device.
        build_model: the model's constructor, for submodules that must come from it.

    Raises:
        PartitionError: a global of the code, a submodule or a tensor cannot be rebuilt
            without pickle (the message names it and says what to change).
    """
    class_name = f"Stage{index}"
    where = f"stage {index}"
    model_holder: list[torch.nn.Module] = []

    def model() -> torch.nn.Module | None:
        if build_model is None:
            return None
        if not model_holder:
            model_holder.append(build_meta_model(build_model))
        return model_holder[0]

    init, taken = _init_lines(stage, where, model)
    python = stage.graph.python_code(root_module="self")
    prologue, forward = _split_forward(python.src, where)
    globals_ = dict(python.globals)
    if isinstance(stage, ModeStage):   # see [Note: train and eval mode] in asteroid_fx.modes
        prologue, forward = _two_modes(stage, prologue, forward, globals_, where)
    tree = ast.parse(forward)
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    imports = _import_lines(globals_, used, where, model_module)
    _check_names(tree, imports, where)
    torch_names = sorted(_torch_names(tree))
    attributes = _tensor_attributes(stage)
    frozen = tuple(n for n, p in stage.named_parameters(remove_duplicate=False)
                   if not p.requires_grad)
    evals = tuple(n for n, m in stage.named_modules(remove_duplicate=False) if not m.training)
    lines = [*(f"# {line}".rstrip() for line in header), *imports, "", "",
             f"FORMAT = {STAGE_FORMAT}",
             f"STAGE_CLASS = {class_name!r}",
             "#: torch names forward() calls (checked against the device's torch first)",
             f"TORCH_NAMES = {_tuple(torch_names)}",
             "#: submodules taken from build_model() of the partition's model (meta device)",
             f"MODEL_SUBMODULES = {_tuple(taken)}",
             "#: plain tensor attributes of submodules (values in the weights file)",
             f"TENSOR_ATTRIBUTES = {_tuple(attributes)}",
             f"FROZEN = {_tuple(frozen)}",
             f"EVAL_MODULES = {_tuple(evals)}",
             *prologue, "", "",
             f"class {class_name}(torch.nn.Module):",
             f"    \"\"\"Stage {index}; the runtime builds it under the meta device and loads "
             f"its tensors.\"\"\"",
             "",
             "    def __init__(self, model=None):",
             "        super().__init__()",
             *(f"        {line}" for line in init),
             "",
             *(f"    {line}".rstrip() for line in forward.strip("\n").splitlines()),
             ""]
    source = "\n".join(lines)
    try:
        ast.parse(source, feature_version=OLDEST_PYTHON)
    except SyntaxError as exc:
        raise PartitionError(f"the generated source of {where} does not parse as Python "
                             f"{OLDEST_PYTHON[0]}.{OLDEST_PYTHON[1]} (line {exc.lineno}: "
                             f"{exc.msg}): {exc.text!r}") from exc
    return StageCode(source=source, weights=_weights(stage, attributes), class_name=class_name,
                     model_submodules=taken)


def constructor_call(module: torch.nn.Module) -> str | None:
    """Source of a ``torch.nn`` constructor call that rebuilds ``module`` (structure,
    hyper-parameters, dtype; not values), or None when there is none that checks out."""
    cls = type(module)
    name = _torch_class_name(cls)
    if name is None or _has_hooks(module):
        return None
    if isinstance(module, _CONTAINERS):
        return None
    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None
    args: list[str] = []
    for param in list(signature.parameters.values())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.name in _SKIP_ARGS:
            continue
        value = _argument(module, param)
        if value is _MISSING:
            if param.default is param.empty:
                return None
            continue
        if param.default is not param.empty and _is_default(value, param.default):
            continue
        text = _literal(value)
        if text is None:
            return None
        positional = param.default is param.empty and param.kind is not param.KEYWORD_ONLY
        args.append(text if positional else f"{param.name}={text}")
    dtypes = {t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()}
    if len(dtypes) == 1 and dtypes != {torch.get_default_dtype()}:
        if "dtype" not in signature.parameters:
            return None
        args.append(f"dtype={dtypes.pop()}")
    call = f"{name}({', '.join(args)})"
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            rebuilt = eval(call, {"torch": torch})  # our own generated call, torch only
    except Exception as exc:  # any failure means: take the submodule from the model
        log.debug("%s does not rebuild %s: %s", call, cls.__name__, exc)
        return None
    difference = tree_difference(module, rebuilt, flags=False)   # the source sets the flags
    if difference is not None:
        log.debug("%s differs from the original %s: %s", call, cls.__name__, difference)
        return None
    return call


# -- module tree --------------------------------------------------------------------------------
def _init_lines(stage: torch.nn.Module, where: str,
                model: Callable[[], torch.nn.Module | None]) -> tuple[list[str], tuple[str, ...]]:
    """``__init__`` statements rebuilding the tree, and the submodules taken from the model."""
    lines: list[str] = []
    taken: list[str] = []

    def visit(module: torch.nn.Module, path: str) -> None:
        parent = "self" if not path else f"self.get_submodule({path!r})"
        for name, param in module._parameters.items():
            if param is None:
                lines.append(f"{parent}.register_parameter({name!r}, None)")
                continue
            lines.append(f"{parent}.register_parameter({name!r}, torch.nn.Parameter("
                         f"{_empty(param)}, requires_grad={param.requires_grad}))")
        for name, buffer in module._buffers.items():
            persistent = name not in module._non_persistent_buffers_set
            value = "None" if buffer is None else _empty(buffer)
            lines.append(f"{parent}.register_buffer({name!r}, {value}"
                         + ("" if persistent else ", persistent=False") + ")")
        for name, child in module._modules.items():
            qualified = f"{path}.{name}" if path else name
            if child is None:
                lines.append(f"{parent}.add_module({name!r}, None)")
            elif type(child) is torch.nn.Module:
                lines.append(f"{parent}.add_module({name!r}, torch.nn.Module())")
                visit(child, qualified)
            else:
                lines.append(f"{parent}.add_module({name!r}, "
                             f"{_rebuild(child, qualified, where, model, taken)})")

    visit(stage, "")
    lines.extend(_tie_lines(stage))
    return lines, tuple(taken)


def _rebuild(child: torch.nn.Module, qualified: str, where: str,
             model: Callable[[], torch.nn.Module | None], taken: list[str]) -> str:
    call = constructor_call(child)
    if call is not None:
        return call
    cls = f"{type(child).__module__}.{type(child).__qualname__}"
    built = model()
    if built is None:
        raise PartitionError(f"{where} calls submodule {qualified!r} ({cls}), which can only "
                             f"be rebuilt from the model's build_model(); save the partition "
                             f"with its model spec (model_spec=...)")
    try:
        original = built.get_submodule(qualified)
    except AttributeError:
        original = None
    if type(original) is not type(child):
        found = "nothing" if original is None else type(original).__name__
        raise PartitionError(f"{where} calls submodule {qualified!r} ({cls}) but build_model() "
                             f"has {found} there; partition the model build_model() returns")
    taken.append(qualified)
    return f"model.get_submodule({qualified!r})"


def _tie_lines(stage: torch.nn.Module) -> list[str]:
    """Re-tie parameters/buffers that are one tensor under several names."""
    lines: list[str] = []
    for kind, items in (("parameter", stage.named_parameters(remove_duplicate=False)),
                        ("buffer", stage.named_buffers(remove_duplicate=False))):
        first: dict[int, str] = {}
        for name, tensor in items:
            original = first.setdefault(id(tensor), name)
            if original != name:
                owner, _, leaf = name.rpartition(".")
                lines.append(f"setattr(self.get_submodule({owner!r}), {leaf!r}, "
                             f"self.get_{kind}({original!r}))  # tied")
    return lines


def _tensor_attributes(stage: torch.nn.Module) -> tuple[str, ...]:
    names = []
    for prefix, module in stage.named_modules(remove_duplicate=False):
        if not prefix:
            continue
        for key, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                names.append(f"{prefix}.{key}")
    return tuple(names)


def _weights(stage: torch.nn.Module, attributes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Parameters and buffers under their first names, and the tensor attributes."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in (*stage.named_parameters(), *stage.named_buffers()):
        out[name] = _plain(tensor)
    for name in attributes:
        owner, _, leaf = name.rpartition(".")
        out[name] = _plain(getattr(stage.get_submodule(owner), leaf))
    return out


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    value = tensor.detach()
    whole = value.untyped_storage().nbytes() == value.numel() * value.element_size()
    return value if whole and value.is_contiguous() else value.clone().contiguous()


def _empty(tensor: torch.Tensor) -> str:
    return f"torch.empty({tuple(tensor.shape)!r}, dtype={tensor.dtype})"


# -- forward code and its globals ---------------------------------------------------------------
def _split_forward(src: str, where: str) -> tuple[list[str], str]:
    """(module-level lines other than fx's ``wrap`` registrations, the ``def forward`` text)."""
    lines = src.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("def forward(")]
    if len(starts) != 1:
        raise PartitionError(f"the generated code of {where} has {len(starts)} forward "
                             f"definitions, expected 1 (internal error)")
    prologue = [line for line in lines[: starts[0]]
                if line.strip() and not line.startswith("torch.fx._symbolic_trace.wrap(")]
    return prologue, "\n".join(lines[starts[0]:])


def _two_modes(stage: ModeStage, prologue: list[str], forward: str, globals_: dict[str, Any],
               where: str) -> tuple[list[str], str]:
    """The module-level lines and the ``forward_train``, ``forward_eval`` and dispatching
    ``forward`` methods of a two-mode stage; ``globals_`` gains the eval code's globals."""
    python = stage.eval_graph.python_code(root_module="self")
    eval_prologue, eval_forward = _split_forward(python.src, where)
    for name, value in python.globals.items():
        if globals_.setdefault(name, value) is not value:
            raise PartitionError(f"the train and eval code of {where} use the global {name!r} "
                                 f"for two objects (internal error; report it, with the model)")
    train_text = forward.replace("def forward(", "def forward_train(", 1)
    eval_text = eval_forward.replace("def forward(", "def forward_eval(", 1)
    dispatch = dispatch_source(_forward_params(train_text), _forward_params(eval_text))
    lines = [*prologue, *(line for line in eval_prologue if line not in prologue)]
    return lines, "\n\n".join([train_text.rstrip("\n"), eval_text.rstrip("\n"), dispatch])


def _forward_params(text: str) -> list[str] | None:
    """Positional parameter names of the function ``text`` defines, or None when it has
    defaults, ``*args``, keyword-only or ``**kwargs`` parameters."""
    function = ast.parse(text).body[0]
    if not isinstance(function, ast.FunctionDef):  # pragma: no cover - fx code is a def
        return None
    args = function.args
    if args.defaults or args.vararg or args.kwonlyargs or args.kwarg or args.posonlyargs:
        return None
    return [arg.arg for arg in args.args[1:]]


def _check_names(tree: ast.AST, imports: list[str], where: str) -> None:
    """Every name ``forward`` reads is its argument, a local, an import or a builtin."""
    defined = set(dir(builtins))
    for line in imports:
        for node in ast.walk(ast.parse(line)):
            if isinstance(node, ast.alias):
                defined.add(node.asname or node.name.split(".")[0])
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
    missing = sorted({node.id for node in ast.walk(tree)
                      if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
                      and node.id not in defined})
    if missing:
        raise PartitionError(f"the code of {where} reads {missing}, which the stage source "
                             f"would not define (a constant torch.fx printed as a name); make "
                             f"that value a tensor, a number or a module-level function")


def _import_lines(globals_: Mapping[str, Any], used: set[str], where: str,
                  model_module: str | None) -> list[str]:
    lines = ["import torch"]
    for name in sorted(used & set(globals_)):
        obj = globals_[name]
        if name in _FX_GLOBALS:
            if _FX_GLOBALS[name] not in lines:
                lines.append(_FX_GLOBALS[name])
            continue
        if getattr(builtins, name, None) is obj:
            continue
        lines.append(_import_line(name, obj, where, model_module))
    return lines


def _import_line(name: str, obj: Any, where: str, model_module: str | None) -> str:
    if isinstance(obj, types.ModuleType):
        return f"import {obj.__name__}" if obj.__name__ == name else \
            f"import {obj.__name__} as {name}"
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    problem = None
    if not module or not qualname or "<" in qualname:
        problem = "it is not a module-level object (a lambda, a local function or an instance)"
    elif module == "__main__":
        problem = "it is defined in __main__, which the device cannot import"
    elif module.startswith("asteroid_fx_user_model_") and module != model_module:
        problem = "it is defined in a model file other than the partition's"
    elif _lookup(module, qualname) is not obj:
        problem = f"{module}.{qualname} does not import back to the same object"
    if problem is not None or not module or not qualname:
        raise PartitionError(f"the code of {where} uses the global {name!r} ({obj!r}), which "
                             f"the stage source cannot import: {problem}; make it a "
                             f"module-level function of the model file or of an installed "
                             f"module")
    head, _, rest = qualname.partition(".")
    if not rest:
        return f"from {module} import {head}" + ("" if head == name else f" as {name}")
    return f"from {module} import {head} as _{name}_owner\n{name} = _{name}_owner.{rest}"


def _lookup(module: str, qualname: str) -> Any:
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj


def _torch_names(tree: ast.AST) -> set[str]:
    """Dotted ``torch.x.y`` names in the code (outermost attribute chains only)."""
    names: set[str] = set()
    inner: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        parts: list[str] = []
        cur: ast.AST = node
        while isinstance(cur, ast.Attribute):
            parts.append(cur.attr)
            inner.add(id(cur.value))
            cur = cur.value
        if isinstance(cur, ast.Name) and cur.id == "torch":
            names.add(".".join(["torch", *reversed(parts)]))
    return names


def _tuple(items: Iterable[str]) -> str:
    values = list(items)
    return "()" if not values else "(" + ", ".join(repr(v) for v in values) + ",)"


# -- constructor arguments ----------------------------------------------------------------------
_MISSING = object()


def _torch_class_name(cls: type) -> str | None:
    """``torch.nn.X`` (or the full module path) for a class of ``torch.nn``, else None."""
    if not cls.__module__.startswith("torch.nn."):
        return None
    if getattr(torch.nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    if _lookup(cls.__module__, cls.__qualname__) is cls:
        return f"{cls.__module__}.{cls.__qualname__}"
    return None


def _argument(module: torch.nn.Module, param: inspect.Parameter) -> Any:
    """The constructor argument ``param`` as the module's attribute of that name shows it."""
    if param.name in module._parameters or param.name in module._buffers:
        value: Any = module._parameters.get(param.name, module._buffers.get(param.name))
    elif param.name in vars(module):
        value = vars(module)[param.name]
    else:
        return _MISSING
    if isinstance(param.default, bool) and (value is None or isinstance(value, torch.Tensor)):
        return value is not None  # e.g. bias=True/False read from the bias parameter
    if isinstance(value, (torch.Tensor, torch.nn.Module)):
        return _MISSING
    return value


def _is_default(value: Any, default: Any) -> bool:
    """``value`` is the default, or the tuple torch makes of it (``stride=1`` -> ``(1, 1)``)."""
    if isinstance(value, tuple) and value and isinstance(default, int) \
            and not isinstance(default, bool):
        return all(_equal(v, default) for v in value)
    return _equal(value, default)


def _equal(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b) and repr(a) == repr(b)
    except Exception:  # incomparable values are not equal
        return False


def _literal(value: Any) -> str | None:
    """Source text of a plain constructor argument, or None."""
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "float('nan')"
        if math.isinf(value):
            return "float('inf')" if value > 0 else "float('-inf')"
        return repr(value)
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (tuple, list)):
        parts = [_literal(v) for v in value]
        if any(p is None for p in parts):
            return None
        if isinstance(value, list):
            return "[" + ", ".join(p for p in parts if p is not None) + "]"
        inner = ", ".join(p for p in parts if p is not None)
        return f"({inner},)" if len(parts) == 1 else f"({inner})"
    return None


def _has_hooks(module: torch.nn.Module) -> bool:
    return any(isinstance(v, dict) and v and k.endswith("hooks")
               for m in module.modules() for k, v in vars(m).items())


def _plain_state(module: torch.nn.Module) -> dict[str, str]:
    return {k: repr(v) for k, v in vars(module).items()
            if k != "training" and _literal(v) is not None}


def tree_difference(original: torch.nn.Module, rebuilt: torch.nn.Module, *,
                    values: bool = False, whole: bool = True, flags: bool = True) -> str | None:
    """What differs between two module trees, or None: submodule names and types, each
    tensor's name, shape, dtype and (with ``flags``) requires_grad, values (with
    ``values``), buffer persistence, ties, training flags (with ``flags``), ``repr`` and
    plain attributes. ``whole=False`` skips the roots' own type and ``repr`` (a GraphModule
    against its generated stage class)."""
    width = 4 if flags else 3
    a = dict(original.named_modules(remove_duplicate=False))
    b = dict(rebuilt.named_modules(remove_duplicate=False))
    if list(a) != list(b):
        return f"submodules {list(a)} vs {list(b)}"
    for name, mod in a.items():
        other = b[name]
        if (whole or name) and type(mod) is not type(other):
            return f"{name!r} is a {type(mod).__name__} vs {type(other).__name__}"
        mine = _tensors(mod)
        theirs = _tensors(other)
        if [t[:width] for t in mine] != [t[:width] for t in theirs]:
            return (f"tensors of {name!r}: {[t[:width] for t in mine]} vs "
                    f"{[t[:width] for t in theirs]}")
        if values:
            for (key, *_, x), (_, *_, y) in zip(mine, theirs, strict=True):
                if not torch.equal(x.detach(), y.detach()):
                    return f"the values of {name + '.' if name else ''}{key}"
        if mod._non_persistent_buffers_set != other._non_persistent_buffers_set:
            return f"non-persistent buffers of {name!r}"
        if flags and mod.training != other.training:
            return f"the training flag of {name!r}"
        if (whole or name) and _plain_state(mod) != _plain_state(other):
            return f"attributes of {name!r}: {_plain_state(mod)} vs {_plain_state(other)}"
    if _ties(original) != _ties(rebuilt):
        return f"tied tensors {_ties(original)} vs {_ties(rebuilt)}"
    if whole and repr(original) != repr(rebuilt):
        return f"repr {original!r} vs {rebuilt!r}"
    if not whole:
        for (name, x), (_, y) in zip(original.named_children(), rebuilt.named_children(),
                                     strict=True):
            if repr(x) != repr(y):
                return f"repr of {name!r}: {x!r} vs {y!r}"
    return None


def _tensors(module: torch.nn.Module) -> list[tuple[Any, ...]]:
    """(name, shape, dtype, requires_grad, tensor) of a module's own tensors, attributes
    included."""
    items = [*module._parameters.items(), *module._buffers.items(),
             *((k, v) for k, v in vars(module).items() if isinstance(v, torch.Tensor))]
    return [(k, tuple(v.shape), v.dtype, v.requires_grad, v) for k, v in items if v is not None]


def _ties(module: torch.nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, tensor in (*module.named_parameters(remove_duplicate=False),
                         *module.named_buffers(remove_duplicate=False)):
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]
