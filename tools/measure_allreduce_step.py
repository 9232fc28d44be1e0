"""Measure what one ring step of a small all-reduce costs on emulated devices of a given speed.

The runtime-overhead probe (``asteroid_fx.runtime_overhead``: 4 Linear layers of width
32) is trained as one data-parallel stage over ``g`` emulated ``local`` devices of speed
``v`` (``run --emulate``, cgroup CPU quotas where allowed). Its all-reduce is ``2 (g-1)``
ring steps of a few KB, so per device

    wall per step = allreduce_s / slow-down factor / (2 (g-1))

and ``wall per step x v`` is what the latency model takes as the step's cost at one core
(``CostTable.message_cost_s``). On real devices the wall time of such a step grows as
1 / v; under the emulator's CFS quotas a step shorter than the quota of one period runs at
a full core's speed whenever the quota is not spent, so it grows more slowly
(docs/latency-model.md, "The default path and calibration on a quiet host").

Usage::

    python tools/measure_allreduce_step.py                       # 2x0.75 3x0.5 2x0.5 3x0.25
    python tools/measure_allreduce_step.py --groups 3x0.5 --steps 100
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _cluster(size: int, speed: float) -> str:
    return "".join(["devices:\n"]
                   + [f"  - {{name: d{i}, type: local, speed: {speed}, memory_gb: 1}}\n"
                      for i in range(size)]
                   + ["network:\n  bandwidth_mbps: 1000\n"])


def _parse(text: str) -> list[tuple[int, float]]:
    groups = []
    for item in text.split(","):
        size, _, speed = item.strip().partition("x")
        if not size.isdigit() or int(size) < 2 or not speed:
            raise SystemExit(f"--groups: {item!r} is not SIZExSPEED with SIZE >= 2, "
                             f"e.g. 3x0.5")
        groups.append((int(size), float(speed)))
    return groups


def main(argv: list[str] | None = None) -> int:
    from asteroid_fx import runtime_overhead as probe
    from asteroid_fx.package import save_partition
    from asteroid_fx.partition import partition
    from asteroid_fx.training import run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default="2x0.75,3x0.5,2x0.5,3x0.25",
                        help="comma-separated SIZExSPEED data-parallel groups")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    groups = _parse(args.groups)
    with tempfile.TemporaryDirectory(prefix="afx-allreduce-") as tmp:
        root = Path(tmp)
        spec, table = probe.profile_probe(root)
        model = spec.build_model()
        inputs = spec.sample_batch(4)[0]
        print("| devices | speed | factor | all-reduce ms per device | wall ms per step "
              "(median) | at one core (x speed) |")
        print("|---|---|---|---|---|---|")
        for size, speed in groups:
            name = f"g{size}-{speed}"
            (root / f"{name}.yaml").write_text(_cluster(size, speed))
            plan = probe.probe_plan(table, tuple(f"d{i}" for i in range(size)))
            save_partition(root / name, plan, partition(model, inputs, plan), model_spec=spec,
                           onnx=False, example_inputs=inputs)
            res = run(root / name, emulate=root / f"{name}.yaml", steps=args.steps)
            factor = res.slowdown_factor
            per = sorted(w.allreduce_s / factor for w in res.workers)
            step = statistics.median(per) / (2 * (size - 1))
            print(f"| {size} | {speed} | {factor:.2f} | "
                  f"{', '.join(f'{x * 1e3:.2f}' for x in per)} | {step * 1e3:.3f} | "
                  f"{step * speed * 1e3:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
