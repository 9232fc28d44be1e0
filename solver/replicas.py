"""Replica placement: which device keeps a copy of each stage's weights, chosen by idle time.

[Note: replica placement]
Every device's stage state (weights and optimizer state; the gradients are not needed
because a replica is refreshed after the optimizer step) is copied to ``copies``
*holders*. All devices of one stage hold the same state (data parallelism inside the
group), so the holders are chosen per stage and every member maps to them.

Why idle time: a replica is not free in steady state. After every K-th optimizer step the
stage's FIRST device sends ``stage_state_bytes`` to every holder outside its group
(``runtime.replication``: ``external_holders``; only the first device of a stage sends,
group peers already hold the state), and the holder spends CPU and link time receiving
it. Both land in the round's idle time -- or, where a device has none, stretch the round.
Giving the replicas to neighbouring stages only (the first version of this rule) put both
neighbours' replicas on the middle stage of a 3-stage pipeline, which is usually the
busiest device; so a replica now goes to the device with the most idle time left.

* ``idle_time_s``: per device, ``round_time_s - busy`` of the plan without replicas, with
  ``busy = M * (fwd + bwd of its own share) + T_a`` of its stage (clamped at 0).
* ``replication_load_s``: per device, seconds per round of replica traffic it takes part
  in, ``state / bandwidth(first device, holder) / K`` counted on the sender AND on the
  holder (a holder inside the stage's own group costs nothing).

Candidates for one copy of stage ``s``: every plan device outside the stage (one holder
for all members), then, for a multi-device stage only, a ring inside the group (member
``i`` is held by member ``i + offset``): it costs no traffic, but it does not survive the
loss of the whole group, so it is the last resort. External candidates are ordered by

1. the idle time the holder has left after absorbing this replica: ``idle_time_s`` minus
   the ``replication_load_s`` of the placements made so far (as sender or receiver) minus
   this replica's receive time, larger first, compared in buckets of 5 % of the round
   time (``IDLE_BUCKET``) so that near-ties fall through to the next criteria;
2. a neighbour (a device of stage ``s - 1`` or ``s + 1``: the layer-wise re-plan gives a
   lost stage's layers to its neighbours, so the holder can often serve them locally)
   before any other device;
3. the shorter send time (``state / bandwidth`` from the stage's first device);
4. the more free memory;
5. the holder's name (deterministic).

Stages are placed most constrained first (fewest external candidates, i.e. the largest
groups), then largest state first (the classic longest-first rule for balancing loads:
the big transfers go where the idle time is, the small ones fill in), then in stage order.
A candidate is accepted only when ``solver.evaluate`` (which adds a replica's
``param_bytes * (1 + optimizer_state_factor)`` to every holder, per replica entry) says
the holder still fits, so a plan with replicas always fits.

When replica traffic exceeds the idle time (large states, short rounds) every holder's
idle time left is negative and rule 1 spreads the transfers so that the most loaded device
is as little loaded as possible; ``auto_replicate_every`` then picks the smallest ``K`` for
which the load fits in a share of the idle time. Placement depends on ``K`` (it scales the
loads), so choose the holders with the ``K`` the runtime will use.

When no candidate has room the entry is an empty tuple (the stage is unprotected: after
its loss the runtime must restore it from the last on-disk checkpoint), or
``PlanError`` with ``strict=True``. A one-device plan therefore always gets an empty
entry.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.plan import Plan, Prediction
from contracts.table import CostTable
from solver.evaluate import LayerSums, evaluate
from solver.timing import Timing

__all__ = [
    "IDLE_BUCKET",
    "stage_state_bytes",
    "replication_time_s",
    "idle_time_s",
    "replication_load_s",
    "choose_replicas",
    "with_replicas",
    "auto_replicate_every",
    "plan_replication",
]

logger = logging.getLogger(__name__)

IDLE_BUCKET = 0.05
"""Idle times left closer than this fraction of the round time count as a tie."""


def stage_state_bytes(costs: CostTable, plan: Plan, stage: int) -> int:
    """Bytes one replica of stage ``stage`` carries: weights plus optimizer state plus
    buffers (BatchNorm statistics)."""
    sums = LayerSums.of(costs)
    st = plan.stages[stage]
    return (math.ceil(sums.params(st.first, st.last) * (1.0 + plan.optimizer_state_factor))
            + sums.buffers(st.first, st.last))


def _send_time(cluster: Cluster, senders: tuple[str, ...], holder: str, nbytes: int) -> float:
    """Seconds to copy ``nbytes`` to ``holder`` from the best-connected sender (one
    message: latency plus bytes / bandwidth)."""
    if nbytes <= 0:
        return 0.0
    if holder in senders:  # a group peer already has the state
        return 0.0
    return min(cluster.latency_s(s, holder) + nbytes / cluster.bandwidth_bytes_s(s, holder)
               for s in senders)


def _check_every(every_k_steps: int) -> None:
    if every_k_steps < 1:
        raise PlanError(f"every_k_steps must be >= 1, got {every_k_steps}; "
                        f"use 1 to replicate after every optimizer step")


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
        ``replication_load_s`` is what the runtime actually does (one sender per stage,
        receivers counted too).

    Raises:
        PlanError: ``every_k_steps < 1``.
    """
    cluster = cluster.for_costs(costs)
    _check_every(every_k_steps)
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


def _idle_from(plan: Plan, costs: CostTable, cluster: Cluster,
               pred: Prediction) -> dict[str, float]:
    """``idle_time_s`` given the prediction of ``plan`` without replicas."""
    timing = Timing.of(costs, cluster)
    m = plan.num_micro_batches
    out: dict[str, float] = {}
    for stage, terms in zip(plan.stages, pred.stages, strict=True):
        for device, share in zip(stage.devices, stage.shares, strict=True):
            busy = m * (timing.fwd_time(device, stage.first, stage.last, share)
                        + timing.bwd_time(device, stage.first, stage.last, share))
            idle = pred.round_time_s - (busy + terms.t_a)
            out[device] = idle if idle > 0.0 else 0.0
    return out


def idle_time_s(plan: Plan, costs: CostTable, cluster: Cluster) -> dict[str, float]:
    """Predicted idle seconds of every device in one training round.

    Args:
        plan: the plan (its ``replicas`` and ``predicted`` are ignored: it is evaluated
            without replicas).
        costs: the model's cost table.
        cluster: the devices and links of the plan.

    Returns:
        device -> ``max(0, round_time_s - busy)``, where ``busy`` is the device's compute
        in a round: ``M * (forward + backward of its own share of its stage's layers)``
        plus its stage's ``T_a`` (all-reduce and optimizer step). Waiting for
        activations, bubbles and the other devices' work count as idle.

    Raises:
        PlanError: the plan does not match the cost table or the cluster.
    """
    cluster = cluster.for_costs(costs)
    base = replace(plan, replicas={})
    return _idle_from(base, costs, cluster, evaluate(base, costs, cluster))


def _external(plan: Plan, replicas: Mapping[str, tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Per stage, its holders outside its group (as ``runtime.replication.external_holders``:
    deduplicated, in member order, plan devices only)."""
    devices = set(plan.devices)
    out: list[tuple[str, ...]] = []
    for stage in plan.stages:
        holders: list[str] = []
        for device in stage.devices:
            for h in replicas.get(device, ()):
                if h not in stage.devices and h not in holders and h in devices:
                    holders.append(h)
        out.append(tuple(holders))
    return out


def _transfer_s(cluster: Cluster, sender: str, holder: str, nbytes: int,
                every_k_steps: int) -> float:
    """Seconds per round to copy ``nbytes`` from ``sender`` to ``holder`` every K steps."""
    if nbytes <= 0:
        return 0.0
    one = cluster.latency_s(sender, holder) + nbytes / cluster.bandwidth_bytes_s(sender, holder)
    return one / every_k_steps


def replication_load_s(plan: Plan, costs: CostTable, cluster: Cluster,
                       replicas: Mapping[str, tuple[str, ...]] | None = None,
                       every_k_steps: int = 1) -> dict[str, float]:
    """Seconds per round of replica traffic every device takes part in.

    Args:
        plan: the plan (its ``replicas`` are used unless ``replicas`` is given).
        costs: the model's cost table.
        cluster: the devices and links.
        replicas: device -> holders, overriding ``plan.replicas``.
        every_k_steps: the state is copied after every K-th optimizer step.

    Returns:
        device -> seconds. For every stage with holders outside its group, the stage's
        first device sends ``stage_state_bytes / bandwidth(first, holder) / K`` to each
        such holder; the sender and the holder are both charged that time. Holders inside
        the group cost nothing (the runtime does not send to group peers). Every plan
        device is a key (0.0 when it takes part in no transfer).

    Raises:
        PlanError: ``every_k_steps < 1``.
    """
    cluster = cluster.for_costs(costs)
    _check_every(every_k_steps)
    mapping = plan.replicas if replicas is None else replicas
    out = {d: 0.0 for d in plan.devices}
    for index, holders in enumerate(_external(plan, mapping)):
        if not holders:
            continue
        sender = plan.stages[index].devices[0]
        nbytes = stage_state_bytes(costs, plan, index)
        for h in holders:
            seconds = _transfer_s(cluster, sender, h, nbytes, every_k_steps)
            out[sender] += seconds
            out[h] += seconds
    return out


@dataclass(frozen=True)
class _Candidate:
    """One placement of one copy of a stage: ``holder`` for every member (``None`` for a
    ring inside the group), ``assign`` member -> holder."""

    label: str
    holder: str | None
    assign: dict[str, str]


def _candidates(plan: Plan, stage: int) -> list[_Candidate]:
    """Every plan device outside ``stage`` (one holder for all members), then for a
    multi-device stage the rings inside the group, member ``i`` -> ``i + offset``."""
    members = plan.stages[stage].devices
    out = [_Candidate(h, h, {d: h for d in members})
           for h in plan.devices if h not in members]
    n = len(members)
    for offset in range(1, n):
        ring = {members[i]: members[(i + offset) % n] for i in range(n)}
        out.append(_Candidate(f"ring+{offset}", None, ring))
    return out


def _bucket(seconds: float, round_time: float) -> int:
    """``seconds`` in units of ``IDLE_BUCKET * round_time`` (rounded down)."""
    width = IDLE_BUCKET * round_time
    if not width > 0.0 or not math.isfinite(width):
        return 0
    return math.floor(seconds / width)


def choose_replicas(plan: Plan, costs: CostTable, cluster: Cluster, *, copies: int = 1,
                    strict: bool = False,
                    every_k_steps: int = 1) -> dict[str, tuple[str, ...]]:
    """Holders of every device's stage state (see [Note: replica placement]).

    Args:
        plan: a plan that fits without replicas (its own ``replicas`` are ignored).
        costs: the model's cost table.
        cluster: the devices and links of the plan.
        copies: holders per device (1: a whole stage may be lost and recovered).
        strict: raise instead of leaving a device with fewer than ``copies`` holders.
        every_k_steps: the runtime copies the state after every K-th optimizer step
            (scales the replica traffic weighed against idle time).

    Returns:
        device -> holders (the mapping for ``Plan.replicas``); a holder is never the
        device itself; an entry has fewer than ``copies`` holders (possibly none) where
        no candidate had room.

    Raises:
        PlanError: ``copies < 1``; ``every_k_steps < 1``; the plan does not fit even
            without replicas; with ``strict``, a stage for which no holder has room.
    """
    cluster = cluster.for_costs(costs)
    if copies < 1:
        raise PlanError(f"copies must be >= 1, got {copies}")
    _check_every(every_k_steps)
    base = replace(plan, replicas={})
    pred = evaluate(base, costs, cluster)
    if not pred.fits:
        short = {d: f"{b / 2**20:.1f} MiB" for d, b in pred.memory_shortfall().items()}
        raise PlanError(f"the plan does not fit even without replicas (short by {short}); "
                        f"re-plan before placing replicas")
    idle = _idle_from(base, costs, cluster, pred)
    round_time = pred.round_time_s
    capacity = pred.memory_capacity_bytes
    peak = dict(pred.peak_memory_bytes)
    load = {d: 0.0 for d in plan.devices}
    replicas: dict[str, tuple[str, ...]] = {d: () for d in plan.devices}
    external = len(plan.devices)
    order = sorted(range(plan.num_stages),
                   key=lambda s: (external - len(plan.stages[s].devices),
                                  -stage_state_bytes(costs, plan, s), s))
    for s in order:
        stage = plan.stages[s]
        sender = stage.devices[0]
        nbytes = stage_state_bytes(costs, plan, s)
        neighbours = {d for t in (s - 1, s + 1) if 0 <= t < plan.num_stages
                      for d in plan.stages[t].devices}

        keyed: list[tuple[tuple[int, int, int, float, int, str], _Candidate]] = []
        for cand in _candidates(plan, s):
            room = min(capacity[h] - peak[h] for h in cand.assign.values())
            if cand.holder is None:  # a ring: no traffic, last resort
                keyed.append(((1, 0, 0, 0.0, -room, cand.label), cand))
                continue
            seconds = _transfer_s(cluster, sender, cand.holder, nbytes, every_k_steps)
            left = idle[cand.holder] - load[cand.holder] - seconds
            tier = 0 if cand.holder in neighbours else 1
            keyed.append(((0, -_bucket(left, round_time), tier, seconds, -room, cand.label),
                          cand))
        keyed.sort(key=lambda item: item[0])
        placed = 0
        for _, cand in keyed:
            if placed == copies:
                break
            if any(h in replicas[d] for d, h in cand.assign.items()):
                continue
            trial = {d: (*hs, cand.assign[d]) if d in cand.assign else hs
                     for d, hs in replicas.items()}
            trial_pred = evaluate(replace(base, replicas=trial), costs, cluster)
            if any(trial_pred.peak_memory_bytes[h] > capacity[h] for h in cand.assign.values()):
                continue
            replicas, peak = trial, dict(trial_pred.peak_memory_bytes)
            if cand.holder is not None:
                seconds = _transfer_s(cluster, sender, cand.holder, nbytes, every_k_steps)
                load[sender] += seconds
                load[cand.holder] += seconds
            placed += 1
        if placed < copies:
            why = "no other device has room" if keyed else "the plan has no other device"
            msg = (f"stage {s} (layers {list(stage.layers)} on {list(stage.devices)}, "
                   f"{nbytes / 2**20:.1f} MiB of state) has {placed} of {copies} "
                   f"replica holder(s): {why}")
            if strict:
                raise PlanError(msg + "; add memory, use fewer copies, or run with "
                                      "on-disk checkpoints only")
            logger.warning("%s; it will be restored from the last checkpoint", msg)
    logger.debug("replica holders %s (every %d steps, load %s s/round, idle %s s/round)",
                 replicas, every_k_steps, load, idle)
    return replicas


def with_replicas(plan: Plan, costs: CostTable, cluster: Cluster, *, copies: int = 1,
                  strict: bool = False, every_k_steps: int = 1) -> Plan:
    """``plan`` with ``replicas`` chosen by ``choose_replicas`` and ``predicted``
    re-evaluated (its peak memory includes the replicas; it still fits)."""
    cluster = cluster.for_costs(costs)
    replicas = choose_replicas(plan, costs, cluster, copies=copies, strict=strict,
                               every_k_steps=every_k_steps)
    placed = replace(plan, replicas=replicas)
    return placed.with_prediction(evaluate(placed, costs, cluster))


def auto_replicate_every(plan: Plan, costs: CostTable, cluster: Cluster,
                         replicas: Mapping[str, tuple[str, ...]] | None = None, *,
                         budget: float = 0.5, max_k: int = 16) -> int:
    """The smallest replication period K whose replica traffic fits in the idle time.

    Args:
        plan: the plan (its ``replicas`` are used unless ``replicas`` is given).
        costs: the model's cost table.
        cluster: the devices and links.
        replicas: device -> holders, overriding ``plan.replicas``.
        budget: the share of every device's idle time that replication may use.
        max_k: the largest K considered.

    Returns:
        The smallest ``K`` in ``1..max_k`` with ``replication_load_s(K) <= budget *
        idle_time_s`` on every device; ``max_k`` (with a warning) when none qualifies;
        1 for a plan whose stages have no holders outside their groups.

    Raises:
        PlanError: ``budget <= 0`` or ``max_k < 1``; the plan does not match the cost
            table or the cluster.
    """
    cluster = cluster.for_costs(costs)
    if not budget > 0.0:
        raise PlanError(f"budget must be > 0 (a share of each device's idle time, e.g. "
                        f"0.5), got {budget}")
    if max_k < 1:
        raise PlanError(f"max_k must be >= 1 (the largest replication period in steps), "
                        f"got {max_k}")
    idle = idle_time_s(plan, costs, cluster)
    worst: tuple[str, float, float] = ("", 0.0, 0.0)
    for k in range(1, max_k + 1):
        load = replication_load_s(plan, costs, cluster, replicas, every_k_steps=k)
        over = [(d, load[d], budget * idle[d]) for d in load if load[d] > budget * idle[d]]
        if not over:
            return k
        worst = max(over, key=lambda item: item[1] - item[2])
    device, seconds, allowed = worst
    logger.warning("replica traffic exceeds %.0f %% of the idle time even every %d steps "
                   "(%s: %.4f s per round, %.4f s allowed); using every %d steps -- "
                   "expect slower rounds, or raise max_k or the budget",
                   100 * budget, max_k, device, seconds, allowed, max_k)
    return max_k


def plan_replication(plan: Plan, costs: CostTable, cluster: Cluster, *,
                     every_k_steps: int | None = None, copies: int = 1,
                     budget: float = 0.5, max_k: int = 16
                     ) -> tuple[dict[str, tuple[str, ...]], int]:
    """Replica holders and the replication period K, chosen together.

    Placement weighs traffic by ``1 / K`` and K depends on where the traffic goes, so with
    ``every_k_steps=None`` ("auto") this places for K = 1, takes the smallest K whose
    traffic fits (``auto_replicate_every``), places again for that K and repeats until K
    stops growing or reaches ``max_k`` (K only grows, so it ends).

    Args:
        plan: the plan to protect.
        costs: the model's cost table.
        cluster: the devices and links of the plan.
        every_k_steps: a fixed period (placement for it only), or ``None`` for auto.
        copies: holders per device.
        budget: with auto, the share of every device's idle time replication may use.
        max_k: with auto, the largest period considered.

    Returns:
        ``(replicas, K)``: device -> holders (as ``choose_replicas``) and the period.

    Raises:
        PlanError: bad ``every_k_steps``, ``copies``, ``budget`` or ``max_k``; the plan does
            not fit even without replicas.
    """
    cluster = cluster.for_costs(costs)
    if every_k_steps is not None:
        _check_every(every_k_steps)
        return choose_replicas(plan, costs, cluster, copies=copies,
                               every_k_steps=every_k_steps), every_k_steps
    k = 1
    replicas = choose_replicas(plan, costs, cluster, copies=copies, every_k_steps=k)
    while k < max_k:
        wanted = auto_replicate_every(plan, costs, cluster, replicas, budget=budget,
                                      max_k=max_k)
        if wanted <= k:
            break
        k = wanted
        replicas = choose_replicas(plan, costs, cluster, copies=copies, every_k_steps=k)
    logger.info("replication every %d step(s), holders %s", k, replicas)
    return replicas, k
