"""Per-stage ONNX export with a dynamic batch dimension, checked against torch in onnxruntime.

Example::

    from asteroid_fx.onnx_export import export_stage_onnx
    export_stage_onnx(stages[1], (activation,), "out/stage_1.onnx", stage_index=1)

The stage is exported in eval mode (its train/eval flags are restored afterwards; a
:class:`~asteroid_fx.modes.ModeStage` exports its eval graph) with the
dynamo exporter (``torch.onnx.export(..., dynamo=True)``, needs ``onnxscript``); when that
fails the TorchScript exporter is tried. The file is then run in onnxruntime on the example
arguments and on a batch one sample larger, and compared with the stage in torch.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from asteroid_fx.modes import ModeStage
from contracts.errors import PartitionError

__all__ = ["ONNX_TOLERANCE", "export_stage_onnx", "run_onnx", "check_stage_onnx"]

log = logging.getLogger(__name__)

#: Largest difference accepted between onnxruntime and torch outputs, relative to the
#: output's largest magnitude when that is above 1 (float32 rounding grows with the values:
#: a randomly initialised resnet50 reaches 160 and differs by 1.8e-4 in ONNX).
ONNX_TOLERANCE = 1e-4


def export_stage_onnx(
    stage: torch.nn.Module,
    example_args: Sequence[torch.Tensor] | torch.Tensor,
    path: str | Path,
    *,
    stage_index: int = 0,
    check: bool = True,
    tolerance: float = ONNX_TOLERANCE,
    fallback: bool = True,
) -> None:
    """Export ``stage`` to ONNX at ``path`` with dimension 0 of every input dynamic.

    Args:
        stage: a stage module (any ``nn.Module`` taking tensors positionally).
        example_args: the stage's inputs for one example batch (batch in dimension 0).
        path: the ``.onnx`` file to write.
        stage_index: used in error messages only.
        check: run the file in onnxruntime and compare with torch (two batch sizes).
        tolerance: largest accepted difference, relative to the output's largest magnitude
            when that is above 1.
        fallback: try the TorchScript exporter when the dynamo exporter fails.

    Raises:
        PartitionError: export failed (the message has the stage index and the reason), or
            onnxruntime disagrees with torch (the message has the largest difference).
    """
    args = (example_args,) if isinstance(example_args, torch.Tensor) else tuple(example_args)
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise PartitionError(f"stage {stage_index}: ONNX export needs tensor arguments, got "
                             f"{[type(a).__name__ for a in args]}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    modes = {m: m.training for m in stage.modules()}
    stage.eval()
    # a two-mode stage's graph is its train mode; the exporter reads the graph
    exported = stage.eval_module() if isinstance(stage, ModeStage) else stage
    try:
        _export(exported, args, out, stage_index, fallback)
        if check:
            check_stage_onnx(stage, args, out, stage_index=stage_index, tolerance=tolerance)
    finally:
        for module, training in modes.items():
            module.training = training


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's own chatter (e.g. "torchvision is not installed. Skipping ...")."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _export(stage: torch.nn.Module, args: tuple[torch.Tensor, ...], out: Path,
            stage_index: int, fallback: bool) -> None:
    with _quiet_exporter():
        _export_loud(stage, args, out, stage_index, fallback)


def _export_loud(stage: torch.nn.Module, args: tuple[torch.Tensor, ...], out: Path,
                 stage_index: int, fallback: bool) -> None:
    names = [f"input_{i}" for i in range(len(args))]
    try:
        batch = torch.export.Dim("batch", min=1)
        dynamic = tuple({0: batch} if a.dim() > 0 else {} for a in args)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(stage, args, dynamo=True, dynamic_shapes=dynamic,
                                        input_names=names, verbose=False)
        if program is None:  # pragma: no cover - dynamo export always returns a program
            raise RuntimeError("torch.onnx.export returned no program")
        program.save(str(out), external_data=False)
        log.debug("stage %d: dynamo ONNX export -> %s", stage_index, out)
        return
    except Exception as exc:  # the exporter raises many unrelated types
        reason = _first_line(exc)
        if not fallback:
            raise PartitionError(f"stage {stage_index}: ONNX export (dynamo) failed: "
                                 f"{reason}") from exc
        log.warning("stage %d: dynamo ONNX export failed (%s); trying the TorchScript "
                    "exporter", stage_index, reason)
    try:
        axes = {name: {0: "batch"} for name, a in zip(names, args, strict=True) if a.dim() > 0}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(stage, args, str(out), dynamo=False, input_names=names,
                              dynamic_axes=axes)
    except Exception as exc:
        raise PartitionError(f"stage {stage_index}: ONNX export failed with the dynamo "
                             f"exporter ({reason}) and with the TorchScript exporter "
                             f"({_first_line(exc)}); save without ONNX "
                             f"(onnx=False / --no-onnx)") from exc


def run_onnx(path: str | Path, args: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run an ONNX file in onnxruntime (CPU) and return its outputs as tensors."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.detach().cpu().numpy()
             for i, a in zip(session.get_inputs(), args, strict=False)}
    if len(feeds) != len(session.get_inputs()):
        raise PartitionError(f"{str(path)!r} takes {len(session.get_inputs())} inputs, "
                             f"got {len(args)}")
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def check_stage_onnx(stage: torch.nn.Module, args: Sequence[torch.Tensor], path: str | Path,
                     *, stage_index: int = 0, tolerance: float = ONNX_TOLERANCE) -> float:
    """Compare the ONNX file with ``stage`` (eval mode) at two batch sizes; the largest
    difference relative to the output's magnitude (when above 1; see :data:`ONNX_TOLERANCE`).

    Raises:
        PartitionError: a difference above ``tolerance``, or a different number/shape of
            outputs.
    """
    worst = 0.0
    for batch_args in (tuple(args), _grow_batch(args)):
        with torch.no_grad():
            expected = _flatten(stage(*batch_args))
        got = run_onnx(path, batch_args)
        batch = batch_args[0].shape[0] if batch_args and batch_args[0].dim() else 0
        if len(got) != len(expected):
            raise PartitionError(f"stage {stage_index}: the ONNX file returns {len(got)} "
                                 f"outputs, torch returns {len(expected)} (batch {batch})")
        for k, (g, e) in enumerate(zip(got, expected, strict=True)):
            if tuple(g.shape) != tuple(e.shape):
                raise PartitionError(f"stage {stage_index}: ONNX output {k} has shape "
                                     f"{list(g.shape)}, torch {list(e.shape)} (batch {batch})")
            if e.numel() == 0:
                continue
            diff = float((g.to(torch.float64) - e.to(torch.float64)).abs().max())
            scale = max(1.0, float(e.to(torch.float64).abs().max()))
            worst = max(worst, diff / scale)
            if not diff <= tolerance * scale:
                raise PartitionError(
                    f"stage {stage_index}: ONNX output {k} differs from torch by {diff:.3g} "
                    f"(tolerance {tolerance:g} x {scale:.3g}, its largest magnitude, batch "
                    f"{batch}); the exported file is not faithful, save without ONNX "
                    f"(onnx=False / --no-onnx)")
    log.debug("stage %d: ONNX matches torch within %.3g", stage_index, worst)
    return worst


def _grow_batch(args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The same arguments with one more sample (the first sample repeated)."""
    return tuple(torch.cat([a, a[:1]]) if a.dim() > 0 else a for a in args)


def _flatten(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flatten(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    return []


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
