"""Read a saved partition directory (plan, stage source + weights, model file) with torch alone.

A device needs only this module, torch and the directory written by
``asteroid_fx.package.save_partition``::

    from runtime.stage_io import load_partition_meta, load_plan, load_stage
    plan = load_plan("out/")
    meta = load_partition_meta("out/")        # meta.stages[i].inputs / .outputs / .params
    i = plan.stage_of("nano0")
    stage = load_stage("out/", i)              # a torch.nn.Module with stage i's weights
    outputs = stage(*received)                 # the tensors named meta.stages[i].inputs

[Note: stage package format 2]
Stage ``i`` is two files. ``stage_<i>.py`` is generated Python source (Python >= 3.8,
torch >= 2.0): a ``torch.nn.Module`` subclass whose ``__init__`` rebuilds the stage's
submodules (``torch.nn`` layers from their constructor arguments; model-file classes taken
from ``build_model()`` of the partition's model, built under the meta device) and whose
``forward`` is the code torch.fx generated for the stage. ``stage_<i>.weights.pt`` is a
plain ``{qualified name: tensor}`` dict of the stage's parameters, buffers and tensor
attributes, read with ``torch.load(weights_only=True)``. No pickled code is loaded: the only
code that runs is the stage source and the model file, both readable in the directory.
Format 1 directories (pickled ``stage_<i>.pt`` modules) are refused with a request to
re-run ``asteroid-fx partition``. No tracing, ONNX or solver code is imported here
(``contracts.plan`` is plain data).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import sys
import types
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from contracts.arguments import is_int
from contracts.errors import PartitionError, absent
from contracts.plan import Plan

__all__ = [
    "PARTITION_VERSION",
    "STAGE_META_KEY",
    "StageMeta",
    "PartitionMeta",
    "STAGE_FORMAT",
    "stage_file",
    "weights_file",
    "load_plan",
    "load_partition_meta",
    "model_namespace",
    "load_stage",
    "build_stage",
    "read_weights",
    "import_stage_code",
    "load_model_module",
    "model_builder",
]

log = logging.getLogger(__name__)

#: format of ``partition.json`` and of the stage files (see [Note: stage package format 2])
PARTITION_VERSION = 2
#: the ``FORMAT`` a generated ``stage_<i>.py`` declares
STAGE_FORMAT = 2
#: how to bring a device's asteroid-fx up to date (named by the "newer format" errors)
UPGRADE_HINT = ("upgrade the device side with `pip install --no-deps .` from the asteroid-fx "
                "checkout that wrote it")
#: ``GraphModule.meta`` key of a stage's boundary names (same as ``asteroid_fx.partition``).
STAGE_META_KEY = "asteroid.stage"


def stage_file(directory: str | Path, index: int, suffix: str = ".py") -> Path:
    """Path of stage ``index``'s file (``stage_<i>.py`` source, or ``.onnx``)."""
    return Path(directory) / f"stage_{index}{suffix}"


def weights_file(directory: str | Path, index: int) -> Path:
    """Path of stage ``index``'s weights (``stage_<i>.weights.pt``)."""
    return Path(directory) / f"stage_{index}.weights.pt"


@dataclass(frozen=True)
class StageMeta:
    """One stage of ``partition.json``: boundary tensor names, parameters and buffers.

    ``inputs``/``outputs`` are node names of the traced model in the order the stage
    takes/returns them; ``tied`` maps a local parameter name to its tie group's name (see
    :attr:`PartitionMeta.tied`).
    """

    index: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: tuple[str, ...]
    buffers: tuple[str, ...]
    layers: tuple[int, int] = (0, 0)
    cloned_inputs: tuple[str, ...] = ()
    tied: Mapping[str, str] = field(default_factory=dict)
    eval_inputs: tuple[str, ...] | None = None   # the eval mode's, when not the same
    eval_outputs: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "index": self.index, "layers": list(self.layers), "inputs": list(self.inputs),
            "outputs": list(self.outputs), "params": list(self.params),
            "buffers": list(self.buffers), "cloned_inputs": list(self.cloned_inputs),
            "tied": dict(self.tied)}
        if self.eval_inputs is not None:
            data["eval_inputs"] = list(self.eval_inputs)
        if self.eval_outputs is not None:
            data["eval_outputs"] = list(self.eval_outputs)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageMeta:
        layers = [int(v) for v in data.get("layers", (0, 0))]
        return cls(index=int(data["index"]), inputs=tuple(map(str, data["inputs"])),
                   outputs=tuple(map(str, data["outputs"])),
                   params=tuple(map(str, data["params"])),
                   buffers=tuple(map(str, data["buffers"])),
                   layers=(layers[0], layers[1]),
                   cloned_inputs=tuple(map(str, data.get("cloned_inputs", ()))),
                   tied={str(k): str(v) for k, v in data.get("tied", {}).items()},
                   eval_inputs=_optional_names(data.get("eval_inputs")),
                   eval_outputs=_optional_names(data.get("eval_outputs")))


def _optional_names(value: Any) -> tuple[str, ...] | None:
    return None if value is None else tuple(map(str, value))


@dataclass(frozen=True)
class PartitionMeta:
    """Contents of ``partition.json``.

    ``tied`` maps the canonical name of a parameter held by several stages to its holders
    ``((stage, local name), ...)``: a runtime sums their gradients before each step.
    ``model_module`` is the module name the model file had when the stages were saved; the
    model file is imported under that name, so stage sources can import its functions.
    ``files`` maps each file the runtime reads (``plan.json``, ``model.py``, every
    ``stage_<i>.py`` and ``stage_<i>.weights.pt``) to its SHA-256 (hex), checked by
    ``runtime.package_check.check_package`` before anything runs.
    """

    version: int
    model_spec: str | None
    model_file: str | None
    prefix: str | None
    num_stages: int
    torch_version: str
    stages: tuple[StageMeta, ...]
    tied: Mapping[str, tuple[tuple[int, str], ...]] = field(default_factory=dict)
    model_module: str | None = None
    model_name: str = ""
    model_hash: str = ""
    onnx: bool = False
    files: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "model_spec": self.model_spec,
            "model_file": self.model_file, "prefix": self.prefix,
            "num_stages": self.num_stages, "torch_version": self.torch_version,
            "model_module": self.model_module, "model_name": self.model_name,
            "model_hash": self.model_hash, "onnx": self.onnx,
            "tied": {k: [list(h) for h in v] for k, v in self.tied.items()},
            "stages": [s.to_dict() for s in self.stages],
            **({"files": dict(self.files)} if self.files else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PartitionMeta:
        if not isinstance(data, Mapping):
            raise PartitionError(f"partition.json must hold a JSON object, got "
                                 f"{type(data).__name__}")
        version = data.get("version")
        if not is_int(version) or version < 1:
            raise PartitionError(f"partition.json version {version!r} is not a format number; "
                                 f"re-run `asteroid-fx partition`")
        if version > PARTITION_VERSION:
            raise PartitionError(f"the partition was written by a newer asteroid-fx (format "
                                 f"{version}, this reads <= {PARTITION_VERSION}); "
                                 f"{UPGRADE_HINT}")
        if version < PARTITION_VERSION:
            raise PartitionError(f"the partition has format {version} (pickled stage_<i>.pt "
                                 f"modules), which this asteroid-fx no longer loads; re-run "
                                 f"`asteroid-fx partition` to write format {PARTITION_VERSION}")
        try:
            stages = tuple(StageMeta.from_dict(s) for s in data["stages"])
            meta = cls(
                version=int(version), model_spec=_opt_str(data.get("model_spec")),
                model_file=_opt_str(data.get("model_file")),
                prefix=_opt_str(data.get("prefix")), num_stages=int(data["num_stages"]),
                torch_version=str(data.get("torch_version", "")), stages=stages,
                tied={str(k): tuple((int(s), str(n)) for s, n in v)
                      for k, v in data.get("tied", {}).items()},
                model_module=_opt_str(data.get("model_module")),
                model_name=str(data.get("model_name", "")),
                model_hash=str(data.get("model_hash", "")),
                onnx=bool(data.get("onnx", False)),
                files=_files(data.get("files", {})),
            )
        except KeyError as exc:
            raise PartitionError(f"partition.json is missing the field {exc.args[0]!r}; "
                                 f"re-run `asteroid-fx partition`") from exc
        except (TypeError, ValueError) as exc:
            raise PartitionError(f"malformed partition.json: {exc}") from exc
        if meta.num_stages != len(stages) or any(s.index != i for i, s in enumerate(stages)):
            raise PartitionError(f"partition.json declares {meta.num_stages} stages but lists "
                                 f"indices {[s.index for s in stages]}")
        return meta


def _files(value: Any) -> dict[str, str]:
    """The ``files`` entry of partition.json: {file name: SHA-256 hex}."""
    if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in value.items()):
        raise PartitionError(f"partition.json 'files' must map file names to SHA-256 hex "
                             f"digests, got {str(value)[:80]}; re-run `asteroid-fx partition`")
    return {str(k): str(v) for k, v in value.items()}


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _directory(directory: str | Path) -> Path:
    path = Path(directory)
    if not path.is_dir():
        raise PartitionError(f"partition directory {str(path)!r} {absent(path, True)}; create it "
                             f"with `asteroid-fx partition MODEL --cluster C --batch-size N "
                             f"--out {path}`")
    return path


def load_plan(directory: str | Path) -> Plan:
    """The plan of a partition directory (``DIR/plan.json``)."""
    path = _directory(directory) / "plan.json"
    if not path.is_file():
        raise PartitionError(f"{str(path)!r} is missing; the directory is not a complete "
                             f"partition (re-run `asteroid-fx partition`)")
    return Plan.load(path)


def load_partition_meta(directory: str | Path) -> PartitionMeta:
    """Parse ``DIR/partition.json``."""
    path = _directory(directory) / "partition.json"
    if not path.is_file():
        raise PartitionError(f"{str(path)!r} is missing; the directory is not a complete "
                             f"partition (re-run `asteroid-fx partition`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PartitionError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    return PartitionMeta.from_dict(data)


def load_model_module(directory: str | Path) -> types.ModuleType:
    """Import ``DIR/model.py`` (the copied model file) and return the module object.

    The module is registered in ``sys.modules`` under the name it had when the stages were
    saved, so pickled references to its classes and functions resolve; if a module of that
    name is already imported, that module is returned.
    """
    path = _directory(directory)
    meta = load_partition_meta(path)
    if meta.model_file is None:
        if meta.model_module:
            try:
                return importlib.import_module(meta.model_module)
            except ImportError as exc:
                raise PartitionError(f"the partition's model module {meta.model_module!r} "
                                     f"cannot be imported: {exc}") from exc
        raise PartitionError(f"partition {str(path)!r} has no model file (model spec "
                             f"{meta.model_spec!r}); re-run `asteroid-fx partition` with a "
                             f"model file spec")
    file = path / meta.model_file
    if not file.is_file():
        raise PartitionError(f"model file {str(file)!r} listed in partition.json is missing")
    name = meta.model_module or f"asteroid_partition_model_{abs(hash(str(file.resolve())))}"
    existing = sys.modules.get(name)
    if existing is not None:
        return existing
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise PartitionError(f"cannot import model file {str(file)!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise PartitionError(f"importing model file {str(file)!r} failed: "
                             f"{type(exc).__name__}: {exc}") from exc
    return module



def model_builder(directory: str | Path,
                  meta: PartitionMeta | None = None) -> Callable[[], torch.nn.Module] | None:
    """The partition's ``build_model`` (the model file's, with its prefix, or a built-in's);
    None when the partition records no model."""
    path = _directory(directory)
    meta = meta or load_partition_meta(path)
    if meta.model_file is None and (meta.model_spec or "").startswith("builtin:"):
        from runtime.builtin_models import builtin_build_model  # needs the models extra

        return builtin_build_model(str(meta.model_spec)[len("builtin:"):])
    if meta.model_file is None and not meta.model_module:
        return None
    module = load_model_module(path)
    holder: Any = module
    name = "build_model"
    if meta.prefix:
        if hasattr(module, meta.prefix):
            holder = getattr(module, meta.prefix)
        else:
            name = f"{meta.prefix}_build_model"
    build = getattr(holder, name, None)
    if not callable(build):
        raise PartitionError(f"the partition's model ({meta.model_spec or meta.model_module!r}) "
                             f"has no {name}(); re-run `asteroid-fx partition` with the model "
                             f"file")
    return build


def model_namespace(directory: str | Path) -> Any:
    """What a device calls the partition's model functions on (``build_model``,
    ``sample_batch``, ``loss_fn`` ...): the copied model file's module, or, for a built-in
    or a ``file.py:prefix`` spec, :func:`spec_functions`."""
    path = _directory(directory)
    meta = load_partition_meta(path)
    if (meta.model_spec or "").startswith("builtin:") or (meta.prefix and meta.model_file):
        return spec_functions(path, meta)
    return load_model_module(path)


_SPEC_FUNCTIONS = ("build_model", "sample_batch", "loss_fn", "build_optimizer", "dataset")


def spec_functions(directory: str | Path, meta: PartitionMeta | None = None) -> Any:
    """The partition's model functions (``build_model``, ``sample_batch``, ``loss_fn``
    (default ``cross_entropy``), ``build_optimizer``, ``dataset``) as a namespace: a
    built-in's (``runtime.builtin_models``, needs the models extra), or the copied model
    file's, under its prefix (an attribute ``prefix`` holding them, else ``prefix_NAME``).
    What the front end's ``load_model_spec`` finds, without the front end (devices)."""
    import types

    path = _directory(directory)
    meta = meta or load_partition_meta(path)
    spec = meta.model_spec or ""
    found: dict[str, Any] = dict.fromkeys(_SPEC_FUNCTIONS)
    if meta.model_file is None and spec.startswith("builtin:"):
        from runtime.builtin_models import BUILTIN_LOSSES, builtin_functions

        name = spec[len("builtin:"):]
        found["build_model"], found["sample_batch"] = builtin_functions(name)
        found["loss_fn"] = BUILTIN_LOSSES.get(name)
    else:
        module = load_model_module(path)
        holder: Any = module
        names = {f: f for f in _SPEC_FUNCTIONS}
        if meta.prefix:
            if hasattr(module, meta.prefix):
                holder = getattr(module, meta.prefix)
            else:
                names = {f: f"{meta.prefix}_{f}" for f in _SPEC_FUNCTIONS}
        for key, attr in names.items():
            found[key] = getattr(holder, attr, None)
    if found["loss_fn"] is None:
        found["loss_fn"] = torch.nn.functional.cross_entropy
    return types.SimpleNamespace(**found)


def load_stage(directory: str | Path, index: int,
               map_location: str | torch.device | None = "cpu") -> torch.nn.Module:
    """Build stage ``index`` from ``DIR/stage_<index>.py`` and ``stage_<index>.weights.pt``.

    The model file is imported first (when the partition has one) so that the stage source
    can import its functions; ``build_model()`` runs (under the meta device) only when the
    stage takes submodules of a model-file class. The returned module carries its
    ``partition.json`` entry in ``module.meta[STAGE_META_KEY]``.

    Raises:
        PartitionError: a missing, unreadable or inconsistent file, a newer format, a torch
            function this torch lacks, or weights that do not match the stage.
    """
    path = _directory(directory)
    meta = load_partition_meta(path)
    if not 0 <= index < meta.num_stages:
        raise PartitionError(f"stage index {index} is out of range: the partition has "
                             f"{meta.num_stages} stages (0..{meta.num_stages - 1})")
    source, weights = stage_file(path, index), weights_file(path, index)
    for file in (source, weights):
        if not file.is_file():
            raise PartitionError(f"stage file {str(file)!r} is missing; re-run "
                                 f"`asteroid-fx partition`")
    if meta.model_file is not None or meta.model_module:
        try:
            load_model_module(path)
        except PartitionError as exc:
            log.warning("loading stage %d without the model module: %s", index, exc)
    code = import_stage_code(source)
    model: torch.nn.Module | None = None
    if tuple(getattr(code, "MODEL_SUBMODULES", ())):
        build = model_builder(path, meta)
        if build is None:
            raise PartitionError(f"{str(source)!r} takes submodules "
                                 f"{list(code.MODEL_SUBMODULES)} from the model, but the "
                                 f"partition has no model file; re-run `asteroid-fx partition` "
                                 f"with a model file spec")
        model = build_meta_model(build)
    tensors = read_weights(weights, map_location)
    stage = build_stage(code, tensors, model=model, where=repr(str(source)))
    expected = meta.stages[index]
    params = tuple(n for n, _ in stage.named_parameters(remove_duplicate=False))
    buffers = tuple(n for n, _ in stage.named_buffers(remove_duplicate=False))
    if params != expected.params or buffers != expected.buffers:
        raise PartitionError(f"{str(source)!r} builds parameters {list(params)[:4]}... and "
                             f"buffers {list(buffers)[:4]}... that partition.json does not "
                             f"list for stage {index}; the directory mixes two partitions, "
                             f"re-run `asteroid-fx partition`")
    object.__setattr__(stage, "meta", {STAGE_META_KEY: expected.to_dict()})  # plain attribute
    return stage


def import_stage_code(file: str | Path) -> types.ModuleType:
    """Execute a generated ``stage_<i>.py`` as a fresh module (not put in ``sys.modules``)."""
    path = Path(file)
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    spec = importlib.util.spec_from_file_location(f"asteroid_fx_stage_{digest}_{path.stem}",
                                                  path)
    if spec is None or spec.loader is None:
        raise PartitionError(f"cannot import stage source {str(path)!r}")
    module = importlib.util.module_from_spec(spec)
    where = f"{str(path)!r} (Python {sys.version.split()[0]}, torch {torch.__version__})"
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise PartitionError(f"{where} does not parse: line {exc.lineno}: {exc.msg}; it was "
                             f"written for a newer Python, {UPGRADE_HINT}") from exc
    except ImportError as exc:
        raise PartitionError(f"{where} imports {exc.name or 'a module'}, which this device "
                             f"cannot import ({_first_line(exc)}); install it here, or make "
                             f"the model use importable functions") from exc
    except Exception as exc:
        raise PartitionError(f"executing {where} failed: {type(exc).__name__}: "
                             f"{_first_line(exc)}") from exc
    version = getattr(module, "FORMAT", None)
    if not isinstance(version, int):
        raise PartitionError(f"{str(path)!r} declares no FORMAT; it is not a stage source "
                             f"written by asteroid-fx (re-run `asteroid-fx partition`)")
    if version > STAGE_FORMAT:
        raise PartitionError(f"{str(path)!r} was written by a newer asteroid-fx (format "
                             f"{version}, this reads <= {STAGE_FORMAT}); {UPGRADE_HINT}")
    return module


def read_weights(file: str | Path,
                 map_location: str | torch.device | None = "cpu") -> dict[str, torch.Tensor]:
    """``torch.load(file, weights_only=True)``, checked to be a ``{name: tensor}`` dict."""
    path = Path(file)
    if not path.is_file():
        raise PartitionError(f"weights file {str(path)!r} is missing; re-run "
                             f"`asteroid-fx partition`")
    try:
        with warnings.catch_warnings():   # torch 2.1's weights_only loader warns on its own
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise PartitionError(f"{str(path)!r} is not a readable weights file "
                             f"({type(exc).__name__}: {_first_line(exc)}); re-run "
                             f"`asteroid-fx partition`") from exc
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise PartitionError(f"{str(path)!r} holds a {type(data).__name__}, not a dict of "
                             f"named tensors; re-run `asteroid-fx partition`")
    return data


@contextlib.contextmanager
def _meta_device() -> Iterator[None]:
    """``with torch.device("meta")`` (torch >= 2.0): tensors made inside cost nothing."""
    with torch.device("meta"):
        yield


def build_meta_model(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` under the meta device (no memory, no initialisation), or on the CPU when
    the model's constructor cannot run on meta tensors. The RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        try:
            with _meta_device():
                model = build()
        except Exception as exc:  # e.g. a constructor that reads tensor values
            log.info("build_model() fails under the meta device (%s: %s); building on the CPU",
                     type(exc).__name__, _first_line(exc))
            model = build()
    if not isinstance(model, torch.nn.Module):
        raise PartitionError(f"build_model() returned a {type(model).__name__}, not a "
                             f"torch.nn.Module")
    return model


def build_stage(code: types.ModuleType, tensors: Mapping[str, torch.Tensor], *,
                model: torch.nn.Module | None = None, where: str = "the stage") -> torch.nn.Module:
    """Instantiate the stage class of a generated source and give it ``tensors``.

    The class is built under the meta device; every parameter, buffer and tensor attribute
    is then replaced by its tensor of ``tensors`` (parameters tied in the source stay tied),
    checked strictly: every name present, none left over, shapes and dtypes equal.
    """
    _check_torch_names(code, where)
    cls = getattr(code, str(getattr(code, "STAGE_CLASS", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise PartitionError(f"{where} defines no stage class (STAGE_CLASS); re-run "
                             f"`asteroid-fx partition`")
    try:
        with torch.random.fork_rng(devices=[]), _meta_device():
            stage = cls(model)
    except Exception as exc:
        raise PartitionError(f"building {cls.__name__} of {where} failed: "
                             f"{type(exc).__name__}: {_first_line(exc)}") from exc
    frozen = set(getattr(code, "FROZEN", ()))
    attributes = tuple(getattr(code, "TENSOR_ATTRIBUTES", ()))
    used: set[str] = set()
    done: dict[int, torch.Tensor] = {}

    def take(name: str, like: torch.Tensor) -> torch.Tensor:
        value = tensors.get(name)
        if value is None:
            raise PartitionError(f"the weights of {where} lack {name!r}; re-run "
                                 f"`asteroid-fx partition`")
        if tuple(value.shape) != tuple(like.shape) or value.dtype != like.dtype:
            raise PartitionError(f"the weights of {where} hold {name!r} as {value.dtype} "
                                 f"{list(value.shape)} but the stage needs {like.dtype} "
                                 f"{list(like.shape)}; re-run `asteroid-fx partition`")
        used.add(name)
        return value

    for name, param in list(stage.named_parameters(remove_duplicate=False)):
        new = done.get(id(param))
        if new is None:
            new = torch.nn.Parameter(take(name, param), requires_grad=name not in frozen)
            done[id(param)] = new
        _set(stage, name, new)
    for name, buffer in list(stage.named_buffers(remove_duplicate=False)):
        new = done.get(id(buffer))
        if new is None:
            new = take(name, buffer)
            done[id(buffer)] = new
        _set(stage, name, new)
    for name in attributes:
        owner, _, leaf = name.rpartition(".")
        current = getattr(stage.get_submodule(owner), leaf, None)
        if not isinstance(current, torch.Tensor):
            raise PartitionError(f"{where} lists tensor attribute {name!r}, which the stage "
                                 f"does not have; re-run `asteroid-fx partition`")
        _set(stage, name, take(name, current))
    extra = sorted(set(tensors) - used)
    if extra:
        raise PartitionError(f"the weights of {where} hold {extra[:5]}, which the stage does "
                             f"not have; the directory mixes two partitions, re-run "
                             f"`asteroid-fx partition`")
    for name in getattr(code, "EVAL_MODULES", ()):
        stage.get_submodule(name).training = False
    left = [f"{prefix}.{k}".lstrip(".") for prefix, module in stage.named_modules()
            for k, v in vars(module).items() if isinstance(v, torch.Tensor) and v.is_meta]
    if left:
        raise PartitionError(f"{where} leaves tensors {left[:5]} without values (plain tensor "
                             f"attributes that build_model() makes); re-run `asteroid-fx "
                             f"partition`")
    return stage


def _set(root: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(owner), leaf, value)


def _check_torch_names(code: types.ModuleType, where: str) -> None:
    """Every ``torch.*`` name the stage's forward uses exists in this torch."""
    missing = [name for name in getattr(code, "TORCH_NAMES", ()) if not _has_torch_name(name)]
    if missing:
        raise PartitionError(f"{where} calls {', '.join(missing)}, which torch "
                             f"{torch.__version__} on this device does not have; install the "
                             f"torch the partition was made with, or partition with layers "
                             f"this torch supports")


def _has_torch_name(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] != "torch":
        return False
    obj: Any = torch
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(".".join(parts[: i + 1]))
        except ImportError:
            return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."
