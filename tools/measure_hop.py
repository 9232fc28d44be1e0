"""Measure what one pipeline hop costs in the runtime on this host (beyond bandwidth).

A tiny MLP (2 hidden layers of width 16: next to no compute) is trained under the emulator
with micro-batches of one sample, M = 1, 4 and 16 per round, once on one device and once
as a 2-stage pipeline ``first | second``. The round grows with M by the compute of a
micro-batch on one device, and on the pipeline also by its two messages (activations
forward, gradients back), so

    per message = (slope of the pipeline - slope of the single device) / 2

where each slope is (round at M=16 - round at M=1) / 15. This is the overhead that
``solver.calibrate`` fits as ``message_overhead_s`` (which also takes in per-round costs)
and that the latency model charges as link latency when the cluster file gives
``latency_ms``.

Usage::

    python tools/measure_hop.py --cluster examples/clusters/local3.yaml --first fast \\
        --second slow1 --steps 40
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_models import mlp_source  # noqa: E402

from asteroid_fx.model_spec import import_model_file  # noqa: E402
from contracts.cluster import Cluster  # noqa: E402
from contracts.plan import Plan, Stage  # noqa: E402
from runtime.launch import run  # noqa: E402
from solver.evaluate import evaluate  # noqa: E402

MICRO_BATCHES = (1, 4, 16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", type=Path, default=ROOT / "examples" / "clusters" /
                        "local3.yaml")
    parser.add_argument("--first", default="fast", help="device of stage 0 (and the "
                        "single-device runs)")
    parser.add_argument("--second", default="slow1", help="device of stage 1")
    parser.add_argument("--steps", type=int, default=40, help="steps per run (the first "
                        "5 are left out)")
    args = parser.parse_args(argv)
    if args.steps < 10:
        parser.error(f"--steps must be >= 10, got {args.steps}")
    cluster = Cluster.from_yaml(args.cluster)
    for name in (args.first, args.second):
        if name not in cluster.names:
            parser.error(f"device {name!r} is not in {args.cluster} ({list(cluster.names)})")
    if args.first == args.second:
        parser.error("--first and --second must be different devices")
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    from asteroid_fx.costs import analytic_costs
    from asteroid_fx.package import save_partition
    from asteroid_fx.partition import partition

    rounds: dict[str, dict[int, float]] = {"single": {}, "pipeline": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_file = work / "model.py"
        model_file.write_text(mlp_source(16, 2, 16, 4))
        module = import_model_file(model_file)
        torch.manual_seed(0)
        inputs, _ = module.sample_batch(2)
        costs = analytic_costs(module.build_model(), inputs)
        n = costs.num_layers
        layouts = {
            "single": (Stage((0, n - 1), (args.first,), (1,)),),
            "pipeline": (Stage((0, n // 2 - 1), (args.first,), (1,)),
                         Stage((n // 2, n - 1), (args.second,), (1,))),
        }
        for m in MICRO_BATCHES:
            for name, stages in layouts.items():
                plan = Plan(costs.model_hash, cluster.cluster_hash, m, 1, m, stages,
                            num_layers=n, model_name="hop")
                plan = replace(plan, predicted=evaluate(plan, costs, cluster))
                out = work / f"{name}{m}"
                save_partition(out, plan, partition(module.build_model(), inputs, plan),
                               model_spec=str(model_file), onnx=False, costs=costs)
                result = run(out, emulate=args.cluster, steps=args.steps, seed=0, lr=0.01)
                rounds[name][m] = (statistics.median(result.round_times[5:])
                                   / result.slowdown_factor)
                print(f"M={m:2d} {name:8s} round {rounds[name][m] * 1e3:7.3f} ms "
                      f"(emulated time / slow-down factor {result.slowdown_factor:.2f})",
                      flush=True)
    lo, hi = MICRO_BATCHES[0], MICRO_BATCHES[-1]
    slope = {name: (r[hi] - r[lo]) / (hi - lo) for name, r in rounds.items()}
    per_message = (slope["pipeline"] - slope["single"]) / 2
    print(f"per micro-batch: single {slope['single'] * 1e3:.3f} ms, pipeline "
          f"{slope['pipeline'] * 1e3:.3f} ms -> {per_message * 1e3:.3f} ms per message "
          f"({args.first} -> {args.second} on {args.cluster.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
