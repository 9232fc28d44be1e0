"""Instances and the brute-force check shared by the tests of the class bound's modules."""

from __future__ import annotations

from typing import Any

import numpy as np

import solver.class_bound
from solver.brute import enumerate_plans
from solver.evaluate import LayerSums, evaluate
from solver.space import ClassSpace
from tests.solver_cases import random_instance


def check_class_bound(seeds: range, instance: Any, **kwargs: Any) -> tuple[int, int]:
    """Every plan of the wide space (brute force, fitting or not) has a round time of at
    least ``class_bound`` of its micro-batch size, for targets at, between and above the
    plans' round times. Returns the plans checked and how often the bound proves more
    than the work bound (a target of 0.9 of the optimum counts when it is proven)."""
    from solver.bound_bisection import work_bound
    from solver.class_bound import class_bound
    from solver.summary import hiding_ratio

    checked = above = 0
    devices = kwargs.pop("devices", 4)
    memory = kwargs.pop("memory", False)    # the memory model (brute force's: no state)
    for seed in seeds:
        costs, cluster, batch = instance(seed, max_layers=5, max_devices=devices, **kwargs)
        cluster = cluster.for_costs(costs)
        sums = LayerSums.of(costs)
        ends = list(range(costs.num_layers - 1))
        space = ClassSpace(costs, cluster)
        rho = hiding_ratio(costs, cluster)
        rounds: dict[int, list[float]] = {}
        for plan in enumerate_plans(costs, cluster, batch, wide=True):
            rounds.setdefault(plan.micro_batch_size, []).append(
                evaluate(plan, costs, cluster).round_time_s)
        for mb, values in rounds.items():
            values.sort()
            for target in (values[0] * 0.9, values[0], values[len(values) // 2],
                           values[-1] * 2.0):
                bound = class_bound(space, sums, costs.cut_bytes, ends, mb, batch // mb,
                                    target, rho=rho,
                                    optimizer_state_factor=0.0 if memory else None)
                assert bound is not None
                assert bound <= target
                assert values[0] >= bound, (seed, mb, target, values[0], bound)
                checked += len(values)
                work = work_bound(costs, cluster, batch, mb)
                above += bound > work * (1 + 1e-9) and (target >= values[0]
                                                         or bound >= target * (1 - 1e-6))
    return checked, above


def same_compute_instance(seed: int, *, max_layers: int, max_devices: int,
                           **_: Any) -> tuple[Any, Any, int]:
    """Devices of two speeds with random links and latencies: devices of the same compute
    that are not interchangeable (a fleet in miniature)."""
    import random

    from tests.solver_cases import make_cluster, random_costs

    rng = random.Random(seed)
    n = rng.randint(2, max_devices)
    costs = random_costs(rng, rng.randint(1, max_layers),
                         param_scale=rng.choice([0.1, 1.0, 10.0]))
    speeds = [rng.choice([0.5, 1.3]) for _ in range(n)]
    overrides = []
    for _ in range(rng.randrange(1, n + 1)):
        a, b = rng.sample(range(n), 2)
        if all({x, y} != {f"d{a}", f"d{b}"} for x, y, _ in overrides):
            overrides.append((f"d{a}", f"d{b}", rng.choice([10.0, 50.0, 1000.0])))
    pair_ms = {tuple(sorted(rng.sample(range(n), 2))): rng.choice([0.0, 2.0, 50.0])
               for _ in range(rng.randrange(0, n + 1))}
    cluster = make_cluster(speeds, 1024.0, rng.choice([10.0, 100.0, 1000.0]), overrides,
                           latency_ms=rng.choice([0.1, 1.0, 5.0]),
                           link_latency=[(f"d{a}", f"d{b}", ms)
                                         for (a, b), ms in pair_ms.items()])
    return costs, cluster, rng.choice([1, 2, 4, 6, 8])


def rigid_instance(seed: int, *, max_layers: int, max_devices: int,
                    **_: Any) -> tuple[Any, Any, int]:
    """Two or three devices of each of one or two speeds, the same memory per speed (tight
    or not), random links and latencies, half with a runtime overhead per stage call:
    groups of several devices of one class ([Note: rigid groups] in solver/class_tables.py),
    with memory caps that bind."""
    import random
    from dataclasses import replace

    from contracts.table import RuntimeOverhead
    from tests.solver_cases import make_cluster, random_costs

    rng = random.Random(seed)
    kinds = rng.sample([0.4, 1.0, 1.7], rng.choice([1, 2]))
    speeds: list[float] = []
    mems: list[float] = []
    for speed in kinds:
        count = rng.randint(2, 3) if len(kinds) == 1 else rng.randint(1, 2)
        mem = rng.choice([6.0, 16.0, 64.0, 1024.0])
        speeds += [speed] * count
        mems += [mem] * count
    speeds, mems = speeds[:max_devices], mems[:max_devices]
    n = len(speeds)
    overrides = []
    if n > 2 and rng.random() < 0.5:
        a, b = rng.sample(range(n), 2)
        overrides.append((f"d{a}", f"d{b}", rng.choice([10.0, 1000.0])))
    costs = random_costs(rng, rng.randint(1, max_layers),
                         param_scale=rng.choice([0.1, 1.0, 10.0]))
    if rng.random() < 0.5:      # the runtime's seconds per stage call, in every compute
        costs = replace(costs, runtime_overhead=RuntimeOverhead(
            rng.uniform(0.0, 0.05), rng.uniform(0.0, 0.05)))
    cluster = make_cluster(speeds, mems, rng.choice([10.0, 100.0, 1000.0]), overrides,
                           latency_ms=rng.choice([0.0, 1.0, 5.0]))
    return costs, cluster, rng.choice([2, 4, 6, 8])


def wired_pairs_instance(seed: int, *, max_layers: int, max_devices: int,
                          **_: Any) -> tuple[Any, Any, int]:
    """A fleet in miniature: boards of two speeds on a slow network, one or two wired
    pairs (disjoint) of fast links, a latency everywhere; parameters large or small, so
    that a pair may take a stage together or receive over its fast link ([Note: pairs of
    devices] in solver.partners)."""
    import random

    from tests.solver_cases import make_cluster, random_costs

    rng = random.Random(seed)
    n = rng.randint(3, max_devices)
    costs = random_costs(rng, rng.randint(2, max_layers),
                         param_scale=rng.choice([0.1, 1.0, 10.0]))
    speeds = [rng.choice([0.6, 1.4]) for _ in range(n)]
    order = rng.sample(range(n), n)
    pairs = [(f"d{order[2 * k]}", f"d{order[2 * k + 1]}", 1000.0)
             for k in range(rng.randint(1, n // 2))]
    cluster = make_cluster(speeds, 1024.0, rng.choice([10.0, 100.0]), pairs,
                           latency_ms=rng.choice([0.2, 2.0]))
    return costs, cluster, rng.choice([2, 4, 6, 8])


def random_relaxed(seeds: range, k: int) -> Any:
    """Per seed of ``random_instance`` (links, latency) whose priced tables at micro-batch 1
    exist: ``(seed, tables, M, low, top, prices, fast, rho)`` with ``k`` random prices per
    class and for partner links, and a random bucket ``(low, top]`` of ``X_d``."""
    import random

    from solver.summary import hiding_ratio

    for seed in seeds:
        costs, cluster, batch = random_instance(seed, links=True, latency=True)
        cluster = cluster.for_costs(costs)
        space = ClassSpace(costs, cluster)
        cache: dict[Any, Any] = {}
        args = (space, LayerSums.of(costs), costs.cut_bytes, list(range(costs.num_layers - 1)))
        solver.class_bound.class_bound(*args, 1, batch, 1e9, pools=False, cache=cache,
                                       max_evals=1)
        tables = next((t for t in cache.values() if t is not None), None)
        if tables is None:
            continue
        rng = random.Random(seed)
        top = rng.uniform(0.1, 2.0) * max(float(r[0].min()) for r in tables.rows)
        low = rng.choice([0.0, top * rng.uniform(0.3, 0.95)])
        prices = np.array([[rng.uniform(0.0, 2.0) * top for _ in tables.totals]
                           for _ in range(k)])
        fast = np.array([rng.uniform(0.0, 2.0) * top for _ in range(k)])
        yield seed, tables, batch, low, top, prices, fast, hiding_ratio(costs, cluster)
