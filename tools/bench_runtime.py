"""Benchmark the runtime on emulated heterogeneous clusters against simple baselines.

For each cluster (speeds 1.0/0.5/0.5 and 1.0/0.6/0.4/0.4) and bandwidth (100 / 1000 Mbps)
it trains a small MLP for a few steps with:

* the Asteroid plan (``solver.api.plan`` when present, else ``solver.dp.asteroid_dp``),
* DDP-style data parallelism with equal shares (``solver.baselines.dp_only``),
* the best single device (``solver.baselines.single_device``),
* ``torch.distributed.pipelining`` (Schedule1F1B) with an equal one-device-per-stage split,
  CPU-shaped by the same cgroup quotas (its sends are not bandwidth-paced: see the notes),

all through the emulator of ``runtime/`` (one process per device, cgroup CPU quotas, paced
links), and compares measured round times with the plans' predicted round times.

Usage::

    python tools/bench_runtime.py --steps 6 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
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

from contracts.cluster import Cluster  # noqa: E402
from contracts.plan import Plan  # noqa: E402
from runtime.emulator import RESERVED_CORES, free_port, usable_cores  # noqa: E402
from runtime.launch import RunResult, run  # noqa: E402
from runtime.shaping import cgroup_available, make_cgroups, remove_cgroups  # noqa: E402
from solver.evaluate import evaluate  # noqa: E402

MODEL = mlp_source(1024, 16, 256, 10)

CLUSTERS = {"3dev-1.0/0.5/0.5": [1.0, 0.5, 0.5], "4dev-1.0/0.6/0.4/0.4": [1.0, 0.6, 0.4, 0.4]}


def cluster_yaml(speeds: list[float], mbps: float) -> str:
    lines = ["devices:"]
    lines += [f"  - {{name: d{i}, type: local, speed: {s}, memory_gb: 2}}"
              for i, s in enumerate(speeds)]
    lines += ["network:", f"  bandwidth_mbps: {mbps}"]
    return "\n".join(lines) + "\n"


@dataclass
class Row:
    cluster: str
    mbps: float
    system: str
    plan: str
    measured_s: float | None
    predicted_s: float | None
    throughput: float | None
    note: str = ""
    batch: int = 0
    factor: float = 1.0   # the emulator's common slow-down: emulated time = measured / factor

    @property
    def emulated_throughput(self) -> float | None:
        """Samples/s on the emulated time axis (comparable across clusters and plans)."""
        return None if self.throughput is None else self.throughput * self.factor


def _plan_shape(plan: Plan) -> str:
    parts = []
    for stage in plan.stages:
        parts.append(f"L{stage.first}-{stage.last}:" + "+".join(
            f"{d}({s})" for d, s in zip(stage.devices, stage.shares, strict=True)))
    return f"M={plan.num_micro_batches} " + "; ".join(parts)


def asteroid_plan(costs: Any, cluster: Cluster, batch: int,
                  micro_batch_sizes: tuple[int, ...] | None = None) -> tuple[Plan, str]:
    try:
        from solver.api import plan as api_plan
    except ImportError:
        from solver.dp import asteroid_dp

        result = asteroid_dp(costs, cluster, batch, micro_batch_sizes=micro_batch_sizes)
        if result.plan is None:
            raise SystemExit("the Asteroid DP found no plan that fits") from None
        return result.plan, "solver.dp.asteroid_dp (solver.api absent)"
    return (api_plan(costs, cluster, batch, micro_batch_sizes=micro_batch_sizes),
            "solver.api.plan")


def run_plan(model_file: Path, plan: Plan, costs: Any, cluster: Cluster, cluster_file: Path,
             work: Path, steps: int) -> tuple[RunResult, float, float]:
    """Partition ``plan``, train it emulated, return (result, predicted_s, factor)."""
    from asteroid_fx.package import save_partition
    from asteroid_fx.partition import partition

    namespace: dict[str, Any] = {}
    exec(compile(model_file.read_text(), str(model_file), "exec"), namespace)
    model = namespace["build_model"]()
    inputs, _ = namespace["sample_batch"](4)
    prediction = evaluate(plan, costs, cluster)
    plan = plan.with_prediction(prediction)
    directory = Path(tempfile.mkdtemp(dir=work))
    save_partition(directory, plan, partition(model, inputs, plan), model_spec=str(model_file),
                   onnx=False)
    sub = cluster.subset(plan.devices)
    sub_file = directory / "cluster.yaml"
    sub_file.write_text(_cluster_to_yaml(sub))
    result = run(directory, emulate=sub_file, steps=steps)
    return result, prediction.round_time_s * result.slowdown_factor, result.slowdown_factor


def _stage_note(result: RunResult) -> str:
    """Per-stage compute, measured / predicted, in ms per micro-batch (F+B)."""
    parts = []
    for st in result.stages:
        measured = (st.measured_f + st.measured_b) * 1e3
        predicted = ("?" if st.predicted_f is None or st.predicted_b is None
                     else f"{(st.predicted_f + st.predicted_b) * 1e3:.1f}")
        parts.append(f"s{st.stage} {measured:.1f}/{predicted}")
    return "F+B ms/micro-batch meas/pred: " + ", ".join(parts)


def _cluster_to_yaml(cluster: Cluster) -> str:
    import yaml

    return str(yaml.safe_dump(cluster.to_dict()))


# -- torch.distributed.pipelining baseline ----------------------------------------------------
def _pipe_worker(rank: int, world: int, port: int, model_text: str, batch: int, micro: int,
                 steps: int, cgroup: str | None, out: Any) -> None:
    try:
        if cgroup is not None:
            Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))
        torch.set_num_threads(1)
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        store = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                              timeout=timedelta(seconds=120))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
        namespace: dict[str, Any] = {}
        exec(compile(model_text, "bench_model", "exec"), namespace)
        torch.manual_seed(0)
        model = namespace["build_model"]()
        layers = list(model)
        per = -(-len(layers) // world)
        mine = torch.nn.Sequential(*layers[rank * per:(rank + 1) * per])
        stage = PipelineStage(mine, rank, world, torch.device("cpu"))
        loss_fn = torch.nn.functional.cross_entropy
        schedule = Schedule1F1B(stage, n_microbatches=batch // micro, loss_fn=loss_fn)
        opt = torch.optim.SGD(mine.parameters(), lr=0.01)
        times = []
        for k in range(steps):
            torch.manual_seed(1 + k)
            x, y = namespace["sample_batch"](batch)
            dist.barrier()
            start = time.perf_counter()
            opt.zero_grad()
            if rank == 0:
                schedule.step(x[0])
            elif rank == world - 1:
                schedule.step(target=y)
            else:
                schedule.step()
            opt.step()
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times.append(float(elapsed))
        out.put((rank, times))
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001
        out.put((rank, f"{type(exc).__name__}: {exc}"))


def run_pipelining(speeds: list[float], batch: int, micro: int, steps: int,
                   host_cores: float) -> tuple[float | None, str]:
    world = len(speeds)
    factor = max(1.0, sum(speeds) / host_cores)
    cgroups = make_cgroups([s / factor for s in speeds]) if cgroup_available() else None
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=True,
                          wait_for_workers=False)
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    procs = [ctx.Process(target=_pipe_worker, daemon=True,
                         args=(r, world, port, MODEL, batch, micro, steps,
                               None if cgroups is None else cgroups[r], out))
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        while len(results) < world:
            rank, payload = out.get(timeout=600)
            results[rank] = payload
            if isinstance(payload, str):
                break
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
        if cgroups is not None:
            remove_cgroups(cgroups)
        del store
    bad = [v for v in results.values() if isinstance(v, str)]
    if bad:
        return None, bad[0][:120]
    times = results[0][1:] if steps > 1 else results[0]
    return statistics.median(times), ""


# -- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-sizes", default="32,256",
                        help="mini-batch sizes, comma-separated (each a separate setting)")
    parser.add_argument("--bandwidths", default="100,1000")
    parser.add_argument("--micro-batch", type=int, default=8,
                        help="also run the Asteroid plan restricted to this micro-batch size "
                             "(0: no)")
    parser.add_argument("--clusters", default=",".join(CLUSTERS))
    parser.add_argument("--out", type=Path, default=None, help="markdown file to update")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--skip-pipelining", action="store_true")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs per system; the fastest median is kept (shared hosts)")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="re-render the rows of an earlier --json dump, run nothing")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        loaded = [Row(**r) for r in json.loads(args.from_json.read_text())]
        text = render(loaded, args, len(os.sched_getaffinity(0)), usable_cores())
        print(text)
        if args.out is not None:
            update_section(args.out, text)
        return 0
    torch.set_num_threads(1)
    from asteroid_fx.costs import profile

    batches = [int(b) for b in args.batch_sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench_runtime_"))
    model_file = work / "model.py"
    model_file.write_text(MODEL)
    namespace: dict[str, Any] = {}
    exec(compile(MODEL, str(model_file), "exec"), namespace)
    started = time.perf_counter()
    sizes = sorted({1, 8, 32, *batches, *(b // 4 for b in batches if b >= 4)})
    costs = profile(namespace["build_model"](), namespace["sample_batch"],
                    batch_sizes=tuple(sizes), repeats=5)
    print(f"profiled at batch sizes {sizes} in {time.perf_counter() - started:.1f} s",
          flush=True)
    rows: list[Row] = []
    host_cores = len(os.sched_getaffinity(0))
    cores = usable_cores()
    for batch in batches:
        for name in args.clusters.split(","):
            for mbps in (float(b) for b in args.bandwidths.split(",")):
                rows += _setting(args, batch, name, mbps, costs, model_file, work, cores)
    if args.json is not None:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    text = render(rows, args, host_cores, cores)
    print(text)
    if args.out is not None:
        update_section(args.out, text)
    return 0


def _setting(args: Any, batch: int, name: str, mbps: float, costs: Any, model_file: Path,
             work: Path, cores: float) -> list[Row]:
    """Every system on one (batch, cluster, bandwidth) setting."""
    from solver.baselines import dp_only, single_device

    speeds = CLUSTERS[name]
    cluster_file = work / f"{name.split('-')[0]}-{int(mbps)}.yaml"
    cluster_file.write_text(cluster_yaml(speeds, mbps))
    cluster = Cluster.from_yaml(cluster_file)
    plans: list[tuple[str, Plan, str]] = []
    ast, how = asteroid_plan(costs, cluster, batch)
    plans.append(("asteroid", ast, how))
    if args.micro_batch and args.micro_batch != ast.micro_batch_size:
        forced, how = asteroid_plan(costs, cluster, batch, (args.micro_batch,))
        plans.append((f"asteroid, micro-batch {args.micro_batch}", forced, how))
    plans.append(("dp-equal (DDP-style)", dp_only(costs, cluster, batch),
                  "solver.baselines.dp_only"))
    plans.append(("best single device", single_device(costs, cluster, batch),
                  "solver.baselines.single_device"))
    rows: list[Row] = []
    for system, plan, how in plans:
        try:
            runs = [run_plan(model_file, plan, costs, cluster, cluster_file, work, args.steps)
                    for _ in range(args.repeat)]
            result, predicted, factor = min(runs, key=lambda r: r[0].measured_round_time_s)
            row = Row(name, mbps, system, _plan_shape(plan), result.measured_round_time_s,
                      predicted, result.throughput_samples_s,
                      f"{how}; shaping {result.shaping}, factor {factor:.2f}; "
                      f"{_stage_note(result)}", batch, factor)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            row = Row(name, mbps, system, _plan_shape(plan), None, None, None,
                      f"failed: {type(exc).__name__}: {str(exc)[:100]}", batch)
        rows.append(row)
        print(json.dumps(row.__dict__), flush=True)
    if not args.skip_pipelining:
        chunks = len(speeds) * 2
        while batch % chunks:
            chunks += 1
        micro = batch // chunks
        tries = [run_pipelining(speeds, batch, micro, args.steps, cores)
                 for _ in range(args.repeat)]
        good = [t for t in tries if t[0] is not None]
        measured, err = min(good) if good else tries[0]
        rows.append(Row(name, mbps, "torch pipelining 1F1B (equal split)",
                        f"M={batch // micro} equal layers, 1 device/stage", measured, None,
                        None if measured is None else batch / measured,
                        err or "CPU quota shaped; sends NOT bandwidth-paced", batch,
                        max(1.0, sum(speeds) / cores)))
        print(json.dumps(rows[-1].__dict__), flush=True)
    return rows


def render(rows: list[Row], args: Any, host_cores: int, cores: float) -> str:
    lines = ["## Runtime", "",
             f"Command: `python tools/bench_runtime.py --steps {args.steps} --batch-sizes "
             f"{args.batch_sizes} --bandwidths {args.bandwidths} "
             f"--micro-batch {args.micro_batch} --repeat {args.repeat}`  ",
             f"Host: {host_cores} cores (shared with other jobs), torch {torch.__version__}. "
             "Model: MLP 256-1024x16-10 (33 layers, 16 M parameters). "
             f"{args.steps} steps per run (median round time of steps 1..; best of "
             f"{args.repeat} runs). "
             "Every system runs in the emulator of `runtime/` (one process per device, "
             f"cgroup CPU quota = speed / f of one core, where the common factor f = "
             f"max(1, sum of speeds / {cores:g} usable cores: the host's minus "
             f"{RESERVED_CORES:g} reserved for the launcher and communication threads); "
             "links paced at the given bandwidth / f), except torch pipelining, which gets "
             "the same CPU quotas but unpaced links. Predicted = `solver.evaluate` on a cost "
             "table profiled on this host (`method=\"chain\"`, optimizer step included), "
             "times f. Throughputs and speed-ups are on the emulated time axis (measured "
             "samples/s times f), so that plans emulated with different f compare.", "",
             "| B | cluster | Mbps | system | plan | measured round (s) | predicted (s) | "
             "meas/pred | f | samples/s (emulated time) | speed-up vs single | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        single = next((r.emulated_throughput for r in rows if r.cluster == row.cluster
                       and r.mbps == row.mbps and r.batch == row.batch
                       and r.system == "best single device"), None)
        ratio = (f"{row.measured_s / row.predicted_s:.2f}"
                 if row.measured_s and row.predicted_s else "-")
        tput = row.emulated_throughput
        speed = f"{tput / single:.2f}x" if tput and single else "-"
        lines.append(
            f"| {row.batch} | {row.cluster} | {row.mbps:.0f} | {row.system} | {row.plan} | "
            f"{'-' if row.measured_s is None else f'{row.measured_s:.4f}'} | "
            f"{'-' if row.predicted_s is None else f'{row.predicted_s:.4f}'} | {ratio} | "
            f"{row.factor:.2f} | {'-' if tput is None else f'{tput:.1f}'} | {speed} | "
            f"{row.note} |")
    lines += ["", *summary_lines(rows), "", *reading_lines(rows)]
    return "\n".join(lines) + "\n"


def summary_lines(rows: list[Row]) -> list[str]:
    """Speed-ups of the Asteroid plan against each baseline, per setting."""
    out = ["Asteroid (planner's choice) throughput relative to each baseline, same run:", ""]
    keys = sorted({(r.batch, r.cluster, r.mbps) for r in rows})
    for batch, cluster, mbps in keys:
        group = {r.system: r for r in rows
                 if r.batch == batch and r.cluster == cluster and r.mbps == mbps}
        ast = group.get("asteroid")
        if ast is None or not ast.emulated_throughput:
            continue
        mine = ast.emulated_throughput or 0.0
        parts = [f"{name}: {mine / other:.2f}x" for name, r in group.items()
                 if name != "asteroid" and (other := r.emulated_throughput)]
        out.append(f"- B={batch}, {cluster} @ {mbps:.0f} Mbps: " + ", ".join(parts))
    return out


def _ratios(rows: list[Row], prefix: str) -> list[float]:
    return [r.measured_s / r.predicted_s for r in rows
            if r.system.startswith(prefix) and r.measured_s and r.predicted_s]


def _ratio_range(rows: list[Row], prefix: str) -> str:
    ratios = _ratios(rows, prefix)
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "n/a"


def _within(rows: list[Row], prefix: str, tolerance: float = 0.15) -> str:
    ratios = _ratios(rows, prefix)
    inside = sum(1 for r in ratios if abs(r - 1.0) <= tolerance)
    return f"{inside} of {len(ratios)}"


def _vs_pipelining(rows: list[Row]) -> str:
    out = []
    for r in rows:
        if r.system != "asteroid" or not r.throughput:
            continue
        base = next((p for p in rows if p.system.startswith("torch pipelining")
                     and p.batch == r.batch and p.cluster == r.cluster and p.mbps == r.mbps
                     and p.throughput), None)
        mine, theirs = r.emulated_throughput, None if base is None else base.emulated_throughput
        if mine and theirs:
            out.append(mine / theirs)
    return f"{min(out):.2f}-{max(out):.2f}x" if out else "n/a"


def reading_lines(rows: list[Row]) -> list[str]:
    """How to read the table (figures computed from the rows above)."""
    pipelined = [r for r in rows if r.system == "asteroid" and not r.plan.startswith("M=1 ")]
    return [
        "Reading the table:",
        "",
        f"- Planner's choice ('asteroid'): measured/predicted {_ratio_range(rows, 'asteroid')}"
        f" over the forced micro-batch rows included; 'asteroid' rows alone "
        f"{_ratio_range([r for r in rows if r.system == 'asteroid'], 'asteroid')}, "
        f"{_within([r for r in rows if r.system == 'asteroid'], 'asteroid')} within 15 %. "
        f"{len(pipelined)} of them are multi-stage pipelines (the planner pipelines this "
        "parameter-heavy MLP only at the larger batch and 1000 Mbps, where each "
        "micro-batch is big enough to amortise streaming a stage's weights).",
        f"- Forced micro-batch rows: {_ratio_range(rows, 'asteroid, micro')} "
        f"({_within(rows, 'asteroid, micro')} within 15 %); DDP-style "
        f"{_ratio_range(rows, 'dp-equal')}; best single device "
        f"{_ratio_range(rows, 'best single')}.",
        f"- Against torch.distributed.pipelining with an equal one-device-per-stage split "
        f"(same CPU quotas, unpaced links): Asteroid {_vs_pipelining(rows)} its throughput.",
        "- What makes measurement and prediction meet (docs/latency-model.md, 'Measured vs "
        "predicted'): the profiler times layers in sequence as training runs them "
        "(method='chain', weights streamed from memory rather than cache-hot), the optimizer "
        "step is part of T_a, workers and profiler use the same allocator settings "
        "(contracts/allocator.py), and the emulator keeps half a core of the host free.",
        "- The host is 2 shared cores: single runs vary by about +-10-30 %; each figure is "
        "the best of the repeated runs.",
    ]


BEGIN, END = "<!-- runtime-benchmark:begin -->", "<!-- runtime-benchmark:end -->"


def update_section(path: Path, section: str) -> None:
    """Replace (or append) this tool's marked section of ``path``, leaving others intact."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{section.rstrip()}\n{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        legacy = text.find("\n## Runtime")
        if legacy >= 0:   # an unmarked section written by an older version of this tool
            end = text.find("\n## ", legacy + 1)
            text = text[:legacy] + (text[end:] if end >= 0 else "\n")
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
