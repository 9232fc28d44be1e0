"""Replica placement: which neighbouring device keeps a copy of each stage's weights.

[Note: replica placement]
Every device's stage state (weights and optimizer state; the gradients are not needed
because a replica is refreshed after the optimizer step) is copied to ``copies``
*holders*. All devices of one stage hold the same state (data parallelism inside the
group), so the holders are chosen per stage and every member maps to them.

Candidates, in order of preference:

1. devices of the previous or the next stage (a neighbour: the layer-wise re-plan gives
   a lost stage's layers to its neighbours, so the holder can often serve them locally);
2. for a multi-device stage, a ring inside the group (member ``i`` is held by member
   ``i + 1``). A peer already keeps identical weights, so this costs no traffic, but it
   does not survive the loss of the whole group, so it comes last.

Among candidates of one tier the holder with the shortest replication time
(``state bytes / bandwidth`` from the best-connected member) wins, then the one with
the most free memory. A candidate is accepted only when ``solver.evaluate`` (which adds
a replica's ``param_bytes * (1 + optimizer_state_factor)`` to every holder, per replica
entry) says the holder still fits, so a plan with replicas always fits. Stages are
placed most constrained first (fewest neighbouring devices), then largest state first,
so the hard ones find room before the easy ones take it.

When no candidate has room the entry is an empty tuple (the stage is unprotected: after
its loss the runtime must restore it from the last on-disk checkpoint), or
``PlanError`` with ``strict=True``. A one-device plan therefore always gets an empty
entry.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import replace

from asteroid_fx.errors import PlanError
from cost_models.table import CostTable
from solver.cluster import Cluster
from solver.evaluate import LayerSums, evaluate
from solver.plan import Plan

__all__ = ["stage_state_bytes", "replication_time_s", "choose_replicas", "with_replicas"]

logger = logging.getLogger(__name__)


def stage_state_bytes(costs: CostTable, plan: Plan, stage: int) -> int:
    """Bytes one replica of stage ``stage`` carries: weights plus optimizer state plus
    buffers (BatchNorm statistics)."""
    sums = LayerSums.of(costs)
    st = plan.stages[stage]
    return (math.ceil(sums.params(st.first, st.last) * (1.0 + plan.optimizer_state_factor))
            + sums.buffers(st.first, st.last))


def _send_time(cluster: Cluster, senders: tuple[str, ...], holder: str, nbytes: int) -> float:
    """Seconds to copy ``nbytes`` to ``holder`` from the best-connected sender."""
    if nbytes <= 0:
        return 0.0
    if holder in senders:  # a group peer already has the state
        return 0.0
    return nbytes / max(cluster.bandwidth_bytes_s(s, holder) for s in senders)


def replication_time_s(plan: Plan, costs: CostTable, cluster: Cluster, *,
                       replicas: Mapping[str, tuple[str, ...]] | None = None,
                       every_k_steps: int = 1) -> dict[str, float]:
    """Seconds per training step that each device spends sending its stage's state.

    Args:
        plan: the plan (its ``replicas`` are used unless ``replicas`` is given).
        costs: the model's cost table.
        cluster: the devices and links.
        replicas: device -> holders, overriding ``plan.replicas``.
        every_k_steps: the state is copied after every K-th optimizer step.

    Returns:
        device -> ``sum over holders of state_bytes / bandwidth(device, holder) / K``,
        the cost if that device sends its stage's state itself; a group peer holder
        costs nothing (it already has the state). Devices without holders map to 0.

    Raises:
        PlanError: ``every_k_steps < 1``.
    """
    if every_k_steps < 1:
        raise PlanError(f"every_k_steps must be >= 1, got {every_k_steps}")
    mapping = plan.replicas if replicas is None else replicas
    out: dict[str, float] = {}
    for index, stage in enumerate(plan.stages):
        nbytes = stage_state_bytes(costs, plan, index)
        for device in stage.devices:
            seconds = sum(_send_time(cluster, stage.devices if h in stage.devices
                                     else (device,), h, nbytes)
                          for h in mapping.get(device, ()))
            out[device] = seconds / every_k_steps
    return out


def _assignments(plan: Plan, stage: int) -> list[tuple[int, str, dict[str, str]]]:
    """Candidate placements of one copy of ``stage``: (tier, label, member -> holder).

    Tier 0: one device of a neighbouring stage holds the state for every member.
    Tier 1 (multi-device stages): a ring inside the group, member ``i`` -> member
    ``i + offset``; one candidate per offset.
    """
    members = plan.stages[stage].devices
    out: list[tuple[int, str, dict[str, str]]] = []
    for neighbour in (stage - 1, stage + 1):
        if 0 <= neighbour < plan.num_stages:
            out.extend((0, h, {d: h for d in members}) for h in plan.stages[neighbour].devices)
    n = len(members)
    for offset in range(1, n):
        ring = {members[i]: members[(i + offset) % n] for i in range(n)}
        out.append((1, f"ring+{offset}", ring))
    return out


def choose_replicas(plan: Plan, costs: CostTable, cluster: Cluster, *, copies: int = 1,
                    strict: bool = False) -> dict[str, tuple[str, ...]]:
    """Holders of every device's stage state (see [Note: replica placement]).

    Args:
        plan: a plan that fits without replicas (its own ``replicas`` are ignored).
        costs: the model's cost table.
        cluster: the devices and links of the plan.
        copies: holders per device (1: a whole stage may be lost and recovered).
        strict: raise instead of leaving a device with fewer than ``copies`` holders.

    Returns:
        device -> holders (the mapping for ``Plan.replicas``); a holder is never the
        device itself; an entry has fewer than ``copies`` holders (possibly none) where
        no candidate had room.

    Raises:
        PlanError: ``copies < 1``; the plan does not fit even without replicas; with
            ``strict``, a stage for which no holder has room.
    """
    if copies < 1:
        raise PlanError(f"copies must be >= 1, got {copies}")
    base = replace(plan, replicas={})
    pred = evaluate(base, costs, cluster)
    if not pred.fits:
        short = {d: f"{b / 2**20:.1f} MiB" for d, b in pred.memory_shortfall().items()}
        raise PlanError(f"the plan does not fit even without replicas (short by {short}); "
                        f"re-plan before placing replicas")
    capacity = pred.memory_capacity_bytes
    peak = dict(pred.peak_memory_bytes)
    replicas: dict[str, tuple[str, ...]] = {d: () for d in plan.devices}
    # most constrained first (fewest neighbouring devices), then the largest state
    order = sorted(range(plan.num_stages),
                   key=lambda s: (sum(t == 0 for t, _, _ in _assignments(plan, s)),
                                  -stage_state_bytes(costs, plan, s)))
    for s in order:
        stage = plan.stages[s]
        nbytes = stage_state_bytes(costs, plan, s)

        keyed = []
        for tier, label, assign in _assignments(plan, s):
            seconds = max(_send_time(cluster, stage.devices, h, nbytes)
                          for h in assign.values())
            room = min(capacity[h] - peak[h] for h in assign.values())
            keyed.append(((tier, seconds, -room, label), assign))
        keyed.sort(key=lambda item: item[0])
        placed = 0
        for _, assign in keyed:
            if placed == copies:
                break
            if any(h in replicas[d] for d, h in assign.items()):
                continue
            trial = {d: (*hs, assign[d]) if d in assign else hs for d, hs in replicas.items()}
            trial_pred = evaluate(replace(base, replicas=trial), costs, cluster)
            if any(trial_pred.peak_memory_bytes[h] > capacity[h] for h in assign.values()):
                continue
            replicas, peak = trial, dict(trial_pred.peak_memory_bytes)
            placed += 1
        if placed < copies:
            msg = (f"stage {s} (layers {list(stage.layers)} on {list(stage.devices)}, "
                   f"{nbytes / 2**20:.1f} MiB of state) has {placed} of {copies} "
                   f"replica holder(s): no neighbouring device has room")
            if strict:
                raise PlanError(msg + "; add memory, use fewer copies, or run with "
                                      "on-disk checkpoints only")
            logger.warning("%s; it will be restored from the last checkpoint", msg)
    return replicas


def with_replicas(plan: Plan, costs: CostTable, cluster: Cluster, *, copies: int = 1,
                  strict: bool = False) -> Plan:
    """``plan`` with ``replicas`` chosen by ``choose_replicas`` and ``predicted``
    re-evaluated (its peak memory includes the replicas; it still fits)."""
    replicas = choose_replicas(plan, costs, cluster, copies=copies, strict=strict)
    placed = replace(plan, replicas=replicas)
    return placed.with_prediction(evaluate(placed, costs, cluster))
