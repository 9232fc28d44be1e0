"""Benchmark PAC fine-tuning against full fine-tuning and the single-process reference, one run.

Usage::

    PYTHONPATH=. python tools/bench_finetune.py [--model examples/gpt_small.py]
        [--cluster examples/clusters/local3.yaml] [--batch-size 16] [--samples 64]
        [--epochs 3] [--out runs/bench-finetune] [--json runs/bench-finetune.json]
        [--cache auto|local] [--cache-slack X] [--cache-dtype bfloat16]
        [--cache-store auto|memory|disk]

Everything is measured in this one invocation on the emulated cluster (same host, same
load): PAC (``asteroid-fx finetune --method pac``), full fine-tuning of the same model for
the same number of steps (``--method full``), and the single-process reference of the same
adapter model. It prints each measured figure next to its baseline or target:

* loss: largest relative difference of PAC's per-step losses from the reference;
* epochs 2+ vs epoch 1: epoch 1 time / mean time of the later epochs;
* peak memory per device: PAC's peak tensor bytes (with and without its activation cache;
  a cache on disk, ``--cache-store disk``, holds none of its rows in memory) against full
  fine-tuning's on the same device;
* end to end: full fine-tuning's summed step times / PAC's, for all epochs;
* prediction: measured phase-1 time and phase-2 step (the whole step of epochs 2+, and
  its compute part) of the run against the plan's prediction times the emulator's
  slow-down factor; per device, the CPU seconds of phase 1's forwards against the cost
  table and of a phase-2 step (besides its all-reduce) against the measured step fit, both
  at host speed (CPU is stretched neither by the emulator's caps nor by other jobs).

The host's load (``os.getloadavg``) is printed before and after: on a shared host the
measured times stretch with it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any


def _sem(values: list[float]) -> float:
    """The standard error of the mean of ``values`` (0 for fewer than two)."""
    if len(values) < 2:
        return 0.0
    return statistics.stdev(values) / len(values) ** 0.5


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def _full(spec: Any, module: Any, inputs: Any, costs: Any, cluster: Any, cluster_path: str,
          batch: int, steps: int, out: Path, seed: int, lr: float, samples: int) -> Any:
    from asteroid_fx.package import save_partition
    from asteroid_fx.partition import partition
    from runtime.launch import run
    from solver.api import plan

    full_plan = plan(costs, cluster, batch, optimizer_state_factor=costs.optimizer_state_factor)
    stages = partition(module, inputs, full_plan)
    save_partition(out, full_plan, stages, model_spec=spec, onnx=False, example_inputs=inputs,
                   costs=costs, cluster=cluster)
    return full_plan, run(out, emulate=cluster_path, steps=steps, seed=seed, lr=lr,
                          metrics=out / "metrics.jsonl", num_samples=samples)


def _phase1_forward(plan: Any, costs: Any, cluster: Any, records: list[dict[str, Any]],
                   factor: float) -> dict[str, dict[str, float]]:
    """Per phase-1 device: its segments' forward seconds over epoch 1, measured (metrics
    ``phase1_forward_s``) and predicted (the cost table at its share of each micro-batch,
    over its speed, times the emulator's factor), the seconds it spent making samples, and
    its forward CPU seconds (``phase1_forward_cpu_s``) against the table at host speed."""
    from solver.pac import segment_costs
    from solver.timing import Timing

    coarse = segment_costs(costs, plan.model.taps, plan.model.segment_cold_s)
    timing = Timing.of(coarse, cluster.for_costs(coarse))
    out = {}
    p1 = plan.phase1
    for stage in p1.stages:
        for device, share in zip(stage.devices, stage.shares, strict=True):
            predicted = p1.num_micro_batches * timing.fwd_time(device, stage.first, stage.last,
                                                               share)
            host = p1.num_micro_batches * timing.fwd_time(device, stage.first, stage.last,
                                                          share) * timing.speeds[device]
            out[device] = {
                "measured_s": sum(float(r.get("phase1_forward_s", {}).get(device, 0.0))
                                  for r in records),
                "cpu_s": sum(float(r.get("phase1_forward_cpu_s", {}).get(device, 0.0))
                             for r in records),
                "predicted_host_s": host * plan.steps_per_epoch,
                "samples_s": sum(float(r.get("phase1_samples_s", {}).get(device, 0.0))
                                 for r in records),
                "predicted_s": predicted * plan.steps_per_epoch * factor}
    return out


def _phase2_cpu(plan: Any, records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per device: its mean CPU seconds per phase-2 step besides the all-reduce (metrics
    ``phase2_cpu_s``, epochs 2+) and the measured step fit (``PacModel.step_fit``) at its
    share, at host speed (neither stretched by the emulator's caps nor by other jobs)."""
    intercept, per_sample = plan.model.step_fit
    out = {}
    for device, share in zip(plan.devices, plan.shares, strict=True):
        seen = [float(r["phase2_cpu_s"][device]) for r in records
                if device in r.get("phase2_cpu_s", {})]
        if seen:
            out[device] = {"cpu_s": statistics.mean(seen),
                           "fit_s": intercept + per_sample * share}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from asteroid_fx.cost_source import resolve_costs
    from asteroid_fx.finetune import prepare_finetune, reference_finetune, run_finetune
    from asteroid_fx.model_spec import load_model_spec
    from contracts.cluster import Cluster

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="examples/gpt_small.py")
    parser.add_argument("--cluster", default="examples/clusters/local3.yaml")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--costs", default=None, help="costs.json, measure or analytic")
    parser.add_argument("--out", default="runs/bench-finetune")
    parser.add_argument("--json", default=None)
    parser.add_argument("--phase1-planner", default="asteroid")
    parser.add_argument("--phase1-objective", default="memory", choices=("memory", "time"))
    parser.add_argument("--phase1-slack", type=float, default=None)
    parser.add_argument("--cache", default="auto", choices=("auto", "local"))
    parser.add_argument("--cache-slack", type=float, default=0.0)
    parser.add_argument("--cache-dtype", default=None, choices=("float32", "bfloat16",
                                                                 "float16"))
    parser.add_argument("--cache-store", default="auto", choices=("auto", "memory", "disk"))
    args = parser.parse_args(argv)

    print(f"before: {_load()}")
    out = Path(args.out)
    spec = load_model_spec(args.model)
    cluster = Cluster.from_yaml(args.cluster)
    module = spec.build_model()
    inputs, _ = spec.example_inputs(2)
    costs = resolve_costs(spec, module, inputs, cluster, args.costs,
                          batch_size=args.batch_size).table

    plan = prepare_finetune(spec, cluster, costs, out / "pac", batch_size=args.batch_size,
                            epochs=args.epochs, num_samples=args.samples, rank=args.rank,
                            seed=args.seed, phase1_planner=args.phase1_planner,
                            phase1_objective=args.phase1_objective,
                            cache=args.cache, cache_slack=args.cache_slack,
                            cache_dtype=args.cache_dtype, cache_store=args.cache_store,
                            **({} if args.phase1_slack is None else
                               {"phase1_slack": args.phase1_slack}))
    choice: dict[str, Any] = dict(plan.meta.get("phase1_choice", {}))
    if choice:
        print(f"phase-1 choice: {choice['reason']}")
    print(f"cache: {plan.meta.get('cache_choice', {}).get('reason', plan.cache)}")
    print(f"cache store: {plan.cache_store}")
    pac = run_finetune(out / "pac", args.cluster, seed=args.seed, lr=args.lr,
                       metrics=out / "pac.jsonl")
    reference = reference_finetune(spec, batch_size=args.batch_size, epochs=args.epochs,
                                   num_samples=args.samples, rank=args.rank, seed=args.seed,
                                   lr=args.lr, cache_dtype=args.cache_dtype)
    steps = plan.steps_per_epoch
    torch_module = spec.build_model()
    full_plan, full = _full(spec, torch_module, inputs, costs, cluster, args.cluster,
                            args.batch_size, args.epochs * steps, out / "full", args.seed,
                            args.lr, plan.num_samples)

    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(pac.losses, reference, strict=True))
    epochs = pac.epoch_times(steps)
    later = statistics.mean(epochs[1:]) if len(epochs) > 1 else float("nan")
    pac_total = sum(float(r["round_time_s"]) for r in pac.records)
    full_total = sum(full.round_times)
    f = pac.slowdown_factor
    pred = plan.predicted
    assert pred is not None
    measured_p1 = sum(float(r["phase1_s"]) for r in pac.records[:steps])
    # a phase-2 step is the whole step (fetch, compute, all-reduce, optimizer step), as
    # predicted; ``phase2_s`` is its compute part on the slowest device
    measured_p2 = statistics.mean(
        [float(r["round_time_s"]) for r in pac.records[steps:]] or [float("nan")])
    measured_p2_compute = statistics.mean(
        [float(r["phase2_s"]) for r in pac.records[steps:]] or [float("nan")])
    forward = _phase1_forward(plan, costs, cluster, pac.records[:steps], f)
    phase2_cpu = _phase2_cpu(plan, pac.records[steps:])
    from solver.pac_simulate import simulate_finetune
    simulated = simulate_finetune(plan, costs, cluster)
    memory = {}
    for device, peak in pac.peak_memory_bytes.items():
        full_peak = full.peak_memory_bytes.get(device)
        # measured over the run with the entries held at each moment (a sharded cache
        # parks rows on other devices in phase 1); older runs: peak + final cache
        with_cache = pac.peak_with_cache_bytes.get(device,
                                                   peak + pac.cache_bytes.get(device, 0))
        memory[device] = {"pac": peak, "pac_with_cache": with_cache, "full": full_peak,
                          "cache": pac.cache_bytes.get(device, 0),
                          "predicted_with_cache": pred.peak_memory_bytes.get(device),
                          "reduction": None if not full_peak else 1 - peak / full_peak,
                          "reduction_with_cache": None if not full_peak else
                          1 - with_cache / full_peak}
    report = {
        "model": args.model, "cluster": args.cluster, "batch_size": args.batch_size,
        "samples": args.samples, "epochs": args.epochs, "slowdown_factor": f,
        "shaping": pac.shaping,
        "phase1_plan": [[s.first, s.last, list(s.devices), list(s.shares)]
                        for s in plan.phase1.stages],
        "phase2_shares": dict(zip(plan.devices, plan.shares, strict=True)),
        "full_plan": [[s.first, s.last, list(s.devices), list(s.shares)]
                      for s in full_plan.stages],
        "loss_max_rel_diff": loss_rel, "epoch_times_s": epochs,
        "epoch1_over_later": epochs[0] / later, "pac_total_s": pac_total,
        "full_total_s": full_total, "full_over_pac": full_total / pac_total,
        "phase1_measured_s": measured_p1, "phase1_predicted_s": pred.phase1_step_s * steps * f,
        "phase1_simulated_s": simulated.phase1_step_s * steps * f,
        "phase2_step_measured_s": measured_p2,
        "phase2_step_times_s": [float(r["round_time_s"]) for r in pac.records[steps:]],
        "phase2_step_predicted_s": pred.phase2_step_s * f,
        "phase2_compute_measured_s": measured_p2_compute,
        "phase2_compute_predicted_s": (pred.phase2_step_s - pred.allreduce_s) * f,
        "phase2_allreduce_predicted_s": pred.allreduce_s * f,
        "phase2_allreduce_measured_s": dict(pac.allreduce_s),
        "memory": memory, "load_after": os.getloadavg(), "phase1_forward": forward,
        "phase2_cpu": phase2_cpu,
        "phase1_choice": choice, "cache": plan.cache, "cache_store": plan.cache_store,
        "cache_phase1": dict(plan.cache_phase1), "cache_phase2": dict(plan.cache_phase2),
        "cache_choice": dict(plan.meta.get("cache_choice", {})),
    }
    print(f"PAC phase 1 {report['phase1_plan']}, phase 2 shares {report['phase2_shares']}; "
          f"full {report['full_plan']}; slow-down factor {f:.2f}, shaping {pac.shaping}")
    print(f"loss vs single-process reference: max relative diff {loss_rel:.2e} "
          f"(target <= 1e-4)")
    print("epochs (s): " + ", ".join(f"{t:.3f}" for t in epochs)
          + f"; epoch 1 / later epochs = {report['epoch1_over_later']:.2f}x (target >= 5x)")
    print(f"{args.epochs} epochs: full {full_total:.3f} s vs PAC {pac_total:.3f} s = "
          f"{report['full_over_pac']:.2f}x (target >= 3x)")
    for device, m in memory.items():
        red = "n/a" if m["reduction"] is None else f"{m['reduction']:.0%}"
        red_c = "n/a" if m["reduction_with_cache"] is None else f"{m['reduction_with_cache']:.0%}"
        full_mib = "-" if not m["full"] else f"{m['full'] / 2**20:.1f}"
        print(f"  {device}: peak PAC {m['pac'] / 2**20:.1f} MiB (with the cache "
              f"{m['pac_with_cache'] / 2**20:.1f}, predicted "
              f"{(m['predicted_with_cache'] or 0) / 2**20:.1f}; cached at the end "
              f"{'on disk ' if plan.on_disk(device) else ''}"
              f"{m['cache'] / 2**20:.1f}) vs full {full_mib} MiB: "
              f"{red} lower ({red_c} with the cache; target >= 60%)")
    for name, got, want in (("phase 1 (epoch 1)", measured_p1, report["phase1_predicted_s"]),
                            ("phase 1 (epoch 1) vs simulated", measured_p1,
                             report["phase1_simulated_s"]),
                            ("phase-2 step", measured_p2, report["phase2_step_predicted_s"]),
                            # measured: forward and backward; the prediction also
                            # counts the entry's assembly, the gradients' packing and
                            # the optimizer step (``PacModel.step_fit``)
                            ("  its compute (slowest device, no all-reduce)",
                             measured_p2_compute, report["phase2_compute_predicted_s"])):
        print(f"{name}: measured {got:.4f} s, predicted {want:.4f} s "
              f"({got / want - 1:+.0%}; target within 15%)")
    steps_p2 = sorted(float(r["round_time_s"]) for r in pac.records[steps:])
    if steps_p2:
        print(f"  its spread over {len(steps_p2)} steps: min {steps_p2[0] * 1e3:.1f}, median "
              f"{statistics.median(steps_p2) * 1e3:.1f}, max {steps_p2[-1] * 1e3:.1f} ms "
              f"(the mean's standard error {_sem(steps_p2) / measured_p2:.0%} of it)")
    if pac.allreduce_s:
        waits = sorted(pac.allreduce_s.items(), key=lambda kv: kv[1])
        print(f"  its all-reduce: measured {waits[0][1] * 1e3:.2f} ms on {waits[0][0]} (the "
              f"last to arrive: the collective alone) vs predicted "
              f"{report['phase2_allreduce_predicted_s'] * 1e3:.2f} ms; with the wait for the "
              f"others " + ", ".join(f"{d} {t * 1e3:.2f}" for d, t in waits[1:]) + " ms")
    for device, row in forward.items():
        print(f"  phase 1 on {device}: forward measured {row['measured_s']:.4f} s vs predicted "
              f"{row['predicted_s']:.4f} s ({row['measured_s'] / row['predicted_s'] - 1:+.0%}), "
              f"making samples {row['samples_s']:.4f} s, whole phase 1 {measured_p1:.4f} s; "
              f"forward CPU {row['cpu_s']:.4f} s vs the cost table at host speed "
              f"{row['predicted_host_s']:.4f} s "
              f"({row['cpu_s'] / row['predicted_host_s'] - 1:+.0%})")
    for device, row in phase2_cpu.items():
        print(f"  phase 2 on {device}: CPU per step {row['cpu_s'] * 1e3:.2f} ms vs the step "
              f"fit at host speed {row['fit_s'] * 1e3:.2f} ms "
              f"({row['cpu_s'] / row['fit_s'] - 1:+.0%})")
    print(f"after: {_load()}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
