"""Benchmark recovery from a killed device: replay vs restart, and the price of replicas.

On the emulated cluster examples/clusters/local3.yaml (speeds 1.0 / 0.5 / 0.5, 1000 Mbps) it
trains an MLP (8 hidden layers of width 512, batch 32, 4 micro-batches) as a 3-stage
pipeline fast | slow0 | slow1 and measures:

* ``--recovery replay`` vs ``--recovery restart`` with ``slow0`` SIGKILLed during step
  ``--fail-step``: detect / re-plan / restore / total seconds (from metrics.jsonl); replay
  as by default (re-plan predicted on the calibrated cluster), with ``--no-calibrate`` (on
  the declared cluster), and both again with the looser ``--loose-tolerance`` (default
  0.25), where a prediction that underrates the repair's cost shows;
* the step period after recovery vs a fresh run of a full re-plan
  (``solver.api.plan``) on the survivors;
* the steady-state step period without failures, interleaved: plain run, replay machinery
  with replication (asynchronous, every ``--replicate-every`` steps) and the same without
  replication (disk checkpoints every 10 steps in both, the replay default), plus the time
  the training threads spend on replication per step (from the workers' own counters).

``--batch`` changes the mini-batch (4 micro-batches; default 32) so that a step does more
compute for the same state size.

Step periods are the median spacing of the launcher's arrival times of consecutive steps'
records over a window (so they include checkpointing and replication, which ``round_time_s`` does
not).

Usage::

    python tools/bench_recovery.py --steps 24 --fail-step 8 --repeats 3 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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

from asteroid_fx.model_spec import import_model_file  # noqa: E402
from asteroid_fx.replanning import Replanner  # noqa: E402
from asteroid_fx.training import run  # noqa: E402
from contracts.cluster import Cluster  # noqa: E402
from contracts.plan import Plan, Stage  # noqa: E402
from runtime.launch import metrics_lines  # noqa: E402
from runtime.recovery import REPLAN_TOLERANCE, run_with_recovery  # noqa: E402
from runtime.train import TrainConfig  # noqa: E402
from solver.evaluate import evaluate  # noqa: E402

CLUSTER = ROOT / "examples" / "clusters" / "local3.yaml"
BEGIN, END = "<!-- recovery-benchmark:begin -->", "<!-- recovery-benchmark:end -->"

MODEL = mlp_source(512, 8, 128, 10)


def _partition(work: Path, model_file: Path, plan_of: Any, name: str) -> tuple[Path, Plan]:
    from asteroid_fx.costs import analytic_costs
    from asteroid_fx.package import save_partition
    from asteroid_fx.partition import partition

    module = import_model_file(model_file)
    torch.manual_seed(0)
    inputs, _ = module.sample_batch(2)
    costs = analytic_costs(module.build_model(), inputs)
    cluster = Cluster.from_yaml(CLUSTER)
    plan = plan_of(costs, cluster)
    out = work / name
    # with the cost table, as `asteroid-fx partition` writes it: the launcher's re-plan
    # after a failure then uses the table the plan was made with (without it, it measures
    # this host's speed again, which drifts on a shared host)
    save_partition(out, plan, partition(module.build_model(), inputs, plan),
                   model_spec=str(model_file), onnx=False, costs=costs)
    return out, plan


BATCH = [32]     # set by --batch


def _three_stages(costs: Any, cluster: Cluster) -> Plan:
    n = len(costs.layers)
    a, b = n // 3, 2 * n // 3
    micro = BATCH[0] // 4
    stages = (Stage((0, a - 1), ("fast",), (micro,)), Stage((a, b - 1), ("slow0",), (micro,)),
              Stage((b, n - 1), ("slow1",), (micro,)))
    plan = Plan(costs.model_hash, cluster.cluster_hash, BATCH[0], micro, 4, stages,
                num_layers=n, model_name="bench")
    return replace(plan, predicted=evaluate(plan, costs, cluster))


def _fresh_on_survivors(costs: Any, cluster: Cluster) -> Plan:
    from solver.api import plan as full_plan

    survivors = cluster.subset([d for d in cluster.names if d != "slow0"])
    return full_plan(costs, survivors, BATCH[0], planner="asteroid")


class _Clock:
    """Arrival time of each step's record at the launcher (the last one per step)."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}

    def __call__(self, record: Any) -> None:
        if "step" in record:
            self.at[int(record["step"])] = time.perf_counter()

    def median_period(self, first: int, last: int) -> float:
        """Median spacing of consecutive steps in ``[first, last]`` (robust to the odd
        stall caused by other jobs on a shared host)."""
        gaps = [self.at[k] - self.at[k - 1] for k in range(first + 1, last + 1)
                if k in self.at and k - 1 in self.at]
        return statistics.median(gaps) if gaps else float("nan")


def _modes(tolerance: float, loose: float | None) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (label, run_with_recovery options) of the recovery variants measured."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for tol, suffix in ((tolerance, ""), (loose, "-loose")):
        if tol is None:
            continue
        out[f"replay{suffix}"] = (f"replay (`--replan-tolerance {tol:g}`)",
                                  {"recovery": "replay", "replan_tolerance": tol})
        out[f"replay-declared{suffix}"] = (
            f"replay (`--replan-tolerance {tol:g} --no-calibrate`)",
            {"recovery": "replay", "replan_tolerance": tol, "calibrate": False})
    out["restart"] = ("restart", {"recovery": "restart"})
    return out


def _recovery_run(directory: Path, options: dict[str, Any], steps: int, fail_step: int,
                  metrics: Path) -> dict[str, Any]:
    clock = _Clock()
    result = run(directory, emulate=CLUSTER, steps=steps, seed=0, lr=0.01, metrics=metrics,
                 progress=clock, fail=f"slow0@{fail_step}", **options)
    events = [line for line in metrics_lines(metrics) if line.get("event") == "recovery"]
    assert len(events) == 1, events
    ev = events[0]
    # the same measure as the fresh and steady-state runs (median spacing of steps)
    return {"event": ev, "period_after": clock.median_period(fail_step + 3, steps - 1),
            "stages": [list(s.devices) for s in result.stages],
            "losses": result.losses}


def _steady(directory: Path, steps: int, variant: str, every: int | str = 1,
            stats: list[dict[str, Any]] | None = None,
            chosen: list[int] | None = None) -> float:
    clock = _Clock()
    if variant == "plain":
        run(directory, emulate=CLUSTER, steps=steps, seed=0, lr=0.01, progress=clock)
    else:
        config = TrainConfig(steps=steps, seed=0, lr=0.01, timeout_s=120.0)
        out = run_with_recovery(directory, CLUSTER, config, fail=None, recovery="replay",
                                progress=clock, replicate=(variant != "no-replicas"),
                                replicate_every=every, replanner=Replanner())
        if stats is not None:
            stats.append(out.replication)
        if chosen is not None:
            chosen.extend(out.replicate_every)
    return clock.median_period(2, steps - 1)


def _fmt(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    if not values:
        return "-"
    v = [x * scale for x in values]
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.median(v):.{digits}f} ({min(v):.{digits}f}-{max(v):.{digits}f})"


def _ms(values: list[float]) -> str:
    """Seconds shown as milliseconds with two decimals (step periods)."""
    return _fmt(values, 1e3, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--fail-step", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="docs/benchmarks.md to update")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--batch", type=int, default=32, help="mini-batch (multiple of 4)")
    parser.add_argument("--replicate-every", default="",
                        help="also measure replicas every K steps: comma list of K > 1, "
                             "e.g. 4,8")
    parser.add_argument("--steady-steps", type=int, default=None,
                        help="steps of each steady-state run (default: --steps)")
    parser.add_argument("--steady-repeats", type=int, default=None,
                        help="repeats of the steady-state runs (default: --repeats)")
    parser.add_argument("--replan-tolerance", type=float, default=REPLAN_TOLERANCE,
                        help="replay's re-plan tolerance (run --replan-tolerance)")
    parser.add_argument("--loose-tolerance", type=float, default=0.25,
                        help="also replay at this tolerance, calibrated and not (<= 0: skip)")
    parser.add_argument("--skip-failures", action="store_true",
                        help="only the steady-state measurements")
    args = parser.parse_args(argv)
    every_k: list[int | str] = []
    for item in (k.strip() for k in args.replicate_every.split(",")):
        if item == "auto":
            every_k.append(item)
        elif item:
            try:
                every_k.append(int(item))
            except ValueError:
                parser.error(f"--replicate-every takes a comma list of integers > 1 and "
                             f"'auto', got {args.replicate_every!r}")
    if any(isinstance(k, int) and k < 2 for k in every_k):
        parser.error(f"--replicate-every values must be > 1, got {args.replicate_every!r}")
    if args.batch < 4 or args.batch % 4:
        parser.error(f"--batch must be a positive multiple of 4, got {args.batch}")
    BATCH[0] = args.batch
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    began = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_file = work / "model.py"
        model_file.write_text(MODEL)
        three, plan3 = _partition(work, model_file, _three_stages, "three")
        fresh, fresh_plan = _partition(work, model_file, _fresh_on_survivors, "fresh")
        modes = _modes(args.replan_tolerance,
                       args.loose_tolerance if args.loose_tolerance > 0 else None)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
        fresh_period: list[float] = []
        fresh_ft: list[float] = []
        if not args.skip_failures:
            for i in range(args.repeats):     # interleaved with the fresh runs: load changes
                for mode in runs:
                    runs[mode].append(_recovery_run(three, modes[mode][1], args.steps,
                                                    args.fail_step,
                                                    metrics=work / f"{mode}{i}.jsonl"))
                fresh_period.append(_steady(fresh, args.steps, "plain"))
                fresh_ft.append(_steady(fresh, args.steps, "replicas"))
        steady: dict[str, list[float]] = {"plain": [], "no-replicas": [], "replicas": []}
        for k in every_k:
            steady[f"replicas-{k}"] = []
        stats: dict[str, list[dict[str, Any]]] = {name: [] for name in steady
                                                  if name != "plain"}
        steady_steps = args.steady_steps or args.steps
        chosen: list[int] = []      # the periods "auto" chose
        for _ in range(args.steady_repeats or args.repeats):   # interleaved: load changes
            for variant in steady:                              # hit every variant
                tail = variant.split("-")[-1]
                every: int | str = (int(tail) if tail.isdigit()
                                    else "auto" if tail == "auto" else 1)
                steady[variant].append(_steady(three, steady_steps, variant, every,
                                               stats.get(variant),
                                               chosen if tail == "auto" else None))
    data = {"runs": runs, "labels": {name: label for name, (label, _) in modes.items()},
            "loose": args.loose_tolerance, "fresh_period": fresh_period,
            "fresh_ft": fresh_ft, "steady": steady,
            "stats": stats, "batch": args.batch, "tolerance": args.replan_tolerance,
            "every": every_k, "auto_k": sorted(set(chosen)),
            "load": [load_before, os.getloadavg()], "steady_steps": steady_steps,
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


def _ratio(values: list[float], plain: list[float]) -> str:
    """Median step period over the plain run's, and the range of the per-repeat ratios
    (repeat i of a variant ran right after repeat i of the plain run)."""
    per = [v / p for v, p in zip(values, plain, strict=False) if p > 0]
    text = f"{statistics.median(values) / statistics.median(plain):.3f}x"
    return text + (f" ({min(per):.2f}-{max(per):.2f})" if len(per) > 1 else "")


def _stats_table(stats: list[dict[str, Any]]) -> list[str]:
    """Per device, the ms per training step of replication work (median over the repeats)."""
    lines = ["| device | training thread: snapshot | training thread: wait for the previous "
             "push | background: send (wall) | of which paced to the link | holder: receive "
             "(wall) | MB sent | process CPU time per step (all threads) |",
             "|---|---|---|---|---|---|---|---|"]
    devices = sorted({d for run in stats for d in run})
    for device in devices:
        rows = [run[device] for run in stats if device in run]

        def med(name: str, rows: list[dict[str, Any]] = rows) -> float:
            return statistics.median(float(r[name]) for r in rows)

        sent = med("bytes_sent_per_step")
        lines.append(f"| {device} | {med('snapshot_ms'):.2f} ms | {med('wait_ms'):.2f} ms | "
                     f"{med('send_ms'):.2f} ms | {med('paced_ms'):.2f} ms | "
                     f"{med('receive_ms'):.2f} ms | "
                     f"{sent / 1e6:.2f} | {med('process_cpu_ms'):.1f} ms |")
    return lines


def _markdown(data: dict[str, Any]) -> str:
    runs = data["runs"]
    load = data["load"]
    repeats = len(data["steady"]["plain"])
    command = (f"`python tools/bench_recovery.py --steps {data['steps']} --fail-step "
               f"{data['fail_step']} --repeats {len(runs['replay']) or repeats}"
               + (f" --steady-steps {data['steady_steps']}"
                  if data["steady_steps"] != data["steps"] else "")
               + (f" --steady-repeats {repeats}" if runs["replay"]
                  and repeats != len(runs["replay"]) else "")
               + (" --skip-failures" if not runs["replay"] else "")
               + (f" --batch {data['batch']}" if data["batch"] != 32 else "")
               + (f" --replan-tolerance {data['tolerance']:g}"
                  if data.get("tolerance", REPLAN_TOLERANCE) != REPLAN_TOLERANCE else "")
               + (f" --loose-tolerance {data['loose']:g}" if data["loose"] != 0.25 else "")
               + (f" --replicate-every {','.join(map(str, data['every']))}"
                  if data["every"] else "")
               + "`")
    lines = [
        f"### Batch {data['batch']}" if data["batch"] != 32 else "## Recovery",
        "",
        f"{command} ({data['wall_s']:.0f} s; load average (1/5/15 min) "
        f"{' / '.join(f'{x:.1f}' for x in load[0])} before, "
        f"{' / '.join(f'{x:.1f}' for x in load[1])} after, on a 2-core host shared with "
        f"other jobs, so expect noise). Emulated `examples/clusters/local3.yaml` (fast 1.0, "
        f"slow0 0.5, slow1 0.5 of a core, 1000 Mbps, cgroup or dilation shaping as "
        f"`asteroid-fx run --emulate`); MLP with 8 hidden layers of width 512 (about 2 M "
        f"parameters, 8 MB of weights), batch {data['batch']} in 4 micro-batches; pipeline "
        f"{data['plan_stages']}. Seconds, median (min-max) over the repeats.",
    ]
    if runs["replay"]:
        lines += [
            "",
            f"`slow0` is SIGKILLed during step {data['fail_step']}. Disk checkpoints: every "
            f"step for restart, every 10 steps for replay (there they are only the fallback "
            f"for a double failure).",
            "",
            "| mode | detect_s | replan_s | restore_s | total_s | lost steps | survivors kept "
            "| plan after | step period after (ms) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        labels = data["labels"]
        modes = [m for m in labels if runs.get(m)]
        for mode in modes:
            evs = [r["event"] for r in runs[mode]]
            kept = sorted({len(e.get("kept", [])) for e in evs})
            plans = sorted({json.dumps(r["stages"]) for r in runs[mode]})
            lines.append(
                f"| {labels[mode]} | {_fmt([e['detect_s'] for e in evs])} | "
                f"{_fmt([e['replan_s'] for e in evs])} | "
                f"{_fmt([e['restore_s'] for e in evs])} | "
                f"{_fmt([e['total_s'] for e in evs])} | "
                f"{sorted({e['lost_steps'] for e in evs})} | {kept} of 2 | "
                f"{' or '.join(plans)} | "
                f"{_ms([r['period_after'] for r in runs[mode]])} |")
        replay = [r["event"] for r in runs["replay"]]
        restart = [r["event"] for r in runs["restart"]]
        lines += ["", "Replay's re-plan (`solver.replan.replan`): the layer-wise repair vs "
                  "the full re-plan, predicted rounds (median over the repeats) and the "
                  "choices; calibrated = predicted on the cluster as the failed generation "
                  "measured it (`solver.calibrate.calibrate_costs`: forward/backward "
                  "ratios per timing group and stage, and a per-message overhead fitted to "
                  "the measured round):", "",
                  "| mode | layer-wise (ms) | full (ms) | chosen | (forward, backward) ratios "
                  "per group and stage | message overhead (ms) | failed plan: measured / "
                  "predicted / calibrated round (ms) |", "|---|---|---|---|---|---|---|"]
        for mode in [m for m in modes if m != "restart"]:
            evs = [r["event"] for r in runs[mode]]
            chosen = ", ".join(f"{name} {sum(e['chosen'] == name for e in evs)}/{len(evs)}"
                               for name in ("layerwise", "full")
                               if any(e["chosen"] == name for e in evs))
            cals = [e["calibration"] for e in evs if "calibration" in e]
            ratio = ("-" if not cals else ", ".join(
                f"{g} stage {st} "
                f"{statistics.median(c['ratios'][g][st][0] for c in cals):.2f}/"
                f"{statistics.median(c['ratios'][g][st][1] for c in cals):.2f}"
                for g in cals[0]["ratios"] for st in cals[0]["ratios"][g]
                if all(st in c["ratios"].get(g, {}) for c in cals)))
            rounds = ("-" if not cals else " / ".join(
                _ms([c[k] for c in cals]) for k in ("measured_round_s", "predicted_round_s",
                                                    "calibrated_round_s")))
            lines.append(
                f"| {labels[mode]} | {_ms(_known(evs, 'layerwise_round_s'))} | "
                f"{_ms(_known(evs, 'full_round_s'))} | {chosen} | "
                f"{ratio} | "
                f"{_fmt([c['message_overhead_ms'] for c in cals], digits=2)} | {rounds} |")
        speedups = [b["total_s"] / a["total_s"] for a, b in zip(replay, restart, strict=True)]
        replay_t = statistics.median(e["total_s"] for e in replay)
        restart_t = statistics.median(e["total_s"] for e in restart)
        lines += [
            "",
            f"Replay is {restart_t / replay_t:.1f}x faster than restart (median total "
            f"{replay_t:.3f} s vs {restart_t:.3f} s; per repeat {min(speedups):.1f}x-"
            f"{max(speedups):.1f}x).",
            "",
            "Where replay's `restore_s` goes (median over the repeats, seconds): "
            + ", ".join(f"{name} {statistics.median(float(v) for v in vals):.3f}"
                        for name, vals in _restore_parts(replay).items()) + ".",
            "",
            f"Fresh full re-plan on the survivors (`solver.api.plan`, planner asteroid, on "
            f"the declared cluster), trained from the start without failures, once per "
            f"repeat between the recovery runs: {data['fresh_stages']}, step period "
            f"{_ms(data['fresh_period'])} ms as a plain run, {_ms(data['fresh_ft'])} ms with "
            f"the same replica machinery as the recovered runs. Throughput after recovery "
            f"as a share of it (same machinery; median of the periods, and in brackets the "
            f"range over the repeats, each against the fresh run of its own repeat):",
            "",
            "| mode | step period after (ms) | throughput vs the fresh re-plan |",
            "|---|---|---|",
        ]
        fresh = data["fresh_ft"]
        for mode in modes:
            after = [r["period_after"] for r in runs[mode]]
            per = [f / a for f, a in zip(fresh, after, strict=False) if a > 0]
            lines.append(f"| {labels[mode]} | {_ms(after)} | "
                         f"{statistics.median(fresh) / statistics.median(after):.0%} "
                         f"({min(per):.0%}-{max(per):.0%}) |")
    steady = data["steady"]
    plain = steady["plain"]
    lines += [
        "",
        f"Steady state without failures (step period = median spacing of consecutive "
        f"steps 2..{data['steady_steps'] - 1} as seen by the launcher, robust to the odd stall "
        f"from other jobs; median (min-max) over the repeats, "
        f"the variants run interleaved; the ratio column gives median over median and, in "
        f"brackets, the range of the per-repeat ratios):",
        "",
        "| variant | step period (ms) | vs plain |",
        "|---|---|---|",
    ]
    labels = {"plain": "plain `run` (no fault tolerance)",
              "no-replicas": "replay machinery, checkpoints every 10 steps, no replicas",
              "replicas": "replay machinery, checkpoints every 10 steps + replicas every step"}
    whats = {"no-replicas": "off", "replicas": "every step"}
    for name in steady:
        if name == "replicas-auto":
            ks = "/".join(str(k) for k in data.get("auto_k", [])) or "?"
            labels[name] = (f"the same with `--replicate-every auto` (chose every {ks} "
                            f"steps)")
            whats[name] = f"auto (every {ks} steps)"
        elif name.startswith("replicas-"):
            k = name.split("-")[1]
            labels[name] = f"the same with replicas every {k} steps"
            whats[name] = f"every {k} steps"
    for name, values in steady.items():
        lines.append(f"| {labels[name]} | {_ms(values)} | {_ratio(values, plain)} |")
    for name, what in whats.items():
        if data["stats"].get(name):
            lines += ["", f"Replication work with replicas {what} (the workers' own counters, "
                      f"per training step, median over the repeats; the background threads' "
                      f"wall time overlaps with training, but their CPU time, which includes "
                      f"gloo's I/O threads, counts against a CPU-capped device's budget: "
                      f"compare the last column with replicas off):", ""]
            lines += _stats_table(data["stats"][name])
    return "\n".join(lines)


def _known(events: list[dict[str, Any]], name: str) -> list[float]:
    """The events' ``name`` values that are set (a search that failed records None)."""
    return [float(e[name]) for e in events if e.get(name) is not None]


def _restore_parts(events: list[dict[str, Any]]) -> dict[str, list[float]]:
    parts: dict[str, list[float]] = {"hand-over and leaving the round (stop_s)": [],
                                     "state manifests (load_s)": []}
    for ev in events:
        parts["hand-over and leaving the round (stop_s)"].append(ev["stop_s"])
        parts["state manifests (load_s)"].append(ev["load_s"])
        for name, value in ev.get("start_parts_s", {}).items():
            parts.setdefault(f"start: {name}", []).append(value)
    return parts


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
