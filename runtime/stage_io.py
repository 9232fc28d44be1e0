"""Read a saved partition directory (plan, stage modules, model file) with torch alone.

A device needs only this module, torch and the directory written by
``asteroid_fx.package.save_partition``::

    from runtime.stage_io import load_partition_meta, load_plan, load_stage
    plan = load_plan("out/")
    meta = load_partition_meta("out/")        # meta.stages[i].inputs / .outputs / .params
    i = plan.stage_of("nano0")
    stage = load_stage("out/", i)              # a torch.nn.Module with stage i's weights
    outputs = stage(*received)                 # the tensors named meta.stages[i].inputs

Stage files are pickled ``torch.fx.GraphModule``s (``torch.save``), so loading one runs
code: only load partition directories you made or trust. No tracing, ONNX or solver code
is imported here (``solver.plan`` is plain data).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asteroid_fx.errors import PartitionError
from solver.plan import Plan

__all__ = [
    "PARTITION_VERSION",
    "STAGE_META_KEY",
    "StageMeta",
    "PartitionMeta",
    "stage_file",
    "load_plan",
    "load_partition_meta",
    "load_stage",
    "load_model_module",
]

log = logging.getLogger(__name__)

PARTITION_VERSION = 1
#: ``GraphModule.meta`` key of a stage's boundary names (same as ``asteroid_fx.partition``).
STAGE_META_KEY = "asteroid.stage"


def stage_file(directory: str | Path, index: int, suffix: str = ".pt") -> Path:
    """Path of stage ``index``'s file (``stage_<i>.pt``, ``.py`` or ``.onnx``)."""
    return Path(directory) / f"stage_{index}{suffix}"


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

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "layers": list(self.layers), "inputs": list(self.inputs),
                "outputs": list(self.outputs), "params": list(self.params),
                "buffers": list(self.buffers), "cloned_inputs": list(self.cloned_inputs),
                "tied": dict(self.tied)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageMeta:
        layers = [int(v) for v in data.get("layers", (0, 0))]
        return cls(index=int(data["index"]), inputs=tuple(map(str, data["inputs"])),
                   outputs=tuple(map(str, data["outputs"])),
                   params=tuple(map(str, data["params"])),
                   buffers=tuple(map(str, data["buffers"])),
                   layers=(layers[0], layers[1]),
                   cloned_inputs=tuple(map(str, data.get("cloned_inputs", ()))),
                   tied={str(k): str(v) for k, v in data.get("tied", {}).items()})


@dataclass(frozen=True)
class PartitionMeta:
    """Contents of ``partition.json``.

    ``tied`` maps the canonical name of a parameter held by several stages to its holders
    ``((stage, local name), ...)``: a runtime sums their gradients before each step.
    ``model_module`` is the module name the model file had when the stages were saved
    (custom leaf-module classes are pickled under it).
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "model_spec": self.model_spec,
            "model_file": self.model_file, "prefix": self.prefix,
            "num_stages": self.num_stages, "torch_version": self.torch_version,
            "model_module": self.model_module, "model_name": self.model_name,
            "model_hash": self.model_hash, "onnx": self.onnx,
            "tied": {k: [list(h) for h in v] for k, v in self.tied.items()},
            "stages": [s.to_dict() for s in self.stages],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PartitionMeta:
        if not isinstance(data, Mapping):
            raise PartitionError(f"partition.json must hold a JSON object, got "
                                 f"{type(data).__name__}")
        version = data.get("version")
        if version != PARTITION_VERSION:
            raise PartitionError(f"partition.json version {version!r} is not supported "
                                 f"(expected {PARTITION_VERSION}); re-run "
                                 f"`asteroid-fx partition`")
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


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _directory(directory: str | Path) -> Path:
    path = Path(directory)
    if not path.is_dir():
        raise PartitionError(f"partition directory {str(path)!r} does not exist; create it "
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


def load_stage(directory: str | Path, index: int,
               map_location: str | torch.device | None = "cpu") -> torch.nn.Module:
    """Load stage ``index`` (``DIR/stage_<index>.pt``) with its weights.

    The model file is imported first (when the partition has one) so that custom classes
    of the model resolve while unpickling.
    """
    path = _directory(directory)
    meta = load_partition_meta(path)
    if not 0 <= index < meta.num_stages:
        raise PartitionError(f"stage index {index} is out of range: the partition has "
                             f"{meta.num_stages} stages (0..{meta.num_stages - 1})")
    file = stage_file(path, index)
    if not file.is_file():
        raise PartitionError(f"stage file {str(file)!r} is missing; re-run "
                             f"`asteroid-fx partition`")
    if meta.model_file is not None or meta.model_module:
        try:
            load_model_module(path)
        except PartitionError as exc:
            log.warning("loading stage %d without the model module: %s", index, exc)
    try:
        module = _torch_load(file, map_location)
    except Exception as exc:
        raise PartitionError(f"loading {str(file)!r} failed ({type(exc).__name__}: {exc}); "
                             f"it was saved with torch {meta.torch_version}, this is torch "
                             f"{torch.__version__}") from exc
    if not isinstance(module, torch.nn.Module):
        raise PartitionError(f"{str(file)!r} holds a {type(module).__name__}, not a module")
    stage_meta = getattr(module, "meta", None)
    if isinstance(stage_meta, dict):  # GraphModule pickles drop ``meta``: restore it
        stage_meta[STAGE_META_KEY] = meta.stages[index].to_dict()
    return module


def _torch_load(file: Path, map_location: str | torch.device | None) -> Any:
    try:
        return torch.load(file, map_location=map_location, weights_only=False)
    except TypeError as exc:  # torch < 1.13 has no weights_only
        if "weights_only" not in str(exc):
            raise
        return torch.load(file, map_location=map_location)
