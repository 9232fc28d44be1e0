"""Per-stage training state (weights + optimizer state by parameter name) and its files."""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asteroid_fx.errors import RuntimeFailure

__all__ = [
    "StageState",
    "capture_state",
    "apply_state",
    "merge_states",
    "slice_state",
    "state_to_bytes",
    "state_from_bytes",
    "checkpoint_file",
    "write_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
]

log = logging.getLogger(__name__)

# [Note: stage state]
# A stage's state is named by the *qualified names of the whole model* (the stage modules
# keep them, see runtime.train.load_stage_weights), so states of any partition merge into
# one whole-model state and re-slice for any other partition: this is what lets a new plan
# with other stage boundaries start from the old stages' weights. Optimizer state is kept
# per parameter name (``optimizer.state[param]``); hyper-parameters come from the run's
# configuration, so they are not stored. ``step`` is the last optimizer step the state
# includes (-1: the seeded initial weights).

_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class StageState:
    """Weights/buffers and per-parameter optimizer state after optimizer step ``step``."""

    step: int
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    optim: dict[str, dict[str, Any]] = field(default_factory=dict)


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def capture_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                  step: int) -> StageState:
    """Copy ``module``'s state dict and ``optimizer``'s per-parameter state by name."""
    model = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    optim: dict[str, dict[str, Any]] = {}
    if optimizer is not None:
        names = {id(p): n for n, p in module.named_parameters()}
        for param, state in optimizer.state.items():
            name = names.get(id(param))
            if name is not None and state:
                optim[name] = {k: _clone(v) for k, v in state.items()}
    return StageState(step=step, model=model, optim=optim)


def apply_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                state: StageState) -> None:
    """Load ``state`` into ``module`` (every entry of its state dict must be present) and
    its optimizer state into ``optimizer`` (by parameter name)."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state.model)
    if missing:
        raise RuntimeFailure(f"the restored state lacks {missing[:5]} (step {state.step}); "
                             f"the checkpoint or replica does not belong to this model")
    module.load_state_dict({k: state.model[k] for k in own}, strict=True)
    if optimizer is None:
        return
    params = dict(module.named_parameters())
    for name, values in state.optim.items():
        param = params.get(name)
        if param is not None:
            optimizer.state[param] = {k: (v.detach().clone().to(param.device)
                                          if isinstance(v, torch.Tensor) and v.dim() > 0
                                          else _clone(v)) for k, v in values.items()}


def merge_states(states: Iterable[StageState]) -> StageState:
    """One whole-model state from stage states of one step (StageState of that step)."""
    items = list(states)
    if not items:
        raise RuntimeFailure("no stage state to merge")
    steps = {s.step for s in items}
    if len(steps) != 1:
        raise RuntimeFailure(f"stage states of different steps {sorted(steps)} cannot be "
                             f"merged: every stage must restart from the same step")
    merged = StageState(step=items[0].step)
    for s in items:
        merged.model.update(s.model)
        merged.optim.update(s.optim)
    return merged


def slice_state(state: StageState, names: Iterable[str]) -> StageState:
    """The part of a whole-model ``state`` that a stage with state-dict ``names`` needs."""
    wanted = list(names)
    missing = sorted(n for n in wanted if n not in state.model)
    if missing:
        raise RuntimeFailure(f"the saved state of step {state.step} lacks {missing[:5]}")
    return StageState(step=state.step, model={n: state.model[n] for n in wanted},
                      optim={n: v for n, v in state.optim.items() if n in set(wanted)})


def state_to_bytes(state: StageState) -> bytes:
    buffer = io.BytesIO()
    torch.save({"step": state.step, "model": state.model, "optim": state.optim}, buffer)
    return buffer.getvalue()


def state_from_bytes(data: bytes) -> StageState:
    raw = torch.load(io.BytesIO(data), weights_only=True)
    return StageState(step=int(raw["step"]), model=dict(raw["model"]), optim=dict(raw["optim"]))


def checkpoint_file(root: str | Path, step: int, plan_version: int, stage: int) -> Path:
    """``root/step_<step>/v<plan_version>_stage_<stage>.pt``."""
    return Path(root) / f"step_{step:06d}" / f"v{plan_version}_stage_{stage}.pt"


def write_checkpoint(root: str | Path, plan_version: int, stage: int, state: StageState,
                     data: bytes | None = None) -> Path:
    """Write one stage's state atomically (temporary file + rename)."""
    path = checkpoint_file(root, state.step, plan_version, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(state_to_bytes(state) if data is None else data)
    os.replace(tmp, path)
    return path


def _complete(directory: Path, plan_version: int, num_stages: int) -> bool:
    return all((directory / f"v{plan_version}_stage_{i}.pt").is_file()
               for i in range(num_stages))


def latest_checkpoint(root: str | Path, plan_version: int, num_stages: int, *,
                      at_most: int | None = None) -> int | None:
    """The newest step (<= ``at_most``) for which every stage of that plan wrote its file."""
    base = Path(root)
    if not base.is_dir():
        return None
    steps = []
    for child in base.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            step = int(match.group(1))
            if (at_most is None or step <= at_most) and _complete(child, plan_version,
                                                                   num_stages):
                steps.append(step)
    return max(steps) if steps else None


def load_checkpoint(root: str | Path, step: int, plan_version: int,
                    num_stages: int) -> StageState:
    """Whole-model state of ``step`` merged from every stage's file."""
    states = []
    for i in range(num_stages):
        path = checkpoint_file(root, step, plan_version, i)
        if not path.is_file():
            raise RuntimeFailure(f"checkpoint {path} is missing; the checkpoint of step {step} "
                                 f"is incomplete")
        states.append(state_from_bytes(path.read_bytes()))
    return merge_states(states)


def prune_checkpoints(root: str | Path, keep: Mapping[int, Any] | Iterable[int]) -> None:
    """Remove step directories not in ``keep``."""
    base = Path(root)
    if not base.is_dir():
        return
    kept = set(keep)
    for child in base.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and int(match.group(1)) not in kept:
            shutil.rmtree(child, ignore_errors=True)
