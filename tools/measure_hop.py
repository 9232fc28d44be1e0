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

The baseline is a raw gloo ping-pong (blocking ``dist.send``/``dist.recv`` of a buffer of
one message's bytes; one-way time = round trip / 2) between two processes shaped like the
pipeline's two devices (the same cgroup CPU caps when the emulator uses them), measured in
the same run before, between and after the pipeline runs (median), so that the ratio
runtime / raw compares runs on this noisy shared host.

Under cgroup shaping each run's line also gives, per device, how many of its quota periods
over the measured steps (5 and later) were throttled (its quota ran out) and for how long.

With ``--cpu`` it measures instead the CPU time (``time.process_time()``: every thread,
user and system) that the device processes spend per round, uncapped and unpaced, so

    CPU per message = (pipeline CPU slope of both ranks - single-device CPU slope) / 2

next to the CPU that both processes of the raw ping-pong spend per one-way message. On a
loaded host this depends far less on the load than the wall-clock figure, and a device
capped at speed s pays it at 1/s.

Usage::

    python tools/measure_hop.py --cluster examples/clusters/local3.yaml --first fast \\
        --second slow1 --steps 40
    python tools/measure_hop.py --cpu --steps 60
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
PING_PONGS = 400        # round trips per ping-pong batch
PING_BATCHES = 5        # batches per measurement (the median is kept)


def _ping_pong_worker(rank: int, port: int, cgroup: str | None, nbytes: int,
                      results: Any) -> None:
    if cgroup is not None:
        Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0,
                          timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    buffer = torch.zeros(nbytes, dtype=torch.uint8)
    one_way, cpu = [], []
    for _ in range(PING_BATCHES):
        dist.barrier()
        start, used = time.perf_counter(), time.process_time()
        for _ in range(PING_PONGS):
            if rank == 0:
                dist.send(buffer, 1)
                dist.recv(buffer, 1)
            else:
                dist.recv(buffer, 0)
                dist.send(buffer, 0)
        one_way.append((time.perf_counter() - start) / PING_PONGS / 2)
        cpu.append((time.process_time() - used) / PING_PONGS / 2)
    results.put((rank, statistics.median(one_way), statistics.median(cpu)))
    dist.barrier()
    dist.destroy_process_group()


def _collect(procs: Sequence[Any], results: Any, timeout_s: float) -> list[Any]:
    """Start ``procs``, take one report from each off ``results`` and join them; a process
    still alive at the end (a failure or a timeout) is killed."""
    try:
        for proc in procs:
            proc.start()
        reports = [results.get(timeout=timeout_s) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        return reports
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()


def gloo_ping_pong(nbytes: int, speeds: Sequence[float]) -> tuple[float, float]:
    """One-way seconds of a raw gloo ping-pong of ``nbytes`` between two processes, each
    held to its speed by a cgroup when the emulator would use one (median of batches),
    and the CPU seconds both processes spend per one-way message."""
    from runtime.shaping import cgroup_available, make_cgroup, remove_cgroups

    cgroups: list[Path] = []
    if cgroup_available() and any(s < 1.0 for s in speeds):
        for rank, speed in enumerate(speeds):
            path = Path("/sys/fs/cgroup/cpu") / f"asteroid-fx-{os.getpid()}-{rank}"
            make_cgroup(path, speed)
            cgroups.append(path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_ping_pong_worker,
                         args=(r, port, str(cgroups[r]) if cgroups else None, nbytes, results))
             for r in range(2)]
    try:
        reports = _collect(procs, results, timeout_s=300)
    finally:
        remove_cgroups([str(path) for path in cgroups])
    wall = next(w for r, w, _ in reports if r == 0)
    return float(wall), float(sum(c for _, _, c in reports))


class _Throttling:
    """Progress hook of a capped run: the ``cpu.stat`` counters of this launcher's device
    groups (``runtime.shaping.make_cgroups`` names them ``asteroid-fx-<launcher pid>-<rank>``)
    when the first step after the warm-up is reported and at the last step reported, so
    that the run's quota periods and throttled periods over the measured steps are printed
    next to its round time."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.first: dict[int, dict[str, int]] = {}
        self.last: dict[int, dict[str, int]] = {}

    def __call__(self, record: Mapping[str, Any]) -> None:
        from runtime.shaping import CGROUP_ROOT, cpu_stat

        step = record.get("step")
        if not isinstance(step, int) or step < self.warmup:
            return
        snapshot: dict[int, dict[str, int]] = {}
        for path in CGROUP_ROOT.glob(f"asteroid-fx-{os.getpid()}-*"):
            try:
                snapshot[int(path.name.rsplit("-", 1)[1])] = cpu_stat(path)
            except (OSError, ValueError):    # the group went away at the end of the run
                continue
        if not self.first:
            self.first = snapshot
        self.last = snapshot

    def describe(self, devices: Sequence[str]) -> str:
        """``device: throttled N of P periods (T ms)`` per capped rank, or "" without groups."""
        parts = []
        for rank, end in sorted(self.last.items()):
            start = self.first.get(rank, {})
            delta = {k: end.get(k, 0) - start.get(k, 0)
                     for k in ("nr_periods", "nr_throttled", "throttled_time")}
            name = devices[rank] if rank < len(devices) else f"rank {rank}"
            parts.append(f"{name} throttled {delta['nr_throttled']} of {delta['nr_periods']} "
                         f"periods ({delta['throttled_time'] / 1e6:.1f} ms)")
        return "; ".join(parts)


class _RoundCpu:
    """Train hooks that record the CPU time of this process during each round."""

    def __init__(self) -> None:
        self.rounds: list[float] = []
        self._start = 0.0

    def restore(self, module: Any, optimizer: Any, stage_index: int) -> None:
        return None

    def round_started(self, step: int) -> None:
        self._start = time.process_time()

    def step_done(self, step: int, module: Any, optimizer: Any) -> None:
        self.rounds.append(time.process_time() - self._start)

    def step_committed(self, step: int, record: dict[str, Any],
                       compute_s: tuple[float, float] | None = None) -> None:
        return None

    def leave_requested(self) -> bool:
        return False

    def generation_ends(self, step: int, module: Any, optimizer: Any,
                        leaving: bool) -> None:
        return None


def _cpu_worker(rank: int, world: int, port: int, directory: str, steps: int,
                results: Any) -> None:
    from runtime.train import DirectorySource, TrainConfig, train_device

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0,
                          timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    hooks = _RoundCpu()
    train_device(DirectorySource(directory), rank, TrainConfig(steps=steps, timeout_s=60),
                 hooks=hooks)
    results.put((rank, statistics.median(hooks.rounds[5:])))
    dist.barrier()
    dist.destroy_process_group()


def round_cpu(directory: Path, world: int, steps: int) -> float:
    """Median CPU seconds per round, summed over the ranks of the partition in
    ``directory`` (one uncapped process per device, no link pacing)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_cpu_worker,
                         args=(r, world, port, str(directory), steps, results))
             for r in range(world)]
    return sum(float(report[1]) for report in _collect(procs, results, timeout_s=600))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", type=Path, default=ROOT / "examples" / "clusters" /
                        "local3.yaml")
    parser.add_argument("--first", default="fast", help="device of stage 0 (and the "
                        "single-device runs)")
    parser.add_argument("--second", default="slow1", help="device of stage 1")
    parser.add_argument("--steps", type=int, default=40, help="steps per run (the first "
                        "5 are left out)")
    parser.add_argument("--cpu", action="store_true", help="measure CPU time per message "
                        "(uncapped processes) instead of wall-clock time")
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
    from runtime.emulator import emulation_setup

    rounds: dict[str, dict[int, float]] = {"single": {}, "pipeline": {}}
    raw: list[float] = []
    raw_cpu: list[float] = []
    what = "CPU" if args.cpu else "round"
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
        # one message: the activations of one sample at the cut, padded, plus the stamp
        cut = costs.cut_bytes[n // 2 - 1]
        nbytes = -(-int(cut) // 8) * 8 + 8
        for m in MICRO_BATCHES:
            for name, stages in layouts.items():
                plan = Plan(costs.model_hash, cluster.cluster_hash, m, 1, m, stages,
                            num_layers=n, model_name="hop")
                if name == "pipeline":
                    speeds = emulation_setup(plan, cluster).effective_speeds
                    wall, cpu = gloo_ping_pong(nbytes, (1.0, 1.0) if args.cpu else speeds)
                    raw.append(wall)
                    raw_cpu.append(cpu)
                    print(f"raw gloo ping-pong ({nbytes} bytes) {wall * 1e3:.3f} ms one-way, "
                          f"CPU {cpu * 1e3:.3f} ms per message", flush=True)
                plan = replace(plan, predicted=evaluate(plan, costs, cluster))
                out = work / f"{name}{m}"
                save_partition(out, plan, partition(module.build_model(), inputs, plan),
                               model_spec=str(model_file), onnx=False, costs=costs)
                if args.cpu:
                    rounds[name][m] = round_cpu(out, len(stages), args.steps)
                    print(f"M={m:2d} {name:8s} CPU per round (all ranks) "
                          f"{rounds[name][m] * 1e3:7.3f} ms", flush=True)
                    continue
                throttling = _Throttling(warmup=5)
                result = run(out, emulate=args.cluster, steps=args.steps, seed=0, lr=0.01,
                             progress=throttling)
                rounds[name][m] = (statistics.median(result.round_times[5:])
                                   / result.slowdown_factor)
                caps = throttling.describe(plan.devices)
                print(f"M={m:2d} {name:8s} round {rounds[name][m] * 1e3:7.3f} ms "
                      f"(emulated time / slow-down factor {result.slowdown_factor:.2f})"
                      + (f"; steps 5+: {caps}" if caps else ""), flush=True)
    lo, hi = MICRO_BATCHES[0], MICRO_BATCHES[-1]
    slope = {name: (r[hi] - r[lo]) / (hi - lo) for name, r in rounds.items()}
    per_message = (slope["pipeline"] - slope["single"]) / 2
    wall, cpu = gloo_ping_pong(nbytes, (1.0, 1.0) if args.cpu else speeds)
    raw.append(wall)
    raw_cpu.append(cpu)
    samples = raw_cpu if args.cpu else raw
    baseline = statistics.median(samples)
    print(f"per micro-batch {what}: single {slope['single'] * 1e3:.3f} ms, pipeline "
          f"{slope['pipeline'] * 1e3:.3f} ms -> {per_message * 1e3:.3f} ms per message "
          f"({args.first} -> {args.second} on {args.cluster.name})")
    kind = "CPU per message" if args.cpu else "one-way"
    print(f"per hop ({what}): runtime {per_message * 1e3:.3f} ms, raw gloo ping-pong "
          f"{baseline * 1e3:.3f} ms {kind} (median of {len(samples)}: "
          f"{', '.join(f'{r * 1e3:.3f}' for r in samples)}), ratio "
          f"{per_message / baseline:.2f}; load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
