"""Baseline planners (DDP, GPipe, PipeDream, DAPPLE, HetPipe, one device) with their blind spots.

Every planner has the signature ``(costs, cluster, batch_size, *,
optimizer_state_factor=0.0) -> Plan`` and returns a plan shaped the way the original
system would shape it. The plans run on the same 1F1B executor and are scored by the
same model (``solver.evaluate.evaluate``), so a comparison isolates the *planning*
decisions: where to cut, how many devices per stage, which devices, how to split a
micro-batch, and the micro-batch size. A baseline plan that does not fit in memory is
returned as is; ``solver.api.plan`` raises ``PlanError`` for it and the benchmark
reports it as OOM.

Common simplifications (stated once here, repeated where they matter):

* All systems execute under our synchronous 1F1B schedule with one all-reduce per round
  (PipeDream's asynchronous weight stashing and HetPipe's parameter server become
  PipeDream-flush-like synchronous rounds).
* A "replicated" stage splits every micro-batch between its devices (contiguous sample
  ranges) instead of sending whole micro-batches round-robin to replicas.
* The network is flat (every pair at the cluster's bandwidth unless overridden), so the
  hierarchical placement policies of PipeDream and DAPPLE reduce to taking devices in
  the order the cluster file lists them.
* Where a baseline reasons with one speed per device (mean speed, shares, virtual
  workers), a device whose type has a column in the cost table counts with its
  whole-model ratio (``solver.timing``); the plans are still scored with its column.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from contracts.cluster import Cluster, Device
from contracts.errors import PlanError
from contracts.plan import Plan, PlannerInfo, Stage
from contracts.table import CostTable
from solver.space import divisors
from solver.timing import Timing

__all__ = [
    "BASELINES",
    "BaselinePlanner",
    "dp_only",
    "pp_equal",
    "pipedream",
    "dapple",
    "hetpipe",
    "single_device",
    "equal_shares",
    "proportional_shares",
    "min_max_partition",
    "gpipe_micro_batches",
    "homogeneous_view",
]

log = logging.getLogger(__name__)

BaselinePlanner = Callable[..., Plan]

_VERSION = "1"


# -- small helpers ---------------------------------------------------------------------------
def equal_shares(micro_batch: int, k: int) -> tuple[int, ...]:
    """Split ``micro_batch`` samples as evenly as possible over ``k`` devices (each >= 1)."""
    if k < 1 or micro_batch < k:
        raise PlanError(f"cannot split a micro-batch of {micro_batch} sample(s) over {k} "
                        f"device(s); every device needs at least one sample")
    base, extra = divmod(micro_batch, k)
    return tuple(base + 1 if i < extra else base for i in range(k))


def proportional_shares(micro_batch: int, weights: Sequence[float]) -> tuple[int, ...]:
    """Split ``micro_batch`` in proportion to ``weights`` (largest remainder, each >= 1)."""
    k = len(weights)
    if k < 1 or micro_batch < k:
        raise PlanError(f"cannot split a micro-batch of {micro_batch} sample(s) over {k} "
                        f"device(s); every device needs at least one sample")
    total = float(sum(weights))
    ideal = [micro_batch * w / total for w in weights]
    shares = [max(1, int(math.floor(x))) for x in ideal]
    while sum(shares) > micro_batch:  # the >= 1 floor over-allocated: take from the largest
        i = max((j for j in range(k) if shares[j] > 1),
                key=lambda j: (shares[j] - ideal[j], shares[j]))
        shares[i] -= 1
    left = micro_batch - sum(shares)
    order = sorted(range(k), key=lambda i: (-(ideal[i] - shares[i]), i))
    for i in order[:left]:
        shares[i] += 1
    return tuple(shares)


def min_max_partition(weights: Sequence[float],
                      capacities: Sequence[float]) -> list[tuple[int, int]]:
    """Cut ``weights`` into ``len(capacities)`` contiguous non-empty blocks, in order,
    minimising ``max_k sum(block_k) / capacities[k]``; returns inclusive index ranges.

    Exact dynamic program over (block, last index), ``O(K n^2)`` vectorised over the
    block's first and last index (a greedy fill is not exact once capacities differ).
    """
    n, parts = len(weights), len(capacities)
    if parts < 1 or parts > n:
        raise PlanError(f"cannot cut {n} layer(s) into {parts} non-empty stage(s)")
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(weights, dtype=float))])
    # best[k, j]: bottleneck of blocks 0..k covering items 0..j; start[k, j]: block k's first
    best = np.full((parts, n), math.inf)
    start = np.zeros((parts, n), dtype=int)
    best[0] = prefix[1:] / capacities[0]
    # every last index j at once (rows), block k's first index f in columns: f > j is no
    # block (inf), so the first minimum of each row is the loop's over f = k..j
    ends = np.arange(n)
    for k in range(1, parts):
        cap = capacities[k]
        firsts = np.arange(k, n)
        cand = np.maximum(best[k - 1, firsts - 1][None, :],
                          (prefix[ends[k:] + 1][:, None] - prefix[firsts][None, :]) / cap)
        cand[firsts[None, :] > ends[k:, None]] = math.inf
        pick = np.argmin(cand, axis=1)
        best[k, k:] = cand[np.arange(n - k), pick]
        start[k, k:] = firsts[pick]
    blocks: list[tuple[int, int]] = []
    j = n - 1
    for k in range(parts - 1, 0, -1):
        first = int(start[k, j])
        blocks.append((first, j))
        j = first - 1
    blocks.append((0, j))
    blocks.reverse()
    return blocks


def gpipe_micro_batches(batch_size: int, num_stages: int, min_micro_batch: int = 1) -> int:
    """GPipe's rule M >= 4 x stages: the smallest divisor of the batch that is at least
    ``min(4 S, B)`` while micro-batches keep ``min_micro_batch`` samples (else the
    largest divisor that does)."""
    if batch_size < min_micro_batch:
        raise PlanError(f"batch size {batch_size} is smaller than the {min_micro_batch} "
                        f"sample(s) one micro-batch needs here (one per device in a stage); "
                        f"use --batch-size >= {min_micro_batch}")
    allowed = [m for m in divisors(batch_size) if batch_size // m >= min_micro_batch]
    target = min(4 * num_stages, batch_size)
    at_least = [m for m in allowed if m >= target]
    return min(at_least) if at_least else max(allowed)


def _speeds(costs: CostTable, cluster: Cluster) -> dict[str, float]:
    """Capability speeds (``solver.timing.Timing``: a device with a cost column has its
    whole-model ratio), the one number per device these planners reason with."""
    return Timing.of(costs, cluster).speeds


def homogeneous_view(costs: CostTable, cluster: Cluster) -> Cluster:
    """The cluster as a homogeneous planner sees it: same names and network, every device
    at the mean speed and the mean memory of the real ones."""
    cluster = cluster.for_costs(costs)
    speeds = _speeds(costs, cluster)
    mean_speed = sum(speeds.values()) / len(speeds)
    # the mean memory left for tensors, and no workspace of its own: the view's devices
    # are all alike
    mean_memory = int(sum(cluster.usable_bytes(d.name) for d in cluster.devices)
                      / len(cluster.devices))
    devices = tuple(Device(name=d.name, type="custom", memory_bytes=mean_memory,
                           speed=mean_speed, workspace_bytes=0) for d in cluster.devices)
    return replace(cluster, devices=devices, workspaces=())


def _layer_times(costs: CostTable, batch: float) -> list[float]:
    """Forward + backward seconds of every layer on the profiling host at ``batch``."""
    return [lc.fwd.at(batch) + lc.bwd.at(batch) for lc in costs.layers]


def _make_plan(costs: CostTable, cluster: Cluster, batch_size: int, num_micro_batches: int,
               stages: Sequence[Stage], name: str, started: float,
               optimizer_state_factor: float, check: dict[str, object] | None = None) -> Plan:
    return Plan(
        model_hash=costs.model_hash,
        cluster_hash=cluster.cluster_hash,
        batch_size=batch_size,
        micro_batch_size=batch_size // num_micro_batches,
        num_micro_batches=num_micro_batches,
        stages=tuple(stages),
        planner=PlannerInfo(name=name, version=_VERSION,
                            search_time_s=time.perf_counter() - started,
                            check=dict(check or {})),
        num_layers=costs.num_layers,
        model_name=costs.model_name,
        optimizer_state_factor=optimizer_state_factor,
    )


def _check_batch(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PlanError(f"batch_size must be a positive integer, got {batch_size!r}")


def _evaluate(plan: Plan, costs: CostTable, cluster: Cluster) -> tuple[float, bool]:
    from solver.evaluate import evaluate

    pred = evaluate(plan, costs, cluster)
    return pred.round_time_s, pred.fits


# -- the baselines ---------------------------------------------------------------------------
def dp_only(costs: CostTable, cluster: Cluster, batch_size: int, *,
            optimizer_state_factor: float = 0.0) -> Plan:
    """Pure data parallelism as PyTorch DDP / EDDL run it.

    The original: every device holds the whole model and takes ``B / N`` samples of every
    mini-batch; gradients are ring all-reduced once per step. Blind spots kept: the split
    is equal whatever the devices' speeds, and the whole model sits on every device.
    Micro-batches: one (the whole batch), as DDP does; only when that does not fit does
    it fall back to gradient accumulation (the fewest accumulation steps that fit), the
    usual DDP workaround. If even that does not fit the plan is returned and reported OOM.
    """
    cluster = cluster.for_costs(costs)
    started = time.perf_counter()
    _check_batch(batch_size)
    names = cluster.names
    if batch_size < len(names):
        raise PlanError(f"dp-only needs at least one sample per device: batch size "
                        f"{batch_size} < {len(names)} devices; use --batch-size >= {len(names)}")
    options = [m for m in divisors(batch_size) if batch_size // m >= len(names)]
    first: Plan | None = None
    for m in options:
        stage = Stage(layers=(0, costs.num_layers - 1), devices=names,
                      shares=equal_shares(batch_size // m, len(names)))
        plan = _make_plan(costs, cluster, batch_size, m, [stage], "dp-only", started,
                          optimizer_state_factor, {"accumulation_steps": m})
        first = first or plan
        if _evaluate(plan, costs, cluster)[1]:
            return plan
    if first is None:
        raise PlanError(f"dp-only found no micro-batch size dividing batch size {batch_size}")
    return first


def pp_equal(costs: CostTable, cluster: Cluster, batch_size: int, *,
             optimizer_state_factor: float = 0.0) -> Plan:
    """Pure pipeline parallelism as GPipe / torchgpipe plan it.

    The original: one device per partition, partitions balanced by profiled time
    (torchgpipe ``balance_by_time`` solves the block-partition problem on per-layer
    times measured on one device) and ``M >= 4 K`` micro-batches (GPipe paper, sec. 2.2).
    Blind spots kept: all devices are assumed identical (layers balanced by time on the
    profiling host, devices taken in the listed order), no memory model, no replication.
    Simplified: torchgpipe's approximate block partition is replaced by an exact min-max
    partition; we run 1F1B rather than GPipe's all-forward-all-backward with
    re-materialisation.
    """
    cluster = cluster.for_costs(costs)
    started = time.perf_counter()
    _check_batch(batch_size)
    names = cluster.names[: min(len(cluster.names), costs.num_layers)]
    m = gpipe_micro_batches(batch_size, len(names))
    micro = batch_size // m
    blocks = min_max_partition(_layer_times(costs, micro), [1.0] * len(names))
    stages = [Stage(layers=blk, devices=(dev,), shares=(micro,))
              for blk, dev in zip(blocks, names, strict=True)]
    return _make_plan(costs, cluster, batch_size, m, stages, "pp-equal", started,
                      optimizer_state_factor)


def _pipedream_dp(times: np.ndarray, sync: np.ndarray, comm: np.ndarray,
                  num_devices: int, max_replicas: int) -> list[tuple[int, int, int]]:
    """PipeDream's optimiser (Narayanan et al., SOSP'19, sec. 3.1).

    ``A(j, m)`` = time of the slowest stage of the best pipeline over layers ``0..j`` on
    ``m`` machines = ``min(T(0..j, m), min_{i<j, m'<m} max(A(i, m-m'), 2 C_i,
    T(i+1..j, m')))`` with ``T(i..j, m) = max(sum compute, sum sync) / m``. Returns
    ``(first, last, replicas)`` per stage.
    """
    n_layers = len(times)
    pre_t = np.concatenate([[0.0], np.cumsum(times)])
    pre_w = np.concatenate([[0.0], np.cumsum(sync)])

    def t_block(i: Any, j: int, m: Any) -> Any:
        comp = pre_t[j + 1] - pre_t[i]
        syn = (pre_w[j + 1] - pre_w[i]) * (m - 1) / m
        return np.maximum(comp, syn) / m

    inf = math.inf
    best = np.full((n_layers, num_devices + 1), inf)
    choice: dict[tuple[int, int], tuple[int, int]] = {}
    machines = np.arange(1, num_devices + 1)
    # replica counts mp of the last stage, 1 .. the most any machine count allows
    most = min(num_devices - 1, max_replicas)
    mps = np.arange(1, most + 1)
    # per machine count m (first axis), the mp it may take: mp <= min(m - 1, max_replicas)
    usable = mps[None, :] <= np.minimum(machines - 1, max_replicas)[:, None]
    rest = np.where(usable, machines[:, None] - mps[None, :], 0)
    for j in range(n_layers):
        for m in range(1, min(num_devices, max_replicas) + 1):
            best[j, m] = float(t_block(0, j, m))
            choice[(j, m)] = (-1, m)
        if j == 0 or most < 1:
            continue
        # every machine count m (first axis), replica count mp (rows) and cut (columns) at
        # once: best[j, .] depends on rows < j only, and the first minimum of each m in
        # row-major order is what a loop over mp ascending with a strict improvement test
        # keeps (mp past m's own limit is inf, after every usable one)
        cut = np.arange(0, j)  # previous pipeline covers layers 0..cut
        block = t_block(cut[None, :] + 1, j, mps[:, None])                    # (mp, cut)
        prev = best[:j][:, rest].transpose(1, 2, 0)                           # (m, mp, cut)
        cand = np.maximum(np.maximum(prev, 2.0 * comm[cut]), block[None])
        cand = np.where(usable[:, :, None], cand, inf).reshape(num_devices, -1)
        flat = np.argmin(cand, axis=1)
        found = cand[np.arange(num_devices), flat]
        for m in np.nonzero(found < best[j, 1:])[0].tolist():
            row, k = divmod(int(flat[m]), j)
            best[j, m + 1] = float(found[m])
            choice[(j, m + 1)] = (k, row + 1)
    stages: list[tuple[int, int, int]] = []
    j = n_layers - 1
    # PipeDream uses every worker; with fewer layers than workers (or micro-batches too
    # small to split further) it falls back to the best configuration on fewer.
    m = num_devices
    while m > 1 and not math.isfinite(best[j, m]):
        m -= 1
    while True:
        i, mp = choice[(j, m)]
        stages.append((i + 1, j, mp))
        if i < 0:
            break
        j, m = i, m - mp
    stages.reverse()
    return stages


def pipedream(costs: CostTable, cluster: Cluster, batch_size: int, *,
              optimizer_state_factor: float = 0.0) -> Plan:
    """PipeDream's planner (Narayanan et al., SOSP'19): DP over layers with stage
    replication on identical workers, then mapped onto the real devices.

    The original profiles every layer on one GPU, assumes all workers identical, and picks
    the partition and per-stage replica counts that minimise the slowest stage, charging
    ``2 C_i`` for activations across a cut and ``4 (m-1) |w| / (m B)`` for weight sync of
    an ``m``-way replicated stage; replicas share minibatches round-robin, the pipeline
    keeps ``ceil(N / m_0)`` minibatches in flight. Blind spots kept: every device at the
    mean speed, no memory model, equal split inside replicated stages, pipeline bubbles
    ignored by the objective, devices mapped in the listed order.
    Simplified: synchronous rounds (PipeDream-flush), so weight sync is charged once per
    round (``/ M`` per micro-batch); M by GPipe's rule ``M >= 4 S``, at least the
    in-flight count ``ceil(N / m_0)``; replicas split each micro-batch.
    """
    cluster = cluster.for_costs(costs)
    started = time.perf_counter()
    _check_batch(batch_size)
    speeds = _speeds(costs, cluster)
    names = cluster.names
    n = len(names)
    mean_speed = sum(speeds.values()) / n
    bandwidth = min((cluster.bandwidth_bytes_s(a, b) for a in names for b in names if a != b),
                    default=math.inf)
    params = np.array([lc.param_bytes for lc in costs.layers], dtype=float)
    cuts = np.array(list(costs.cut_bytes) + [0], dtype=float)
    # first pass: micro-batches big enough to replicate a stage on every device
    m_count = gpipe_micro_batches(batch_size, 1, min(n, batch_size))
    layout: list[tuple[int, int, int]] = []
    for _ in range(3):  # choose M from the stage count the DP found, then re-run once
        micro = batch_size // m_count
        times = np.array(_layer_times(costs, micro)) / mean_speed
        sync = 4.0 * params / bandwidth / m_count
        comm = cuts * micro / bandwidth
        layout = _pipedream_dp(times, sync, comm, n, max_replicas=micro)
        widest = max(r for _, _, r in layout)
        in_flight = math.ceil(n / layout[0][2])
        new_m = gpipe_micro_batches(batch_size, max(len(layout), math.ceil(in_flight / 4)),
                                    widest)
        if new_m == m_count:
            break
        m_count = new_m
    micro = batch_size // m_count
    stages: list[Stage] = []
    cursor = 0
    for first, last, reps in layout:
        group = names[cursor: cursor + reps]
        cursor += reps
        stages.append(Stage(layers=(first, last), devices=group,
                            shares=equal_shares(micro, reps)))
    return _make_plan(costs, cluster, batch_size, m_count, stages, "pipedream", started,
                      optimizer_state_factor,
                      {"replicas": [r for _, _, r in layout]})


def dapple(costs: CostTable, cluster: Cluster, batch_size: int, *,
           optimizer_state_factor: float = 0.0) -> Plan:
    """DAPPLE's planner (Fan et al., PPoPP'21): pipeline stages with data-parallel groups
    on a homogeneous cluster.

    The original searches stage partitions and per-stage replication degrees with the
    latency estimate ``L = T_w + T_s + T_e`` (warm-up, steady phase paced by the pivot
    stage, ending), which is the formula Asteroid's round-latency model generalises; it
    checks memory, assumes identical GPUs and places stages with its Fresh-First /
    Append-First / Scatter-First policies on a hierarchical topology.
    Here: the same search (the Asteroid DP, ``solver.dp.asteroid_dp``) runs on the
    *homogeneous view* of the cluster (every device at the mean speed and mean memory);
    the group sizes it picks are then placed on the real devices in the listed order
    (on a flat network the placement policies coincide), with equal shares.
    Blind spots kept: mean speed and memory, equal split, placement ignoring speed.
    """
    cluster = cluster.for_costs(costs)
    from solver.dp import asteroid_dp

    started = time.perf_counter()
    _check_batch(batch_size)
    view = homogeneous_view(costs, cluster)
    # Identical devices make the exact DP's Pareto fronts large and redundant (every
    # permutation ties); a capped front keeps DAPPLE's planner fast, as its own is.
    homog = asteroid_dp(costs, view, batch_size, optimizer_state_factor=optimizer_state_factor,
                        max_front=8).plan
    if homog is None:
        raise PlanError(f"dapple found no plan of batch size {batch_size} that fits on the "
                        f"homogeneous view of the cluster (every device at the mean speed "
                        f"and mean memory); try a smaller batch or the asteroid planner")
    names = cluster.names
    micro = homog.micro_batch_size
    stages: list[Stage] = []
    cursor = 0
    for st in homog.stages:
        k = len(st.devices)
        stages.append(Stage(layers=st.layers, devices=names[cursor: cursor + k],
                            shares=equal_shares(micro, k)))
        cursor += k
    return _make_plan(costs, cluster, batch_size, homog.num_micro_batches, stages, "dapple",
                      started, optimizer_state_factor,
                      {"group_sizes": [len(s.devices) for s in homog.stages]})


def _virtual_workers(speeds: dict[str, float], names: Sequence[str],
                     count: int) -> list[list[str]]:
    """HetPipe's hybrid distribution: devices, fastest first, go to the virtual worker with
    the least total speed that still has room, so every worker gets a similar mix."""
    size = len(names) // count
    order = sorted(names, key=lambda d: (-speeds[d], names.index(d)))
    workers: list[list[str]] = [[] for _ in range(count)]
    totals = [0.0] * count
    for dev in order:
        k = min((i for i in range(count) if len(workers[i]) < size),
                key=lambda i: (totals[i], i))
        workers[k].append(dev)
        totals[k] += speeds[dev]
    return workers


def hetpipe(costs: CostTable, cluster: Cluster, batch_size: int, *,
            optimizer_state_factor: float = 0.0) -> Plan:
    """HetPipe-like planner (Park et al., USENIX ATC'20): virtual workers of heterogeneous
    devices, pipelined inside, data parallel across.

    The original groups GPUs into virtual workers (VWs) with similar total power (its
    NP/ED/HD allocation policies), partitions the model inside every VW in proportion to
    the GPUs' speeds, runs pipelined micro-batches inside a VW and synchronises VWs
    through a parameter server (wave synchronous parallel).
    Here: for every VW count ``k`` dividing ``N`` the devices are dealt to ``k`` VWs of
    ``N / k`` devices by the hybrid (HD) policy; position ``s`` of every VW forms stage
    ``s`` (so VWs are data parallel stage by stage, synchronously), layers are cut to
    balance time against the stage's total speed and every micro-batch is split in
    proportion to speed. ``k`` is chosen by predicted round time. Blind spot kept: no
    memory model at all (neither in the cuts nor in choosing ``k``).
    """
    cluster = cluster.for_costs(costs)
    started = time.perf_counter()
    _check_batch(batch_size)
    speeds = _speeds(costs, cluster)
    names = list(cluster.names)
    n = len(names)
    best: tuple[float, Plan] | None = None
    for k in divisors(n):
        depth = n // k
        if depth > costs.num_layers or batch_size < k:
            continue
        workers = _virtual_workers(speeds, names, k)
        for w in workers:
            w.sort(key=lambda d: (-speeds[d], names.index(d)))
        groups = [tuple(w[s] for w in workers) for s in range(depth)]
        m = gpipe_micro_batches(batch_size, depth, k)
        micro = batch_size // m
        capacity = [sum(speeds[d] for d in g) for g in groups]
        blocks = min_max_partition(_layer_times(costs, micro / k), capacity)
        stages = [Stage(layers=blk, devices=g,
                        shares=proportional_shares(micro, [speeds[d] for d in g]))
                  for blk, g in zip(blocks, groups, strict=True)]
        plan = _make_plan(costs, cluster, batch_size, m, stages, "hetpipe", started,
                          optimizer_state_factor, {"virtual_workers": k})
        round_time, _ = _evaluate(plan, costs, cluster)  # memory deliberately ignored
        if best is None or round_time < best[0]:
            best = (round_time, plan)
    if best is None:
        raise PlanError(f"hetpipe needs a batch of at least one sample per virtual worker; "
                        f"batch size {batch_size} is too small for {n} devices")
    return _make_plan(costs, cluster, batch_size, best[1].num_micro_batches,
                      best[1].stages, "hetpipe", started, optimizer_state_factor,
                      dict(best[1].planner.check))


def single_device(costs: CostTable, cluster: Cluster, batch_size: int, *,
                  optimizer_state_factor: float = 0.0) -> Plan:
    """Training alone on the best single device (the paper's "local training" baseline).

    Every device and every micro-batch size that divides the batch (gradient accumulation
    over ``M`` micro-batches) is scored; the fastest plan that fits wins. If nothing fits
    anywhere, the plan with the smallest micro-batch on the device with the most memory is
    returned (and is reported OOM).
    """
    cluster = cluster.for_costs(costs)
    started = time.perf_counter()
    _check_batch(batch_size)
    best: tuple[float, Plan] | None = None
    biggest = max(cluster.devices, key=lambda d: cluster.usable_bytes(d.name)).name
    fallback: Plan | None = None
    for dev in cluster.names:
        for m in divisors(batch_size):
            stage = Stage(layers=(0, costs.num_layers - 1), devices=(dev,),
                          shares=(batch_size // m,))
            plan = _make_plan(costs, cluster, batch_size, m, [stage], "device", started,
                              optimizer_state_factor, {"device": dev})
            round_time, fits = _evaluate(plan, costs, cluster)
            if dev == biggest and m == batch_size:
                fallback = plan
            if fits and (best is None or round_time < best[0]):
                best = (round_time, plan)
    chosen = best[1] if best is not None else fallback
    if chosen is None:
        raise PlanError(f"device found no single-device plan for batch size {batch_size} on "
                        f"devices {list(cluster.names)}")
    return _make_plan(costs, cluster, batch_size, chosen.num_micro_batches, chosen.stages,
                      "device", started, optimizer_state_factor, dict(chosen.planner.check))


BASELINES: dict[str, BaselinePlanner] = {
    "dp-only": dp_only,
    "pp-equal": pp_equal,
    "pipedream": pipedream,
    "dapple": dapple,
    "hetpipe": hetpipe,
    "device": single_device,
}
