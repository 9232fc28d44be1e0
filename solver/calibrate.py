"""Calibrating a cost table from what a running plan measured (per group and stage)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from contracts.cluster import Cluster, Device, Link
from contracts.errors import CostModelError
from contracts.plan import Plan
from contracts.table import (
    UNMEASURED_TYPES,
    CostTable,
    DeviceColumn,
    RuntimeOverhead,
    TimeFit,
)
from solver.evaluate import evaluate
from solver.simulate import simulate
from solver.timing import Timing

__all__ = ["with_message_overhead", "MIN_STEPS", "CostCorrection", "calibrate_costs",
           "timing_group", "BASE_GROUP"]

# [Note: calibrating from the running plan]
# A plan's prediction rests on the cost table (a profile of the host, a board's column, or
# analytic FLOP counts) and on the declared cluster. A running plan measures each device's
# forward and backward time per micro-batch (the workers time their own compute) and the
# round. ``calibrate_costs`` ([Note: a cost table corrected by a run]) turns both into a
# corrected cost table. It has two users, one mechanism:
#
# * ``asteroid-fx calibrate DIR METRICS`` (asteroid_fx.calibration): the next ``plan
#   --costs`` predicts the devices as they ran;
# * replay after a failure (runtime.recovery): the layer-wise repair and the full re-plan
#   are compared on the table as the failed generation measured it. On this project's
#   2-core host a hop costs more than the links' bandwidth says, so a pipeline of two
#   devices can be predicted faster than one device and measure slower; the calibrated
#   comparison sees that.
#
# Times measured under the emulator are first divided by its slow-down factor, so the
# corrected table is in the declared cluster's time units. Under emulation on one shared
# host a device's measured speed also depends on which other processes run beside it, so
# corrections are pooled per timing group (device type) and stage, never per device.

MIN_STEPS = 3
"""Fewest measured rounds (after the first) a calibration needs."""

_RATIO_BOUNDS = (0.05, 20.0)     # a correction outside this is a broken measurement


def with_message_overhead(cluster: Cluster, overhead_s: float) -> Cluster:
    """``cluster`` with ``overhead_s`` added to the latency of every link."""
    if overhead_s <= 0:
        return cluster
    ms = overhead_s * 1e3
    links = tuple(Link(lk.a, lk.b, lk.bandwidth_mbps,
                       None if lk.latency_ms is None else lk.latency_ms + ms)
                  for lk in cluster.links)
    return replace(cluster, links=links, latency_ms=cluster.latency_ms + ms)


def _scaled_overhead(overhead: RuntimeOverhead, speed: float) -> RuntimeOverhead:
    """The base device's runtime overhead on a device of ``speed`` (a group that scaled the
    base times and now gets a column of its own)."""
    return RuntimeOverhead(forward_s=overhead.forward_s / speed,
                           backward_s=overhead.backward_s / speed,
                           round_s=overhead.round_s / speed)


def _bisect_overhead(round_with: Callable[[float], float], base_s: float,
                     round_s: float) -> float:
    """The ``h >= 0`` with ``round_with(h) = round_s`` (bisection; the round grows with
    ``h``), or 0 when ``round_s`` is no more than ``base_s`` or does not depend on ``h``."""
    if not (math.isfinite(round_s) and round_s > base_s):
        return 0.0
    hi = round_s
    top = round_with(hi)
    if top <= base_s:                      # no message on any path: nothing to fit
        return 0.0
    if top < round_s:                      # pragma: no cover - h = round_s always suffices
        return hi
    lo = 0.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if round_with(mid) < round_s:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-7 * round_s:
            break
    return 0.5 * (lo + hi)


# [Note: a cost table corrected by a run]
# ``asteroid-fx calibrate DIR METRICS`` turns what a run measured into a cost table, so that
# the next ``plan --costs`` predicts the devices as they ran, not as profiled or modelled.
# Every device of the run belongs to one *timing group*: ``base`` (the table's own times,
# scaled by speed: ``local``/``custom`` devices, and devices of the type the base was
# measured on) or its device type (a column, or a board type scaled from the base). For
# each group and stage the forward and backward ratios measured / predicted (the median
# over the group's devices in that stage) scale the group's times of that stage's layers:
# the correction is per device type and per stage, not one factor. Layers a group did not
# run take the group's median over all its devices, so a different plan on the same
# cluster is corrected too. A board type without a column gets a new ``calibrated``
# column: the base times over its speed, corrected. What the corrected compute does not
# explain of the measured round is a per-message overhead ``h`` (the runtime's own cost of
# a hop), fitted by bisection and kept as
# ``CostTable.message_overhead_s``, which the solver adds to every message.

BASE_GROUP = "base"
"""The timing group of devices that scale the table's base times by their speed."""


@dataclass(frozen=True)
class CostCorrection:
    """What ``calibrate_costs`` found: per group and stage ``(forward, backward)`` ratios
    measured / predicted, the fitted per-message overhead and the round before and after."""

    ratios: dict[str, dict[int, tuple[float, float]]]
    message_overhead_s: float
    measured_round_s: float
    predicted_round_s: float
    calibrated_round_s: float
    unmeasured: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ratios": {g: {str(s): [round(f, 4), round(b, 4)] for s, (f, b) in st.items()}
                           for g, st in self.ratios.items()},
                "message_overhead_ms": round(self.message_overhead_s * 1e3, 4),
                "measured_round_s": self.measured_round_s,
                "predicted_round_s": self.predicted_round_s,
                "calibrated_round_s": self.calibrated_round_s,
                "unmeasured": list(self.unmeasured)}


def timing_group(costs: CostTable, device: Device) -> str:
    """``BASE_GROUP`` or the device type whose times ``device`` takes (see the Note)."""
    if device.type == costs.device_type or (costs.column(device.type) is None
                                            and device.type in UNMEASURED_TYPES):
        return BASE_GROUP
    return device.type


def _group_fits(costs: CostTable, group: str, speed: float) -> tuple[list[TimeFit],
                                                                     list[TimeFit], float]:
    """The group's per-layer (forward, backward) fits and optimizer step per byte, in the
    plan's time units for a device of ``speed`` (used when the group scales the base)."""
    col = None if group == BASE_GROUP else costs.column(group)
    if col is not None:
        return list(col.fwd), list(col.bwd), col.update_s_per_byte
    scale = 1.0 if group == BASE_GROUP else 1.0 / speed
    return ([lc.fwd.scaled(scale) for lc in costs.layers],
            [lc.bwd.scaled(scale) for lc in costs.layers], costs.update_s_per_byte * scale)


def calibrate_costs(plan: Plan, costs: CostTable, cluster: Cluster,
                    compute_s: Mapping[str, tuple[float, float]],
                    round_s: float, *, model: str = "evaluate"
                    ) -> tuple[CostTable, CostCorrection]:
    """The cost table corrected by what ``plan`` measured (see [Note: a cost table corrected
    by a run]).

    Args:
        plan: the plan that ran.
        costs: the table it was planned with.
        cluster: the cluster it ran on (every device of ``plan`` in it).
        compute_s: device -> (forward, backward) seconds per micro-batch as measured, in the
            plan's time units (divide emulated times by the slow-down factor first).
        round_s: the measured round time (median), in the same units.
        model: what predicts a round from the corrected times, to fit the per-message
            overhead against: ``"evaluate"`` (the closed form the planners optimise; what
            the re-planner of a recovery compares) or ``"simulate"`` (the event simulation,
            which a plan's ``expected_round_time_s`` is and a run compares with).

    Returns:
        ``(calibrated table, CostCorrection)``: the table keeps the model and its bytes;
        corrected times have source ``calibrated``, and ``message_overhead_s`` is set.
    """
    cluster = cluster.for_costs(costs)
    timing = Timing.of(costs, cluster)
    samples: dict[str, dict[int, list[tuple[float, float]]]] = {}
    group_speed: dict[str, float] = {}
    unmeasured = []
    for index, stage in enumerate(plan.stages):
        for name, share in zip(stage.devices, stage.shares, strict=True):
            group = timing_group(costs, cluster.device(name))
            measured = compute_s.get(name)
            if measured is None:
                unmeasured.append(name)
                continue
            group_speed.setdefault(group, timing.speeds[name])   # scaled groups only
            # the ratios correct the layers' times; the runtime's per-call overhead
            # (CostTable.runtime_overhead) stays as it is, so it is left out of both sides
            sums, div = timing.sums_of(name), timing.device(name).divisor
            call_f, call_b = sums.call_fwd / div, sums.call_bwd / div
            pf = timing.fwd_time(name, stage.first, stage.last, share) - call_f
            pb = timing.bwd_time(name, stage.first, stage.last, share) - call_b
            rf, rb = ((float(measured[0]) - call_f) / pf if pf > 0 else 1.0,
                      (float(measured[1]) - call_b) / pb if pb > 0 else 1.0)
            if all(_RATIO_BOUNDS[0] <= r <= _RATIO_BOUNDS[1] for r in (rf, rb)):
                samples.setdefault(group, {}).setdefault(index, []).append((rf, rb))
    ratios = {g: {s: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
                  for s, rs in per_stage.items()}
              for g, per_stage in samples.items()}
    layers = list(costs.layers)
    columns = {c.device_type: c for c in costs.columns}
    base_source = costs.source
    for group, per_stage in ratios.items():
        every = [r for rs in samples[group].values() for r in rs]
        default = (statistics.median(r[0] for r in every), statistics.median(r[1] for r in every))
        factor = [default] * costs.num_layers
        for s, value in per_stage.items():
            for i in range(plan.stages[s].first, plan.stages[s].last + 1):
                factor[i] = value
        fits_f, fits_b, update = _group_fits(costs, group, group_speed[group])
        new_f = tuple(fit.scaled(f) for fit, (f, _b) in zip(fits_f, factor, strict=True))
        new_b = tuple(fit.scaled(b) for fit, (_f, b) in zip(fits_b, factor, strict=True))
        if group == BASE_GROUP:
            layers = [replace(lc, fwd=f, bwd=b) for lc, f, b in zip(layers, new_f, new_b,
                                                                     strict=True)]
            base_source = "calibrated"
            continue
        old = costs.column(group)
        columns[group] = DeviceColumn(
            device_type=group, fwd=new_f, bwd=new_b, update_s_per_byte=update,
            source="calibrated", host=old.host if old is not None else "",
            torch_version=old.torch_version if old is not None else "",
            host_flops=old.host_flops if old is not None else 0.0,
            runtime_overhead=(old.runtime_overhead if old is not None
                              else _scaled_overhead(costs.runtime_overhead,
                                                    group_speed[group])),
            workspace_bytes=old.workspace_bytes if old is not None else None)
    table = replace(costs, layers=tuple(layers), source=base_source,
                    columns=tuple(columns[k] for k in sorted(columns)
                                  if k != costs.device_type))
    if model not in ("evaluate", "simulate"):
        raise CostModelError(f"model must be 'evaluate' or 'simulate', got {model!r}")

    def predict(t: CostTable) -> float:
        if model == "simulate":
            return simulate(plan, t, cluster).round_time_s
        return evaluate(plan, t, cluster).round_time_s

    before = predict(costs)
    base = predict(replace(table, message_overhead_s=0.0))
    if predict(replace(table, message_overhead_s=max(round_s, 1e-3))) <= base:
        # the plan sends no message (one device): nothing to fit, so the table keeps the
        # per-message cost it had (the host's probe, asteroid_fx.runtime_overhead, or an
        # earlier fit) for the plans that will send some
        overhead = costs.message_overhead_s
    else:
        overhead = _bisect_overhead(lambda h: predict(replace(table, message_overhead_s=h)),
                                    base, round_s)
    table = replace(table, message_overhead_s=overhead)
    after = predict(table)
    correction = CostCorrection(ratios=ratios, message_overhead_s=overhead,
                                measured_round_s=round_s, predicted_round_s=before,
                                calibrated_round_s=after, unmeasured=unmeasured)
    return replace(table, meta={**costs.meta, "calibration": correction.to_dict()}), correction
