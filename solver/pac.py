"""PAC fine-tuning plans: a forward-only pipeline (phase 1), uneven data parallelism (phase 2).

[Note: PAC phases]
Parallel-adapter fine-tuning (Pluto and Charon, ICPP'24; ``asteroid_fx.adapters``) trains
only a side network fed by tapped hidden states of a frozen backbone, so

* phase 1 (epoch 1) runs the backbone forward once per sample, without backward, through
  a pipeline plan whose cuts lie at the taps (the backbone's *segments* are the layers of
  a coarse cost table, :func:`segment_costs`: no backward, no gradients or optimizer
  state, frozen weights counted once), and hands each sample's cache entry (the taps and
  the head's inputs) to the device that trains on that sample;
* phase 2 (every step, from the cache) trains the adapters (and the head's side) with data
  parallelism: device ``d`` takes ``share_d`` samples of every mini-batch (Algorithm 1,
  ``solver.split.split_shares``, by speed, capped by the memory left after its cache),
  then the adapter gradients are all-reduced (``solver.evaluate.allreduce_time``).

Where the cache lives is planned too ([Note: cache placement]): on the device that trains
on the samples (``cache="local"``: nothing moves after epoch 1), or ``sharded`` (rows
parked on devices with room while the backbone is held and handed to their phase-2 holder
when phase 1 ends, or held on another device and streamed to the trainer every step).
Predicted times (``PacPrediction``): one phase-1 step is a
forward-only pipeline of ``M`` micro-batches, ``sum_s E_f^s + (M - 1) max_s E_f^s``, where
``E_f^s`` is ``solver.evaluate``'s forward term plus the stage's hand-off of cache entries;
one phase-2 step is ``max_d compute_d + all-reduce``, ``compute_d`` the whole step besides
the all-reduce (entry from the cache rows, side path, head, loss, backward, gradients
packed and unpacked, optimizer step) as ``PacModel.step_fit`` measured it on
the profiling host, over the device's speed; without that measurement, the head's layers
from the cost table (a frozen head's backward counted at ``FROZEN_BACKWARD_SHARE`` of its
measured backward), the adapters' FLOPs and the optimizer step; epoch 1 runs a
phase-1 and a phase-2 step per mini-batch, later epochs only phase 2.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

from contracts.arguments import check_cluster, check_costs, is_int, is_number, require
from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.pac_plan import PacModel, PacPlan, PacPrediction
from contracts.plan import Plan
from contracts.table import CostTable
from solver.evaluate import allreduce_time, evaluate
from solver.pac_cost import (
    DevicePeaks,
    disk_s,
    fetch_s,
    phase1_memory,
    phase2_compute,
    phase2_fixed,
    phase2_per_sample,
    predict_finetune,
    segment_costs,
    workspaces,
)
from solver.split import split_shares
from solver.timing import Timing

__all__ = ["PacModel", "PacPrediction", "PacPlan", "segment_costs", "plan_finetune",
           "predict_finetune", "describe_phase1", "PHASE1_OBJECTIVES", "replan_phase1",
           "DEFAULT_PHASE1_SLACK", "place_cache", "phase1_memory", "describe_cache",
           "DEFAULT_CACHE_SLACK", "CACHE_MODES"]
# (the plan's data types live in contracts/pac_plan.py)

def _phase2_shares(costs: CostTable, cluster: Cluster, model: PacModel, batch_size: int,
                   steps: int, devices: Sequence[str], reserved: Mapping[str, int],
                   on_disk: Collection[str] = ()) -> tuple[int, ...]:
    """Algorithm 1 over all devices, each capped by the memory its cache leaves (none for
    a device ``on_disk``); raises ``PlanError`` naming the device that is most bytes short
    when the cache fits nowhere."""
    timing = Timing.of(costs, cluster)
    speeds = [timing.speeds[d] for d in devices]
    if any(d in on_disk for d in devices):
        # a device on disk also reads each of its samples: shares by the seconds a sample
        # adds to its step, reads included ([Note: a cache on disk])
        ones, twos = ([k] * len(devices) for k in (1, 2))
        marginal = [b - a for a, b in zip(phase2_compute(costs, cluster, model, devices, ones),
                                          phase2_compute(costs, cluster, model, devices, twos),
                                          strict=True)]
        _write, copy, wait = disk_s(costs, cluster, model, devices, ones, on_disk)
        sample_s = [max(m + c, w) for m, c, w in zip(marginal, copy, wait, strict=True)]
        if all(t > 0 for t in sample_s):
            speeds = [1.0 / t for t in sample_s]
    fixed = phase2_fixed(costs, model, costs.optimizer_state_factor)
    cache, work = phase2_per_sample(costs, model, steps)
    per_sample = {d: work + (0 if d in on_disk else cache) for d in devices}
    caps = []
    for d in devices:
        room = cluster.usable_bytes(d) - fixed - reserved.get(d, 0)
        caps.append(max(0, room // per_sample[d]) if per_sample[d] > 0 else batch_size)
    shares = split_shares(batch_size, speeds, caps)
    if shares is not None:
        return shares
    total = sum(speeds)
    short = []
    for d, v in zip(devices, speeds, strict=True):
        want = max(1, math.ceil(batch_size * v / total))
        need = cluster.workspace_bytes(d) + fixed + reserved.get(d, 0) + want * per_sample[d]
        short.append((need - cluster.device(d).memory_bytes, d, want, need))
    gap, device, want, need = max(short)
    have = cluster.device(device).memory_bytes
    raise PlanError(
        f"the activation cache does not fit: device {device!r} would hold {want} samples x "
        f"{steps} steps x {model.entry_bytes} bytes of cache (needs {need} bytes with the "
        f"phase-1 weights) but has {have} bytes, {max(gap, 1)} bytes short; use fewer "
        f"samples (--samples), fewer taps, a smaller batch{_narrower(model)}")


def _narrower(model: PacModel) -> str:
    """The end of the hint of a cache that does not fit: a narrower cache dtype too, while
    the cache keeps entries as made."""
    return (", devices with more memory, --cache-store disk or --cache-dtype bfloat16 (half "
            "the bytes)") if model.made_bytes == model.entry_bytes else \
        ", devices with more memory or --cache-store disk"


def _takeover(costs: CostTable, cluster: Cluster, model: PacModel, lost_share: int,
              steps: int, others: Sequence[str], reserved: Mapping[str, int],
              on_disk: Collection[str] = ()) -> tuple[int, ...] | None:
    """How many of a lost device's rows each other device takes over (Algorithm 1 over
    the fastest ``min(len(others), lost_share)`` of them, capped by the memory their own
    cache leaves), or None when they cannot hold them."""
    if not others:
        return None
    timing = Timing.of(costs, cluster)
    order = sorted(others, key=lambda d: -timing.speeds[d])[:lost_share]
    try:
        part = _phase2_shares(costs, cluster, model, lost_share, steps, order, reserved,
                              on_disk)
    except PlanError:
        return None
    taken = dict(zip(order, part, strict=True))
    return tuple(taken.get(d, 0) for d in others)


DEFAULT_CACHE_SLACK = 0.0
"""How much longer than with a local cache (a fraction of the predicted phase-2 step) a
sharded cache's fetches may make the phase-2 step."""

CACHE_MODES = ("auto", "local")
"""``auto``: planned by memory and link bandwidth ([Note: cache placement]); ``local``:
every trainer caches its own rows."""

STORE_MODES = ("auto", "memory", "disk")
"""Where the cache's rows are kept ([Note: a cache on disk]): ``auto`` chooses (see
[Note: choosing the store]); ``memory``; ``disk`` (every device)."""

DEFAULT_STORE_SLACK = 0.05
"""With ``cache_store="auto"`` and the ``memory`` objective: how much longer (a fraction of
the predicted total) a cache on disk may make the run for its lower peak memory."""

# [Note: choosing the store]
# ``cache_store="auto"`` plans up to three stores and takes one. It tries the cache in
# memory (no device on disk); where that fits nowhere, the fewest devices on disk, smallest
# memory first, that make it fit (``mixed``: the others keep the faster memory cache,
# sharded only among themselves); and every device on disk. Each gets its own phase-1
# choice ([Note: phase-1 objective]). With the ``memory`` objective (the default) it takes
# the lowest peak memory pressure among the stores whose predicted total is at most
# ``1 + store_slack`` times the fastest's, then the faster: the cache grows with the data
# set while the adapters do not, and with the reads overlapped ([Note: a cache on disk])
# storage usually costs a few per cent. A device on slow storage (``storage_mb_s``) can
# push the disk's total past the slack, and the cache stays in memory. With the ``time``
# objective it takes the fastest total. ``plan.meta["cache_choice"]["store_reason"]``
# gives the choice and its price. The planner cannot see whether a device's temporary
# directory is memory (``tmpfs``); the run warns where it is (``ASTEROID_CACHE_DIR``).

PHASE1_OBJECTIVES = ("memory", "time")
"""How ``plan_finetune`` picks the phase-1 plan (see [Note: phase-1 objective])."""

DEFAULT_PHASE1_SLACK = 2.0
"""How much slower than the fastest phase-1 plan (a fraction of its predicted step time)
the ``memory`` objective may choose, for lower peak memory."""

MEMORY_LEVELS = 12
"""Memory caps (each ``CAP_RATIO`` of the one before) under which the ``memory`` objective
re-runs the phase-1 planner for candidates that hold less of the backbone per device."""

CAP_RATIO = 0.8


# [Note: phase-1 objective]
# The fastest forward-only phase 1 is often data parallel: every device holds the whole
# frozen backbone during epoch 1, so PAC's peak memory per device can exceed full
# fine-tuning's, whose pipeline spreads the model. With ``phase1_objective="memory"``
# (the default) the planner makes a small Pareto front of phase-1 plans: the fastest
# one, the same planner under per-device memory caps of ``workspace_d + alpha x (memory_d -
# workspace_d)`` for ``alpha`` shrinking by ``CAP_RATIO`` from the fastest plan's pressure
# on the memory for tensors (each cap gives
# the fastest plan that holds less per device), and one device per stage
# (``pp-equal``). Each candidate gets its phase-2 shares and the whole PAC prediction;
# among those whose phase-1 step is at most ``1 + phase1_slack`` times the fastest's, it
# takes the lowest *memory pressure* ``max_d peak_d / memory_d`` (PAC peak, both phases),
# then the faster. ``plan.meta["phase1_choice"]`` keeps every candidate and the reason,
# which the report prints. ``phase1_objective="time"`` takes the fastest plan.


def _pressure(peak: Mapping[str, int], cluster: Cluster) -> float:
    return max(peak[d] / cluster.device(d).memory_bytes for d in peak)


def _usable_pressure(peak: Mapping[str, int], cluster: Cluster) -> float:
    """``max_d (peak_d - workspace_d) / usable_d``: ``_pressure`` of the stage's tensors."""
    return max((peak[d] - cluster.workspace_bytes(d)) / max(1, cluster.usable_bytes(d))
               for d in peak)


def _capped(cluster: Cluster, alpha: float) -> Cluster:
    """``cluster`` (with its cost table's workspaces, ``Cluster.for_costs``) with every
    device's memory for tensors cut to ``alpha`` of it; its workspace stays whole (a cap
    of the whole memory fell below the Jetsons' 16 MiB workspaces for small models, where
    no plan fits: [Note: no plan to prune by] in ``solver.anytime``)."""
    devices = tuple(replace(d, memory_bytes=cluster.workspace_bytes(d.name) + max(
        1, int(alpha * cluster.usable_bytes(d.name)))) for d in cluster.devices)
    return replace(cluster, devices=devices)


def _phase1_candidates(coarse: CostTable, cluster: Cluster, batch_size: int,
                       planner: str, micro_batch_size: int | None, objective: str
                       ) -> list[tuple[str, Plan]]:
    """Phase-1 plans to choose from (see [Note: phase-1 objective]), fastest first."""
    from solver.api import plan as plan_fn

    def make(planner_name: str, where: Cluster) -> Plan:
        made = plan_fn(coarse, where, batch_size, planner=planner_name,
                       optimizer_state_factor=0.0,
                       micro_batch_size=micro_batch_size if planner_name == planner
                       or planner_name == "asteroid" else None)
        return replace(made, cluster_hash=cluster.cluster_hash)

    fastest = make(planner, cluster)
    out = [(planner, fastest)]
    if objective == "time":
        return out
    seen = {_shape(fastest)}
    real = cluster.for_costs(coarse)
    alpha = _usable_pressure(evaluate(fastest, coarse, real).peak_memory_bytes, real)
    for _level in range(MEMORY_LEVELS):
        alpha *= CAP_RATIO
        try:
            capped = make(planner, _capped(real, alpha))
        except PlanError:
            break          # nothing fits under this cap (nor under smaller ones)
        if _shape(capped) not in seen:
            seen.add(_shape(capped))
            out.append((f"{planner}, memory cap {alpha:.3g} x each device's memory for "
                        f"tensors", capped))
    if planner != "pp-equal":
        try:
            spread = make("pp-equal", cluster)
        except PlanError:
            spread = None
        if spread is not None and _shape(spread) not in seen:
            out.append(("pp-equal", spread))
    return out


def _shape(plan: Plan) -> tuple[object, ...]:
    return (plan.micro_batch_size, tuple((s.first, s.last, s.devices, s.shares)
                                          for s in plan.stages))


def describe_phase1(plan: Plan) -> str:
    """``segments 0-1 on ['a'] | 2-3 on ['b', 'c'] (2/2), micro-batch 4 x 4``."""
    stages = " | ".join(f"{s.first}-{s.last} on {list(s.devices)}"
                        + (f" ({'/'.join(map(str, s.shares))})" if len(s.devices) > 1 else "")
                        for s in plan.stages)
    return f"segments {stages}, micro-batch {plan.micro_batch_size} x {plan.num_micro_batches}"


def plan_finetune(costs: CostTable, cluster: Cluster, model: PacModel, *, batch_size: int,
                  num_samples: int, epochs: int, micro_batch_size: int | None = None,
                  phase1_planner: str = "asteroid", phase1_objective: str = "memory",
                  phase1_slack: float = DEFAULT_PHASE1_SLACK, cache: str = "auto",
                  cache_slack: float = DEFAULT_CACHE_SLACK, cache_store: str = "auto",
                  store_slack: float = DEFAULT_STORE_SLACK) -> PacPlan:
    """Plan both phases of PAC fine-tuning (see [Note: PAC phases]); pure.

    ``phase1_planner`` is any planner of ``solver.api`` (``asteroid``: the fastest
    forward pipeline; ``pp-equal``: one device per stage, which spreads the frozen
    weights and so lowers each device's peak memory). ``phase1_objective``: ``memory``
    (default) takes the phase-1 plan of lowest peak memory pressure among those at most
    ``1 + phase1_slack`` times slower than the fastest; ``time`` the fastest (see
    [Note: phase-1 objective]). ``cache``: ``auto`` (default) places the activation
    cache by memory and link bandwidth, ``local`` keeps every trainer's rows on itself;
    ``cache_slack``: how much longer the phase-2 step may get for fetching rows cached
    elsewhere (see [Note: cache placement]). ``cache_store``: ``memory``, ``disk`` (every
    device keeps its rows in a file, [Note: a cache on disk]) or ``auto`` (default:
    memory where the cache fits there, else the fewest devices on disk that make it fit,
    smallest memory first).

    Raises:
        PlanError: bad sizes, objective, cache mode, store or slack, no forward-only
            pipeline fits, or the cache fits nowhere.
    """
    check_cluster(cluster)
    check_costs(costs)
    require(model, PacModel, PlanError, "model",
            "make one with asteroid_fx.finetune.pac_model_of(afx.parallel_adapters(...))")
    for value, what in ((batch_size, "batch_size"), (epochs, "epochs"),
                        (num_samples, "num_samples")):
        if not is_int(value):
            raise PlanError(f"{what} must be an integer, got {value!r}")
    for slack, what in ((phase1_slack, "phase1_slack"), (cache_slack, "cache_slack"),
                        (store_slack, "store_slack")):
        if not is_number(slack):
            raise PlanError(f"{what} must be a number >= 0, got {slack!r}")
    if batch_size < 1 or epochs < 1:
        raise PlanError(f"--batch-size and --epochs must be >= 1, got {batch_size} and "
                        f"{epochs}")
    if phase1_objective not in PHASE1_OBJECTIVES:
        raise PlanError(f"phase-1 objective must be one of {list(PHASE1_OBJECTIVES)}, got "
                        f"{phase1_objective!r}")
    if not phase1_slack >= 0.0:
        raise PlanError(f"phase-1 slack must be >= 0 (a fraction of the fastest phase 1), "
                        f"got {phase1_slack}")
    if cache not in CACHE_MODES:
        raise PlanError(f"cache placement must be one of {list(CACHE_MODES)}, got {cache!r}")
    if cache_store not in STORE_MODES:
        raise PlanError(f"cache store must be one of {list(STORE_MODES)}, got "
                        f"{cache_store!r}")
    if not cache_slack >= 0.0:
        raise PlanError(f"cache slack must be >= 0 (a fraction of the phase-2 step), got "
                        f"{cache_slack}")
    if not store_slack >= 0.0:
        raise PlanError(f"store slack must be >= 0 (a fraction of the predicted total), got "
                        f"{store_slack}")
    steps = num_samples // batch_size
    if steps < 1:
        raise PlanError(f"{num_samples} samples make no full batch of {batch_size}; use "
                        f"more samples or a smaller --batch-size")
    if batch_size < len(cluster.devices):
        raise PlanError(f"--batch-size {batch_size} is smaller than the {len(cluster.devices)} "
                        f"devices of the cluster; phase 2 gives every device >= 1 sample")
    coarse = segment_costs(costs, model.taps, model.segment_cold_s)
    candidates = _phase1_candidates(coarse, cluster, batch_size, phase1_planner,
                                    micro_batch_size, phase1_objective)
    names = tuple(cluster.names)
    error: PlanError | None = None
    options: list[_StoreOption] = []
    for on_disk in _store_sets(cluster, cache_store):
        if cache_store == "auto" and options and on_disk != frozenset(names):
            continue     # a partial spill only where less does not fit
        drafts: list[tuple[str, PacPlan, PacPrediction]] = []
        for label, phase1 in candidates:
            try:
                draft = _draft(costs, cluster, model, coarse, phase1, batch_size=batch_size,
                               num_samples=num_samples, steps=steps, epochs=epochs,
                               cache=cache, cache_slack=cache_slack, on_disk=on_disk)
            except PlanError as exc:      # this phase 1 leaves no room for the cache
                error = error or exc
                continue
            drafts.append((label, draft, predict_finetune(draft, costs, cluster)))
        if drafts:
            options.append(_store_option(on_disk, drafts, phase1_objective, phase1_slack,
                                         cluster))
    if not options:
        raise error if error is not None else PlanError(
            "no phase-1 plan leaves room for the activation cache")
    best, store_reason = _choose_store(options, cache_store, phase1_objective, store_slack,
                                       names, error)
    label, draft, pred = best.drafts[best.chosen]
    choice = {
        "objective": phase1_objective, "slack": phase1_slack, "chosen": best.chosen,
        "reason": _reason(phase1_objective, phase1_slack, best.drafts, best.pressures,
                          best.chosen),
        "candidates": [{"label": lab, "phase1": describe_phase1(d.phase1),
                        "phase1_step_s": p.phase1_step_s, "total_s": p.total_s,
                        "pressure": best.pressures[i],
                        "peak_memory_bytes": dict(p.peak_memory_bytes)}
                       for i, (lab, d, p) in enumerate(best.drafts)],
    }
    return replace(draft, predicted=pred, meta={
        **dict(draft.meta), "phase1_choice": choice,
        "cache_choice": {"mode": cache, "slack": cache_slack, "store": cache_store,
                         "reason": describe_cache(draft, pred),
                         **({"store_reason": store_reason} if store_reason else {})}})


def _store_sets(cluster: Cluster, cache_store: str) -> list[frozenset[str]]:
    """The sets of devices keeping their rows on disk that ``cache_store`` tries, in order
    (see [Note: choosing the store])."""
    names = tuple(cluster.names)
    if cache_store != "auto":
        return [frozenset(names if cache_store == "disk" else ())]
    spill = sorted(names, key=lambda d: (cluster.device(d).memory_bytes, names.index(d)))
    return [frozenset(spill[:k]) for k in range(len(names) + 1)]


@dataclass(frozen=True)
class _StoreOption:
    """One set of devices on disk: its PAC drafts (one per phase-1 candidate), their peak
    memory pressures and the phase-1 choice among them ([Note: phase-1 objective])."""

    on_disk: frozenset[str]
    drafts: tuple[tuple[str, PacPlan, PacPrediction], ...]
    pressures: tuple[float, ...]
    chosen: int

    @property
    def total_s(self) -> float:
        return self.drafts[self.chosen][2].total_s

    @property
    def pressure(self) -> float:
        return self.pressures[self.chosen]


def _store_option(on_disk: frozenset[str], drafts: Sequence[tuple[str, PacPlan, PacPrediction]],
                  objective: str, slack: float, cluster: Cluster) -> _StoreOption:
    """``drafts`` for the devices ``on_disk`` with the phase-1 choice made (lowest pressure
    within ``slack`` of the fastest phase 1, or the fastest for the ``time`` objective)."""
    pressures = tuple(_pressure(p.peak_memory_bytes, cluster) for _l, _d, p in drafts)
    steps = [p.phase1_step_s for _l, _d, p in drafts]
    chosen = (min(range(len(steps)), key=lambda i: steps[i]) if objective == "time"
              else _least_pressure(steps, pressures, slack))
    return _StoreOption(on_disk, tuple(drafts), pressures, chosen)


def _least_pressure(times: Sequence[float], pressures: Sequence[float], slack: float) -> int:
    """The index of the lowest peak memory pressure, then the faster, among those whose
    time is at most ``1 + slack`` times the fastest's (the first of equals)."""
    fastest = min(times)
    admissible = [i for i, t in enumerate(times) if t <= (1.0 + slack) * fastest * (1 + 1e-12)]
    return min(admissible, key=lambda i: (round(pressures[i], 12), times[i]))


def _choose_store(options: Sequence[_StoreOption], cache_store: str, objective: str,
                  slack: float, names: Sequence[str], error: PlanError | None
                  ) -> tuple[_StoreOption, str]:
    """The store option to take and, for ``auto``, why (see [Note: choosing the store])."""
    if cache_store != "auto":
        return options[0], ""
    if objective == "time":
        best = min(options, key=lambda o: (o.total_s, len(o.on_disk)))
    else:
        best = options[_least_pressure([o.total_s for o in options],
                                       [o.pressure for o in options], slack)]
    memory = next((o for o in options if not o.on_disk), None)
    if not best.on_disk:
        others = [o for o in options if o.on_disk]
        why = ("memory: the cache fits there" + (
            f"; on disk it would cost {others[0].total_s / best.total_s - 1:+.1%} of the "
            f"predicted total for peak memory pressure {others[0].pressure:.3%} instead of "
            f"{best.pressure:.3%}" if others else ""))
        return best, why
    where = ("disk" if len(best.on_disk) == len(names) else
             f"mixed: {', '.join(d for d in names if d in best.on_disk)} keep their rows on "
             f"disk")
    if memory is None:
        return best, f"{where}: the cache does not fit in memory ({error})"
    return best, (f"{where}: peak memory pressure {best.pressure:.3%} instead of "
                  f"{memory.pressure:.3%} in memory, for {best.total_s / memory.total_s - 1:+.1%}"
                  f" of the predicted total ({best.total_s:.3f} s); allowed: +{slack:.0%}"
                  if objective == "memory" else
                  f"{where}: the fastest predicted total ({best.total_s:.3f} s)")


def describe_cache(plan: PacPlan, pred: PacPrediction) -> str:
    """One line: where the cache lives and what it costs (see [Note: cache placement] and
    [Note: a cache on disk])."""
    disk = (f"writing them {pred.write_s * 1e3:.2f} ms per phase-1 step, reading them "
            f"{pred.read_s * 1e3:.2f} ms per phase-2 step (slowest device)")
    if plan.cache_store == "disk":
        return f"disk: every device keeps the rows it trains on in a file; {disk}"
    if plan.cache_store == "mixed":
        return (f"mixed: {', '.join(plan.cache_disk)} keep the rows they train on in a file "
                f"({disk}); the others in memory, "
                + describe_cache(replace(plan, cache_disk=()), pred))
    if plan.cache == "local":
        return "local: every device caches the rows it trains on; nothing moves after phase 1"
    parts = []
    for phase, what in ((1, "phase 1"), (2, "phase 2")):
        moved = []
        for t, trainer in enumerate(plan.devices):
            counts = plan.holders(trainer, phase)
            off = [f"{counts[h]} on {d}" for h, d in enumerate(plan.devices)
                   if h != t and counts[h]]
            if off:
                moved.append(f"{trainer}'s rows {', '.join(off)}")
        if moved:
            parts.append(f"{what}: " + "; ".join(moved))
    return (f"sharded ({' | '.join(parts)}): hand-off after phase 1 "
            f"{pred.handoff_s * 1e3:.2f} ms, fetches {pred.fetch_s * 1e3:.2f} ms per phase-2 "
            f"step (overlapped)")


def _reason(objective: str, slack: float, drafts: Sequence[tuple[str, PacPlan, PacPrediction]],
            pressures: Sequence[float], chosen: int) -> str:
    label, plan, pred = drafts[chosen]
    fastest = min(range(len(drafts)), key=lambda i: drafts[i][2].phase1_step_s)
    if objective == "time" or chosen == fastest:
        why = ("the fastest phase 1" if objective == "time" else
               f"the fastest phase 1 also has the lowest peak memory pressure of the plans "
               f"within {slack:.0%} of it")
        return f"{label}: {describe_phase1(plan.phase1)}: {why}"
    fast = drafts[fastest][2]
    peak, fast_peak = max(pred.peak_memory_bytes.values()), max(fast.peak_memory_bytes.values())
    return (f"{label}: {describe_phase1(plan.phase1)}: peak memory pressure "
            f"{pressures[chosen]:.3%} instead of {pressures[fastest]:.3%} (largest device peak "
            f"{peak / 2**20:.1f} instead of {fast_peak / 2**20:.1f} MiB) for a phase-1 step "
            f"{pred.phase1_step_s / fast.phase1_step_s - 1:+.0%} of the fastest "
            f"({describe_phase1(drafts[fastest][1].phase1)}); allowed: +{slack:.0%}")


def _draft(costs: CostTable, cluster: Cluster, model: PacModel, coarse: CostTable,
           phase1: Plan, *, batch_size: int, num_samples: int, steps: int, epochs: int,
           cache: str = "auto", cache_slack: float = 0.0,
           on_disk: Collection[str] = frozenset()) -> PacPlan:
    """A PAC plan around ``phase1``: phase-2 shares, fallbacks and the cache's placement
    (see [Note: cache placement]; the devices ``on_disk`` keep their own rows on disk,
    [Note: a cache on disk]), no prediction."""
    p1_memory = phase1_memory(costs, model, phase1)
    devices = tuple(cluster.names)
    try:
        shares = _phase2_shares(costs, cluster.for_costs(costs), model, batch_size, steps,
                                devices, p1_memory, on_disk)
    except PlanError as local_error:
        if cache == "local" or len(on_disk) == len(devices):
            raise
        # no local placement: shares by the step's memory alone, the cache placed apart
        try:
            shares = _phase2_shares(costs, cluster.for_costs(costs), model, batch_size, 0,
                                    devices, p1_memory, on_disk)
        except PlanError:
            raise local_error from None
    phase1_holders, phase2_holders = ({}, {}) if cache == "local" else place_cache(
        costs, cluster, model, devices, shares, steps, p1_memory, cache_slack, phase1,
        on_disk)
    fallback = {}
    for lost, lost_share in zip(devices, shares, strict=True):
        others = tuple(d for d in devices if d != lost)
        extra = _takeover(costs, cluster.for_costs(costs), model, lost_share, steps, others,
                          {d: p1_memory.get(d, 0) + s * sum(phase2_per_sample(
                              costs, model, 0 if d in on_disk else steps))
                           for d, s in zip(devices, shares, strict=True)}, on_disk)
        if extra is not None:
            fallback[lost] = extra
    return PacPlan(model=model, batch_size=batch_size, num_samples=num_samples,
                   steps_per_epoch=steps, epochs=epochs, phase1=phase1, devices=devices,
                   shares=shares, model_hash=costs.model_hash,
                   cluster_hash=cluster.cluster_hash, fallback=fallback,
                   cache="sharded" if phase1_holders or phase2_holders else "local",
                   cache_phase1=phase1_holders, cache_phase2=phase2_holders,
                   cache_disk=tuple(d for d in devices if d in on_disk))


# [Note: cache placement]
# Where the activation cache lives is planned per trainer and per phase. In phase 1 a
# device holds the frozen segments of its stage and the cache fills up; in phase 2 the
# backbone is gone and the device holds the adapter step. So a device's peak is
#     max(phase-1 peak + rows held in phase 1, phase-2 step + rows held in phase 2 + wires)
# and memory one phase needs is free in the other. Every trainer starts with its own rows
# (``local``: nothing moves after phase 1); ``place_cache`` then moves one row of every
# mini-batch at a time (``steps x entry_bytes`` bytes) from a holder to another device,
# in phase 1 (the row is *parked* there while the backbone is held and handed to its
# phase-2 holder when phase 1 ends, once) or in phase 2 (the trainer *fetches* it from
# its holder every step over the process group, posted a step ahead so that the link
# overlaps the step before). It keeps the move that lowers most the bytes by which
# devices exceed their memory, else the sum of the devices' peaks (a row goes where
# memory is held anyway in the other phase: a device's peak does not grow), ties broken
# by the lowest largest memory pressure ``peak_d / memory_d``, until no move lowers
# either: a row moves only where memory dictates, never merely to even out the devices'
# pressure (that would fill a small device up to a large one's). A phase-2 move must keep
# the predicted phase-2 step (``max(compute + all-reduce, busiest port's fetch per
# step)``) within ``1 + cache_slack`` of the local cache's, unless a device is over its
# memory. When
# devices still exceed their memory the cache fits nowhere: ``PlanError`` naming the
# device and the bytes short.

def _holders_of(devices: Sequence[str], shares: Sequence[int], rows: Sequence[Sequence[int]]
                ) -> dict[str, tuple[int, ...]]:
    return {d: tuple(rows[t]) for t, (d, s) in enumerate(zip(devices, shares, strict=True))
            if rows[t][t] != s}


def place_cache(costs: CostTable, cluster: Cluster, model: PacModel, devices: Sequence[str],
                shares: Sequence[int], steps: int, p1_memory: Mapping[str, int],
                cache_slack: float = DEFAULT_CACHE_SLACK, phase1: Plan | None = None,
                on_disk: Collection[str] = ()
                ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """The cache's holders in phase 1 and in phase 2 (``PacPlan.cache_phase1/2``; empty:
    every trainer caches its own rows), see [Note: cache placement]; the devices
    ``on_disk`` keep exactly their own rows ([Note: a cache on disk]); pure.

    Raises:
        PlanError: the cache fits nowhere (names the device and the bytes short).
    """
    cluster = cluster.for_costs(costs)
    n = len(devices)
    memory = [cluster.device(d).memory_bytes for d in devices]
    spaces = workspaces(cluster, devices)
    compute = phase2_compute(costs, cluster, model, devices, shares)
    base_step = max(compute) + allreduce_time(cluster, devices, model.wire_bytes)
    limit = (1.0 + cache_slack) * base_step * (1 + 1e-9)

    # a move of one row changes the peaks of its two holders only ([Note: cache
    # placement]; ``DevicePeaks``): each device's peak is kept, and a move is scored by
    # the two it changes (the sums are of integers: the same as summing every device's)
    peaks = DevicePeaks(costs, model, devices, shares, steps, p1_memory, phase1, spaces,
                         on_disk)
    rows = [[[s if j == t else 0 for j in range(n)] for t, s in enumerate(shares)]
            for _phase in (1, 2)]
    held = [[sum(rows[phase][t][h] for t in range(n)) for h in range(n)] for phase in (0, 1)]

    def peak_of(h: int) -> int:
        own = rows[1][h][h]
        return peaks.peak(h, held[0][h], held[1][h], own, shares[h] - own)

    peak = [peak_of(h) for h in range(n)]
    over = [max(0, peak[h] - memory[h]) for h in range(n)]

    def score(changed: Mapping[int, int]) -> tuple[float, ...]:
        """(bytes over memory, summed peaks, largest pressure) with the peaks ``changed``."""
        total_over = sum(over) + sum(max(0, p - memory[h]) - over[h]
                                     for h, p in changed.items())
        total = sum(peak) + sum(p - peak[h] for h, p in changed.items())
        pressure = max(changed.get(h, peak[h]) / memory[h] for h in range(n))
        return (float(total_over), float(total), round(pressure, 12))

    def moved(phase: int, t: int, a: int, b: int, step: int) -> None:
        """Move ``step`` (1 or -1) rows of trainer ``t`` from ``a`` to ``b``."""
        rows[phase][t][a] -= step
        rows[phase][t][b] += step
        held[phase][a] -= step
        held[phase][b] += step

    def step_s(two: list[list[int]]) -> float:
        return max(base_step, fetch_s(cluster, devices, shares,
                                       _holders_of(devices, shares, two), model.entry_bytes))

    best = score({})
    for _round in range(4 * n * sum(shares) + 1):
        found: tuple[tuple[float, ...], int, int, int, int] | None = None
        for phase in (0, 1):
            for t in range(n):
                if devices[t] in on_disk:      # a disk cache keeps its own rows
                    continue
                for a in range(n):
                    if rows[phase][t][a] == 0:
                        continue
                    for b in range(n):
                        if b == a or devices[b] in on_disk:
                            continue
                        moved(phase, t, a, b, 1)
                        got = score({a: peak_of(a), b: peak_of(b)})
                        ok = got[:2] < best[:2] and (phase == 0 or got[0] > 0
                                                     or step_s(rows[1]) <= limit)
                        moved(phase, t, a, b, -1)
                        if ok and (found is None or got < found[0]):
                            found = (got, phase, t, a, b)
        if found is None:
            break
        best, phase, t, a, b = found
        moved(phase, t, a, b, 1)
        for h in (a, b):
            peak[h] = peak_of(h)
            over[h] = max(0, peak[h] - memory[h])
    if best[0] > 0:
        gap, device = max((peak[h] - memory[h], devices[h]) for h in range(n))
        raise PlanError(
            f"the activation cache does not fit: device {device!r} would hold "
            f"{peak[devices.index(device)]} bytes with its share of the cache ({steps} steps x "
            f"{model.entry_bytes} bytes a sample) but has {cluster.device(device).memory_bytes} "
            f"bytes, {max(int(gap), 1)} bytes short, however the cache is sharded; use fewer "
            f"samples (--samples), fewer taps, a smaller batch{_narrower(model)}")
    return (_holders_of(devices, shares, rows[0]), _holders_of(devices, shares, rows[1]))


def replan_phase1(pac: PacPlan, costs: CostTable, cluster: Cluster, failed: Sequence[str]
                  ) -> Plan:
    """The phase-1 plan of ``pac`` without the devices ``failed`` (lost during phase 1;
    see [Note: PAC phase-1 recovery] in runtime.pac_recovery); pure.

    When none of them ran a phase-1 stage the plan stays (only the owners of the lost
    samples change, as the plan's ``fallback`` says). Otherwise the phase-1 planner runs
    on the survivors with the plan's own objective and slack (``meta.phase1_choice``),
    exactly as :func:`plan_finetune` chose the first plan; its ``plan_version`` is the old
    one's plus one.

    Raises:
        PlanError: every device lost, or no phase-1 plan fits on the survivors.
    """
    survivors = [d for d in pac.devices if d not in set(failed)]
    if not survivors:
        raise PlanError(f"every device of the PAC plan {list(pac.devices)} is lost; nothing "
                        f"is left to re-plan phase 1 on")
    if not set(failed) & set(pac.phase1.devices):
        return pac.phase1
    choice = pac.meta.get("phase1_choice", {})
    objective = str(choice.get("objective", "memory")) if isinstance(choice, Mapping) \
        else "memory"
    slack = float(choice.get("slack", DEFAULT_PHASE1_SLACK)) if isinstance(choice, Mapping) \
        else DEFAULT_PHASE1_SLACK
    fresh = plan_finetune(costs, cluster.subset(survivors), pac.model,
                          batch_size=pac.batch_size, num_samples=pac.num_samples,
                          epochs=pac.epochs, phase1_objective=objective, phase1_slack=slack,
                          cache="local",
                          cache_store="auto" if pac.cache_store == "mixed" else pac.cache_store)
    return replace(fresh.phase1, plan_version=pac.phase1.plan_version + 1)
