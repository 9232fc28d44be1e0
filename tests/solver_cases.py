"""Hand-written and seeded random cost tables and clusters for solver tests (no torch)."""

from __future__ import annotations

import importlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import replace

import pytest

from contracts.cluster import Cluster, Device, Link
from contracts.table import CostTable, DeviceColumn, LayerCost, RuntimeOverhead, TimeFit

__all__ = [
    "CLASS_BOUND_MODULES",
    "patch_class_bound",
    "patch_planner",
    "MIB",
    "make_costs",
    "uniform_costs",
    "make_cluster",
    "random_costs",
    "random_cluster",
    "random_instance",
    "spread_cluster",
    "planner_instance",
    "INSTANCE_KINDS",
    "BOARD_TYPES",
    "with_ops",
    "scaled_column",
    "random_columns",
    "typed_cluster",
    "random_column_instance",
]

MIB = 1 << 20
HOST_FLOPS = 1e9


def make_costs(fwd: Sequence[tuple[float, float]], bwd: Sequence[tuple[float, float]],
               param_bytes: Sequence[int], activation_bytes: Sequence[int],
               cut_bytes: Sequence[int], *, buffer_bytes: Sequence[int] | None = None,
               name: str = "toy") -> CostTable:
    """A cost table from per-layer (intercept, per-sample) fits and byte counts."""
    n = len(fwd)
    buffers = list(buffer_bytes) if buffer_bytes is not None else [0] * n
    layers = tuple(
        LayerCost(name=f"layer{i}", op="linear", fwd=TimeFit(*fwd[i]), bwd=TimeFit(*bwd[i]),
                  param_bytes=int(param_bytes[i]), activation_bytes=int(activation_bytes[i]),
                  output_bytes=int(cut_bytes[i]) if i < n - 1 else 4,
                  buffer_bytes=int(buffers[i]))
        for i in range(n))
    return CostTable(layers=layers, cut_bytes=tuple(int(c) for c in cut_bytes),
                     input_bytes=16, model_name=name, model_hash=f"hash-{name}",
                     host="test-host", host_flops=HOST_FLOPS, source="analytic")


def uniform_costs(num_layers: int, *, fwd: float = 0.01, bwd: float = 0.02,
                  param_bytes: int = 4 * MIB, activation_bytes: int = MIB // 4,
                  cut_bytes: int = 64 * 1024) -> CostTable:
    """``num_layers`` identical layers with zero intercepts."""
    return make_costs([(0.0, fwd)] * num_layers, [(0.0, bwd)] * num_layers,
                      [param_bytes] * num_layers, [activation_bytes] * num_layers,
                      [cut_bytes] * (num_layers - 1), name=f"uniform{num_layers}")


def make_cluster(speeds: Sequence[float], memory_mib: Sequence[float] | float = 1024.0,
                 bandwidth_mbps: float = 100.0,
                 links: Sequence[tuple[str, str, float]] = (), latency_ms: float = 0.0,
                 link_latency: Sequence[tuple[str, str, float]] = ()) -> Cluster:
    """Custom devices ``d0, d1, ...`` with the given speeds (relative to the host);
    ``link_latency`` overrides the latency of some pairs (milliseconds)."""
    mems = ([float(memory_mib)] * len(speeds) if isinstance(memory_mib, (int, float))
            else [float(m) for m in memory_mib])
    devices = tuple(Device(name=f"d{i}", type="custom", memory_bytes=int(mems[i] * MIB),
                           speed=float(v)) for i, v in enumerate(speeds))
    lat = {frozenset((a, b)): ms for a, b, ms in link_latency}
    overrides = [Link(a, b, bw, lat.pop(frozenset((a, b)), None)) for a, b, bw in links]
    for pair, ms in lat.items():
        a, b = sorted(pair)
        overrides.append(Link(a, b, None, ms))
    return Cluster(devices=devices, bandwidth_mbps=bandwidth_mbps, links=tuple(overrides),
                   latency_ms=latency_ms)


def random_costs(rng: random.Random, num_layers: int, *, intercepts: bool = True,
                 param_scale: float = 1.0) -> CostTable:
    """Random layers: 5..50 ms per sample, a few MiB of params/activations, KiB..MiB cuts.

    ``param_scale`` multiplies the parameter bytes (large values favour pipelines over
    data parallelism, because the all-reduce gets expensive)."""
    fwd, bwd = [], []
    for _ in range(num_layers):
        per = rng.uniform(5e-3, 50e-3)
        inter = rng.uniform(0.0, 5e-3) if intercepts and rng.random() < 0.7 else 0.0
        fwd.append((inter, per))
        bwd.append((inter * rng.uniform(1.0, 2.0), per * rng.uniform(1.5, 2.5)))
    params = [int(param_scale * rng.choice([0, rng.randrange(1, 8 * MIB)]))
              for _ in range(num_layers)]
    acts = [rng.randrange(16 * 1024, MIB) for _ in range(num_layers)]
    cuts = [rng.randrange(1024, 256 * 1024) for _ in range(num_layers - 1)]
    return make_costs(fwd, bwd, params, acts, cuts, name=f"rand{num_layers}")


def random_cluster(rng: random.Random, num_devices: int, *, tight_memory: bool = False,
                   links: bool = False, latency: bool = False) -> Cluster:
    """Random speeds in [0.2, 2], memory 64 MiB..1 GiB (or tight: 4..64 MiB), 10..1000 Mbps;
    with ``latency``, a default latency of 0.1..20 ms and some per-pair overrides."""
    speeds = [round(rng.uniform(0.2, 2.0), 3) for _ in range(num_devices)]
    if rng.random() < 0.3 and num_devices > 1:  # some identical devices -> exact ties
        speeds[1] = speeds[0]
    if tight_memory:
        mems = [rng.uniform(4.0, 64.0) for _ in range(num_devices)]
    else:
        mems = [rng.uniform(64.0, 1024.0) for _ in range(num_devices)]
    bandwidth = rng.choice([10.0, 100.0, 1000.0, 1000.0])
    overrides: list[tuple[str, str, float]] = []
    if links and num_devices > 1:
        for _ in range(rng.randrange(1, num_devices + 1)):
            a, b = rng.sample(range(num_devices), 2)
            if all({x, y} != {f"d{a}", f"d{b}"} for x, y, _ in overrides):
                overrides.append((f"d{a}", f"d{b}", rng.choice([10.0, 50.0, 1000.0])))
    if not latency:
        return make_cluster(speeds, mems, bandwidth, overrides)
    default_ms = rng.choice([0.1, 1.0, 5.0, 20.0])
    pair_ms: dict[tuple[str, str], float] = {}
    for _ in range(rng.randrange(0, num_devices + 1) if num_devices > 1 else 0):
        a, b = sorted(rng.sample(range(num_devices), 2))
        pair_ms[(f"d{a}", f"d{b}")] = rng.choice([0.0, 2.0, 50.0])
    return make_cluster(speeds, mems, bandwidth, overrides, latency_ms=default_ms,
                        link_latency=[(a, b, ms) for (a, b), ms in pair_ms.items()])


def random_instance(seed: int, *, max_layers: int = 6, max_devices: int = 4,
                    tight_memory: bool | None = None, links: bool | None = None,
                    latency: bool = False) -> tuple[CostTable, Cluster, int]:
    """A seeded tiny instance ``(costs, cluster, batch_size)`` for exhaustive comparisons."""
    rng = random.Random(seed)
    num_layers = rng.randint(1, max_layers)
    num_devices = rng.randint(1, max_devices)
    tight = rng.random() < 0.3 if tight_memory is None else tight_memory
    with_links = rng.random() < 0.3 if links is None else links
    costs = random_costs(rng, num_layers, param_scale=rng.choice([0.1, 1.0, 10.0]))
    cluster = random_cluster(rng, num_devices, tight_memory=tight, links=with_links,
                             latency=latency)
    batch_size = rng.choice([1, 2, 4, 6, 8, 12, 16])
    return costs, cluster, batch_size


def spread_cluster(rng: random.Random, num_devices: int) -> Cluster:
    """Speeds drawn from U(0.2, 2) (no ties forced), 4096 MiB each, 100 Mbps everywhere:
    a cluster where memory never binds and the planner's search space is widest."""
    speeds = [rng.uniform(0.2, 2.0) for _ in range(num_devices)]
    return make_cluster(speeds, 4096.0, 100.0)


INSTANCE_KINDS = ("spread", "random")


def planner_instance(kind: str, seed: int, num_layers: int,
                     num_devices: int) -> tuple[CostTable, Cluster]:
    """The planner-time instances of ``tools/time_planner.py``: ``random_costs`` from
    ``random.Random(seed)``, then (same generator) a ``spread_cluster`` or a
    ``random_cluster`` of ``num_devices`` devices."""
    if kind not in INSTANCE_KINDS:
        raise ValueError(f"unknown instance kind {kind!r}; choose one of {INSTANCE_KINDS}")
    rng = random.Random(seed)
    costs = random_costs(rng, num_layers)
    if kind == "spread":
        return costs, spread_cluster(rng, num_devices)
    return costs, random_cluster(rng, num_devices)


# -- cost columns (per-device-type times, solver/timing.py) ------------------------------------
BOARD_TYPES = ("jetson-nano", "jetson-tx2", "jetson-xavier-nx")
"""Built-in device types that a cost table may hold a column for."""


def with_ops(costs: CostTable, ops: Sequence[str]) -> CostTable:
    """``costs`` with layer ``i``'s op set to ``ops[i]`` (e.g. "conv", "matmul")."""
    return replace(costs, layers=tuple(replace(lc, op=op)
                                       for lc, op in zip(costs.layers, ops, strict=True)))


def scaled_column(costs: CostTable, device_type: str, factors: Mapping[str, float], *,
                  update_factor: float = 1.0, noise: random.Random | None = None
                  ) -> DeviceColumn:
    """A column for ``device_type``: every layer's base times times ``factors[op]`` (a
    device twice as slow on "matmul" has ``{"matmul": 2.0, ...}``), each coefficient
    jittered by up to +-20 % with ``noise``, and the optimizer step times
    ``update_factor``."""
    def jitter() -> float:
        return 1.0 if noise is None else noise.uniform(0.8, 1.2)

    fwd, bwd = [], []
    for lc in costs.layers:
        k = factors[lc.op]
        fwd.append(TimeFit(lc.fwd.intercept_s * k * jitter(), lc.fwd.per_sample_s * k * jitter()))
        bwd.append(TimeFit(lc.bwd.intercept_s * k * jitter(), lc.bwd.per_sample_s * k * jitter()))
    return DeviceColumn(device_type=device_type, fwd=tuple(fwd), bwd=tuple(bwd),
                        update_s_per_byte=costs.update_s_per_byte * update_factor,
                        host=f"{device_type}-0")


def random_columns(rng: random.Random, costs: CostTable, types: Sequence[str]) -> CostTable:
    """``costs`` with "conv"/"matmul" ops at random and one column per type of ``types``:
    each type is fast on one kind of layer and slow on the other (factors 0.2..5, drawn
    independently), with per-layer jitter and its own optimizer step."""
    ops = [rng.choice(["conv", "matmul"]) for _ in costs.layers]
    costs = with_ops(costs, ops)
    if costs.update_s_per_byte == 0.0 and rng.random() < 0.5:
        costs = replace(costs, update_s_per_byte=rng.choice([1e-9, 1e-8]))
    columns = tuple(sorted(
        (scaled_column(costs, t, {"conv": rng.uniform(0.2, 5.0), "matmul": rng.uniform(0.2, 5.0)},
                       update_factor=rng.uniform(0.2, 5.0), noise=rng)
         for t in types), key=lambda c: c.device_type))
    return replace(costs, columns=columns)


def typed_cluster(types: Sequence[str], speeds: Sequence[float],
                  memory_mib: Sequence[float] | float = 1024.0, bandwidth_mbps: float = 100.0,
                  latency_ms: float = 0.0) -> Cluster:
    """Devices ``d0, d1, ...`` of the given types, each declared with ``speed`` (which a
    device whose type has a column ignores)."""
    mems = ([float(memory_mib)] * len(types) if isinstance(memory_mib, (int, float))
            else [float(m) for m in memory_mib])
    devices = tuple(Device(name=f"d{i}", type=t, memory_bytes=int(mems[i] * MIB),
                           speed=float(v))
                    for i, (t, v) in enumerate(zip(types, speeds, strict=True)))
    return Cluster(devices=devices, bandwidth_mbps=bandwidth_mbps, latency_ms=latency_ms)


def random_column_instance(seed: int, *, max_layers: int = 6, max_devices: int = 4,
                           latency: bool = False) -> tuple[CostTable, Cluster, int]:
    """``random_instance`` with cost columns: one or two board types measured (fast on
    "conv" layers and slow on "matmul" ones, or the other way round), and a cluster that
    mixes devices of those types with ``custom`` / ``local`` ones (scaled by speed)."""
    rng = random.Random(seed)
    num_layers = rng.randint(1, max_layers)
    num_devices = rng.randint(1, max_devices)
    costs = random_costs(rng, num_layers, param_scale=rng.choice([0.1, 1.0, 10.0]))
    measured = rng.sample(BOARD_TYPES[:2], rng.randint(1, 2))
    costs = random_columns(rng, costs, measured)
    types = [rng.choice([*measured, *measured, "custom", "local"]) for _ in range(num_devices)]
    if all(t not in measured for t in types):
        types[0] = measured[0]
    speeds = [round(rng.uniform(0.2, 2.0), 3) for _ in range(num_devices)]
    tight = rng.random() < 0.3
    mems = [rng.uniform(4.0, 64.0) if tight else rng.uniform(64.0, 1024.0)
            for _ in range(num_devices)]
    cluster = typed_cluster(types, speeds, mems, rng.choice([10.0, 100.0, 1000.0, 1000.0]),
                            rng.choice([0.1, 1.0, 5.0]) if latency else 0.0)
    return costs, cluster, rng.choice([1, 2, 4, 6, 8, 12, 16])


def with_runtime_overhead(seed: int, costs: CostTable) -> CostTable:
    """``costs`` with a random runtime overhead per stage call and round (0-3x the mean
    layer time; zero in a third of the draws of each part) and per message (0-0.5x) on the
    base and every column."""
    rng = random.Random(seed)
    mean = sum(lc.fwd.at(4) + lc.bwd.at(4) for lc in costs.layers) / (2 * len(costs.layers))

    def draw() -> RuntimeOverhead:
        parts = [0.0 if rng.random() < 1 / 3 else rng.uniform(0.0, 3.0) * mean
                 for _ in range(3)]
        return RuntimeOverhead(forward_s=parts[0], backward_s=parts[1], round_s=parts[2])

    def message() -> float:   # per message, paid at the slower end (its speed or column)
        return 0.0 if rng.random() < 1 / 3 else rng.uniform(0.0, 0.5) * mean

    columns = tuple(replace(col, runtime_overhead=draw(), message_overhead_s=message())
                    for col in costs.columns)
    return replace(costs, runtime_overhead=draw(), columns=columns,
                   message_overhead_s=message())


def random_overhead_instance(seed: int, **kwargs: object) -> tuple[CostTable, Cluster, int]:
    """``random_instance`` (even seeds) or ``random_column_instance`` (odd) with a random
    runtime overhead (``with_runtime_overhead``)."""
    make = random_column_instance if seed % 2 else random_instance
    costs, cluster, batch = make(seed, **kwargs)  # type: ignore[arg-type]
    return with_runtime_overhead(seed, costs), cluster, batch


CLASS_BOUND_MODULES = ("solver.class_tables", "solver.partners", "solver.relaxation",
                       "solver.counted_pools", "solver.class_bound")
"""The modules of the class bound; each imports what it uses from the others by name."""


def patch_class_bound(patch: pytest.MonkeyPatch, name: str, value: object) -> None:
    """Set ``name`` to ``value`` in every module of the class bound that holds it (where it
    is defined and where it is imported), so that every caller sees the same value."""
    found = False
    for module in map(importlib.import_module, CLASS_BOUND_MODULES):
        if hasattr(module, name):
            patch.setattr(module, name, value)
            found = True
    if not found:
        raise AttributeError(f"no module of the class bound has {name!r}")


def patch_planner(patch: pytest.MonkeyPatch, name: str, value: object) -> None:
    """Set ``name`` in ``solver.anytime`` and ``solver.bound_bisection`` wherever it is
    bound (both import some names, such as ``spare_core``, by name)."""
    found = False
    for module in map(importlib.import_module, ("solver.anytime", "solver.bound_bisection")):
        if hasattr(module, name):
            patch.setattr(module, name, value)
            found = True
    if not found:
        raise AttributeError(f"neither solver.anytime nor solver.bound_bisection has {name!r}")

