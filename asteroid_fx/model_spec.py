"""Loading a MODEL_SPEC (``path/model.py``, ``path/model.py:prefix``, ``builtin:NAME``)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
import traceback
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from contracts.arguments import is_int
from contracts.errors import AsteroidError, ModelSpecError
from contracts.inputs import model_inputs
from cost_models.batches import Inputs, check_batch
from runtime.builtin_models import (
    BUILTIN_LOSSES,
    BUILTIN_MODELS,
    BuildModel,
    LossFn,
    SampleBatch,
)

__all__ = [
    "ModelSpec",
    "Inputs",
    "load_model_spec",
    "check_batch",
    "model_inputs",
    "BUILTIN_MODELS",
    "import_model_file",
]

log = logging.getLogger(__name__)

BuildOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

_FUNCTIONS = ("build_model", "sample_batch", "loss_fn", "build_optimizer", "dataset")
_REQUIRED = ("build_model", "sample_batch")


@dataclass(frozen=True)
class ModelSpec:
    """A loaded model description: how to build the model, make batches and compute loss."""

    spec: str  # as given, e.g. "examples/resnet.py:cifar"
    name: str  # short readable name, e.g. "resnet:cifar"
    path: Path | None  # the model file (None for built-ins)
    prefix: str | None
    build_model: BuildModel
    sample_batch: SampleBatch
    loss_fn: LossFn
    build_optimizer: BuildOptimizer | None
    #: optional ``dataset()``: a finite indexable dataset of ``(inputs, target)`` samples,
    #: used by ``asteroid-fx finetune`` ([Note: fine-tuning data] in runtime/samples.py)
    dataset: Callable[[], Any] | None = None

    def example_inputs(self, batch_size: int) -> tuple[Inputs, Any]:
        """Call ``sample_batch(batch_size)`` and check its result: ``(inputs, targets)``.

        Raises:
            ModelSpecError: ``sample_batch`` returned something else.
        """
        if not is_int(batch_size) or batch_size < 1:
            raise ModelSpecError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        where = f"{self.spec}: sample_batch({batch_size})"
        return check_batch(self._call(where, self.sample_batch, batch_size), batch_size,
                           where=where)

    def build(self) -> nn.Module:
        """``build_model()``; ``ModelSpecError`` (the file and line) when it raises or does not
        return an ``nn.Module``."""
        model = self._call(f"{self.spec}: build_model()", self.build_model)
        if not isinstance(model, nn.Module):
            raise ModelSpecError(f"{self.spec}: build_model() returned {type(model).__name__}, "
                                 f"not a torch.nn.Module; return the model")
        return model

    def _call(self, where: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, with what it raises (besides our own errors) as a one-line
        ``ModelSpecError`` naming ``where`` and the line of the model file it came from."""
        try:
            return fn(*args)
        except AsteroidError:
            raise
        except (Exception, SystemExit) as e:
            line = _frame_in(e, self.path.resolve()) if self.path is not None else "?"
            fix = "fix the model file" + (", or ask for a smaller batch"
                                          if "sample_batch" in where else "")
            raise ModelSpecError(f"{where} raised {type(e).__name__}: {e} (at {line}); "
                                 f"{fix}") from e


def load_model_spec(spec: str) -> ModelSpec:
    """Load ``spec`` into a :class:`ModelSpec`.

    Forms:
        ``path/model.py``: module-level ``build_model``, ``sample_batch`` and optional
        ``loss_fn`` (default ``cross_entropy``) and ``build_optimizer``.
        ``path/model.py:prefix``: the file's attribute ``prefix`` (a class, namespace or
        module) holds those functions, or else they are named ``prefix_build_model`` ...
        ``builtin:NAME``: one of :data:`BUILTIN_MODELS` (needs the ``models`` extra).

    Raises:
        ModelSpecError: missing file, not a ``.py`` file, error while importing it (file and
            line named), missing functions (what the file defines is listed), unknown
            built-in (known names listed), or the ``models`` extra is not installed.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"MODEL_SPEC must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec.startswith("builtin:"):
        return _load_builtin(spec, spec[len("builtin:") :])
    path_txt, prefix = _split_prefix(spec)
    path = Path(path_txt)
    if path.suffix != ".py":
        raise ModelSpecError(
            f"MODEL_SPEC {spec!r}: {path_txt!r} is not a Python file (.py); use "
            "path/to/model.py, path/to/model.py:prefix or builtin:NAME "
            f"({', '.join(sorted(BUILTIN_MODELS))})"
        )
    if not path.is_file():
        raise ModelSpecError(f"MODEL_SPEC {spec!r}: model file {str(path)!r} does not exist")
    module = import_model_file(path)
    functions = _find_functions(spec, module, prefix)
    name = path.stem if prefix is None else f"{path.stem}:{prefix}"
    return ModelSpec(
        spec=spec,
        name=name,
        path=path.resolve(),
        prefix=prefix,
        build_model=functions["build_model"],
        sample_batch=functions["sample_batch"],
        loss_fn=functions.get("loss_fn") or nn.functional.cross_entropy,
        build_optimizer=functions.get("build_optimizer"),
        dataset=functions.get("dataset"),
    )


def _split_prefix(spec: str) -> tuple[str, str | None]:
    # "C:\\x\\model.py" has a drive colon; only a colon after ".py" starts a prefix.
    head, sep, tail = spec.rpartition(":")
    if sep and head.endswith(".py") and tail:
        if not tail.isidentifier():
            raise ModelSpecError(
                f"MODEL_SPEC {spec!r}: prefix {tail!r} is not a Python identifier"
            )
        return head, tail
    return spec, None


def import_model_file(path: Path) -> types.ModuleType:
    """Import the model file at ``path`` as a fresh module (not added to ``sys.path``).

    Raises:
        ModelSpecError: the file has a syntax error or raises while importing; the message
            names the file and line.
    """
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    mod_name = f"asteroid_fx_user_model_{resolved.stem}_{digest}"
    loader_spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if loader_spec is None or loader_spec.loader is None:  # pragma: no cover - .py checked
        raise ModelSpecError(f"cannot import model file {str(path)!r}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[mod_name] = module  # dataclasses and pickling look the module up
    try:
        loader_spec.loader.exec_module(module)
    except SyntaxError as e:
        del sys.modules[mod_name]
        code = (e.text or "").strip()
        raise ModelSpecError(
            f"syntax error in model file {e.filename or path}:{e.lineno}: {e.msg}"
            + (f": {code}" if code else "")
        ) from e
    except (Exception, SystemExit) as e:        # a model file that exits is an error too
        del sys.modules[mod_name]
        where = _frame_in(e, resolved)
        raise ModelSpecError(
            f"importing model file {str(path)!r} failed at {where}: {type(e).__name__}: {e}"
        ) from e
    return module


def _frame_in(e: BaseException, path: Path) -> str:
    """``file:line: code`` of the deepest traceback frame in ``path`` (else the deepest)."""
    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if Path(f.filename).resolve() == path]
    if not (mine or frames):  # pragma: no cover - an exception always has a frame here
        return str(path)
    frame = (mine or frames)[-1]
    return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"


def _find_functions(
    spec: str, module: types.ModuleType, prefix: str | None
) -> dict[str, Callable[..., Any]]:
    if prefix is None:
        source: Any = module
        names = {f: f for f in _FUNCTIONS}
        where = "at module level"
    elif hasattr(module, prefix):
        source = getattr(module, prefix)
        names = {f: f for f in _FUNCTIONS}
        where = f"in {prefix!r}"
    else:
        source = module
        names = {f: f"{prefix}_{f}" for f in _FUNCTIONS}
        where = f"(the file has no attribute {prefix!r} either)"
    found: dict[str, Callable[..., Any]] = {}
    for key, attr in names.items():
        value = getattr(source, attr, None)
        if value is None:
            continue
        if not callable(value):
            raise ModelSpecError(
                f"MODEL_SPEC {spec!r}: {attr} is a {type(value).__name__}, not a function"
            )
        found[key] = value
    missing = [names[f] for f in _REQUIRED if f not in found]
    if missing:
        defined = sorted(
            n for n, v in vars(source).items() if not n.startswith("_") and callable(v)
        )
        prefixes = _available_prefixes(module)
        hint = f"; prefixes in the file: {', '.join(prefixes)}" if prefixes else ""
        raise ModelSpecError(
            f"MODEL_SPEC {spec!r}: the model file must define {', '.join(missing)} {where}; "
            f"it defines: {', '.join(defined) or 'nothing callable'}{hint}"
        )
    return found


def _available_prefixes(module: types.ModuleType) -> list[str]:
    """Prefixes the file offers: ``X_build_model`` functions and namespaces with one."""
    found = []
    for n, v in vars(module).items():
        if n.startswith("_"):
            continue
        if n.endswith("_build_model") and callable(v):
            found.append(n[: -len("_build_model")])
        elif not isinstance(v, types.FunctionType) and callable(getattr(v, "build_model", None)):
            found.append(n)
    return sorted(found)


# --------------------------------------------------------------------------- built-ins


def _load_builtin(spec: str, name: str) -> ModelSpec:
    factory = BUILTIN_MODELS.get(name)
    if factory is None:
        raise ModelSpecError(
            f"unknown built-in model {name!r} in {spec!r}; known: "
            + ", ".join(f"builtin:{n}" for n in sorted(BUILTIN_MODELS))
            + " (or give a path/to/model.py)"
        )
    build_model, sample_batch = factory()
    return ModelSpec(
        spec=spec,
        name=name,
        path=None,
        prefix=None,
        build_model=build_model,
        sample_batch=sample_batch,
        loss_fn=BUILTIN_LOSSES.get(name, nn.functional.cross_entropy),
        build_optimizer=None,
    )
