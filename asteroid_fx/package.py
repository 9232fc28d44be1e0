"""Save and load a partition directory: plan, per-stage source + weights, ONNX, model file.

Example::

    import asteroid_fx as afx
    stages = afx.partition(model, (x,), plan)
    files = afx.save_partition("out/", plan, stages, model_spec="examples/mlp.py",
                               example_inputs=(x,))
    plan, stages = afx.load_partition("out/")

Layout (the runtime reads it with ``runtime.stage_io`` and torch alone)::

    out/plan.json         Plan.to_json()
    out/partition.json    stage boundary names, parameters, buffers, tied parameters, model
    out/model.py          copy of the model file (when the spec is a file)
    out/stage_<i>.py      stage i as generated Python source (a torch.nn.Module; see
                          [Note: stage package format 2] in runtime/stage_io.py)
    out/stage_<i>.weights.pt   its parameters, buffers and tensor attributes: a plain
                          {name: tensor} dict, read with torch.load(weights_only=True)
    out/stage_<i>.onnx    the stage in ONNX (dynamic batch), when example inputs are given
    out/costs.json        the cost table the plan was made with, when given
    out/cluster.yaml      the cluster the plan was made for, when given
    out/report.md, out/gantt.png   when costs and a cluster are given
    out/token             the shared secret a process proves to join a run of this package
                          (mode 0600; see [Note: trust boundary] in runtime/trust.py)

``partition.json`` records the SHA-256 of plan.json, model.py and every stage file; the
runtime checks them before anything runs (runtime/package_check.py).

``costs.json`` and ``cluster.yaml`` let ``asteroid-fx simulate DIR/plan.json`` and a
re-plan after a failure work from the directory alone.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from asteroid_fx.partition import StageInfo, stage_info, tied_parameters
from asteroid_fx.stage_code import stage_source
from contracts.arguments import check_cluster, check_costs, check_path, check_plan
from contracts.errors import AsteroidError, ModelSpecError, PartitionError
from contracts.plan import Plan
from runtime.package_check import file_digest, package_files
from runtime.stage_io import (
    PARTITION_VERSION,
    PartitionMeta,
    StageMeta,
    load_partition_meta,
    load_plan,
    load_stage,
    stage_file,
    weights_file,
)
from runtime.trust import TOKEN_FILE, find_token, new_token, write_token
from solver.evaluate import check_covers

__all__ = ["save_partition", "load_partition", "stage_example_args", "check_package_dir"]

log = logging.getLogger(__name__)


def save_partition(
    directory: str | Path,
    plan: Plan,
    stages: Sequence[fx.GraphModule],
    *,
    model_spec: Any = None,
    onnx: bool = True,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor | Mapping[str, torch.Tensor] | None
    = None,
    costs: Any = None,
    cluster: Any = None,
    progress: Callable[[int, int, str], None] | None = None,
    token: str | None = None,
) -> dict[str, Path]:
    """Write the partition directory and return ``{file name: path}`` of what was written.

    ``progress(done, total, what)`` is called around each stage's ONNX export and check.

    Args:
        directory: created if missing; it must be empty or hold an older package,
            which the new one replaces (files of other names stay). The package is
            written beside it first and moved in when complete, so a failure
            leaves ``directory`` as it was.
        plan: the plan the stages were made from (``len(plan.stages) == len(stages)``).
        stages: the output of :func:`asteroid_fx.partition.partition`.
        model_spec: a MODEL_SPEC string (``path/model.py[:prefix]`` or ``builtin:NAME``) or
            a loaded ``ModelSpec``; a model file is copied to ``model.py``.
        onnx: also write ``stage_<i>.onnx`` (needs ``example_inputs``; each file is checked
            against torch in onnxruntime).
        example_inputs: model inputs of one example batch (batch in dimension 0; a mapping
            of keyword inputs is taken in its order, as stage 0 takes them).
        costs, cluster: a ``CostTable`` and ``Cluster``; with both, ``report.md`` and
            ``gantt.png`` are written when the solver's report/Gantt modules are installed.
        token: the job's shared secret, written to ``token`` (mode 0600); when None,
            ``$ASTEROID_TOKEN``, else the directory's existing token, else a fresh random one.

    Each stage is written as ``stage_<i>.py`` (source) and ``stage_<i>.weights.pt`` (a
    ``{name: tensor}`` dict), then loaded back as a device would and compared with the
    original (see :mod:`asteroid_fx.stage_code`).

    Raises:
        PartitionError: stages and plan disagree, a stage cannot be written without pickle
            (a global of its code that cannot be imported by name, a model-file submodule
            without a model spec ...), or ONNX export fails (see
            :func:`asteroid_fx.onnx_export.export_stage_onnx`).
    """
    check_plan(plan)
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence):
        raise PartitionError(f"stages must be the list of stage modules of "
                             f"afx.partition(model, inputs, plan), got {type(stages).__name__}")
    if len(stages) != plan.num_stages:
        raise PartitionError(f"the plan has {plan.num_stages} stages but {len(stages)} stage "
                             f"modules were given; partition with this plan first")
    if costs is not None:
        # (a table of another model wrote its costs.json and a report of its layers)
        check_covers(plan, check_costs(costs))
        if costs.model_hash and plan.model_hash and costs.model_hash != plan.model_hash:
            raise PartitionError(f"the cost table is of model {costs.model_name!r} (hash "
                                 f"{costs.model_hash}), the plan of hash {plan.model_hash}; "
                                 f"give the table the plan was made from")
    if cluster is not None:
        check_cluster(cluster)
    target = check_path(directory, PartitionError, "directory")
    check_package_dir(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial",
                                    dir=target.parent))
    try:
        written = _write_package(staging, target, plan, stages, model_spec=model_spec,
                                 onnx=onnx, example_inputs=example_inputs, costs=costs,
                                 cluster=cluster, progress=progress, token=token)
        return _move_in(staging, target, written)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_PACKAGE_NAME = re.compile(r"(plan\.json|partition\.json|model\.py|costs\.json|cluster\.yaml"
                           r"|report\.md|gantt\.png|token|stage_\d+\.(py|weights\.pt|onnx))")
"""The names a partition package's files have (the layout in the module docstring)."""


def check_package_dir(directory: str | Path, marker: str = "partition.json",
                      kind: str = "partition") -> None:
    """``PartitionError`` unless ``directory`` is missing, empty, or a ``kind`` directory
    (it holds ``marker``; ``finetune`` asks for ``pac_plan.json``, a fine-tuning directory):
    a package is written only where it replaces nothing but an older package, never a
    user's own files of the same names (a ``cluster.yaml``, a ``model.py``, a ``report.md``,
    or the ``costs.json`` a partition's recovery reads)."""
    out = Path(directory)
    if not out.exists():
        return
    if not out.is_dir():
        raise PartitionError(f"--out {str(out)!r} is a file, not a directory; give a new or "
                             f"an empty directory, or a {kind} directory to replace")
    if (out / marker).is_file():
        return
    held = sorted(p.name for p in out.iterdir())
    if held:
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise PartitionError(f"--out {str(out)!r} holds files and is not a {kind} "
                             f"directory ({shown}); give a new or an empty directory, or a "
                             f"{kind} directory to replace")


def _move_in(staging: Path, target: Path, written: dict[str, Path]) -> dict[str, Path]:
    """Move the finished package from ``staging`` into ``target``: the older package's
    files that the new one does not have (stages beyond its count, ONNX files, a report)
    are removed first, then each new file replaces its namesake; files of other names
    stay. Returns ``written`` with the paths in ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for old in target.iterdir():
        if old.is_file() and _PACKAGE_NAME.fullmatch(old.name) and old.name not in written:
            old.unlink()
    out: dict[str, Path] = {}
    for name, path in written.items():
        os.replace(path, target / name)
        out[name] = target / name
    return out


def _write_package(
    out: Path,
    target: Path,
    plan: Plan,
    stages: Sequence[fx.GraphModule],
    *,
    model_spec: Any,
    onnx: bool,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor | Mapping[str, torch.Tensor] | None,
    costs: Any,
    cluster: Any,
    progress: Callable[[int, int, str], None] | None,
    token: str | None,
) -> dict[str, Path]:
    """``save_partition``'s files, written in ``out`` (a fresh directory; ``target`` is
    where they go: its token is kept)."""
    infos = [stage_info(s) for s in stages]
    written: dict[str, Path] = {}

    def put(name: str, text: str) -> None:
        path = out / name
        path.write_text(text)
        written[name] = path

    spec, source, prefix, module_name, build_model = _spec_fields(model_spec)
    model_file: str | None = None
    if source is not None:
        shutil.copyfile(source, out / "model.py")
        written["model.py"] = out / "model.py"
        model_file = "model.py"
    put("plan.json", plan.to_json())
    meta = PartitionMeta(
        version=PARTITION_VERSION, model_spec=spec, model_file=model_file, prefix=prefix,
        num_stages=len(stages), torch_version=torch.__version__,
        stages=tuple(_stage_meta(info, i) for i, info in enumerate(infos)),
        tied=tied_parameters(stages), model_module=module_name,
        model_name=plan.model_name, model_hash=plan.model_hash,
        onnx=bool(onnx and example_inputs is not None),
    )
    put("partition.json", meta.to_json())
    loaded: list[torch.nn.Module] = []
    for i, stage in enumerate(stages):
        code = stage_source(stage, index=i, header=_header(infos[i], spec),
                            model_module=module_name, build_model=build_model)
        put(stage_file(out, i).name, code.source)
        try:
            torch.save(code.weights, weights_file(out, i))
        except (OSError, RuntimeError) as exc:
            raise PartitionError(f"writing the weights of stage {i} to "
                                 f"{str(weights_file(out, i))!r} failed: {exc}") from exc
        written[weights_file(out, i).name] = weights_file(out, i)
        loaded.append(load_stage(out, i))
        _check_round_trip(stage, loaded[-1], i)
    meta = replace(meta, files={name: file_digest(out / name) for name in package_files(meta)})
    put("partition.json", meta.to_json())
    chosen = find_token(token, target) or new_token()
    written[TOKEN_FILE] = write_token(out, chosen)
    if example_inputs is not None:
        example_inputs = check_rows(example_inputs)
        _check_outputs(stages, loaded, example_inputs)
    if onnx:
        if example_inputs is None:
            log.info("no example inputs: skipping the per-stage ONNX files")
        else:
            from asteroid_fx.onnx_export import export_stage_onnx

            for i, args in enumerate(stage_example_args(stages, example_inputs)):
                path = stage_file(out, i, ".onnx")
                if progress is not None:
                    progress(i, len(stages), path.name)
                export_stage_onnx(stages[i], args, path, stage_index=i)
                written[path.name] = path
            if progress is not None:
                progress(len(stages), len(stages), "checked")
    if costs is not None:
        costs.save(out / "costs.json")
        written["costs.json"] = out / "costs.json"
    if cluster is not None:
        import yaml

        (out / "cluster.yaml").write_text(yaml.safe_dump(cluster.to_dict(), sort_keys=False))
        written["cluster.yaml"] = out / "cluster.yaml"
    if costs is not None and cluster is not None:
        written.update(_write_report(out, plan, costs, cluster))
    log.info("saved a %d-stage partition to %s (%d files)", len(stages), target, len(written))
    return written


def load_partition(directory: str | Path) -> tuple[Plan, list[torch.nn.Module]]:
    """Load the plan and every stage of a partition directory (see :mod:`runtime.stage_io`).

    The stages are the generated ``Stage<i>`` modules of ``stage_<i>.py`` (plain
    ``torch.nn.Module``s, not GraphModules) with their weights; each carries its
    ``partition.json`` entry in ``stage.meta`` (so :func:`~asteroid_fx.partition.stage_info`
    works) and composes like the stages :func:`~asteroid_fx.partition.partition` made.
    """
    directory = check_path(directory, PartitionError, "directory")
    plan = load_plan(directory)
    meta = load_partition_meta(directory)
    if meta.num_stages != plan.num_stages:
        raise PartitionError(f"partition.json lists {meta.num_stages} stages but plan.json has "
                             f"{plan.num_stages}; re-run `asteroid-fx partition`")
    return plan, [load_stage(directory, i) for i in range(meta.num_stages)]


def stage_example_args(
    stages: Sequence[torch.nn.Module],
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor | Mapping[str, torch.Tensor],
) -> list[tuple[torch.Tensor, ...]]:
    """The positional inputs of every stage when the model runs on ``example_inputs``.

    Runs the stages in eval mode without autograd (train/eval flags restored afterwards).
    """
    from contracts.inputs import model_inputs

    args: Any = model_inputs(example_inputs)
    result: list[tuple[torch.Tensor, ...]] = []
    modes = {m: m.training for s in stages for m in s.modules()}
    try:
        with torch.no_grad():
            for stage in stages:
                stage.eval()
                result.append(tuple(args))
                args = stage(*args)
    finally:
        for module, training in modes.items():
            module.training = training
    return result


def _stage_meta(info: StageInfo, position: int) -> StageMeta:
    if info.index != position:
        raise PartitionError(f"stage at position {position} was made as stage {info.index}; "
                             f"pass the stages in the order partition() returned them")
    return StageMeta(index=info.index, inputs=info.inputs, outputs=info.outputs,
                     params=info.params, buffers=info.buffers, layers=info.layers,
                     cloned_inputs=info.cloned_inputs, tied=dict(info.tied or {}),
                     eval_inputs=info.eval_inputs, eval_outputs=info.eval_outputs)


def _header(info: StageInfo, spec: str | None) -> list[str]:
    return [f"Stage {info.index} of {spec or 'the model'}: layers "
            f"{info.layers[0]}..{info.layers[1]} (generated by asteroid-fx, torch "
            f"{torch.__version__})",
            f"inputs:  {', '.join(info.inputs) or '-'}",
            f"outputs: {', '.join(info.outputs) or '-'}",
            f"params:  {len(info.params)}, buffers: {len(info.buffers)}",
            f"The runtime imports this file (Python >= 3.8, torch >= 2.0), builds "
            f"Stage{info.index} under the meta device",
            f"and loads stage_{info.index}.weights.pt with torch.load(weights_only=True)."]


CHECK_ROWS = 2
"""Samples of the example batch the written stages are checked (and exported to ONNX) on:
the stages are batch-polymorphic (the runtime feeds them micro-batches of any size, and the
ONNX files have a dynamic batch dimension), and two samples keep train-mode BatchNorm
defined while a batch of 64 images would cost the check seconds of convolutions."""


def check_rows(example_inputs: Any, rows: int = CHECK_ROWS) -> Any:
    """``example_inputs`` cut to its first ``rows`` samples: every tensor whose dimension 0
    is the batch (the first tensor's dimension 0) is sliced; other tensors and values are
    kept as they are, in the same container (tensor, tuple or mapping)."""
    from contracts.inputs import model_inputs

    tensors = [t for t in model_inputs(example_inputs)
               if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not tensors or tensors[0].shape[0] <= rows:
        return example_inputs
    batch = tensors[0].shape[0]

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value[:rows]
        return value

    if isinstance(example_inputs, Mapping):
        return {key: cut(value) for key, value in example_inputs.items()}
    if isinstance(example_inputs, torch.Tensor):
        return cut(example_inputs)
    return tuple(cut(value) for value in example_inputs)


def _check_outputs(stages: Sequence[fx.GraphModule], loaded: Sequence[torch.nn.Module],
                   example_inputs: Any) -> None:
    """The loaded stages compute exactly what the originals do on the example inputs, in
    eval mode and in train mode (each stage run from the same RNG seed; BatchNorm running
    statistics restored afterwards)."""
    for training in (False, True):
        try:
            want = _run_stages(stages, example_inputs, training)
        except (RuntimeError, ValueError) as exc:  # e.g. BatchNorm, train mode, one sample
            log.info("not comparing the loaded stages in train mode: %s", exc)
            continue
        got = [_flat(_run_stage(stage, args, training, i))
               for i, (stage, (args, _)) in enumerate(zip(loaded, want, strict=True))]
        for i, ((_, w), g) in enumerate(zip(want, got, strict=True)):
            w = _flat(w)
            if len(w) != len(g) or not all(torch.equal(x, y) for x, y in zip(w, g, strict=True)):
                mode = "train" if training else "eval"
                raise PartitionError(f"stage {i} loaded from its source computes other values "
                                     f"than the traced stage on the example inputs in {mode} "
                                     f"mode; report it, with the model")


def _run_stages(stages: Sequence[torch.nn.Module], example_inputs: Any,
                training: bool) -> list[tuple[tuple[Any, ...], Any]]:
    """``(inputs, outputs)`` of every stage run one after the other in the given mode."""
    from contracts.inputs import model_inputs

    args: Any = model_inputs(example_inputs)
    runs = []
    for i, stage in enumerate(stages):
        out = _run_stage(stage, args, training, i)
        runs.append((tuple(args), out))
        args = out if isinstance(out, tuple) else (out,)
    return runs


def _run_stage(stage: torch.nn.Module, args: Sequence[Any], training: bool, seed: int) -> Any:
    """``stage(*args)`` in the given mode without autograd, from RNG seed ``seed``; the
    stage's flags and buffers (BatchNorm running statistics) are left as they were."""
    modes = {m: m.training for m in stage.modules()}
    buffers = [(b, b.detach().clone()) for b in stage.buffers()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return stage.train(training)(*args)
    finally:
        for module, flag in modes.items():
            module.training = flag
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


def _flat(value: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) stage output, in order."""
    if isinstance(value, torch.Tensor):
        return [value.detach()]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat(v)]
    return []


def _check_round_trip(original: fx.GraphModule, loaded: torch.nn.Module, index: int) -> None:
    """The loaded stage has the original's submodules, tensors (equal values) and flags."""
    from asteroid_fx.stage_code import tree_difference

    problem = tree_difference(original, loaded, values=True, whole=False)
    if problem is not None:
        raise PartitionError(f"stage {index} does not load back as it was saved: {problem}; "
                             f"the model has a submodule the generated source cannot rebuild "
                             f"(report it, with the model)")


_SpecFields = tuple[str | None, Path | None, str | None, str | None, Any]


def _spec_fields(model_spec: Any) -> _SpecFields:
    """``(spec string, model file, prefix, module name, build_model)`` of a spec string or
    ModelSpec."""
    if model_spec is None:
        return None, None, None, None, None
    if isinstance(model_spec, (str, Path)):
        text = str(model_spec)
        try:
            from asteroid_fx.model_spec import load_model_spec

            model_spec = load_model_spec(text)
        except ImportError:
            return _parse_spec(text)
        except ModelSpecError as exc:
            raise PartitionError(f"model spec {text!r} cannot be loaded: {exc}") from exc
    spec = str(getattr(model_spec, "spec", "") or "") or None
    path = getattr(model_spec, "path", None)
    prefix = getattr(model_spec, "prefix", None)
    build = getattr(model_spec, "build_model", None)
    module = getattr(build, "__module__", None)
    source = Path(path) if path is not None else None
    if source is not None and not source.is_file():
        raise PartitionError(f"model file {str(source)!r} does not exist")
    return spec, source, prefix, module, build if callable(build) else None


def _parse_spec(text: str) -> _SpecFields:
    if text.startswith("builtin:"):
        return text, None, None, None, None
    file, _, prefix = text.partition(":") if text.count(":") == 1 else (text, "", "")
    source = Path(file)
    if not source.is_file():
        raise PartitionError(f"model file {str(source)!r} of spec {text!r} does not exist")
    return text, source, prefix or None, None, None


def _write_report(out: Path, plan: Plan, costs: Any, cluster: Any) -> dict[str, Path]:
    """``report.md`` (asteroid_fx.report) and ``gantt.png`` (solver.simulate + asteroid_fx.gantt).

    Each file is skipped, with a log line, when its module (or rich, matplotlib) is not installed.
    """
    written: dict[str, Path] = {}
    render = _optional("asteroid_fx.report", "plan_report_markdown")
    if render is not None:
        try:
            (out / "report.md").write_text(str(render(plan, costs, cluster)))
            written["report.md"] = out / "report.md"
        except (AsteroidError, ValueError, TypeError, KeyError) as exc:
            log.warning("report.md not written: %s", exc)
    simulate = _optional("solver.simulate", "simulate")
    draw = _optional("asteroid_fx.gantt", "gantt_png")
    if simulate is not None and draw is not None:
        try:
            result = simulate(plan, costs, cluster)
            draw(result, out / "gantt.png", title=f"{plan.model_name or 'model'}: one round")
            written["gantt.png"] = out / "gantt.png"
        except (AsteroidError, ValueError, TypeError, KeyError, ImportError) as exc:
            log.warning("gantt.png not written: %s", exc)
    return written


def _optional(module_name: str, attribute: str) -> Any:
    """``module_name.attribute``, or None (logged) when the module or name is missing."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        log.info("%s is not available (%s): skipping its part of the report", module_name, exc)
        return None
    value = getattr(module, attribute, None)
    if value is None:
        log.info("%s has no %s(): skipping its part of the report", module_name, attribute)
    return value
