"""The cost table: per-layer times, bytes and cut sizes of one model, as plain JSON data."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from contracts.arguments import is_int
from contracts.errors import MALFORMED, CostModelError, parse_json, read_json
from contracts.files import write_text

__all__ = ["TimeFit", "LayerCost", "DeviceColumn", "CostTable", "RuntimeOverhead", "TiedWeight",
           "COST_TABLE_VERSION", "COLUMN_SOURCES", "UNMEASURED_TYPES"]

COST_TABLE_VERSION = 2
"""Version 2 adds ``device_type`` and ``columns``; version 1 files are still read."""

COLUMN_SOURCES = ("measured", "calibrated", "analytic")
"""Where a column's times come from: a profiler run on a device of its type, a measured
table corrected by what a training run measured (``asteroid-fx calibrate``), or the
FLOP/byte model."""

UNMEASURED_TYPES = ("local", "custom")
"""Types that never have a column of their own: ``local`` is the table's own host (the
base times, scaled by ``speed``) and ``custom`` devices are declared by their speed."""


@dataclass(frozen=True)
class TimeFit:
    """Seconds on the profiling host as a function of batch size: ``intercept + per_sample*b``."""

    intercept_s: float
    per_sample_s: float

    def __post_init__(self) -> None:
        for value in (self.intercept_s, self.per_sample_s):
            if not math.isfinite(value) or value < 0:
                raise CostModelError(
                    f"time fit coefficients must be finite and >= 0, got "
                    f"({self.intercept_s!r}, {self.per_sample_s!r}); re-run `asteroid-fx profile`"
                )

    def at(self, batch: float) -> float:
        """Time in seconds for ``batch`` samples (0 samples cost nothing)."""
        if batch <= 0:
            return 0.0
        return self.intercept_s + self.per_sample_s * batch

    def to_list(self) -> list[float]:
        return [self.intercept_s, self.per_sample_s]

    def scaled(self, factor: float) -> TimeFit:
        """Both coefficients times ``factor`` (> 0)."""
        return TimeFit(self.intercept_s * factor, self.per_sample_s * factor)

    @classmethod
    def from_list(cls, value: Sequence[float]) -> TimeFit:
        if len(value) != 2:
            raise CostModelError(f"a time fit is [intercept_s, per_sample_s], got {value!r}")
        return cls(float(value[0]), float(value[1]))


@dataclass(frozen=True)
class LayerCost:
    """Costs of one layer (a node group of the traced graph that does work).

    Times are on the profiling host (``CostTable.host``); bytes are per sample unless
    the name says otherwise.
    """

    name: str
    op: str
    fwd: TimeFit
    bwd: TimeFit
    param_bytes: int
    activation_bytes: int  # per sample, kept alive for backward
    output_bytes: int  # per sample, the layer's output tensor(s)
    flops: float = 0.0  # forward FLOPs per sample (analytic; 0 when unknown)
    buffer_bytes: int = 0  # non-trainable state (BatchNorm running stats)

    def __post_init__(self) -> None:
        for what in ("param_bytes", "activation_bytes", "output_bytes", "buffer_bytes"):
            value = getattr(self, what)
            if not is_int(value) or value < 0:
                raise CostModelError(f"layer {self.name!r}: {what} must be an integer >= 0, "
                                     f"got {value!r}; re-run `asteroid-fx profile`")
        if not (math.isfinite(self.flops) and self.flops >= 0):
            raise CostModelError(f"layer {self.name!r}: flops must be finite and >= 0, got "
                                 f"{self.flops!r}; re-run `asteroid-fx profile`")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op": self.op,
            "fwd": self.fwd.to_list(),
            "bwd": self.bwd.to_list(),
            "param_bytes": self.param_bytes,
            "activation_bytes": self.activation_bytes,
            "output_bytes": self.output_bytes,
            "flops": self.flops,
            "buffer_bytes": self.buffer_bytes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerCost:
        try:
            return cls(
                name=str(data["name"]),
                op=str(data["op"]),
                fwd=TimeFit.from_list(data["fwd"]),
                bwd=TimeFit.from_list(data["bwd"]),
                param_bytes=_bytes(data["param_bytes"], f"layer {data['name']!r}: param_bytes"),
                activation_bytes=_bytes(data["activation_bytes"],
                                        f"layer {data['name']!r}: activation_bytes"),
                output_bytes=_bytes(data["output_bytes"],
                                    f"layer {data['name']!r}: output_bytes"),
                flops=float(data.get("flops", 0.0)),
                buffer_bytes=_bytes(data.get("buffer_bytes", 0),
                                    f"layer {data['name']!r}: buffer_bytes"),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            if isinstance(exc, CostModelError):
                raise
            raise CostModelError(f"malformed layer entry {dict(data)!r}: {exc}") from exc


MAX_BYTES = 2**50
"""The most bytes one size of a cost table may hold (a pebibyte: past it, a typo or a broken
tool; 1e30 reached the planner and overflowed there)."""


def _bytes(value: Any, what: str) -> int:
    """A byte count of a table's JSON: a whole number from 0 to ``MAX_BYTES`` (an integral
    float such as ``4096.0`` is taken; ``1.5``, ``true`` and strings are not)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not is_int(value) or not 0 <= value <= MAX_BYTES:
        raise CostModelError(f"{what} must be an integer >= 0 (bytes, at most 2^50), got "
                             f"{value!r}; re-run `asteroid-fx profile`")
    return value


def _workspace(value: Any) -> int | None:
    """A table's ``workspace_bytes`` entry: None (absent: not measured) or bytes >= 0."""
    if value is None:
        return None
    if not is_int(value) or value < 0:
        raise CostModelError(f"workspace_bytes must be an integer >= 0 or null, got {value!r}")
    return value


def _fits(values: Any, what: str, count: int) -> tuple[TimeFit, ...]:
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != count:
        raise CostModelError(f"{what} must list one [intercept_s, per_sample_s] per layer "
                             f"({count}), got {values!r:.80}")
    return tuple(TimeFit.from_list(v) for v in values)


@dataclass(frozen=True)
class RuntimeOverhead:
    """What the training runtime costs on a device beyond its layers' times, in seconds
    of that device (or of one core of the profiling host, for the base times: devices
    that scale the base divide these by their speed too). See docs/latency-model.md,
    "Runtime overhead"; measured by ``asteroid_fx.runtime_overhead``.

    ``forward_s`` / ``backward_s``: per stage call (one micro-batch on one device):
    calling the stage module and the loss, the autograd engine's launch, and running a
    stage right after a wait, with colder caches than back-to-back layers.
    ``round_s``: per device and round: the round's bookkeeping, ``zero_grad``, the
    optimizer's fixed cost (its per-byte cost is ``update_s_per_byte``).
    """

    forward_s: float = 0.0
    backward_s: float = 0.0
    round_s: float = 0.0

    def __post_init__(self) -> None:
        for value, what in ((self.forward_s, "forward_s"), (self.backward_s, "backward_s"),
                            (self.round_s, "round_s")):
            if isinstance(value, bool) or not (math.isfinite(value) and value >= 0):
                raise CostModelError(f"runtime_overhead.{what} must be finite and >= 0 "
                                     f"seconds, got {value!r}")

    @property
    def is_zero(self) -> bool:
        return self.forward_s == 0.0 and self.backward_s == 0.0 and self.round_s == 0.0

    def describe(self) -> str:
        """One phrase, e.g. ``0.108 / 0.133 ms per stage call (F / B), 0.173 ms per
        round``."""
        return (f"{self.forward_s * 1e3:.3f} / {self.backward_s * 1e3:.3f} ms per stage call "
                f"(F / B), {self.round_s * 1e3:.3f} ms per round")

    def to_dict(self) -> dict[str, float]:
        return {"forward_s": self.forward_s, "backward_s": self.backward_s,
                "round_s": self.round_s}

    @classmethod
    def from_dict(cls, data: Any) -> RuntimeOverhead:
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise CostModelError(f"runtime_overhead is a JSON object with forward_s, "
                                 f"backward_s and round_s, got {data!r:.80}")
        try:
            return cls(forward_s=float(data.get("forward_s", 0.0)),
                       backward_s=float(data.get("backward_s", 0.0)),
                       round_s=float(data.get("round_s", 0.0)))
        except (TypeError, ValueError) as exc:
            raise CostModelError(f"malformed runtime_overhead {data!r:.80}: {exc}") from exc


@dataclass(frozen=True)
class TiedWeight:
    """A trained tensor that several layers use (a token embedding that is also the output
    head): ``bytes`` counted once, in the first of ``layers`` (``LayerCost.param_bytes``).
    A plan that puts ``layers`` in several stages holds a copy in each and sums their
    gradients over every device of those stages each round (runtime/ties.py)."""

    name: str
    layers: tuple[int, ...]
    bytes: int

    def __post_init__(self) -> None:
        if len(set(self.layers)) < 2 or list(self.layers) != sorted(set(self.layers)):
            raise CostModelError(f"tied weight {self.name!r} needs two or more distinct layers "
                                 f"in order, got {list(self.layers)}")
        if self.bytes < 0:
            raise CostModelError(f"tied weight {self.name!r} has {self.bytes} bytes; "
                                 f"re-run `asteroid-fx profile`")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "layers": list(self.layers), "bytes": self.bytes}

    @classmethod
    def from_dict(cls, data: Any) -> TiedWeight:
        if not isinstance(data, Mapping):
            raise CostModelError(f"a tied weight is a JSON object, got {data!r}")
        return cls(str(data["name"]), tuple(int(v) for v in data["layers"]),
                   _bytes(data["bytes"], f"tied weight {data['name']!r}: bytes"))


@dataclass(frozen=True)
class DeviceColumn:
    """One device type's per-layer times (``fwd[i]``/``bwd[i]`` for layer ``i``) and
    optimizer step, taken as they are for every device of that type: no ``speed`` is
    applied on top (see docs/latency-model.md, "Cost columns").

    ``host`` / ``torch_version`` / ``host_flops`` describe the device that measured it.
    """

    device_type: str
    fwd: tuple[TimeFit, ...]
    bwd: tuple[TimeFit, ...]
    update_s_per_byte: float = 0.0
    source: str = "measured"
    host: str = ""
    torch_version: str = ""
    host_flops: float = 0.0
    meta: Mapping[str, Any] = field(default_factory=dict)
    runtime_overhead: RuntimeOverhead = field(default_factory=RuntimeOverhead)
    #: the runtime's seconds per message on a device of this type, as measured there
    #: (``CostTable.message_overhead_s`` of its table); 0: not measured, so such a device
    #: pays the base's figure over its declared speed (``CostTable.message_cost_s``)
    message_overhead_s: float = 0.0
    #: fixed bytes a training process held on this type beyond its tensors, as measured
    #: there (cuBLAS's workspaces on a GPU); None: not measured, the type's default holds
    #: (contracts/devices.py)
    workspace_bytes: int | None = None

    def __post_init__(self) -> None:
        if not self.device_type or self.device_type in UNMEASURED_TYPES:
            raise CostModelError(
                f"a cost column needs a device type other than {' or '.join(UNMEASURED_TYPES)}, "
                f"got {self.device_type!r}; profile with `--device-type TYPE` on that device")
        from contracts.devices import DEVICE_TYPES

        if self.device_type not in DEVICE_TYPES:
            known = ", ".join(sorted(t for t in DEVICE_TYPES if t not in UNMEASURED_TYPES))
            raise CostModelError(
                f"cost column for unknown device type {self.device_type!r}; known types: "
                f"{known} (profile with --device-type set to the type used in cluster.yaml)")
        if len(self.fwd) != len(self.bwd):
            raise CostModelError(f"column {self.device_type!r} has {len(self.fwd)} forward "
                                 f"and {len(self.bwd)} backward times")
        if self.source not in COLUMN_SOURCES:
            raise CostModelError(f"column {self.device_type!r}: source must be one of "
                                 f"{COLUMN_SOURCES}, got {self.source!r}")
        for value, what in ((self.update_s_per_byte, "update_s_per_byte"),
                            (self.host_flops, "host_flops"),
                            (self.message_overhead_s, "message_overhead_s")):
            if not (math.isfinite(value) and value >= 0):
                raise CostModelError(f"column {self.device_type!r}: {what} must be finite "
                                     f"and >= 0, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_type": self.device_type,
            "source": self.source,
            "host": self.host,
            "torch_version": self.torch_version,
            "host_flops": self.host_flops,
            "update_s_per_byte": self.update_s_per_byte,
            "fwd": [f.to_list() for f in self.fwd],
            "bwd": [b.to_list() for b in self.bwd],
            "meta": dict(self.meta),
            "runtime_overhead": self.runtime_overhead.to_dict(),
            "message_overhead_s": self.message_overhead_s,
            "workspace_bytes": self.workspace_bytes,
        }

    @classmethod
    def from_dict(cls, data: Any, num_layers: int) -> DeviceColumn:
        if not isinstance(data, Mapping):
            raise CostModelError(f"a cost column is a JSON object, got {data!r:.80}")
        try:
            name = str(data["device_type"])
            return cls(
                device_type=name,
                fwd=_fits(data["fwd"], f"column {name!r} fwd", num_layers),
                bwd=_fits(data["bwd"], f"column {name!r} bwd", num_layers),
                update_s_per_byte=float(data.get("update_s_per_byte", 0.0)),
                source=str(data.get("source", "measured")),
                host=str(data.get("host", "")),
                torch_version=str(data.get("torch_version", "")),
                host_flops=float(data.get("host_flops", 0.0)),
                meta=dict(data.get("meta", {})),
                runtime_overhead=RuntimeOverhead.from_dict(data.get("runtime_overhead")),
                message_overhead_s=float(data.get("message_overhead_s", 0.0)),
                workspace_bytes=_workspace(data.get("workspace_bytes")),
            )
        except KeyError as exc:
            raise CostModelError(f"a cost column is missing the field {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise CostModelError(f"malformed cost column: {exc}") from exc


@dataclass(frozen=True)
class CostTable:
    """Per-layer costs of one model in topological order, plus the bytes across every cut.

    ``cut_bytes[i]`` is the number of bytes per sample of **all** tensors live across the
    cut between layer ``i`` and layer ``i + 1`` (skip connections included), so it has
    ``len(layers) - 1`` entries. ``host_flops`` is the effective FLOP/s of one core of
    the profiling host; built-in device types are scaled against it (see
    ``contracts.devices``). ``update_s_per_byte`` is the host's time for one optimizer
    step per byte of parameters (0 when unknown: tables from before it was measured).

    The layers' times are the *base column*: they were measured (or modelled) on a device
    of type ``device_type`` (``"local"``: the workstation that ran ``profile``). Devices of
    that type, when it is not ``local``, take them as they are; ``columns`` hold further
    types measured on their own devices (``asteroid-fx costs merge``). Every other device
    scales the base times by its ``speed`` (``Cluster`` / ``contracts.devices``). See
    :meth:`column` and :meth:`timing_source`.
    """

    layers: tuple[LayerCost, ...]
    cut_bytes: tuple[int, ...]
    input_bytes: int
    model_name: str
    model_hash: str
    host: str
    host_flops: float
    source: str  # "measured" or "analytic"
    torch_version: str = ""
    batch_sizes: tuple[int, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)
    update_s_per_byte: float = 0.0  # one optimizer step, seconds per parameter byte
    device_type: str = "local"  # the type the base times were measured on
    optimizer_state_factor: float = 0.0  # optimizer state per weight byte (measured)
    #: the runtime's cost of one message on top of the link, in seconds of one core of the
    #: base device (probed or calibrated); a device of speed ``v`` pays it over ``v``, and a
    #: message pays the slower end's (``message_cost_s``)
    message_overhead_s: float = 0.0
    columns: tuple[DeviceColumn, ...] = ()  # other measured types, sorted by type
    #: the runtime's own cost per stage call and round on the base device (measured)
    runtime_overhead: RuntimeOverhead = field(default_factory=RuntimeOverhead)
    #: fixed bytes a training process held on the profiling device beyond its tensors
    #: (cuBLAS's workspaces, measured on CUDA); None: not measured (a CPU has none to
    #: measure), so devices keep their type's default (contracts/devices.py)
    workspace_bytes: int | None = None
    #: tensors several layers use (weight tying), each counted in its first layer only
    tied: tuple[TiedWeight, ...] = ()

    def __post_init__(self) -> None:
        for tie in self.tied:
            if tie.layers[0] < 0 or tie.layers[-1] >= len(self.layers):
                bad = tie.layers[0] if tie.layers[0] < 0 else tie.layers[-1]
                raise CostModelError(f"tied weight {tie.name!r} names layer {bad}, but the "
                                     f"table's layers are 0 to {len(self.layers) - 1}")
        for value, what in ((self.optimizer_state_factor, "optimizer_state_factor"),
                            (self.message_overhead_s, "message_overhead_s")):
            if not (math.isfinite(value) and value >= 0):
                raise CostModelError(f"{what} must be finite and >= 0, got {value!r}")
        if not self.device_type or self.device_type == "custom":
            raise CostModelError(f"a cost table's device_type must name a device type "
                                 f"(e.g. local, jetson-nano), got {self.device_type!r}")
        seen = {self.device_type}
        for col in self.columns:
            if col.device_type in seen:
                raise CostModelError(f"the cost table has two columns for device type "
                                     f"{col.device_type!r}; merge tables of distinct types")
            seen.add(col.device_type)
            if len(col.fwd) != len(self.layers):
                raise CostModelError(f"column {col.device_type!r} has {len(col.fwd)} layers, "
                                     f"the table {len(self.layers)}")
        if not (math.isfinite(self.update_s_per_byte) and self.update_s_per_byte >= 0):
            raise CostModelError(
                f"update_s_per_byte must be finite and >= 0, got {self.update_s_per_byte!r}; "
                "re-run `asteroid-fx profile`"
            )
        if not self.layers:
            raise CostModelError("a cost table needs at least one layer, got none")
        if len(self.cut_bytes) != len(self.layers) - 1:
            raise CostModelError(
                f"cut_bytes must have len(layers) - 1 = {len(self.layers) - 1} entries, "
                f"got {len(self.cut_bytes)}"
            )
        bad_cuts = [(i, v) for i, v in enumerate(self.cut_bytes) if v < 0]
        if bad_cuts or self.input_bytes < 0:
            shown = bad_cuts[0] if bad_cuts else ("input", self.input_bytes)
            raise CostModelError(f"cut_bytes and input_bytes must be >= 0, got {shown[1]} at "
                                 f"{shown[0]}; re-run `asteroid-fx profile`")
        if not (self.host_flops > 0 and math.isfinite(self.host_flops)):
            raise CostModelError(f"host_flops must be > 0, got {self.host_flops!r}")
        if self.source not in COLUMN_SOURCES:
            raise CostModelError(
                f"source must be one of {', '.join(COLUMN_SOURCES)}, got {self.source!r}"
            )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def total_param_bytes(self) -> int:
        return sum(layer.param_bytes for layer in self.layers)

    @property
    def base_column(self) -> DeviceColumn | None:
        """The base times as a column when they were measured on a board type (``profile
        --device-type``), else None (``local``: they describe the workstation)."""
        if self.device_type in UNMEASURED_TYPES:
            return None
        return DeviceColumn(
            device_type=self.device_type,
            fwd=tuple(lc.fwd for lc in self.layers),
            bwd=tuple(lc.bwd for lc in self.layers),
            update_s_per_byte=self.update_s_per_byte,
            source=self.source,
            host=self.host, torch_version=self.torch_version, host_flops=self.host_flops,
            runtime_overhead=self.runtime_overhead,
            message_overhead_s=self.message_overhead_s,
            workspace_bytes=self.workspace_bytes,
        )

    def without_runtime_overhead(self) -> CostTable:
        """This table with no runtime overhead on the base or any column: its stage
        times are the layers' sums alone (what one layer costs, shown per layer)."""
        zero = RuntimeOverhead()
        return replace(self, runtime_overhead=zero,
                       columns=tuple(replace(c, runtime_overhead=zero) for c in self.columns))

    @property
    def measured_types(self) -> tuple[str, ...]:
        """The device types with times of their own (base column first, then columns)."""
        base = () if self.device_type in UNMEASURED_TYPES else (self.device_type,)
        return base + tuple(col.device_type for col in self.columns)

    def column(self, device_type: str) -> DeviceColumn | None:
        """The times devices of ``device_type`` take as they are, or None when they scale
        the base times by their speed (``local``, ``custom`` and unmeasured types)."""
        if device_type == self.device_type:
            return self.base_column
        for col in self.columns:
            if col.device_type == device_type:
                return col
        return None

    def workspace_of(self, device_type: str) -> int | None:
        """The fixed workspace measured for devices of ``device_type`` (the base's for its
        own type, else its column's), or None where none was measured."""
        if device_type == self.device_type:
            return self.workspace_bytes
        col = self.column(device_type)
        return None if col is None else col.workspace_bytes

    def runtime_overhead_of(self, device_type: str) -> RuntimeOverhead:
        """The runtime overhead devices of ``device_type`` take: their column's, else the
        base's (which scaled devices divide by their speed)."""
        col = self.column(device_type)
        return self.runtime_overhead if col is None else col.runtime_overhead

    def message_cost_s(self, device_type: str, speed: float) -> float:
        """The runtime's seconds per message on a device of ``device_type`` and declared
        ``speed`` (see docs/latency-model.md, "The runtime's own overhead"): its column's
        ``message_overhead_s`` when that type measured one, else the base's
        ``message_overhead_s`` (seconds of the profiling host's core) over ``speed``."""
        col = self.column(device_type)
        if col is not None and col.message_overhead_s > 0.0:
            return col.message_overhead_s
        if self.message_overhead_s == 0.0:
            return 0.0
        return self.message_overhead_s / speed

    def timing_source(self, device_type: str) -> str:
        """One phrase: where devices of ``device_type`` take their times from."""
        col = self.column(device_type)
        if col is not None:
            where = f" on {col.host}" if col.host else ""
            return f"{col.source} on a {device_type}{where}"
        base = f"{self.source} on {self.host or 'the profiling host'}"
        if device_type == "local":
            return base
        if device_type == "custom":
            return f"scaled by speed from {base}"
        return f"scaled by speed from {base} (no {device_type} column)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": COST_TABLE_VERSION,
            "model_name": self.model_name,
            "model_hash": self.model_hash,
            "host": self.host,
            "host_flops": self.host_flops,
            "source": self.source,
            "torch_version": self.torch_version,
            "batch_sizes": list(self.batch_sizes),
            "input_bytes": self.input_bytes,
            "cut_bytes": list(self.cut_bytes),
            "layers": [layer.to_dict() for layer in self.layers],
            "meta": dict(self.meta),
            "update_s_per_byte": self.update_s_per_byte,
            "device_type": self.device_type,
            "optimizer_state_factor": self.optimizer_state_factor,
            "message_overhead_s": self.message_overhead_s,
            "columns": [col.to_dict() for col in self.columns],
            "runtime_overhead": self.runtime_overhead.to_dict(),
            "workspace_bytes": self.workspace_bytes,
            **({"tied": [t.to_dict() for t in self.tied]} if self.tied else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostTable:
        if not isinstance(data, Mapping):
            raise CostModelError(f"a cost table is a JSON object, got {type(data).__name__}")
        version = data.get("version", COST_TABLE_VERSION)
        if version not in (1, COST_TABLE_VERSION):
            newer = isinstance(version, int) and version > COST_TABLE_VERSION
            raise CostModelError(
                f"cost table version {version!r} is not supported (this asteroid-fx reads "
                f"1..{COST_TABLE_VERSION}); "
                + ("upgrade asteroid-fx" if newer else "re-run `asteroid-fx profile`")
            )
        try:
            return cls(
                layers=tuple(LayerCost.from_dict(item) for item in data["layers"]),
                cut_bytes=tuple(_bytes(v, f"cut_bytes[{i}]")
                                for i, v in enumerate(data["cut_bytes"])),
                input_bytes=_bytes(data["input_bytes"], "input_bytes"),
                model_name=str(data["model_name"]),
                model_hash=str(data["model_hash"]),
                host=str(data["host"]),
                host_flops=float(data["host_flops"]),
                source=str(data["source"]),
                torch_version=str(data.get("torch_version", "")),
                batch_sizes=tuple(int(b) for b in data.get("batch_sizes", ())),
                meta=dict(data.get("meta", {})),
                update_s_per_byte=float(data.get("update_s_per_byte", 0.0)),
                device_type=str(data.get("device_type", "local")),
                optimizer_state_factor=float(data.get("optimizer_state_factor", 0.0)),
                message_overhead_s=float(data.get("message_overhead_s", 0.0)),
                columns=tuple(DeviceColumn.from_dict(c, len(data["layers"]))
                              for c in data.get("columns", ())),
                runtime_overhead=RuntimeOverhead.from_dict(data.get("runtime_overhead")),
                workspace_bytes=_workspace(data.get("workspace_bytes")),
                tied=tuple(TiedWeight.from_dict(t) for t in data.get("tied", ())),
            )
        except KeyError as exc:
            raise CostModelError(f"cost table is missing the field {exc.args[0]!r}") from exc
        except MALFORMED as exc:   # (a field of the wrong type or size)
            if isinstance(exc, CostModelError):
                raise
            raise CostModelError(f"malformed cost table: {type(exc).__name__}: {exc}; "
                                 f"re-create it with `asteroid-fx profile`") from None

    @classmethod
    def from_json(cls, text: str) -> CostTable:
        return cls.from_dict(parse_json(text, CostModelError, "cost table",
                                        "re-create it with `asteroid-fx profile`"))

    def save(self, path: str | Path) -> None:
        """Write the JSON to ``path`` whole or not at all ([Note: whole files] in
        ``contracts.files``)."""
        write_text(path, self.to_json(), "cost table")

    @classmethod
    def load(cls, path: str | Path) -> CostTable:
        p = Path(path)
        fix = f"create it with `asteroid-fx profile MODEL --out {p}`"
        return cls.from_dict(read_json(p, CostModelError, "cost table", fix))
