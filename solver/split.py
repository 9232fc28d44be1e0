"""Algorithm 1: split a micro-batch between the devices of one stage by speed, capped by memory.

[Note: Algorithm 1]
The continuous optimum gives device ``d`` a share proportional to its speed ``v_d``,
which equalises the per-sample load ``b_d / v_d``. Shares must be integers ``>= 1`` (a
device that would get no sample does not belong in the stage: the caller, the DP, then
considers the group without it; ``split_shares`` returns None when the micro-batch has
fewer samples than the group has devices) and at most the device's memory cap; samples
that do not fit on a device overflow to the devices with room.

The integer shares are chosen *exactly*: starting from one sample each, every further
sample goes to the device whose load ``(b_d + 1) / v_d`` would be smallest among those
below their cap (ties: the earlier device, i.e. the more capable one). This greedy
minimises ``max_d b_d / v_d`` (the bottleneck of a separable increasing objective), and
it is the proportional split rounded optimally, with memory overflow redistributed.

The split balances the per-sample part of the device times. The fitted intercepts are
a per-device constant (``intercept / v_d``) that the split cannot change except by
dropping the device, which is the DP's choice of group. Because of that the shares depend
only on the group, the micro-batch size and — when memory binds — the stage's layers.

The speeds are the capability speeds of ``solver.timing.Timing``: a device whose type has
a column in the cost table counts with its whole-model ratio (base work over its
column's), which does not depend on the stage, so the shares still depend only on the
group and the micro-batch size ([Note: cost columns]). Its time is then charged from
its column, so on a stage where the column's ratio differs the split is not balanced;
the DP sees that time and picks groups accordingly.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import replace

from contracts.arguments import is_int
from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.plan import Plan
from contracts.table import CostTable
from solver.evaluate import (
    WORKSPACE_FRACTION,
    LayerSums,
    evaluate,
    in_flight,
    memory_from_parts,
    stage_memory_parts,
)
from solver.space import divisors
from solver.timing import Timing

__all__ = ["split_shares", "memory_cap", "cap_from_parts", "split_stage", "check_micro_batch",
           "resplit"]

_NO_CAP = 1 << 62


def split_shares(micro_batch: int, speeds: Sequence[float],
                 caps: Sequence[int] | None = None) -> tuple[int, ...] | None:
    """Integer shares ``>= 1`` summing to ``micro_batch`` minimising ``max b_d / speed_d``.

    Args:
        micro_batch: samples per micro-batch.
        speeds: the devices' speeds (any common unit), in group order.
        caps: the most samples each device can hold (memory); None for no limit.

    Returns:
        The shares, or None when the group cannot take the micro-batch (more devices than
        samples, a device that cannot hold even one sample, or not enough room in total).
    """
    n = len(speeds)
    limits = list(caps) if caps is not None else [_NO_CAP] * n
    if n == 0 or micro_batch < n or any(c < 1 for c in limits):
        return None
    if sum(min(c, micro_batch) for c in limits) < micro_batch:
        return None
    shares = [1] * n
    heap = [((1 + 1) / speeds[d], d) for d in range(n) if limits[d] > 1]
    heapq.heapify(heap)
    for _ in range(micro_batch - n):
        _, d = heapq.heappop(heap)
        shares[d] += 1
        if shares[d] < limits[d]:
            heapq.heappush(heap, ((shares[d] + 1) / speeds[d], d))
    return tuple(shares)


def cap_from_parts(fixed: int, per_sample: int, capacity_bytes: int) -> int:
    """The most samples that fit in ``capacity_bytes`` (see ``stage_memory_parts``); 0 when
    not even one sample fits, a huge number when the layers keep no activations."""
    if memory_from_parts(fixed, per_sample, 1) > capacity_bytes:
        return 0
    if per_sample == 0:
        return _NO_CAP
    guess = max(1, int((capacity_bytes - fixed) / (per_sample * (1.0 + WORKSPACE_FRACTION))))
    while guess > 1 and memory_from_parts(fixed, per_sample, guess) > capacity_bytes:
        guess -= 1
    while memory_from_parts(fixed, per_sample, guess + 1) <= capacity_bytes:
        guess += 1
    return guess


def memory_cap(sums: LayerSums, first: int, last: int, in_flight: int,
               optimizer_state_factor: float, capacity_bytes: int) -> int:
    """The most samples a device of ``capacity_bytes`` can take for layers ``first..last``.

    Returns 0 when even the weights (or a single sample) do not fit, and a huge number
    when the layers keep no activations.
    """
    fixed, per_sample = stage_memory_parts(sums, first, last, in_flight, optimizer_state_factor)
    return cap_from_parts(fixed, per_sample, capacity_bytes)


def split_stage(sums: LayerSums, first: int, last: int, speeds: Sequence[float],
                capacities: Sequence[int], micro_batch: int, in_flight: int,
                optimizer_state_factor: float = 0.0,
                free_shares: tuple[int, ...] | None = None,
                num_micro_batches: int | None = None) -> tuple[int, ...] | None:
    """Algorithm 1 for one stage: shares of layers ``first..last`` on a group of devices.

    Args:
        sums: prefix sums of the cost table.
        first, last: the stage's layers (inclusive).
        speeds, capacities: per device of the group (memory in bytes).
        micro_batch: samples per micro-batch.
        in_flight: micro-batches whose activations the stage holds at once
            (``min(M, S - s)`` under 1F1B).
        optimizer_state_factor: optimizer state in units of the weights.
        free_shares: ``split_shares(micro_batch, speeds)`` when the caller has it cached.
        num_micro_batches: micro-batches a round (None: not known; see
            ``solver.evaluate.accumulates``).

    Returns:
        The shares, or None when the group cannot hold the stage.
    """
    if micro_batch < len(speeds):
        return None
    free = free_shares if free_shares is not None else split_shares(micro_batch, speeds)
    if free is None:
        return None
    fixed, per_sample = stage_memory_parts(sums, first, last, in_flight, optimizer_state_factor,
                                           len(capacities), num_micro_batches)
    if all(memory_from_parts(fixed, per_sample, b) <= cap
           for b, cap in zip(free, capacities, strict=True)):
        return free
    caps = [cap_from_parts(fixed, per_sample, cap) for cap in capacities]
    return split_shares(micro_batch, speeds, caps)


def check_micro_batch(micro_batch_size: int, batch_size: int) -> int:
    """``micro_batch_size``, checked: an integer >= 1, at most the batch and dividing it
    (``PlanError`` naming the valid sizes otherwise)."""
    m = micro_batch_size
    if not is_int(m) or m < 1:
        raise PlanError(f"the micro-batch size must be an integer >= 1, got {m!r}")
    if m > batch_size:
        raise PlanError(f"micro-batch {m} is larger than the batch {batch_size}; use at most "
                        f"{batch_size} (one micro-batch per round)")
    if batch_size % m:
        raise PlanError(f"micro-batch {m} does not divide the batch {batch_size}; use one of "
                        f"{divisors(batch_size)}")
    return m


def resplit(plan: Plan, costs: CostTable, cluster: Cluster, micro_batch_size: int) -> Plan:
    """``plan`` with the same stages and groups at another micro-batch size: every group's
    shares split again by Algorithm 1 (``split_stage``, memory at the new in-flight
    counts), evaluated. What ``simulate --micro-batch`` runs.

    Raises:
        PlanError: a micro-batch size that is not an integer >= 1 dividing the batch, one
            smaller than a stage's group, or a stage its group cannot hold at that size
            (naming the stage and its devices).
    """
    m = check_micro_batch(micro_batch_size, plan.batch_size)
    batch = plan.batch_size
    cluster = cluster.for_costs(costs)
    timing = Timing.of(costs, cluster)
    capacity = {d.name: cluster.usable_bytes(d.name) for d in cluster.devices}
    count = batch // m
    stages = []
    for s, stage in enumerate(plan.stages):
        first, last = stage.layers
        if m < len(stage.devices):
            raise PlanError(f"micro-batch {m} is smaller than stage {s}'s group of "
                            f"{len(stage.devices)} devices ({', '.join(stage.devices)}); use "
                            f"at least {len(stage.devices)}")
        flight = in_flight(count, len(plan.stages), s, plan.schedule)
        shares = split_stage(timing.base, first, last,
                             [timing.speeds[d] for d in stage.devices],
                             [capacity[d] for d in stage.devices], m, flight,
                             plan.optimizer_state_factor, num_micro_batches=count)
        if shares is None:
            raise PlanError(f"stage {s} (layers {first}..{last}) does not fit on "
                            f"{', '.join(stage.devices)} at micro-batch {m}; use a smaller "
                            f"micro-batch or plan again")
        stages.append(replace(stage, shares=shares))
    candidate = replace(plan, stages=tuple(stages), micro_batch_size=m,
                        num_micro_batches=count, predicted=None)
    prediction = evaluate(candidate, costs, cluster)
    if not prediction.fits:
        device, short = max(prediction.memory_shortfall().items(), key=lambda kv: kv[1])
        raise PlanError(f"at micro-batch {m} device {device} is {short} bytes short of "
                        f"memory; use a smaller micro-batch or plan again")
    return candidate.with_prediction(prediction)
