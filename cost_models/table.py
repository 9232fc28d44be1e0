"""The cost table: per-layer times, bytes and cut sizes of one model, as plain JSON data."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asteroid_fx.errors import CostModelError

__all__ = ["TimeFit", "LayerCost", "CostTable", "COST_TABLE_VERSION"]

COST_TABLE_VERSION = 1


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
                param_bytes=int(data["param_bytes"]),
                activation_bytes=int(data["activation_bytes"]),
                output_bytes=int(data["output_bytes"]),
                flops=float(data.get("flops", 0.0)),
                buffer_bytes=int(data.get("buffer_bytes", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CostModelError(f"malformed layer entry {dict(data)!r}: {exc}") from exc


@dataclass(frozen=True)
class CostTable:
    """Per-layer costs of one model in topological order, plus the bytes across every cut.

    ``cut_bytes[i]`` is the number of bytes per sample of **all** tensors live across the
    cut between layer ``i`` and layer ``i + 1`` (skip connections included), so it has
    ``len(layers) - 1`` entries. ``host_flops`` is the effective FLOP/s of one core of
    the profiling host; built-in device types are scaled against it (see
    ``cost_models.devices``). ``update_s_per_byte`` is the host's time for one optimizer
    step per byte of parameters (0 when unknown: tables from before it was measured).
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

    def __post_init__(self) -> None:
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
        if not (self.host_flops > 0 and math.isfinite(self.host_flops)):
            raise CostModelError(f"host_flops must be > 0, got {self.host_flops!r}")
        if self.source not in ("measured", "analytic"):
            raise CostModelError(
                f"source must be 'measured' or 'analytic', got {self.source!r}"
            )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def total_param_bytes(self) -> int:
        return sum(layer.param_bytes for layer in self.layers)

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
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostTable:
        if not isinstance(data, Mapping):
            raise CostModelError(f"a cost table is a JSON object, got {type(data).__name__}")
        version = data.get("version", COST_TABLE_VERSION)
        if version != COST_TABLE_VERSION:
            raise CostModelError(
                f"cost table version {version!r} is not supported (expected "
                f"{COST_TABLE_VERSION}); re-run `asteroid-fx profile`"
            )
        try:
            return cls(
                layers=tuple(LayerCost.from_dict(item) for item in data["layers"]),
                cut_bytes=tuple(int(v) for v in data["cut_bytes"]),
                input_bytes=int(data["input_bytes"]),
                model_name=str(data["model_name"]),
                model_hash=str(data["model_hash"]),
                host=str(data["host"]),
                host_flops=float(data["host_flops"]),
                source=str(data["source"]),
                torch_version=str(data.get("torch_version", "")),
                batch_sizes=tuple(int(b) for b in data.get("batch_sizes", ())),
                meta=dict(data.get("meta", {})),
                update_s_per_byte=float(data.get("update_s_per_byte", 0.0)),
            )
        except KeyError as exc:
            raise CostModelError(f"cost table is missing the field {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise CostModelError(f"malformed cost table: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> CostTable:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CostModelError(f"cost table is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> CostTable:
        p = Path(path)
        if not p.is_file():
            raise CostModelError(
                f"cost table {str(p)!r} does not exist; create it with "
                f"`asteroid-fx profile MODEL --out {p}`"
            )
        return cls.from_json(p.read_text())
