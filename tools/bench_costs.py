"""Benchmark the cost tables behind plans: predicted against measured rounds on emulated clusters.

For each model and ``local``-type cluster it runs what a user runs, with no flags:

1. ``partition MODEL --cluster C --batch-size B`` (default costs: this host measured, cached),
   then ``run DIR --emulate C`` and compares the measured median round with the plan's
   prediction (times the emulator's slow-down factor);
2. ``calibrate DIR metrics.jsonl`` and a second run of the *same* plan, compared with that
   plan evaluated on the calibrated table;
3. a *different* plan on the same cluster (``--planner`` given, default ``dp-only``: every
   device in one data-parallel stage; or ``pp-equal``) planned with the calibrated table,
   run and compared with its prediction.

Every figure is measured in this script; ratios are printed side by side.

Usage::

    python tools/bench_costs.py --steps 10 --out docs/benchmarks-costs.md
    python tools/bench_costs.py --models examples/mlp.py --clusters examples/clusters/local3.yaml
    python tools/bench_costs.py --default-only --steps 20 --repeats 3   # median of 3 runs each

Rounds of a few milliseconds vary by 20-30 % from one run to the next on the shared 2-core
host; ``--repeats`` runs each plan several times and compares the median run (every run's
ratio is printed next to it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_CASES = [
    ("examples/mlp.py", 16),
    ("examples/skipnet.py", 32),
    ("examples/mobilenet_v2.py", 32),
    ("examples/resnet.py:cifar", 32),
    ("examples/efficientnet.py", 16),
]
DEFAULT_CLUSTERS = ["examples/clusters/local3.yaml", "examples/clusters/local4-wifi.yaml"]


@dataclass
class Row:
    model: str
    cluster: str
    what: str
    layout: str
    predicted_s: float             # the plan's expected round (its event simulation)
    measured_s: float
    closed_s: float = float("nan")  # the closed-form model (solver.evaluate) of the same plan
    #: run CPU / profiled time of the same compute (the host's speed drifted by this much
    #: between profile and run: other jobs on the cores, caches, memory bandwidth)
    host_drift: float = float("nan")
    #: wall / (CPU / quota) of the compute (1.0: each device got its quota whenever it
    #: computed; above: it waited for a core beyond its quota, the emulator's share)
    core_wait: float = float("nan")
    #: the measured rounds of every repeat (``--repeats``); ``measured_s`` is their median
    repeats: tuple[float, ...] = ()

    @property
    def ratio(self) -> float:
        return self.measured_s / self.predicted_s if self.predicted_s > 0 else float("nan")


def decompose(plan: Any, costs: Any, cluster: Any, summary: dict[str, Any]
              ) -> tuple[float, float]:
    """(host drift, core wait) of a run from its summary's per-device CPU and wall times.

    The profiled time of a device's compute is its stage's layers at its share in the
    table's base time (one host core: ``LayerSums.fwd_time`` / ``bwd_time`` at speed 1).
    Both figures weigh devices by their compute."""
    from solver.evaluate import LayerSums

    sums = LayerSums.of(costs)
    factor = float(summary.get("slowdown_factor") or 1.0)
    shaped = summary.get("shaping") != "none"
    cpu = base = wall = expected = 0.0
    for name, got in summary["devices"].items():
        spent = got.get("forward_cpu_s", 0.0) + got.get("backward_cpu_s", 0.0)
        if not spent:
            continue
        stage, share = plan.stages[got["stage"]], got["share"]
        base += (sums.fwd_time(stage.first, stage.last, share, 1.0)
                 + sums.bwd_time(stage.first, stage.last, share, 1.0))
        cpu += spent
        speed = cluster.device(name).speed_against(costs.host_flops)
        expected += spent / (min(1.0, speed / factor) if shaped else 1.0)
        wall += got["forward_s"] + got["backward_s"]
    if base <= 0.0 or expected <= 0.0:
        return float("nan"), float("nan")
    return cpu / base, wall / expected


def _ratios(row: Row) -> str:
    """Every repeat's measured / predicted, e.g. ``0.98-1.07`` (one run: its ratio)."""
    got = sorted(x / row.predicted_s for x in row.repeats) if row.predicted_s > 0 else []
    return "-" if not got else f"{got[0]:.2f}" if len(got) == 1 else f"{got[0]:.2f}-{got[-1]:.2f}"


def _cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "asteroid_fx.cli", *args], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"asteroid-fx {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


def _summary(metrics: Path) -> dict[str, Any]:
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    return [x for x in lines if x.get("event") == "summary"][-1]


def _layout(plan: Any) -> str:
    return " | ".join(f"{st.first}..{st.last}:{'+'.join(st.devices)}" for st in plan.stages)


REPEATS = 1
"""Runs of each plan (``--repeats``); the one with the median round is reported."""


def _run(directory: Path, cluster: str, steps: int, metrics: Path) -> dict[str, Any]:
    """The summary of the run with the median round of ``REPEATS`` runs, with every run's
    round under ``"repeats"`` (this host's run-to-run noise, shown next to the ratio)."""
    runs = []
    for _ in range(REPEATS):
        _cli("run", str(directory), "--emulate", cluster, "--steps", str(steps),
             "--metrics", str(metrics))
        runs.append(_summary(metrics))
    runs.sort(key=lambda r: r["round_time_s"])
    return {**runs[len(runs) // 2], "repeats": [r["round_time_s"] for r in runs]}


def bench_case(model: str, batch: int, cluster: str, steps: int, work: Path,
               other_planner: str, default_only: bool = False) -> list[Row]:
    from contracts.cluster import Cluster
    from contracts.plan import Plan
    from contracts.table import CostTable
    from solver.evaluate import evaluate
    from solver.simulate import simulate

    rows: list[Row] = []
    name = Path(model.split(":")[0]).stem + (":" + model.split(":")[1] if ":" in model else "")
    short = Path(cluster).stem
    first = work / "default"
    _cli("partition", model, "--cluster", cluster, "--batch-size", str(batch), "--out",
         str(first), "--no-onnx")
    plan = Plan.load(first / "plan.json")
    s = _run(first, cluster, steps, work / "m1.jsonl")
    factor = s["slowdown_factor"]
    assert plan.predicted is not None
    table = CostTable.load(first / "costs.json")
    clus = Cluster.from_yaml(cluster)
    rows.append(Row(name, short, "default (measured costs)", _layout(plan),
                    plan.predicted.expected_round_time_s * factor, s["round_time_s"],
                    plan.predicted.round_time_s * factor, *decompose(plan, table, clus, s),
                    repeats=tuple(s["repeats"])))
    if default_only:
        return rows
    _cli("calibrate", str(first), str(work / "m1.jsonl"), "--out", str(work / "cal.json"))
    cal = CostTable.load(work / "cal.json")
    again = simulate(plan, cal, clus).round_time_s
    s2 = _run(first, cluster, steps, work / "m2.jsonl")
    rows.append(Row(name, short, "same plan after calibrate", _layout(plan),
                    again * s2["slowdown_factor"], s2["round_time_s"],
                    evaluate(plan, cal, clus).round_time_s * s2["slowdown_factor"],
                    *decompose(plan, cal, clus, s2), repeats=tuple(s2["repeats"])))
    second = work / "other"
    _cli("partition", model, "--cluster", cluster, "--batch-size", str(batch), "--out",
         str(second), "--no-onnx", "--costs", str(work / "cal.json"), "--planner",
         other_planner)
    plan2 = Plan.load(second / "plan.json")
    s3 = _run(second, cluster, steps, work / "m3.jsonl")
    assert plan2.predicted is not None
    rows.append(Row(name, short, f"{other_planner} plan, calibrated costs", _layout(plan2),
                    plan2.predicted.expected_round_time_s * s3["slowdown_factor"],
                    s3["round_time_s"], plan2.predicted.round_time_s * s3["slowdown_factor"],
                    *decompose(plan2, cal, clus, s3), repeats=tuple(s3["repeats"])))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None,
                        help="MODEL_SPEC[@BATCH] ... (default: the bundled examples)")
    parser.add_argument("--clusters", nargs="*", default=DEFAULT_CLUSTERS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--other-planner", default="dp-only")
    parser.add_argument("--default-only", action="store_true",
                        help="only the default path (no calibrate, no other plan)")
    parser.add_argument("--out", type=Path, default=None, help="append a markdown table")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each plan; the median round is compared (1)")
    args = parser.parse_args()
    global REPEATS
    REPEATS = max(1, args.repeats)
    cases = DEFAULT_CASES if not args.models else [
        (m.split("@")[0], int(m.split("@")[1]) if "@" in m else 16) for m in args.models]
    os.environ.setdefault("ASTEROID_FX_CACHE", str(Path(tempfile.gettempdir()) / "afx-bench"))
    rows: list[Row] = []
    started = time.time()
    for cluster in args.clusters:
        for model, batch in cases:
            with tempfile.TemporaryDirectory() as tmp:
                got = bench_case(model, batch, cluster, args.steps, Path(tmp),
                                 args.other_planner, args.default_only)
            for r in got:
                print(f"{r.model:24s} {r.cluster:12s} {r.what:34s} predicted "
                      f"{r.predicted_s * 1e3:9.2f} ms  measured {r.measured_s * 1e3:9.2f} ms  "
                      f"ratio {r.ratio:5.2f} (closed form {r.measured_s / r.closed_s:5.2f})  "
                      f"host drift {r.host_drift:4.2f}  core wait "
                      f"{r.core_wait:4.2f}  runs {_ratios(r)}  [{r.layout}]", flush=True)
            rows += got
    load = os.getloadavg()
    print(f"{len(rows)} runs in {time.time() - started:.0f} s; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.out is not None:
        lines = ["", f"### Predicted vs measured rounds (`python tools/bench_costs.py "
                 f"--steps {args.steps} --repeats {REPEATS}`)", "",
                 "| model | cluster | plan | layout | predicted ms | measured ms | ratio | "
                 "ratio to the closed form | host drift | core wait | every run's ratio |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r.model} | {r.cluster} | {r.what} | {r.layout.replace(' | ', ' / ')} | "
                  f"{r.predicted_s * 1e3:.2f} | {r.measured_s * 1e3:.2f} | {r.ratio:.2f} | "
                  f"{r.measured_s / r.closed_s:.2f} | {r.host_drift:.2f} | {r.core_wait:.2f} | "
                  f"{_ratios(r)} |"
                  for r in rows]
        with args.out.open("a") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
