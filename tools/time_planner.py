"""Wall time of the Asteroid DP and of ``solver.api.plan`` on seeded synthetic instances.

Reproduces the issue-4 target "plan < 1 s for 200 layers x 8 devices": for every
cluster kind, layer count, device count and seed it builds the instance of
``tests.solver_cases.planner_instance`` (``random_costs`` from ``random.Random(seed)``,
then a ``spread_cluster`` — speeds U(0.2, 2), 4096 MiB, 100 Mbps — or a
``random_cluster`` from the same generator), runs ``solver.dp.asteroid_dp`` and
``solver.api.plan(planner="asteroid")`` ``--repeat`` times each and prints the median
wall times and the round time found.

Usage::

    python tools/time_planner.py                                   # 200 x 8, seeds 1 2 7
    python tools/time_planner.py --layers 100 200 --devices 8 --kinds spread --repeat 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from solver.api import plan  # noqa: E402
from solver.dp import asteroid_dp  # noqa: E402
from tests.solver_cases import INSTANCE_KINDS, planner_instance  # noqa: E402

T = TypeVar("T")


def _median_time(fn: Callable[[], T], repeat: int) -> tuple[float, T]:
    """Median wall time of ``repeat`` calls and the last result."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--layers", nargs="+", type=int, default=[200])
    parser.add_argument("--devices", nargs="+", type=int, default=[8])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 7])
    parser.add_argument("--kinds", nargs="+", default=list(INSTANCE_KINDS),
                        choices=INSTANCE_KINDS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing (median)")
    parser.add_argument("--skip-dp", action="store_true", help="time only solver.api.plan")
    parser.add_argument("--skip-plan", action="store_true", help="time only the DP")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    print(f"# batch {args.batch}, median of {args.repeat} run(s), load average {load}, "
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


if __name__ == "__main__":
    sys.exit(main())
