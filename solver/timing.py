"""Per-device layer times from a cost table's columns (``Timing``) and the prefix sums behind them.

[Note: cost columns]
A cost table's layer times (the *base* times) were measured on one device type,
``CostTable.device_type`` (``local``: the workstation that ran ``profile``). A table may
also hold *columns*: other device types measured on their own devices
(``asteroid-fx costs merge``). ``CostTable.column(type)`` is the column that devices of
``type`` take as they are, or None when they scale the base times by their speed. So a
device ``d`` of type ``t`` takes, for layers ``first..last`` and ``b`` samples,

* with a column ``c = costs.column(t)``: ``sum_{l} c.fwd[l].at(b)`` forward (the same for
  backward) and ``param_bytes * c.update_s_per_byte`` for the optimizer step, **as
  measured**: its declared ``speed`` / ``flops`` is not applied on top;
* without one (``local``, ``custom``, and types the table has not measured): the base
  times divided by ``v_d = device.speed_against(costs.host_flops)``, as before columns
  existed. When the table has measured at least one type and the cluster has a device of
  a type it has not measured (other than ``local`` / ``custom``), a warning names the
  type once per process (per table and type).

Each time source (the base, every column a device uses) has its own ``LayerSums``: the
same byte sums, its own time sums accumulated left to right. Every consumer (``evaluate``,
the simulator, the DP, the ILP, brute force, the re-planner, calibration, replicas)
takes a device's stage time from ``Timing`` in the same float operations,
``(intercept + slope * share) / divisor`` with ``divisor = v_d`` (scaled) or ``1.0``
(a column: dividing by one is exact), so they agree to the last bit. A table without
columns gives bit for bit the times of before.

Two scalars per device stand in for the columns where the planners need one number:

* ``speed`` (capability): the DP's device order and Algorithm 1's share split. A scaled
  device has ``v_d``; a device with a column has its whole-model ratio ``W_base / W_col``
  with ``W`` the per-sample forward + backward work summed over all layers (the slopes;
  with intercepts ``at(1)`` when the slopes are all zero; the declared speed when both are
  zero). It does not depend on the stage, so Algorithm 1's shares depend only on the
  group and micro-batch (the DP caches them per group). A device fast on some layers and
  slow on others therefore gets a share that is right for the whole model, not for its
  stage; the model charges its true per-stage time.
* ``bound_speed`` ``u_d``: no stage runs faster on ``d`` than the base times divided by
  ``u_d``, which keeps the DP's pruning bounds (``work / sum of speeds``) valid lower
  bounds. A scaled device has ``u_d = v_d``; a device with a column has the largest
  ratio ``base / column`` over all layers and over forward / backward intercepts and
  slopes (a ratio of sums lies below the largest ratio of its terms), times
  ``1 + 1e-9`` against float rounding of the different prefix sums; a layer that costs
  something in the base and nothing in the column makes it infinite (the bounds then
  give nothing for groups with that device, which is still exact).
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import accumulate

from contracts.cluster import Cluster, Device
from contracts.table import UNMEASURED_TYPES, CostTable, DeviceColumn, TimeFit

__all__ = ["LayerSums", "DeviceTiming", "Timing", "column_speed", "column_bound_speed",
           "wire_counts"]

log = logging.getLogger(__name__)

_BOUND_SLACK = 1e-9
"""Relative slack added to a column device's bound speed (float rounding of prefix sums)."""

_warned: set[tuple[str, tuple[str, ...], str]] = set()
"""(model hash, measured types, device type) already warned about: once per process."""


def _prefix_f(values: Sequence[float]) -> tuple[float, ...]:
    return (0.0, *accumulate(values))


def _prefix_i(values: Sequence[int]) -> tuple[int, ...]:
    return (0, *accumulate(values))


def _range_max_table(values: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    table = [tuple(values)]
    span = 1
    while 2 * span <= len(values):
        below = table[-1]
        table.append(tuple(max(below[i], below[i + span]) for i in range(len(below) - span)))
        span *= 2
    return tuple(table)


_BASE_SUMS: dict[int, tuple[weakref.ref[CostTable], LayerSums]] = {}
"""``LayerSums.of``'s base sums by the id of their live table."""


@dataclass(frozen=True)
class LayerSums:
    """Prefix sums over the layers of a cost table (index ``i`` = sum of layers ``< i``).

    Times are floats accumulated left to right; bytes are exact integers. The times are
    one *time source*: the base times (``LayerSums.of(costs)``) or one column
    (``LayerSums.of(costs, column)``, the same bytes). Every consumer (``evaluate``, the
    DP, Algorithm 1) takes stage sums from here, through ``Timing``, so that they agree
    to the last bit.
    """

    fwd_intercept: tuple[float, ...]
    fwd_slope: tuple[float, ...]
    bwd_intercept: tuple[float, ...]
    bwd_slope: tuple[float, ...]
    param_bytes: tuple[int, ...]
    buffer_bytes: tuple[int, ...]
    activation_bytes: tuple[int, ...]
    update_per_byte: float = 0.0
    #: per sample, the tensors crossing the cut *before* layer ``i`` (``len = layers + 1``):
    #: 0 before layer 0 (the mini-batch), ``cut_bytes[i - 1]`` inside, and the model's
    #: output after the last layer (see solver.evaluate [Note: the memory model]); empty:
    #: none counted
    boundary_bytes: tuple[int, ...] = ()
    #: ``largest_params`` lookups: level ``k`` holds the largest ``param_bytes`` of the
    #: ``2**k`` layers starting at each index (a sparse table); empty: 0
    param_max: tuple[tuple[int, ...], ...] = ()
    #: the runtime's own seconds per stage call (forward, backward) and per device and
    #: round (``CostTable.runtime_overhead``, see [Note: runtime overhead])
    call_fwd: float = 0.0
    call_bwd: float = 0.0
    round_s: float = 0.0

    @classmethod
    def of(cls, costs: CostTable, column: DeviceColumn | None = None) -> LayerSums:
        """The base times' sums, or ``column``'s times with the table's bytes. The base
        sums of a table are built once while it lives (a planner run asks for them about a
        hundred times; a ``CostTable`` is frozen)."""
        hit = _BASE_SUMS.get(id(costs))
        if hit is not None and hit[0]() is costs:
            return hit[1] if column is None else hit[1].with_column(column)
        layers = costs.layers
        base = cls(
            fwd_intercept=_prefix_f([lc.fwd.intercept_s for lc in layers]),
            fwd_slope=_prefix_f([lc.fwd.per_sample_s for lc in layers]),
            bwd_intercept=_prefix_f([lc.bwd.intercept_s for lc in layers]),
            bwd_slope=_prefix_f([lc.bwd.per_sample_s for lc in layers]),
            param_bytes=_prefix_i([lc.param_bytes for lc in layers]),
            buffer_bytes=_prefix_i([lc.buffer_bytes for lc in layers]),
            activation_bytes=_prefix_i([lc.activation_bytes for lc in layers]),
            update_per_byte=costs.update_s_per_byte,
            boundary_bytes=(0, *costs.cut_bytes, layers[-1].output_bytes),
            param_max=_range_max_table([lc.param_bytes for lc in layers]),
            call_fwd=costs.runtime_overhead.forward_s,
            call_bwd=costs.runtime_overhead.backward_s,
            round_s=costs.runtime_overhead.round_s,
        )
        key = id(costs)
        _BASE_SUMS[key] = (weakref.ref(costs, lambda _: _BASE_SUMS.pop(key, None)), base)
        return base if column is None else base.with_column(column)

    def with_column(self, column: DeviceColumn) -> LayerSums:
        """These byte sums with ``column``'s times and optimizer step."""
        if len(column.fwd) != self.num_layers:
            raise ValueError(f"column {column.device_type!r} has {len(column.fwd)} layers, "
                             f"the sums {self.num_layers}")
        return replace(
            self,
            fwd_intercept=_prefix_f([f.intercept_s for f in column.fwd]),
            fwd_slope=_prefix_f([f.per_sample_s for f in column.fwd]),
            bwd_intercept=_prefix_f([b.intercept_s for b in column.bwd]),
            bwd_slope=_prefix_f([b.per_sample_s for b in column.bwd]),
            update_per_byte=column.update_s_per_byte,
            call_fwd=column.runtime_overhead.forward_s,
            call_bwd=column.runtime_overhead.backward_s,
            round_s=column.runtime_overhead.round_s,
        )

    @property
    def num_layers(self) -> int:
        return len(self.param_bytes) - 1

    def params(self, first: int, last: int) -> int:
        return self.param_bytes[last + 1] - self.param_bytes[first]

    def buffers(self, first: int, last: int) -> int:
        return self.buffer_bytes[last + 1] - self.buffer_bytes[first]

    def activations(self, first: int, last: int) -> int:
        return self.activation_bytes[last + 1] - self.activation_bytes[first]

    def largest_params(self, first: int, last: int) -> int:
        """The largest ``param_bytes`` of one layer among ``first..last``."""
        if not self.param_max:
            return 0
        k = (last - first + 1).bit_length() - 1
        level = self.param_max[k]
        return max(level[first], level[last - (1 << k) + 1])

    def in_flight_bytes(self, first: int, last: int) -> int:
        """Per-sample bytes that a stage over layers ``first..last`` holds for one
        micro-batch in flight: the layers' saved activations plus the tensors at its two
        cuts (the simulator's per-micro-batch level; the peak is :meth:`flight_bytes`)."""
        edges = self.boundary_bytes
        cuts = edges[first] + edges[last + 1] if edges else 0
        return self.activations(first, last) + cuts

    def flight_bytes(self, first: int, last: int, in_flight: int,
                     num_micro_batches: int | None = None) -> int:
        """Per-sample bytes that a stage over layers ``first..last`` holds at its peak with
        ``in_flight`` micro-batches in flight out of ``num_micro_batches`` a round (None:
        more than ``in_flight``): their saved activations, and the runtime's wire buffers
        at its two cuts (see solver.evaluate [Note: wire buffers])."""
        acts = self.activations(first, last) * in_flight
        edges = self.boundary_bytes
        if not edges:
            return acts
        ins, outs = wire_counts(in_flight, num_micro_batches, last == self.num_layers - 1)
        return acts + ins * edges[first] + outs * edges[last + 1]

    def fwd_time(self, first: int, last: int, share: int, speed: float) -> float:
        """Forward seconds of layers ``first..last`` for ``share`` samples at ``speed``."""
        if share <= 0:
            return 0.0
        inter = self.fwd_intercept[last + 1] - self.fwd_intercept[first] + self.call_fwd
        slope = self.fwd_slope[last + 1] - self.fwd_slope[first]
        return (inter + slope * share) / speed

    def bwd_time(self, first: int, last: int, share: int, speed: float) -> float:
        """Backward seconds of layers ``first..last`` for ``share`` samples at ``speed``."""
        if share <= 0:
            return 0.0
        inter = self.bwd_intercept[last + 1] - self.bwd_intercept[first] + self.call_bwd
        slope = self.bwd_slope[last + 1] - self.bwd_slope[first]
        return (inter + slope * share) / speed

    def update_time(self, first: int, last: int, speed: float) -> float:
        """Seconds of one optimizer step over layers ``first..last`` at ``speed``, with
        the round's fixed runtime cost (``round_s``)."""
        return (self.params(first, last) * self.update_per_byte + self.round_s) / speed

    def compute(self, first: int, last: int, shares: Sequence[int],
                speeds: Sequence[float]) -> tuple[float, float]:
        """``(compute_f, compute_b)`` of a group whose devices all scale these times by
        their speeds: the slowest device, forward and backward (``Timing.compute`` for a
        group with columns)."""
        cf = max(self.fwd_time(first, last, b, v) for b, v in zip(shares, speeds, strict=True))
        cb = max(self.bwd_time(first, last, b, v) for b, v in zip(shares, speeds, strict=True))
        return cf, cb


def wire_counts(in_flight: int, num_micro_batches: int | None, final: bool) -> tuple[int, int]:
    """``(at the input cut, at the output cut)``: how many of its cuts' per-sample wire
    buffers a stage with ``in_flight`` micro-batches in flight out of ``num_micro_batches``
    a round (None: more than ``in_flight``) holds (see solver.evaluate [Note: wire
    buffers]): received activations ``min(M, F + 2)`` and gradients sent back
    ``min(M, F + 1)``; ``F`` activations sent and one gradient received, or on the
    ``final`` stage the model's output of its ``F`` micro-batches."""
    m = num_micro_batches
    received = in_flight + 2 if m is None else min(m, in_flight + 2)
    returned = in_flight + 1 if m is None else min(m, in_flight + 1)
    return received + returned, in_flight if final else in_flight + 1


def _work(fits: Iterable[tuple[TimeFit, TimeFit]]) -> tuple[float, float]:
    """(per-sample forward + backward seconds, the same at one sample) over ``fits``."""
    slope = inter = 0.0
    for f, b in fits:
        slope += f.per_sample_s + b.per_sample_s
        inter += f.intercept_s + b.intercept_s
    return slope, slope + inter


def column_speed(costs: CostTable, column: DeviceColumn, declared: float) -> float:
    """The capability speed of a device that takes ``column`` (see [Note: cost columns]):
    base per-sample work over the column's, ``declared`` when both are degenerate."""
    base_slope, base_one = _work((lc.fwd, lc.bwd) for lc in costs.layers)
    col_slope, col_one = _work(zip(column.fwd, column.bwd, strict=True))
    if base_slope > 0.0 and col_slope > 0.0:
        return base_slope / col_slope
    if base_one > 0.0 and col_one > 0.0:
        return base_one / col_one
    return declared


def column_bound_speed(costs: CostTable, column: DeviceColumn) -> float:
    """``u``: the largest base / column ratio over layers, forward / backward intercepts
    and slopes, with a little slack (``inf`` when the column has a free layer part the
    base charges; see [Note: cost columns])."""
    top = 0.0
    for lc, f, b in zip(costs.layers, column.fwd, column.bwd, strict=True):
        for base, col in ((lc.fwd.intercept_s, f.intercept_s), (lc.fwd.per_sample_s,
                                                                 f.per_sample_s),
                          (lc.bwd.intercept_s, b.intercept_s), (lc.bwd.per_sample_s,
                                                                 b.per_sample_s)):
            if base <= 0.0:
                continue
            if col <= 0.0:
                return math.inf
            top = max(top, base / col)
    if top == 0.0:  # the base costs nothing: any speed bounds it
        return 1.0
    return top * (1.0 + _BOUND_SLACK)


@dataclass(frozen=True)
class DeviceTiming:
    """How one device's times follow from the cost table (see [Note: cost columns]).

    ``source`` indexes ``Timing.sources`` (0: the base times); the device's time of a
    stage is the source's time divided by ``divisor`` (its speed when scaled, 1.0 with a
    column). ``column`` names the device type whose column it takes (None: scaled).
    """

    name: str
    type: str
    source: int
    divisor: float
    speed: float
    bound_speed: float
    column: str | None = None


@dataclass(frozen=True)
class Timing:
    """Per-device stage times of one cost table on one cluster.

    Example::

        timing = Timing.of(costs, cluster)
        timing.fwd_time("nano0", 0, 3, 4)          # layers 0..3, 4 samples
        timing.compute(0, 3, ("nx0", "nano0"), (6, 2))
        timing.speeds                              # capability, for order and shares
    """

    sources: tuple[LayerSums, ...]
    devices: Mapping[str, DeviceTiming]

    @classmethod
    def of(cls, costs: CostTable, cluster: Cluster | Iterable[Device]) -> Timing:
        """The timing of every device of ``cluster`` (a ``Cluster`` or its devices)."""
        devices = cluster.devices if isinstance(cluster, Cluster) else tuple(cluster)
        base = LayerSums.of(costs)
        sources = [base]
        by_type: dict[str, tuple[int, float | None, float] | None] = {}
        unmeasured: dict[str, list[float]] = {}
        out: dict[str, DeviceTiming] = {}
        for device in devices:
            if device.type not in by_type:
                col = costs.column(device.type)
                if col is None:
                    by_type[device.type] = None
                else:
                    index = len(sources)
                    sources.append(base.with_column(col))
                    whole = column_speed(costs, col, math.nan)  # nan: degenerate
                    by_type[device.type] = (index, None if math.isnan(whole) else whole,
                                            column_bound_speed(costs, col))
            found = by_type[device.type]
            if found is None:
                v = device.speed_against(costs.host_flops)
                out[device.name] = DeviceTiming(device.name, device.type, 0, v, v, v)
                if device.type not in UNMEASURED_TYPES:
                    unmeasured.setdefault(device.type, []).append(v)
            else:
                index, own, bound = found
                speed = device.speed_against(costs.host_flops) if own is None else own
                out[device.name] = DeviceTiming(device.name, device.type, index, 1.0, speed,
                                                bound, device.type)
        if unmeasured and costs.measured_types:
            _warn_unmeasured(costs, unmeasured)
        return cls(sources=tuple(sources), devices=out)

    # -- per device -----------------------------------------------------------------------
    @property
    def base(self) -> LayerSums:
        """The base times' sums (also the byte sums every source shares)."""
        return self.sources[0]

    @property
    def has_columns(self) -> bool:
        """True when some device takes a column instead of scaling the base times."""
        return len(self.sources) > 1

    @property
    def speeds(self) -> dict[str, float]:
        """Capability speed per device (the DP's order, Algorithm 1's split)."""
        return {name: t.speed for name, t in self.devices.items()}

    @property
    def bound_speeds(self) -> dict[str, float]:
        """``u_d`` per device: no stage is faster than the base times over it."""
        return {name: t.bound_speed for name, t in self.devices.items()}

    def device(self, name: str) -> DeviceTiming:
        return self.devices[name]

    def sums_of(self, name: str) -> LayerSums:
        """The time source device ``name`` takes (the base or its type's column)."""
        return self.sources[self.devices[name].source]

    def fwd_time(self, name: str, first: int, last: int, share: int) -> float:
        """Forward seconds of layers ``first..last`` for ``share`` samples on ``name``."""
        t = self.devices[name]
        return self.sources[t.source].fwd_time(first, last, share, t.divisor)

    def bwd_time(self, name: str, first: int, last: int, share: int) -> float:
        """Backward seconds of layers ``first..last`` for ``share`` samples on ``name``."""
        t = self.devices[name]
        return self.sources[t.source].bwd_time(first, last, share, t.divisor)

    def update_time(self, name: str, first: int, last: int) -> float:
        """Seconds of one optimizer step of layers ``first..last`` on ``name``."""
        t = self.devices[name]
        return self.sources[t.source].update_time(first, last, t.divisor)

    # -- per group ------------------------------------------------------------------------
    def compute(self, first: int, last: int, devices: Sequence[str],
                shares: Sequence[int]) -> tuple[float, float]:
        """``(compute_f, compute_b)``: the slowest device of the group, forward and
        backward (for a group without columns, ``LayerSums.compute`` bit for bit)."""
        pairs = list(zip(devices, shares, strict=True))
        cf = max(self.fwd_time(d, first, last, b) for d, b in pairs)
        cb = max(self.bwd_time(d, first, last, b) for d, b in pairs)
        return cf, cb

    def group_update_time(self, first: int, last: int, devices: Iterable[str]) -> float:
        """The optimizer step of the group's slowest member (without columns,
        ``params * update_per_byte / min speed``, bit for bit: division is monotone)."""
        return max(self.update_time(d, first, last) for d in devices)

    def update_pairs(self, devices: Iterable[str]) -> list[tuple[float, float, float]]:
        """``(update_per_byte, divisor, round_s)`` per time source of the group, the
        smallest divisor of each: the group's step is ``max((params * upb + round_s) /
        div)`` over them."""
        best: dict[int, float] = {}
        for d in devices:
            t = self.devices[d]
            if t.source not in best or t.divisor < best[t.source]:
                best[t.source] = t.divisor
        return [(self.sources[s].update_per_byte, div, self.sources[s].round_s)
                for s, div in sorted(best.items())]


def _warn_unmeasured(costs: CostTable, unmeasured: Mapping[str, list[float]]) -> None:
    """Warn once per (table, type) about device types scaled although the table measured
    others (see [Note: cost columns])."""
    measured = costs.measured_types
    base = (f"the {costs.device_type} times ({costs.source} on "
            f"{costs.host or 'the profiling host'})")
    for type_name, speeds in sorted(unmeasured.items()):
        key = (costs.model_hash, measured, type_name)
        if key in _warned:
            continue
        _warned.add(key)
        shown = ", ".join(f"{v:.3g}" for v in sorted(set(speeds)))
        log.warning("device type %s has no measured column in the cost table (measured: %s); "
                    "scaling %s by speed %s", type_name, ", ".join(measured), base, shown)
