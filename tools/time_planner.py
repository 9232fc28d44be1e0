"""Planner time and exactness: synthetic instances, the cases of issue 14, fleets, small instances.

Every time is the planner's CPU time (``time.process_time``, plus the class bound's process
beside the search where one ran: ``solver.beside``, with a time limit, and without one
where the counted bound's sizes are shared between two processes), best of
``--repeat`` runs, with the host's load average; time-limited runs (``time_limit`` is a
wall-clock deadline) also give their wall time, since the search does less under load.

Modes::

    python tools/time_planner.py               # issue 4: 200 x 8 synthetic, seeds 1 2 7
    python tools/time_planner.py --issue14     # the cases measured in issue 14
    python tools/time_planner.py --fleet       # ResNet-50 / BERT-small on 8..64 devices
    python tools/time_planner.py --small 200   # plan vs ilp-wide and the baselines
    python tools/time_planner.py --bounds      # the stage bound (solver.bounds)
    python tools/time_planner.py --class-bounds   # the class bound, every order
    python tools/time_planner.py --once jetsons 32 --time-limit 5   # one run, a JSON line

* ``--issue14``: the 200-layer MLP (200 Linear 512x512, batch 64) on eight mixed devices
  (2 Xavier NX, 2 TX2, 3 Nano, a ``custom`` phone of speed 0.7 and 3 GB; 100 Mbps, one
  1000 Mbps link between the NX); ResNet-50 (``examples/resnet.py:imagenet``, batch 64)
  on NX/TX2/Nano mixes of 8, 16 and 32 devices at 1000 Mbps; the 32-device home fleet
  (100 Mbps Wi-Fi with 2 ms latency, ten wired 1000 Mbps pairs); and the README's
  ``--check-ilp`` example (MobileNetV2 on ``C-100mbps.yaml``, batch 64), with its peak
  memory.
* ``--fleet``: ResNet-50 (batch 64) and BERT-small (batch 32) on fleets of 8, 16, 32 and 64
  boards (NX/TX2/Nano in turn, 100 Mbps and 2 ms, ``n // 3`` wired 1000 Mbps pairs): the
  plan with the time limit of the issue's targets (5 s up to 32 devices, 30 s for 64;
  none for 8), its round, stages, proven gap and why the search stopped.
* ``--small N``: ``N`` seeded instances of at most 8 layers and 5 devices with random
  links and latency: the Asteroid plan against ``planner="ilp-wide"`` and every baseline.

Cost tables are analytic and Nano-referenced as in ``tools/bench_planner.py`` (cached in
``build/bench_costs``).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from contracts.cluster import Cluster, Device, Link  # noqa: E402
from contracts.devices import DEVICE_TYPES, GIB  # noqa: E402
from contracts.errors import PlanError  # noqa: E402
from contracts.plan import Plan  # noqa: E402
from contracts.table import CostTable  # noqa: E402
from solver.anytime import wide_size  # noqa: E402
from solver.api import PLANNERS, plan  # noqa: E402
from solver.dp import asteroid_dp  # noqa: E402
from solver.space import device_classes  # noqa: E402
from tests.solver_cases import INSTANCE_KINDS, planner_instance, random_instance  # noqa: E402

T = TypeVar("T")

CACHE = ROOT / "build" / "bench_costs"
NANO_MEM_BW = 25.6e9


def load() -> float:
    """The host's 1-minute load average (nan where unknown)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def _median_time(fn: Callable[[], T], repeat: int) -> tuple[float, T]:
    """Median wall time of ``repeat`` calls and the last result."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def children_cpu() -> float:
    """CPU seconds of this process's ended children so far (the class bound's process beside
    the search, ``solver.beside``, where a time limit ran one)."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def best_cpu(fn: Callable[[], T], repeat: int) -> tuple[float, float, T]:
    """``(best CPU seconds, wall seconds of that run, its result)`` over ``repeat`` calls;
    the CPU of the process beside the search counts too."""
    best: tuple[float, float, T] | None = None
    for _ in range(repeat):
        cpu, wall = time.process_time() + children_cpu(), time.perf_counter()
        result = fn()
        cpu = time.process_time() + children_cpu() - cpu
        wall = time.perf_counter() - wall
        if best is None or cpu < best[0]:
            best = (cpu, wall, result)
    assert best is not None
    return best


# -- instances ----------------------------------------------------------------------------
BOARDS = ("jetson-xavier-nx", "jetson-tx2", "jetson-nano")
_SHORT = {"jetson-xavier-nx": "nx", "jetson-tx2": "tx2-", "jetson-nano": "nano"}


def board(name: str, kind: str) -> Device:
    spec = DEVICE_TYPES[kind]
    return Device(name=name, type=kind, memory_bytes=int((spec.memory_gb or 4.0) * GIB),
                  flops=spec.flops)


def mixed8() -> Cluster:
    """Issue 14's eight mixed devices: 2 NX, 2 TX2, 3 Nano, a phone; 100 Mbps, NX pair 1 Gbps."""
    devices = (board("nx0", BOARDS[0]), board("nx1", BOARDS[0]), board("tx2-0", BOARDS[1]),
               board("tx2-1", BOARDS[1]), board("nano0", BOARDS[2]), board("nano1", BOARDS[2]),
               board("nano2", BOARDS[2]),
               Device(name="phone", type="custom", memory_bytes=3 * GIB, speed=0.7))
    return Cluster(devices=devices, bandwidth_mbps=100.0, links=(Link("nx0", "nx1", 1000.0),))


def jetson_mix(n: int, mbps: float = 1000.0) -> Cluster:
    """``n`` boards, NX, TX2 and Nano in turn, one network of ``mbps``."""
    count = dict.fromkeys(BOARDS, 0)
    devices = []
    for i in range(n):
        kind = BOARDS[i % 3]
        devices.append(board(f"{_SHORT[kind]}{count[kind]}", kind))
        count[kind] += 1
    return Cluster(devices=tuple(devices), bandwidth_mbps=mbps)


def fleet(n: int, pairs: int | None = None, seed: int = 0) -> Cluster:
    """A home or lab fleet: ``jetson_mix(n)`` on 100 Mbps Wi-Fi with 2 ms latency, plus
    ``pairs`` (default ``n // 3``) seeded wired pairs at 1000 Mbps and 0.2 ms."""
    base = jetson_mix(n, 100.0)
    names = list(base.names)
    random.Random(seed).shuffle(names)
    pairs = n // 3 if pairs is None else pairs
    links = tuple(Link(names[2 * k], names[2 * k + 1], 1000.0, 0.2) for k in range(pairs))
    return Cluster(devices=base.devices, bandwidth_mbps=100.0, links=links, latency_ms=2.0)


def model_costs(key: str) -> CostTable:
    """Analytic, Nano-referenced costs of ``tools/bench_planner.py``'s models, plus
    ``mlp200`` (200 Linear 512x512 layers), cached."""
    if key != "mlp200":
        sys.path.insert(0, str(ROOT / "tools"))
        from bench_planner import model_costs as bench_costs

        return bench_costs(key, CACHE)
    path = CACHE / "mlp200.json"
    if path.is_file():
        return CostTable.load(path)
    import torch

    import asteroid_fx as afx

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(200)])
    costs: CostTable = afx.analytic_costs(model, (torch.randn(2, 512),),
                                          host_flops=DEVICE_TYPES["jetson-nano"].flops,
                                          host_mem_bw=NANO_MEM_BW, model_name="mlp200")
    CACHE.mkdir(parents=True, exist_ok=True)
    costs.save(path)
    return costs


# -- one measured planning run --------------------------------------------------------------
def plan_row(label: str, costs: CostTable, cluster: Cluster, batch: int, repeat: int,
             time_limit: float | None = None, **kwargs: Any) -> dict[str, Any]:
    """``solver.api.plan`` on one instance: best-of-``repeat`` CPU time and what it found."""
    cpu, wall, result = best_cpu(partial(plan, costs, cluster, batch, time_limit=time_limit,
                                         **kwargs), repeat)
    pred = result.predicted
    bound = result.planner.bound
    return {"case": label, "layers": costs.num_layers, "devices": len(cluster.devices),
            "classes": len(device_classes(cluster, costs)),
            "wide_pairs": wide_size(costs, cluster), "batch": batch,
            "time_limit": time_limit, "cpu_s": cpu, "wall_s": wall,
            "round_s": None if pred is None else pred.round_time_s,
            "stages": result.num_stages, "used": len(result.devices),
            "micro_batches": result.num_micro_batches,
            "gap": None if bound is None else bound.gap,
            "bound_s": None if bound is None else bound.bound_s,
            "stopped": "" if bound is None else bound.stopped,
            "order_optimal": bound is not None and bound.order_optimal,
            "check": dict(result.planner.check), "load": load()}


def row_line(r: dict[str, Any]) -> str:
    limit = "-" if r["time_limit"] is None else f"{r['time_limit']:g}"
    gap = "-" if r["gap"] is None else f"{100 * r['gap']:.1f} %"
    return (f"| {r['case']} | {r['layers']} | {r['devices']} | {r['classes']} | "
            f"{r['wide_pairs']} | {limit} | {r['cpu_s']:.2f} | {r['wall_s']:.2f} | "
            f"{r['round_s']:.4g} | {r['stages']} / {r['used']} | "
            f"{'yes' if r['order_optimal'] else 'no'} | {gap} | "
            f"{r['stopped'] or 'finished'} | {r['load']:.1f} |")


ROW_HEAD = ["| case | layers | devices | classes | wide pairs | time limit (s) | CPU (s) | "
            "wall (s) | round (s) | stages / devices used | optimal in one order | "
            "proven gap, every order | search | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]


# -- issue 14 ---------------------------------------------------------------------------------
def issue14(repeat: int) -> list[str]:
    """The cases measured in issue 14 (see the module docstring), as table lines."""
    lines = list(ROW_HEAD)
    mlp = model_costs("mlp200")
    lines.append(row_line(plan_row("MLP 200 x 8 mixed, 100 Mbps + NX pair", mlp, mixed8(), 64,
                                   repeat)))
    resnet = model_costs("resnet50_imagenet")
    for n, limit in ((8, None), (16, None), (16, 5.0), (32, 5.0), (32, 30.0)):
        lines.append(row_line(plan_row(f"ResNet-50 on {n} Jetsons, 1000 Mbps", resnet,
                                       jetson_mix(n), 64, 1 if limit else repeat, limit)))
        print(lines[-1], flush=True)
    for limit in (5.0, 30.0):
        lines.append(row_line(plan_row("ResNet-50 on the 32-device home fleet", resnet,
                                       fleet(32, 10), 64, 1, limit)))
        print(lines[-1], flush=True)
    return lines


def check_ilp_example() -> str:
    """The README's ``--check-ilp`` example: wall time, CBC's CPU time, peak memory, measured
    in a fresh process (``--check-ilp-example``): a process's peak memory is its peak over
    its life, which in a benchmark is that of the cases run before."""
    import subprocess

    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--check-ilp-example"],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"README --check-ilp example: failed (exit code {done.returncode}): {tail}"
    return done.stdout.strip().splitlines()[-1]


def _check_ilp_here() -> str:
    """``check_ilp_example``'s measurement, in this process."""
    costs = model_costs("mobilenet_v2")
    cluster = Cluster.from_yaml(ROOT / "examples" / "clusters" / "C-100mbps.yaml")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    result = plan(costs, cluster, 64, check_ilp=True)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    check = result.planner.check
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return (f"README --check-ilp example (MobileNetV2, C-100mbps, batch 64): {wall:.1f} s "
            f"wall, MILP on {check['ilp_cuts']} candidate cuts ({check['ilp_status']}, "
            f"{check['ilp_time_s']:.1f} s, solver CPU "
            f"{after.ru_utime - before.ru_utime:.1f} s), DP = MILP: gap {check['gap']}, "
            f"peak memory {own:.0f} MiB (planner) / {after.ru_maxrss / 1024:.0f} MiB "
            f"(solver), load {load():.1f}")


# -- fleets --------------------------------------------------------------------------------
FLEET_MODELS = {"resnet50_imagenet": ("ResNet-50", 64), "bert_small": ("BERT-small", 32)}
FLEET_LIMITS = {8: None, 16: 5.0, 32: 5.0, 64: 30.0}


def fleet_rows(sizes: Sequence[int] = (8, 16, 32, 64),
               models: Sequence[str] = tuple(FLEET_MODELS), repeat: int = 1
               ) -> list[dict[str, Any]]:
    """Every model on every fleet size with the time limit of ``FLEET_LIMITS``."""
    rows = []
    for key in models:
        name, batch = FLEET_MODELS[key]
        costs = model_costs(key)
        for n in sizes:
            limit = FLEET_LIMITS.get(n, 30.0)
            row = plan_row(f"{name}, {n}-device fleet", costs, fleet(n), batch,
                           repeat if limit is None else 1, limit)
            rows.append(row)
            print(row_line(row), flush=True)
    return rows


# -- small instances against ilp-wide ------------------------------------------------------
def small_check(count: int, seed0: int = 140_000) -> dict[str, Any]:
    """The Asteroid plan against ``ilp-wide`` and every baseline on ``count`` seeded
    instances (<= 8 layers, <= 5 devices, random links and latency)."""
    baselines = [n for n in PLANNERS if n not in ("asteroid", "asteroid-order", "ilp", "ilp-wide")]
    equal = better = worse = unproven = none = 0
    worse_than_baseline: list[str] = []
    statuses: list[str] = []
    cpu = 0.0
    for seed in range(seed0, seed0 + count):
        costs, cluster, batch = random_instance(seed, max_layers=8, max_devices=5,
                                                links=True, latency=seed % 2 == 0)
        started = time.process_time()
        try:
            ours: Plan | None = plan(costs, cluster, batch)
        except PlanError:
            ours = None
        cpu += time.process_time() - started
        try:
            wide: Plan | None = plan(costs, cluster, batch, planner="ilp-wide")
        except PlanError:
            wide = None
        value = math.inf if ours is None or ours.predicted is None else ours.predicted.round_time_s
        if wide is None or wide.predicted is None:
            none += ours is None
            unproven += ours is not None
        else:
            theirs = wide.predicted.round_time_s
            if abs(value - theirs) <= 1e-6 * theirs:
                equal += 1
            elif value < theirs:
                better += 1   # the MILP stopped at its time limit, or its epsilon
                statuses.append(str(wide.planner.check.get("ilp_status")))
            else:
                worse += 1
                print(f"seed {seed}: asteroid {value:.6g} > ilp-wide {theirs:.6g} "
                      f"({wide.planner.check.get('ilp_status')})", flush=True)
        for name in baselines:
            try:
                base = plan(costs, cluster, batch, planner=name).predicted
            except PlanError:
                continue
            if base is not None and base.round_time_s < value * (1 - 1e-9):
                worse_than_baseline.append(f"seed {seed}: {name}")
    compared = equal + better + worse
    return {"instances": count, "compared": compared, "equal": equal, "better": better,
            "worse": worse, "ilp_status_when_better": sorted(set(statuses)),
            "ilp_none": unproven + none, "both_none": none,
            "share_at_least_ilp_wide": (equal + better) / compared if compared else math.nan,
            "worse_than_a_baseline": worse_than_baseline, "asteroid_cpu_s": cpu,
            "load": load()}


# -- the stage bound (solver.bounds) ---------------------------------------------------------
def stage_bound_rows() -> list[str]:
    """The paper's space without a limit on the 200-layer MLP x 8 and ResNet-50 x 32: the
    DP's CPU time without and with ``stage_bounds_prune`` (alternating, same process), and
    the proven lower bound of the paper's space per micro-batch size (``proven_bound``)
    against the work bound."""
    from solver.bound_bisection import work_bound
    from solver.bounds import proven_bound
    from solver.dp import make_space
    from solver.evaluate import LayerSums
    from solver.space import SliceSpace, candidate_cuts

    lines = ["| case | DP CPU without (s) | with (s) | with / without | round (s) | "
             "work bound (s) | stage bound (s) | gap to work / stage bound | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, key, cluster in (("MLP 200 x 8 mixed", "mlp200", mixed8()),
                                ("ResNet-50 x 32 Jetsons, 1000 Mbps", "resnet50_imagenet",
                                 jetson_mix(32))):
        costs = model_costs(key)
        cluster = cluster.for_costs(costs)
        times: dict[bool, float] = {}
        result = None
        for flag in (False, True):
            cpu, _, result = best_cpu(partial(asteroid_dp, costs, cluster, 64,
                                              stage_bounds_prune=flag), 1)
            times[flag] = cpu
        assert result is not None
        best = result.round_time_s
        space = make_space(costs, cluster, "order")
        assert isinstance(space, SliceSpace)
        sums, ends = LayerSums.of(costs), candidate_cuts(costs, 96)
        work = stage = math.inf
        for mb in (1, 2, 4, 8, 16, 32, 64):
            w = work_bound(costs, cluster, 64, mb)
            work = min(work, w)
            stage = min(stage, proven_bound(space, sums, costs.cut_bytes, ends, mb, 64 // mb,
                                            w, 2.0 * best))
        lines.append(f"| {label} | {times[False]:.2f} | {times[True]:.2f} | "
                     f"{times[True] / times[False]:.2f} | {best:.4g} | {work:.4g} | "
                     f"{stage:.4g} | {100 * (best - work) / work:.0f} % / "
                     f"{100 * (best - stage) / stage:.0f} % | {load():.1f} |")
        print(lines[-1], flush=True)
    return lines


# -- the class bound (solver.class_bound) --------------------------------------------------
CLASS_BOUND_CASES: tuple[tuple[str, str, Callable[[], Cluster], int, float], ...] = (
    ("MLP 200 x 8 mixed", "mlp200", mixed8, 64, 0.06268075162732864),
    ("ResNet-50 x 32 Jetsons, 1000 Mbps", "resnet50_imagenet", partial(jetson_mix, 32), 64,
     0.9249183904623013),
    ("ResNet-50 x 64 Jetsons, 1000 Mbps", "resnet50_imagenet", partial(jetson_mix, 64), 64,
     0.6516567990877246),
    # fleets: the best round of the time-limited runs of 2026-12-04 (not proven optimal)
    ("ResNet-50, 32-device fleet", "resnet50_imagenet", partial(fleet, 32), 64,
     5.513405382718929),
    ("BERT-small, 16-device fleet", "bert_small", partial(fleet, 16), 32, 4.937790864922259))


def class_bound_rows() -> list[str]:
    """Per micro-batch size of issue 14's instances: the work bound and the class
    bound over every order for the best round time known (the target), with the CPU
    seconds of each class bound, and the gap of the smallest bound over the sizes."""
    from solver.bound_bisection import work_bound
    from solver.class_bound import class_bound
    from solver.evaluate import LayerSums
    from solver.space import ClassSpace, candidate_cuts
    from solver.summary import hiding_ratio

    lines = ["| case | best round (s) | micro-batch | work bound (s) | class bound (s) | "
             "CPU (s) | load |", "|---|---|---|---|---|---|---|"]
    from solver.space import micro_batch_choices

    for label, key, make, batch, target in CLASS_BOUND_CASES:
        costs = model_costs(key)
        cluster = make().for_costs(costs)
        space = ClassSpace(costs, cluster)
        sums, ends = LayerSums.of(costs), candidate_cuts(costs, 96)
        lowest = {"work": math.inf, "both": math.inf}
        total = 0.0
        for mb in micro_batch_choices(batch, None):
            cpu = time.process_time()
            value = class_bound(space, sums, costs.cut_bytes, ends, mb, batch // mb, target,
                                rho=hiding_ratio(costs, cluster))
            cpu = time.process_time() - cpu
            total += cpu
            work = work_bound(costs, cluster, batch, mb)
            lowest["work"] = min(lowest["work"], work)
            lowest["both"] = min(lowest["both"], max(work, value or 0.0))
            shown = "-" if value is None else f"{value:.4g}"
            lines.append(f"| {label} | {target:.4g} | {mb} | {work:.4g} | {shown} | "
                         f"{cpu:.2f} | {load():.1f} |")
            print(lines[-1], flush=True)
        lines.append(f"| {label}: gap | | all | {100 * (target / lowest['work'] - 1):.0f} % | "
                     f"{100 * (target / lowest['both'] - 1):.0f} % | {total:.2f} | "
                     f"{load():.1f} |")
        print(lines[-1], flush=True)
    return lines


def compiled_ab(devices: int, target: float) -> list[str]:
    """The class bound of every micro-batch size of ResNet-50 x ``devices`` Jetsons for
    ``target``, each pass run in numpy and compiled in turn ([Note: the compiled
    priced pass] and [Note: the compiled counted pass] in ``solver.relaxation_compiled``):
    per size the passes, how many values differed and the seconds of each way."""
    import numpy as np

    import solver.class_bound
    import solver.relaxation
    from solver.class_bound import class_bound
    from solver.evaluate import LayerSums
    from solver.space import ClassSpace, candidate_cuts, micro_batch_choices
    from solver.summary import hiding_ratio

    costs = model_costs("resnet50_imagenet")
    cluster = jetson_mix(devices).for_costs(costs)
    space = ClassSpace(costs, cluster)
    sums, ends = LayerSums.of(costs), candidate_cuts(costs, 96)
    relaxed_many = solver.relaxation.relaxed_many
    seen = {"numpy": 0.0, "compiled": 0.0, "passes": 0, "differ": 0, "counted numpy": 0.0,
            "counted compiled": 0.0, "counted passes": 0}

    def both(*args: Any) -> Any:
        counted = "counted " if len(args) > 9 and args[9] else ""
        found = {}
        for name, on in (("numpy", False), ("compiled", True)):
            solver.relaxation.COMPILED = on
            started = time.perf_counter()
            found[name] = relaxed_many(*args)
            seen[counted + name] += time.perf_counter() - started
        seen[counted + "passes"] += 1
        seen["differ"] += int(not np.array_equal(found["numpy"], found["compiled"]))
        return found["compiled"]

    def row(name: str, value: str, was: dict[str, Any]) -> str:
        return (f"| {name} | {value} | {seen['passes'] - was['passes']} | "
                f"{seen['counted passes'] - was['counted passes']} | "
                f"{seen['differ'] - was['differ']} | {seen['numpy'] - was['numpy']:.2f} | "
                f"{seen['compiled'] - was['compiled']:.2f} | "
                f"{seen['counted numpy'] - was['counted numpy']:.2f} | "
                f"{seen['counted compiled'] - was['counted compiled']:.2f} |")

    zero = {name: 0 for name in seen}
    lines = [f"ResNet-50 x {devices} Jetsons, target {target} s, load {load():.1f}",
             "| micro-batch | bound (s) | priced passes | counted passes | differ | "
             "priced numpy (s) | priced compiled (s) | counted numpy (s) | "
             "counted compiled (s) |", "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    solver.class_bound.relaxed_many = both  # type: ignore[assignment]
    try:
        for mb in micro_batch_choices(64, None):
            before = dict(seen)
            value = class_bound(space, sums, costs.cut_bytes, ends, mb, 64 // mb, target,
                                rho=hiding_ratio(costs, cluster), pools=False, cache={},
                                optimizer_state_factor=costs.optimizer_state_factor)
            lines.append(row(str(mb), f"{value:.5g}", before))
            print(lines[-1], flush=True)
    finally:
        solver.class_bound.relaxed_many = relaxed_many
        solver.relaxation.COMPILED = True
    lines.append(row("all", "", zero))
    print(lines[-1], flush=True)
    return lines


# -- one time-limited run, for comparing checkouts ------------------------------------------
ONCE_CASES = {
    "mlp8": ("mlp200", 64, lambda n: mixed8()),
    "jetsons": ("resnet50_imagenet", 64, jetson_mix),
    "resnet-fleet": ("resnet50_imagenet", 64, fleet),
    "bert-fleet": ("bert_small", 32, fleet),
}


def once(case: str, devices: int, limit: float | None) -> dict[str, Any]:
    """One ``solver.api.plan`` run of a case of ``ONCE_CASES`` on ``devices`` devices: CPU
    (of this process, and of the class bound's process beside the search where it ran:
    ``solver.beside``) and wall seconds, round, proven bound and gap, when the progress
    bar first showed the plan returned (``best_at_s``), when the class bound had proven
    the bound returned (``bound_at_s``: its calls traced, ``_traced_bound_calls``), and the
    load at the end. The solver comes from ``sys.path`` (``PYTHONPATH=<checkout>`` runs
    another checkout's planner with this script, for alternating runs of two versions)."""
    import solver

    key, batch, make = ONCE_CASES[case]
    costs, cluster = model_costs(key), make(devices)
    beside = children_cpu()
    seen: list[tuple[float, str]] = []     # (when, the bar's text)
    calls = Path(tempfile.mkdtemp(prefix="afx-once-")) / "bound-calls"
    undo = _traced_bound_calls(calls)
    cpu, started = time.process_time(), time.perf_counter()
    try:
        result = plan(costs, cluster, batch, time_limit=limit,
                      progress=lambda done, what: seen.append((time.perf_counter(), what)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - started
        beside = children_cpu() - beside
        bound = result.planner.bound
        bound_at = _bound_at(calls, None if bound is None else bound.bound_s, started)
    finally:
        undo()
        shutil.rmtree(calls.parent, ignore_errors=True)
    return {"case": case, "devices": len(cluster.devices), "time_limit": limit,
            "solver": str(Path(solver.__file__).resolve().parents[1]),
            "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
            "cpu_beside_s": round(beside, 2),
            "round_s": None if result.predicted is None else result.predicted.round_time_s,
            "bound_s": None if bound is None else bound.bound_s,
            "gap": None if bound is None else bound.gap,
            "stopped": None if bound is None else bound.stopped,
            "best_at_s": _best_at(seen, result.predicted, started),
            "bound_at_s": bound_at, "load": load()}


def replan_times(case: str, devices: int, plan_limit: float = 10.0) -> dict[str, Any]:
    """A recovery's re-plan on a case of ``ONCE_CASES``: the plan of ``plan_limit`` seconds
    loses the first device of its middle stage, and ``solver.replan.replan`` runs with the
    full re-plan's default time limit and without one (exact), one after the other: wall
    seconds of the whole re-plan and of its full search, both rounds and the choice."""
    from solver.replan import REPLAN_TIME_LIMIT_S, replan

    key, batch, make = ONCE_CASES[case]
    costs, cluster = model_costs(key), make(devices)
    first = plan(costs, cluster, batch, time_limit=plan_limit)
    failed = [first.stages[len(first.stages) // 2].devices[0]]
    out: dict[str, Any] = {"case": case, "devices": len(cluster.devices), "failed": failed,
                           "load": load()}
    for name, limit in (("limited", REPLAN_TIME_LIMIT_S), ("exact", None)):
        started = time.perf_counter()
        _, info = replan(first, costs, cluster, failed, time_limit=limit)
        out[name] = {"time_limit": limit, "wall_s": round(time.perf_counter() - started, 2),
                     "full_search_s": round(info.full_search_s, 2),
                     "layerwise_search_s": round(info.layerwise_search_s, 3),
                     "full_round_s": info.full_round_s,
                     "layerwise_round_s": info.layerwise_round_s, "chosen": info.chosen}
    return out


def _best_at(seen: Sequence[tuple[float, str]], predicted: Any, started: float) -> float | None:
    """Seconds into the run when the progress bar first showed the returned plan's round
    (``best X s``, four digits), None where it never did."""
    if predicted is None:
        return None
    final = f"best {predicted.round_time_s:.4g} s"
    return next((round(when - started, 2) for when, what in seen if final in what), None)


def _traced_bound_calls(path: Path) -> Callable[[], None]:
    """Every ``class_bound`` call of the bisection (``solver.bound_bisection``, in this
    process and in the processes forked beside the search, which inherit the wrapper)
    appends ``when micro_batch value`` to ``path`` as it returns (``time.perf_counter``:
    the same clock in every process); the returned function undoes it."""
    import solver.bound_bisection as bisection

    original = bisection.class_bound

    def traced(*args: Any, **kwargs: Any) -> Any:
        value = original(*args, **kwargs)
        if value is not None:
            with path.open("a") as out:
                out.write(f"{time.perf_counter()!r} {args[4]} {value!r}\n")
        return value

    bisection.class_bound = traced

    def undo() -> None:
        bisection.class_bound = original
    return undo


def _bound_at(path: Path, bound: float | None, started: float) -> float | None:
    """Seconds into the run when every micro-batch size the class bound was asked about
    had reached the returned bound (each size's first call at or above it), from
    ``_traced_bound_calls``'s file; None where no call reached it (a bound of the link or
    work bounds alone)."""
    if bound is None or not path.exists():
        return None
    reached: dict[int, float] = {}
    for line in path.read_text().splitlines():
        when, mb, value = line.split()
        if float(value) >= bound * (1.0 - 1e-9):
            reached.setdefault(int(mb), float(when))
    return round(max(reached.values()) - started, 2) if reached else None


# -- issue 4: synthetic instances ----------------------------------------------------------
def synthetic(args: argparse.Namespace) -> int:
    print(f"# batch {args.batch}, median of {args.repeat} run(s), load average {load():.2f}, "
          f"{os.cpu_count()} CPU(s)")
    print("| kind | layers | devices | seed | DP (s) | DP round (s) | plan (s) | "
          "plan round (s) | stages |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for kind in args.kinds:
        for n_layers in args.layers:
            for n_devices in args.devices:
                for seed in args.seeds:
                    costs, cluster = planner_instance(kind, seed, n_layers, n_devices)
                    dp_s = dp_round = plan_s = plan_round = float("nan")
                    stages = "-"
                    if not args.skip_dp:
                        dp_s, res = _median_time(
                            partial(asteroid_dp, costs, cluster, args.batch), args.repeat)
                        dp_round = res.round_time_s
                    if not args.skip_plan:
                        plan_s, p = _median_time(partial(plan, costs, cluster, args.batch),
                                                 args.repeat)
                        if p.predicted is not None:
                            plan_round = p.predicted.round_time_s
                        stages = str(p.num_stages)
                        worst = max(worst, plan_s)
                    print(f"| {kind} | {n_layers} | {n_devices} | {seed} | {dp_s:.3f} | "
                          f"{dp_round:.6g} | {plan_s:.3f} | {plan_round:.6g} | {stages} |",
                          flush=True)
    if not args.skip_plan:
        print(f"# slowest solver.api.plan median: {worst:.3f} s")
    return 0


def build_compiled() -> None:
    """The class bound's compiled passes built before anything is timed ([Note: building the
    compiled passes] in ``solver.relaxation_compiled``: within a time limit a pass not
    built yet runs in numpy), in a process of its own, as the README's quick start does:
    this one loads them where a plan needs them, inside its time limit, as a user's
    ``asteroid-fx plan`` does (numba's import and the passes' load cost 0.5-0.7 s here;
    loaded before the timings, they went unmeasured until the thirty-third session). On
    stderr how long the build took."""
    started = time.perf_counter()
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    done = subprocess.run([sys.executable, "-m", "solver.relaxation_compiled"],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": path})
    said = (done.stderr or done.stdout).strip().splitlines()
    print(f"(python -m solver.relaxation_compiled: rc {done.returncode} in "
          f"{time.perf_counter() - started:.1f} s{': ' + said[-1] if said else ''}; "
          "before the timings)", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--issue14", action="store_true", help="the cases of issue 14")
    parser.add_argument("--fleet", action="store_true", help="the fleet table")
    parser.add_argument("--small", type=int, metavar="N", help="N small instances vs ilp-wide")
    parser.add_argument("--bounds", action="store_true",
                        help="the stage bound: DP time with and without, proven bounds")
    parser.add_argument("--class-bounds", action="store_true",
                        help="the class bound over every order per micro-batch size")
    parser.add_argument("--check-ilp-example", action="store_true",
                        help="the README's --check-ilp example alone (its peak memory)")
    parser.add_argument("--once", nargs=2, metavar=("CASE", "DEVICES"),
                        help=f"one run of a case ({', '.join(ONCE_CASES)}) on DEVICES devices "
                             f"with --time-limit, as a JSON line")
    parser.add_argument("--replan", nargs=2, metavar=("CASE", "DEVICES"),
                        help="a recovery's re-plan on a case (one device of the plan's middle "
                        "stage lost): with the full re-plan's default time limit and exact, "
                        "as a JSON line")
    parser.add_argument("--compiled-ab", nargs=2, metavar=("DEVICES", "TARGET"),
                        help="the class bound's passes in numpy and compiled, in turn, "
                        "on ResNet-50 x DEVICES Jetsons for TARGET seconds")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds, for --once (default: none)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--layers", nargs="+", type=int, default=[200])
    parser.add_argument("--devices", nargs="+", type=int, default=[8])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 7])
    parser.add_argument("--kinds", nargs="+", default=list(INSTANCE_KINDS),
                        choices=INSTANCE_KINDS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing")
    parser.add_argument("--skip-dp", action="store_true", help="time only solver.api.plan")
    parser.add_argument("--skip-plan", action="store_true", help="time only the DP")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    build_compiled()
    if args.once:
        import json

        if args.once[0] not in ONCE_CASES:
            parser.error(f"--once: unknown case {args.once[0]!r}; choose one of "
                         f"{', '.join(ONCE_CASES)}")
        print(json.dumps(once(args.once[0], int(args.once[1]), args.time_limit)), flush=True)
        return 0
    if args.replan:
        import json

        if args.replan[0] not in ONCE_CASES:
            parser.error(f"--replan: unknown case {args.replan[0]!r}; choose one of "
                         f"{', '.join(ONCE_CASES)}")
        print(json.dumps(replan_times(args.replan[0], int(args.replan[1]))), flush=True)
        return 0
    if args.compiled_ab:
        compiled_ab(int(args.compiled_ab[0]), float(args.compiled_ab[1]))
        return 0
    if args.check_ilp_example:
        print(_check_ilp_here(), flush=True)
        return 0
    if args.bounds:
        print("\n".join(stage_bound_rows()))
        return 0
    if args.class_bounds:
        class_bound_rows()
        return 0
    if not (args.issue14 or args.fleet or args.small):
        return synthetic(args)
    if args.issue14:
        for line in issue14(args.repeat):
            print(line)
        print(check_ilp_example())
    if args.fleet:
        print("\n".join(ROW_HEAD))
        for row in fleet_rows(args.sizes, repeat=args.repeat):
            print(row_line(row))
    if args.small:
        print(small_check(args.small))
    return 0


if __name__ == "__main__":
    sys.exit(main())
