"""Benchmark recovery from a killed device: replay vs restart, and the price of replicas.

On the emulated cluster examples/clusters/local3.yaml (speeds 1.0 / 0.5 / 0.5, 1000 Mbps) it
trains an MLP (8 hidden layers of width 512, batch 32, 4 micro-batches) as a 3-stage
pipeline fast | slow0 | slow1 and measures:

* ``--recovery replay`` vs ``--recovery restart`` with ``slow0`` SIGKILLed during step
  ``--fail-step``: detect / re-plan / restore / total seconds (from metrics.jsonl);
* the step period after recovery vs a fresh run of a full re-plan
  (``solver.api.plan``) on the survivors;
* the steady-state step period without failures: plain run, replay machinery with
  replication, and the same without replication (checkpoints every step in both).

Step periods are the mean spacing of the launcher's arrival times of the steps' records
over a window (so they include checkpointing and replication, which ``round_time_s`` does
not).

Usage::

    python tools/bench_recovery.py --steps 24 --repeats 2 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_models import mlp_source  # noqa: E402

from runtime.launch import metrics_lines, run  # noqa: E402
from runtime.recovery import run_with_recovery  # noqa: E402
from runtime.train import TrainConfig  # noqa: E402
from solver.cluster import Cluster  # noqa: E402
from solver.evaluate import evaluate  # noqa: E402
from solver.plan import Plan, Stage  # noqa: E402

CLUSTER = ROOT / "examples" / "clusters" / "local3.yaml"
BEGIN, END = "<!-- recovery-benchmark:begin -->", "<!-- recovery-benchmark:end -->"

MODEL = mlp_source(512, 8, 128, 10)


def _module(path: Path) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_recovery_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _partition(work: Path, model_file: Path, plan_of: Any, name: str) -> tuple[Path, Plan]:
    from asteroid_fx.package import save_partition
    from asteroid_fx.partition import partition
    from cost_models.analytic import analytic_costs

    module = _module(model_file)
    torch.manual_seed(0)
    inputs, _ = module.sample_batch(2)
    costs = analytic_costs(module.build_model(), inputs)
    cluster = Cluster.from_yaml(CLUSTER)
    plan = plan_of(costs, cluster)
    out = work / name
    save_partition(out, plan, partition(module.build_model(), inputs, plan),
                   model_spec=str(model_file), onnx=False)
    return out, plan


def _three_stages(costs: Any, cluster: Cluster) -> Plan:
    n = len(costs.layers)
    a, b = n // 3, 2 * n // 3
    stages = (Stage((0, a - 1), ("fast",), (8,)), Stage((a, b - 1), ("slow0",), (8,)),
              Stage((b, n - 1), ("slow1",), (8,)))
    plan = Plan(costs.model_hash, cluster.cluster_hash, 32, 8, 4, stages, num_layers=n,
                model_name="bench")
    return replace(plan, predicted=evaluate(plan, costs, cluster))


def _fresh_on_survivors(costs: Any, cluster: Cluster) -> Plan:
    from solver.api import plan as full_plan

    survivors = cluster.subset([d for d in cluster.names if d != "slow0"])
    return full_plan(costs, survivors, 32, planner="asteroid")


class _Clock:
    """Arrival time of each step's record at the launcher (the last one per step)."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}

    def __call__(self, record: Any) -> None:
        if "step" in record:
            self.at[int(record["step"])] = time.perf_counter()

    def period(self, first: int, last: int) -> float:
        """Mean seconds per step from step ``first`` to step ``last``."""
        if first not in self.at or last not in self.at or last <= first:
            return float("nan")
        return (self.at[last] - self.at[first]) / (last - first)


def _recovery_run(directory: Path, mode: str, steps: int, fail_step: int,
                  metrics: Path) -> dict[str, Any]:
    clock = _Clock()
    result = run(directory, emulate=CLUSTER, steps=steps, seed=0, lr=0.01, metrics=metrics,
                 progress=clock, fail=f"slow0@{fail_step}", recovery=mode)
    events = [line for line in metrics_lines(metrics) if line.get("event") == "recovery"]
    assert len(events) == 1, events
    ev = events[0]
    return {"event": ev, "period_after": clock.period(fail_step + 3, steps - 1),
            "stages": [list(s.devices) for s in result.stages],
            "losses": result.losses}


def _steady(directory: Path, steps: int, variant: str) -> float:
    clock = _Clock()
    if variant == "plain":
        run(directory, emulate=CLUSTER, steps=steps, seed=0, lr=0.01, progress=clock)
    else:
        config = TrainConfig(steps=steps, seed=0, lr=0.01, timeout_s=120.0)
        run_with_recovery(directory, CLUSTER, config, fail=None, recovery="replay",
                          progress=clock, replicate=(variant == "replicas"))
    return clock.period(2, steps - 1)


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--fail-step", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="docs/benchmarks.md to update")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_file = work / "model.py"
        model_file.write_text(MODEL)
        three, plan3 = _partition(work, model_file, _three_stages, "three")
        fresh, fresh_plan = _partition(work, model_file, _fresh_on_survivors, "fresh")
        runs: dict[str, list[dict[str, Any]]] = {"replay": [], "restart": []}
        for i in range(args.repeats):
            for mode in ("replay", "restart"):
                runs[mode].append(_recovery_run(three, mode, args.steps, args.fail_step,
                                                work / f"{mode}{i}.jsonl"))
        fresh_period = _steady(fresh, args.steps, "plain")
        fresh_ft = _steady(fresh, args.steps, "replicas")
        steady: dict[str, list[float]] = {"plain": [], "no-replicas": [], "replicas": []}
        for _ in range(args.repeats):   # interleaved, so that load changes hit all three
            for variant in steady:
                steady[variant].append(_steady(three, args.steps, variant))
    data = {"runs": runs, "fresh_period": fresh_period, "fresh_ft": fresh_ft, "steady": steady,
            "fresh_stages": [list(s.devices) for s in fresh_plan.stages],
            "plan_stages": [[list(s.layers), list(s.devices)] for s in plan3.stages],
            "wall_s": time.perf_counter() - began, "steps": args.steps,
            "fail_step": args.fail_step}
    if args.json:
        args.json.write_text(json.dumps(data, indent=1, default=str))
    text = _markdown(data)
    print(text)
    if args.out:
        _write_section(args.out, text)
    return 0


def _markdown(data: dict[str, Any]) -> str:
    runs = data["runs"]
    lines = [
        "## Recovery",
        "",
        f"`python tools/bench_recovery.py --steps {data['steps']} --repeats "
        f"{len(runs['replay'])} --out docs/benchmarks.md` ({data['wall_s']:.0f} s). "
        f"Emulated `examples/clusters/local3.yaml` (fast 1.0, slow0 0.5, slow1 0.5 of a core, "
        f"1000 Mbps, cgroup or dilation shaping as `asteroid-fx run --emulate`); MLP with 8 "
        f"hidden layers of width 512 (about 2 M parameters, 8 MB of weights), batch 32 in 4 "
        f"micro-batches; pipeline {data['plan_stages']}; `slow0` is SIGKILLed during step "
        f"{data['fail_step']}; checkpoints every step in both modes. Seconds, median "
        f"(min-max) over the repeats; 2-core host shared with other jobs, so expect noise.",
        "",
        "| mode | detect_s | replan_s | restore_s | total_s | lost steps | survivors kept "
        "| plan after | step period after (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("replay", "restart"):
        evs = [r["event"] for r in runs[mode]]
        kept = sorted({len(e.get("kept", [])) for e in evs})
        lines.append(
            f"| {mode} | {_fmt([e['detect_s'] for e in evs])} | "
            f"{_fmt([e['replan_s'] for e in evs])} | {_fmt([e['restore_s'] for e in evs])} | "
            f"{_fmt([e['total_s'] for e in evs])} | "
            f"{sorted({e['lost_steps'] for e in evs})} | {kept} of 2 | "
            f"{runs[mode][-1]['stages']} | {_fmt([r['period_after'] for r in runs[mode]])} |")
    steady = data["steady"]
    plain = statistics.median(steady["plain"])
    lines += [
        "",
        f"Fresh full re-plan on the survivors (`solver.api.plan`, planner asteroid), trained "
        f"from the start without failures: {data['fresh_stages']}, step period "
        f"{data['fresh_period']:.3f} s as a plain run, {data['fresh_ft']:.3f} s with the same "
        f"per-step checkpoints and replica machinery as the recovered runs (compare with the "
        f"last column above).",
        "",
        "Steady state without failures (mean step period from step 2 to the last step; "
        "median (min-max) over the repeats, run interleaved):",
        "",
        "| variant | step period (s) | median vs plain |",
        "|---|---|---|",
    ]
    for name, label in (("plain", "plain `run` (no fault tolerance)"),
                        ("no-replicas", "recovery machinery, checkpoints, no replicas"),
                        ("replicas", "recovery machinery, checkpoints + replicas via store")):
        values = steady[name]
        lines.append(f"| {label} | {_fmt(values)} | "
                     f"{statistics.median(values) / plain:.2f}x |")
    ev = runs["replay"][-1]["event"]
    lines += [
        "",
        "What the columns contain (see docs/fault-tolerance.md): `detect_s` runs from the "
        "kill to the launcher noticing (process exit seen by the parent, or heartbeat "
        "silence); `replan_s` = plan search + writing the new generation's stage modules "
        f"(last replay run: search {ev['search_s']:.3f} s, partition {ev['partition_s']:.3f} "
        f"s); `restore_s` = stopping the failed round (hand-over of states and replicas: "
        f"{ev['stop_s']:.3f} s in that run), moving the state, (re)starting processes, "
        f"rendezvous and loading the stage modules, until the first round of the new plan "
        f"starts. Restart starts every process afresh; replay keeps the survivors that "
        f"leave the failed round within {1.5} s and starts only the others.",
    ]
    return "\n".join(lines)


def _write_section(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        new = head + block + tail
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


if __name__ == "__main__":
    raise SystemExit(main())
