"""``solver.pac.place_cache`` as it was before its moves were scored per device (the
twenty-eighth session): every candidate move re-runs ``peaks`` over all devices. The
differential tests check that the quicker one places every row the same."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.pac_plan import PacModel
from contracts.plan import Plan
from contracts.table import CostTable
from solver.evaluate import allreduce_time
from solver.pac import DEFAULT_CACHE_SLACK, _holders_of, _narrower
from solver.pac_cost import fetch_s, peaks, phase2_compute, workspaces


def place_cache_reference(
        costs: CostTable, cluster: Cluster, model: PacModel, devices: Sequence[str],
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

    def score(one: list[list[int]], two: list[list[int]]) -> tuple[float, ...]:
        peak, _ = peaks(costs, model, devices, shares, steps, p1_memory,
                         _holders_of(devices, shares, one), _holders_of(devices, shares, two),
                         phase1, spaces, on_disk)
        over = sum(max(0, peak[d] - memory[i]) for i, d in enumerate(devices))
        pressure = max(peak[d] / memory[i] for i, d in enumerate(devices))
        return (float(over), float(sum(peak.values())), round(pressure, 12))

    def step_s(two: list[list[int]]) -> float:
        return max(base_step, fetch_s(cluster, devices, shares,
                                       _holders_of(devices, shares, two), model.entry_bytes))

    rows = [[[s if j == t else 0 for j in range(n)] for t, s in enumerate(shares)]
            for _phase in (1, 2)]
    best = score(*rows)
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
                        rows[phase][t][a] -= 1
                        rows[phase][t][b] += 1
                        got = score(*rows)
                        ok = got[:2] < best[:2] and (phase == 0 or got[0] > 0
                                                     or step_s(rows[1]) <= limit)
                        rows[phase][t][a] += 1
                        rows[phase][t][b] -= 1
                        if ok and (found is None or got < found[0]):
                            found = (got, phase, t, a, b)
        if found is None:
            break
        best, phase, t, a, b = found
        rows[phase][t][a] -= 1
        rows[phase][t][b] += 1
    if best[0] > 0:
        peak, _ = peaks(costs, model, devices, shares, steps, p1_memory,
                         _holders_of(devices, shares, rows[0]),
                         _holders_of(devices, shares, rows[1]), phase1, spaces, on_disk)
        gap, device = max((peak[d] - memory[i], d) for i, d in enumerate(devices))
        raise PlanError(
            f"the activation cache does not fit: device {device!r} would hold "
            f"{peak[device]} bytes with its share of the cache ({steps} steps x "
            f"{model.entry_bytes} bytes a sample) but has {cluster.device(device).memory_bytes} "
            f"bytes, {max(int(gap), 1)} bytes short, however the cache is sharded; use fewer "
            f"samples (--samples), fewer taps, a smaller batch{_narrower(model)}")
    return (_holders_of(devices, shares, rows[0]), _holders_of(devices, shares, rows[1]))
