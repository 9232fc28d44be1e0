"""Per-stage training state (weights + optimizer state by parameter name) and its files."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Tuple

import torch

from contracts.arguments import is_int
from contracts.errors import ProtocolError, RuntimeFailure

__all__ = [
    "StageState",
    "StateBuffer",
    "capture_state",
    "apply_state",
    "merge_states",
    "slice_state",
    "state_to_bytes",
    "state_from_bytes",
    "state_names",
    "join_state",
    "header_names",
    "checkpoint_file",
    "write_checkpoint",
    "write_checkpoint_bytes",
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

# [Note: flat state format]
# ``state_to_bytes`` writes MAGIC, a little-endian uint64 header length, a JSON header
# (step, per tensor: section, name, field, dtype, shape, offset; non-tensor optimizer values)
# and then every tensor's raw bytes, each at an 8-byte aligned offset. ``StateBuffer`` keeps
# one preallocated flat buffer in exactly that layout, so taking a snapshot after an
# optimizer step is one ``copy_`` per tensor (no pickling, no allocation) and serialising
# it is one ``bytes`` copy. ``state_from_bytes`` reads this format and, for old files,
# ``torch.save`` archives.
_MAGIC = b"AFXSTATE1"
_ALIGN = 8
_JSONABLE = (bool, int, float, str, type(None))


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


Entry = Tuple[str, str, str, torch.Tensor]          # (section, name, field, tensor)


def _entries(state: StageState) -> tuple[list[Entry], dict[str, dict[str, Any]]] | None:
    """Tensors of ``state`` in a fixed order and its JSON-able non-tensor optimizer values;
    None when some value is neither (then the torch.save format is used)."""
    items: list[Entry] = [("model", name, "", t) for name, t in state.model.items()]
    extras: dict[str, dict[str, Any]] = {}
    for name, values in state.optim.items():
        for fld, value in values.items():
            if isinstance(value, torch.Tensor):
                items.append(("optim", name, fld, value))
            elif isinstance(value, _JSONABLE):
                extras.setdefault(name, {})[fld] = value
            else:
                return None
    return items, extras


def _module_entries(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                    ) -> tuple[list[Entry], dict[str, dict[str, Any]]] | None:
    optim: dict[str, dict[str, Any]] = {}
    if optimizer is not None:
        names = {id(p): n for n, p in module.named_parameters()}
        for param, st in optimizer.state.items():
            name = names.get(id(param))
            if name is not None and st:
                optim[name] = dict(st)
    return _entries(StageState(step=0, model=dict(module.state_dict()), optim=optim))


def _layout(items: list[Entry]) -> tuple[list[dict[str, Any]], int]:
    rows: list[dict[str, Any]] = []
    offset = 0
    for section, name, fld, t in items:
        nbytes = t.numel() * t.element_size()
        rows.append({"s": section, "n": name, "f": fld, "d": str(t.dtype).split(".")[-1],
                     "shape": list(t.shape), "o": offset})
        offset += -(-nbytes // _ALIGN) * _ALIGN
    return rows, offset


def _encode(step: int, rows: list[dict[str, Any]], extras: dict[str, dict[str, Any]],
            payload: bytes | memoryview) -> bytes:
    header = json.dumps({"step": step, "t": rows, "x": extras}).encode()
    return b"".join((_MAGIC, struct.pack("<Q", len(header)), header, payload))


def _views(flat: torch.Tensor, rows: list[dict[str, Any]]) -> list[torch.Tensor]:
    out = []
    for row in rows:
        dtype = getattr(torch, row["d"])
        shape = tuple(row["shape"])
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        out.append(flat[row["o"]: row["o"] + nbytes].view(dtype).view(shape))
    return out


def state_to_bytes(state: StageState) -> bytes:
    """Serialise ``state`` (flat format, see [Note: flat state format])."""
    found = _entries(state)
    if found is None:
        buffer = io.BytesIO()
        torch.save({"step": state.step, "model": state.model, "optim": state.optim}, buffer)
        return buffer.getvalue()
    items, extras = found
    rows, total = _layout(items)
    flat = torch.zeros(total, dtype=torch.uint8)
    for view, (_, _, _, t) in zip(_views(flat, rows), items):
        view.copy_(t.detach())
    return _encode(state.step, rows, extras, flat.numpy().data)


#: the dtypes a flat state may hold (a header naming another is refused)
_DTYPES = {name: getattr(torch, name) for name in (
    "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
    "bool", "complex64", "complex128")}
_ITEMSIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in _DTYPES.items()}


def _bad(where: str, what: str) -> ProtocolError:
    return ProtocolError(f"{where}: {what}; it is not a stage state written by asteroid-fx")


def _header(data: bytes, where: str) -> tuple[dict[str, Any], int]:
    """The checked JSON header of flat-format ``data`` and where the tensor bytes start."""
    start = len(_MAGIC) + 8
    if len(data) < start:
        raise _bad(where, f"{len(data)} bytes is too short for the flat state format")
    (length,) = struct.unpack("<Q", data[len(_MAGIC): start])
    if start + length > len(data):
        raise _bad(where, f"the header declares {length} bytes but {len(data) - start} follow")
    try:
        header = json.loads(bytes(data[start: start + length]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(where, f"the header is not JSON ({exc})") from None
    if not isinstance(header, dict) or set(header) != {"step", "t", "x"} \
            or not is_int(header["step"]) \
            or not isinstance(header["t"], list) or not isinstance(header["x"], dict):
        raise _bad(where, "the header is not {step: int, t: [...], x: {...}}")
    body = len(data) - start - length
    for row in header["t"]:
        if not isinstance(row, dict) or set(row) != {"s", "n", "f", "d", "shape", "o"}:
            raise _bad(where, f"tensor entry {str(row)[:80]} has other fields than "
                              f"s, n, f, d, shape, o")
        shape = row["shape"]
        if row["s"] not in ("model", "optim") or not isinstance(row["n"], str) \
                or not isinstance(row["f"], str) or row["d"] not in _DTYPES \
                or not isinstance(shape, list) or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape) \
                or not isinstance(row["o"], int) or isinstance(row["o"], bool) or row["o"] < 0:
            raise _bad(where, f"malformed tensor entry {str(row)[:120]}")
        numel = 1
        for d in shape:
            numel *= d
        if row["o"] + numel * _ITEMSIZE[row["d"]] > body:
            raise _bad(where, f"tensor {row['n']!r} lies beyond the {body} bytes of data")
    for name, values in header["x"].items():
        if not isinstance(values, dict) or not all(
                isinstance(v, _JSONABLE) for v in values.values()):
            raise _bad(where, f"optimizer values of {name!r} are not plain numbers")
    return header, start + length


def state_from_bytes(data: bytes, *, where: str = "stage state") -> StageState:
    """Inverse of :func:`state_to_bytes`; the tensors share one buffer (no per-tensor copies).

    The header is checked strictly (fields, dtypes among the known ones, every tensor inside
    the data). A ``torch.save`` zip archive (older files, optimizer state that is not
    tensors or numbers) is read with ``torch.load(weights_only=True)``; anything else, a
    pickle among them, is refused unread.

    Raises:
        ProtocolError: ``data`` is not a stage state (``where`` names it in the message).
    """
    if not data.startswith(_MAGIC):
        if not bytes(data[:4]) == b"PK\x03\x04":
            head = bytes(data[:8])
            what = "a pickle, refused unread" if head[:1] == b"\x80" else "an unknown format"
            raise _bad(where, f"{len(data)} bytes starting {head!r} ({what})")
        try:
            raw = torch.load(io.BytesIO(data), weights_only=True)
            return StageState(step=int(raw["step"]), model=dict(raw["model"]),
                              optim=dict(raw["optim"]))
        except Exception as exc:  # noqa: BLE001 - any failure of the restricted loader
            raise _bad(where, f"a torch.save archive that weights_only loading refuses "
                              f"({type(exc).__name__})") from None
    header, start = _header(data, where)
    body = bytearray(memoryview(data)[start:])
    flat = torch.frombuffer(body, dtype=torch.uint8) if body else torch.zeros(0, dtype=torch.uint8)
    state = StageState(step=int(header["step"]))
    for row, view in zip(header["t"], _views(flat, header["t"])):
        if row["s"] == "model":
            state.model[row["n"]] = view
        else:
            state.optim.setdefault(row["n"], {})[row["f"]] = view
    for name, values in header["x"].items():
        state.optim.setdefault(name, {}).update(values)
    return state


def join_state(header: bytes, flat: torch.Tensor) -> bytes:
    """Flat-format bytes from a :meth:`StateBuffer.header` and the matching buffer."""
    return b"".join((_MAGIC, struct.pack("<Q", len(header)), header, flat.numpy().data))


def header_names(header: bytes) -> list[str]:
    """The state-dict names listed in a :meth:`StateBuffer.header`."""
    return [row["n"] for row in json.loads(header)["t"] if row["s"] == "model"]


def state_names(data: bytes) -> list[str]:
    """The state-dict names in serialised ``data`` (reads only the header when it can)."""
    if not data.startswith(_MAGIC):
        return list(state_from_bytes(data).model)
    header, _ = _header(data, "stage state")
    return [row["n"] for row in header["t"] if row["s"] == "model"]


class StateBuffer:
    """A preallocated snapshot of one stage's state (see [Note: flat state format]).

    :meth:`capture` copies the module's state dict and the optimizer's per-parameter state
    into the buffer (re-allocating only when shapes change, e.g. when momentum buffers
    appear after the first step); :meth:`to_bytes` serialises it; :meth:`state` views it.
    """

    def __init__(self) -> None:
        self.step = -2
        self.flat = torch.zeros(0, dtype=torch.uint8)
        self._signature: tuple[Any, ...] = ()
        self._rows: list[dict[str, Any]] = []
        self._views: list[torch.Tensor] = []
        self._extras: dict[str, dict[str, Any]] = {}
        self.names: tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        return int(self.flat.numel())

    def capture(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                step: int) -> None:
        """Copy ``module``/``optimizer`` state after optimizer step ``step`` into the buffer."""
        found = _module_entries(module, optimizer)
        if found is None:
            raise RuntimeFailure("optimizer state holds values that are neither tensors nor "
                                 "plain numbers/strings; such an optimizer cannot be "
                                 "replicated (use a torch.optim optimizer)")
        items, extras = found
        signature = tuple((s, n, f, t.dtype, tuple(t.shape)) for s, n, f, t in items)
        if signature != self._signature:
            self._rows, total = _layout(items)
            self.flat = torch.zeros(total, dtype=torch.uint8)
            self._views = _views(self.flat, self._rows)
            self._signature = signature
            self.names = tuple(n for s, n, _, _ in items if s == "model")
        with torch.no_grad():
            for view, (_, _, _, t) in zip(self._views, items):
                view.copy_(t.detach())
        self._extras = {k: dict(v) for k, v in extras.items()}
        self.step = step

    def to_bytes(self) -> bytes:
        """The snapshot in the flat format (one copy of the buffer)."""
        return _encode(self.step, self._rows, self._extras, self.flat.numpy().data)

    def header(self) -> bytes:
        """The JSON header of :meth:`to_bytes` (to send it apart from :attr:`flat`)."""
        return json.dumps({"step": self.step, "t": self._rows, "x": self._extras}).encode()

    def state(self, names: Iterable[str] | None = None) -> StageState:
        """The snapshot as a :class:`StageState` of views into the buffer (all names, or
        only the state-dict entries ``names`` and their optimizer state)."""
        wanted = None if names is None else set(names)
        out = StageState(step=self.step)
        for row, view in zip(self._rows, self._views):
            if wanted is not None and row["n"] not in wanted:
                continue
            if row["s"] == "model":
                out.model[row["n"]] = view
            else:
                out.optim.setdefault(row["n"], {})[row["f"]] = view
        for name, values in self._extras.items():
            if wanted is None or name in wanted:
                out.optim.setdefault(name, {}).update(values)
        return out


def checkpoint_file(root: str | Path, step: int, plan_version: int, stage: int) -> Path:
    """``root/step_<step>/v<plan_version>_stage_<stage>.pt``."""
    return Path(root) / f"step_{step:06d}" / f"v{plan_version}_stage_{stage}.pt"


def write_checkpoint(root: str | Path, plan_version: int, stage: int, state: StageState,
                     data: bytes | None = None) -> Path:
    """Write one stage's state atomically (temporary file + rename); ``data``: the state
    already encoded (``state_to_bytes``)."""
    return write_checkpoint_bytes(root, state.step, plan_version, stage,
                                  state_to_bytes(state) if data is None else data)


def write_checkpoint_bytes(root: str | Path, step: int, plan_version: int, stage: int,
                           data: bytes) -> Path:
    """The one checkpoint writer: ``data`` (a stage state as ``state_to_bytes`` encodes
    it) to :func:`checkpoint_file` atomically (temporary file + rename), so that a reader
    never sees a partial file."""
    path = checkpoint_file(root, step, plan_version, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
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
