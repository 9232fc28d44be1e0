"""``asteroid-fx run``: train a partition directory emulated on this host or under torchrun."""

from __future__ import annotations

import inspect
import json
import logging
import os
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
import torch.distributed as dist

from contracts.allocator import tune_allocator
from contracts.arguments import check_path, is_int
from contracts.errors import RuntimeFailure
from contracts.plan import Plan
from runtime import protocol as proto
from runtime.staged_output import staged_output
from runtime.train import (
    DirectorySource,
    StageSource,
    TrainConfig,
    WorkerResult,
    check_lr,
    train_device,
)
from runtime.trust import Gatekeeper, find_token, join_job, resolve_token

if TYPE_CHECKING:   # the device path (training without recovery) never loads it
    from runtime.replanning import Replanner

__all__ = ["StageTiming", "RunResult", "run", "run_source", "summarize", "metrics_lines",
           "summary_record"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageTiming:
    """Measured vs predicted per-micro-batch compute of one stage (slowest device), seconds.
    Predictions are already multiplied by the emulation's slow-down factor."""

    stage: int
    devices: tuple[str, ...]
    measured_f: float
    measured_b: float
    predicted_f: float | None
    predicted_b: float | None
    #: CPU time of the slowest device's computing thread per forward / backward (0: none)
    cpu_f: float = 0.0
    cpu_b: float = 0.0


@dataclass
class RunResult:
    """Outcome of ``asteroid-fx run``."""

    losses: list[float]
    round_times: list[float]
    plan_version: int
    batch_size: int
    mode: str                                  # "emulate" or "torchrun"
    slowdown_factor: float = 1.0
    shaping: str = "none"
    predicted_round_time_s: float | None = None   # x slowdown_factor
    stages: list[StageTiming] = field(default_factory=list)
    workers: list[WorkerResult] = field(default_factory=list)
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    #: exit codes of the device processes that ended by themselves (0: a device that left,
    #: or one that finished training; a process that had to be killed is not listed)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    #: per device (bytes; runtime/memory.py [Note: measured memory]): the peak of its
    #: tensors, what the process reserved for them (None where not measurable), the
    #: tensor-level count by kind, and the plan's prediction
    peak_memory_bytes: dict[str, int | None] = field(default_factory=dict)
    peak_reserved_bytes: dict[str, int | None] = field(default_factory=dict)
    tensor_memory: dict[str, dict[str, int]] = field(default_factory=dict)
    predicted_peak_memory_bytes: dict[str, int] = field(default_factory=dict)
    reserved_method: str = "none"

    @property
    def measured_round_time_s(self) -> float:
        """Median round time, leaving out the first (warm-up) step when there are more."""
        times = self.round_times[1:] if len(self.round_times) > 1 else self.round_times
        return statistics.median(times) if times else 0.0

    @property
    def throughput_samples_s(self) -> float:
        t = self.measured_round_time_s
        return self.batch_size / t if t > 0 else 0.0

    def summary(self) -> str:
        lines = [f"trained {len(self.losses)} step(s) ({self.mode}, shaping: {self.shaping}, "
                 f"slow-down factor {self.slowdown_factor:.2f})"]
        if self.losses:
            lines.append(f"loss {self.losses[0]:.6f} -> {self.losses[-1]:.6f}")
        line = (f"round time {self.measured_round_time_s:.4f} s (median), "
                f"{self.throughput_samples_s:.1f} samples/s")
        if self.predicted_round_time_s is not None:
            line += f"; predicted {self.predicted_round_time_s:.4f} s"
            if self.mode == "emulate":
                plan_s = self.predicted_round_time_s / self.slowdown_factor
                line += (f" (emulated: the plan's {plan_s:.4f} s x slow-down factor "
                         f"{self.slowdown_factor:.2f})")
        lines.append(line)
        for st in self.stages:
            pred = ("" if st.predicted_f is None or st.predicted_b is None else
                    f" (predicted F {st.predicted_f * 1e3:.2f} ms, "
                    f"B {st.predicted_b * 1e3:.2f} ms)")
            cpu = ("" if st.cpu_f <= 0.0 else
                   f"; CPU F {st.cpu_f * 1e3:.2f} ms, B {st.cpu_b * 1e3:.2f} ms")
            lines.append(f"  stage {st.stage} {list(st.devices)}: F {st.measured_f * 1e3:.2f} ms, "
                         f"B {st.measured_b * 1e3:.2f} ms per micro-batch{pred}{cpu}")
        lines += self._memory_lines()
        for ev in self.recoveries:
            lost = "left" if ev.get("reason") == "leave" else "lost"
            lines.append(f"recovery ({ev.get('mode')}, from {ev.get('source')}): {lost} "
                         f"{ev.get('failed')}, detect {ev['detect_s']:.3f} s, re-plan "
                         f"{ev['replan_s']:.3f} s, restore {ev['restore_s']:.3f} s, total "
                         f"{ev['total_s']:.3f} s, lost steps {ev['lost_steps']}, now plan "
                         f"v{ev.get('plan_version')}")
        return "\n".join(lines)


    def _memory_lines(self) -> list[str]:
        if not self.peak_memory_bytes:
            return []
        how = {"rss": "resident high-water", "rss-sampled": "resident, sampled",
               "cuda": "CUDA reserved", "none": "not measured"}
        lines = [f"peak memory per device (tensors; reserved: "
                 f"{how.get(self.reserved_method, self.reserved_method)}; predicted: plan.json)"]
        width = max(len(d) for d in self.peak_memory_bytes)
        for device, measured in self.peak_memory_bytes.items():
            line = (f"  {device:<{width}}  tensors {_mib(measured)}, reserved "
                    f"{_mib(self.peak_reserved_bytes.get(device))}")
            predicted = self.predicted_peak_memory_bytes.get(device)
            if predicted is not None:
                line += f"; predicted {_mib(predicted)}"
                if measured:
                    line += f" ({predicted / measured:.2f}x)"
            lines.append(line)
        return lines


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def summarize(plan: Plan, workers: Sequence[WorkerResult], *, mode: str, factor: float = 1.0,
              shaping: str = "none") -> RunResult:
    """Fold per-rank results into a :class:`RunResult` (predictions scaled by ``factor``)."""
    first = min(workers, key=lambda w: w.rank)
    stages = []
    for index, stage in enumerate(plan.stages):
        mine = [w for w in workers if w.stage == index]
        pred = plan.predicted.stages[index] if plan.predicted is not None else None
        stages.append(StageTiming(
            stage=index, devices=stage.devices,
            measured_f=max((w.forward_s for w in mine), default=0.0),
            measured_b=max((w.backward_s for w in mine), default=0.0),
            predicted_f=None if pred is None else pred.compute_f * factor,
            predicted_b=None if pred is None else pred.compute_b * factor,
            cpu_f=max((w.forward_cpu_s for w in mine), default=0.0),
            cpu_b=max((w.backward_cpu_s for w in mine), default=0.0)))
    predicted = None if plan.predicted is None else plan.predicted.expected_round_time_s * factor
    ordered = sorted(workers, key=lambda w: w.rank)
    methods = {w.reserved_method for w in ordered}
    return RunResult(losses=list(first.losses), round_times=list(first.round_times),
                     plan_version=plan.plan_version, batch_size=plan.batch_size, mode=mode,
                     slowdown_factor=factor, shaping=shaping, predicted_round_time_s=predicted,
                     stages=stages, workers=list(workers),
                     peak_memory_bytes={w.device: w.peak_memory_bytes for w in ordered},
                     peak_reserved_bytes={w.device: w.peak_reserved_bytes for w in ordered},
                     tensor_memory={w.device: dict(w.tensor_memory) for w in ordered
                                    if w.tensor_memory},
                     predicted_peak_memory_bytes=({} if plan.predicted is None else
                                                  dict(plan.predicted.peak_memory_bytes)),
                     reserved_method=methods.pop() if len(methods) == 1 else "mixed")


def summary_record(plan: Plan, result: RunResult) -> dict[str, Any]:
    """The ``{"event": "summary"}`` line that ends a run's metrics.jsonl: what every device
    measured per micro-batch (mean after the first step, as the run measured it, i.e.
    times ``slowdown_factor`` under emulation) and the plan it ran. ``asteroid-fx
    calibrate`` reads it."""
    devices: dict[str, Any] = {}
    for w in sorted(result.workers, key=lambda w: w.rank):
        stage = plan.stages[w.stage]
        devices[w.device] = {"stage": w.stage,
                             "share": stage.shares[stage.devices.index(w.device)],
                             "forward_s": w.forward_s, "backward_s": w.backward_s,
                             "forward_cpu_s": w.forward_cpu_s,
                             "backward_cpu_s": w.backward_cpu_s,
                             "allreduce_s": w.allreduce_s,
                             "peak_memory_bytes": result.peak_memory_bytes.get(w.device),
                             "peak_reserved_bytes": result.peak_reserved_bytes.get(w.device),
                             "predicted_peak_memory_bytes":
                                 result.predicted_peak_memory_bytes.get(w.device)}
    return {"event": "summary", "plan_version": plan.plan_version,
            "plan_hash": plan_fingerprint(plan), "mode": result.mode,
            "steps": len(result.losses), "slowdown_factor": result.slowdown_factor,
            "shaping": result.shaping,
            "round_time_s": result.measured_round_time_s,
            "predicted_round_time_s": (None if plan.predicted is None
                                       else plan.predicted.expected_round_time_s),
            "devices": devices}


def plan_fingerprint(plan: Plan) -> str:
    """A short hash of what a run's measurements depend on: stages, devices, shares, batch."""
    import hashlib

    layout = [[st.first, st.last, list(st.devices), list(st.shares)] for st in plan.stages]
    text = json.dumps([plan.model_hash, plan.batch_size, plan.micro_batch_size, layout])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_summary(metrics: str | Path | None, plan: Plan, result: RunResult) -> None:
    if metrics is None or int(os.environ.get("RANK", "0")) != 0:
        return
    with Path(metrics).open("a") as fh:
        fh.write(json.dumps(summary_record(plan, result)) + "\n")


def _under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


# [Note: ending a torchrun worker]
# A process that torchrun started ends without the interpreter's teardown. After a run has
# destroyed its process group and written its metrics, a normal exit still destroys
# torch.distributed objects from Python's finalisation, in no particular order, and now
# and then one of them takes a thread that is still running with it: the process aborts
# ("terminate called without an active exception", SIGABRT) after its work is done, and
# torchrun reports the job as failed. Seen 2 times in about 22 local runs of
# tests/test_device.py's torchrun test, once in tools/check_device_env.py and once in a CI
# rehearsal (2026-12-04), on ranks 0 and 1 alike. The emulator's workers end the same way
# for the same reason (runtime.worker ``_exit_handed_over``).


def end_process(code: int) -> NoReturn:
    """Leave the process with ``code``: under torchrun (``RANK``, ``WORLD_SIZE`` and
    ``MASTER_ADDR`` set) through ``os._exit`` after flushing the log and the standard
    streams, without the interpreter's teardown ([Note: ending a torchrun worker]); else
    ``sys.exit(code)``. Called by the command-line entry points once their command is done;
    never from library code."""
    if not _under_torchrun():
        sys.exit(code)
    from runtime.worker import exit_without_teardown

    exit_without_teardown(code)


def check_run_arguments(*, steps: object, seed: object, lr: object, progress: object,
                        token: object, num_samples: object) -> None:
    """``RuntimeFailure`` naming the argument of ``run`` that is of the wrong type or out
    of range, before any process starts (``steps="2"`` was a TypeError, ``seed="x"`` a
    worker's failure that named no argument, ``progress=5`` failed after the processes had
    started, ``num_samples=-1`` was taken)."""
    for value, what, least in ((steps, "steps", 1), (seed, "seed", 0),
                               (num_samples, "num_samples", 0)):
        if not is_int(value) or value < least:
            raise RuntimeFailure(f"{what} must be an integer >= {least}, got {value!r}")
    check_lr(lr)
    if progress is not None and not callable(progress):
        raise RuntimeFailure(f"progress must be a callable taking each step's record, or "
                             f"None, got {progress!r}")
    if token is not None and not isinstance(token, str):
        raise RuntimeFailure(f"token must be a string (the job's shared secret), got "
                             f"{type(token).__name__}")


def check_metrics_path(metrics: str | Path | None, directory: Path, emulate: Any) -> None:
    """``OutputError`` where ``metrics`` names an input of the run: a file of the partition
    ``directory`` other than a ``.jsonl`` (``--metrics DIR/plan.json`` ruined the package
    for the next run) or the ``emulate`` cluster file."""
    if metrics is None:
        return
    from contracts.errors import OutputError

    target = Path(metrics).resolve()
    inputs = [p for p in Path(directory).iterdir() if p.is_file() and p.suffix != ".jsonl"]
    if isinstance(emulate, (str, os.PathLike)):
        inputs.append(Path(emulate))
    for item in inputs:
        if item.resolve() == target:
            raise OutputError(f"--metrics {str(metrics)!r} is {str(item)!r}, an input of this "
                              f"run; give a new .jsonl file, e.g. "
                              f"{str(Path(directory) / 'metrics.jsonl')!r}")


def run_source(source: StageSource, *, emulate: Any = None, steps: int = 10, seed: int = 0,
               lr: float = 0.01, metrics: str | Path | None = None,
               progress: Callable[[Mapping[str, Any]], None] | None = None,
               timeout_s: float = 120.0, return_state: bool = False,
               host_cores: float | None = None, token: str | None = None,
               num_samples: int = 0) -> RunResult:
    """:func:`run` for any :class:`~runtime.train.StageSource` (tests, benchmarks).

    ``token``: the job's shared secret (see [Note: trust boundary] in runtime.trust); under
    torchrun it is required, emulated device processes get a fresh one when None."""
    check_run_arguments(steps=steps, seed=seed, lr=lr, progress=progress, token=token,
                        num_samples=num_samples)
    config = TrainConfig(steps=steps, seed=seed, lr=lr, timeout_s=timeout_s,
                         metrics=None if metrics is None else str(metrics),
                         return_state=return_state, num_samples=num_samples)
    plan = source.load_plan()
    if emulate is not None:
        from runtime.emulator import emulate as emulate_fn
        from runtime.emulator import emulated_cluster

        emulate = emulated_cluster(emulate)
        if plan.cluster_hash and plan.cluster_hash != emulate.cluster_hash:
            log.warning("the plan was made for another cluster (hash %s) than the one "
                        "emulated (%s): its predicted round is not this cluster's; re-plan "
                        "with this cluster to compare", plan.cluster_hash,
                        emulate.cluster_hash)

        result = emulate_fn(source, emulate, config, progress=progress,
                            timeout_s=max(60.0, timeout_s * (steps + 2)),
                            host_cores=host_cores, token=token)
        factor = result.setup.factor if result.setup is not None else 1.0
        out = summarize(plan, result.workers, mode="emulate", factor=factor,
                        shaping=result.shaping)
    elif not _under_torchrun():
        raise RuntimeFailure("nothing to run on: pass --emulate cluster.yaml to emulate the "
                             "cluster on this host, or start one process per device with "
                             "torchrun (RANK/WORLD_SIZE/MASTER_ADDR unset)")
    else:
        out = _run_torchrun(source, plan, config, progress,
                            token or resolve_token(None, getattr(source, "directory", None)))
    _write_summary(metrics, plan, out)
    return out


def _run_torchrun(source: StageSource, plan: Plan, config: TrainConfig,
                  progress: Callable[[Mapping[str, Any]], None] | None,
                  token: str) -> RunResult:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != len(plan.devices):
        raise RuntimeFailure(f"torchrun started {world} processes but the plan has "
                             f"{len(plan.devices)} devices {list(plan.devices)}; use "
                             f"--nproc-per-node/--nnodes so that WORLD_SIZE matches")
    cuda = torch.cuda.is_available()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    backend = "nccl" if cuda and dist.is_nccl_available() else "gloo"
    tune_allocator()
    store = _join_torchrun(token, rank, world, config.timeout_s)
    bound: dict[str, Any] = {}
    if backend == "nccl" and "device_id" in inspect.signature(dist.init_process_group).parameters:
        bound["device_id"] = device   # torch >= 2.3: NCCL need not guess it from the rank
    dist.init_process_group(backend, store=dist.PrefixStore(proto.Keys(0).process_group(), store),
                            rank=rank, world_size=world,
                            timeout=timedelta(seconds=config.timeout_s), **bound)
    log.info("rank %d runs device %s (stage %d) on %s with %s", rank, plan.devices[rank],
             plan.stage_of(plan.devices[rank]), device, backend)
    try:
        mine = train_device(source, rank, config, device=device, report=progress)
        gathered = _gather_results(_strip(mine), world,
                                   device if backend == "nccl" else torch.device("cpu"))
        dist.barrier()   # nobody tears its sockets down while a peer still reads
    finally:
        dist.destroy_process_group()
    return summarize(plan, gathered, mode="torchrun")


def _join_torchrun(token: str, rank: int, world: int, timeout_s: float) -> dist.Store:
    """The job's store under torchrun: a client of the rendezvous store (hosted by
    torchrun's agent, or by rank 0 with a plain ``env://`` launch) on which rank 0 admits
    every other rank that proves ``token`` (see [Note: trust boundary] in runtime.trust).

    Raises:
        AuthenticationError: a rank with another token (on both sides), or a rank that does
            not join within ``timeout_s``.
    """
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    raw = dist.TCPStore(host, port, world, is_master=rank == 0 and not agent,
                        timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    where = f"rank 0 at {host}:{port}"
    if rank != 0:
        return join_job(raw, token, rank, timeout_s=timeout_s, where=where)
    gate = Gatekeeper(raw, token, where=where)
    try:
        gate.wait_for(set(range(1, world)), timeout_s)
    finally:
        gate.stop()
    return gate.job_store


def _gather_results(mine: WorkerResult, world: int, device: torch.device
                    ) -> list[WorkerResult]:
    """Every rank's result on every rank, as ``runtime.protocol.encode_result`` bytes
    gathered in byte tensors (no pickled objects cross the process group)."""
    data = torch.frombuffer(bytearray(proto.encode_result(mine)), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, size)
    lengths = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data.to(device)
    chunks = [torch.zeros(max(lengths), dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(chunks, padded)
    return [proto.decode_result(bytes(chunk[:n].cpu().numpy()), f"the result of rank {r}")
            for r, (chunk, n) in enumerate(zip(chunks, lengths))]


def _strip(result: WorkerResult) -> WorkerResult:
    return WorkerResult(rank=result.rank, device=result.device, stage=result.stage,
                        losses=result.losses, round_times=result.round_times,
                        forward_s=result.forward_s, backward_s=result.backward_s,
                        forward_cpu_s=result.forward_cpu_s,
                        backward_cpu_s=result.backward_cpu_s,
                        allreduce_s=result.allreduce_s,
                        peak_memory_bytes=result.peak_memory_bytes,
                        peak_reserved_bytes=result.peak_reserved_bytes,
                        reserved_method=result.reserved_method,
                        tensor_memory=result.tensor_memory)


def run(directory: str | Path, *, emulate: str | Path | None = None, steps: int = 10,
        seed: int = 0, lr: float = 0.01, metrics: str | Path | None = None,
        progress: Callable[[Mapping[str, Any]], None] | None = None,
        fail: str | Mapping[str, int] | None = None, recovery: str = "replay",
        leave: str | Mapping[str, int] | None = None, token: str | None = None,
        replanner: Replanner | str | None = None, num_samples: int = 0,
        **recovery_options: Any) -> RunResult:
    """Train the partition in ``directory`` for ``steps`` mini-batches.

    The package is checked first (``runtime.package_check``: plan, stage files and model
    agree), and every device process proves the job's shared ``token`` before it joins:
    ``token``, else ``$ASTEROID_TOKEN``, else ``DIR/token`` (under torchrun one of them is
    required; an emulation without any uses a fresh one). See [Note: trust boundary] in
    runtime.trust.

    With ``emulate=cluster.yaml`` one process per device runs on this host, speed and
    bandwidth shaped; under torchrun (RANK/WORLD_SIZE/MASTER_ADDR set) this process runs
    device ``plan.devices[RANK]``. ``metrics`` receives one JSON line per step.

    Transparency: for models without batch-statistics layers the per-step losses and final
    weights equal single-process training on the same seeded batches (up to float rounding;
    see ``runtime.reference``). With BatchNorm in train mode each device normalises over its
    own shard of each micro-batch, as DDP without SyncBatchNorm does, so results differ.

    ``fail="DEVICE@STEP"`` (emulation only) SIGKILLs that device's process during step STEP
    and recovers by ``recovery`` ("replay" or "restart", see ``runtime.recovery``);
    ``leave="DEVICE@STEP"`` (emulation, replay) sends it SIGTERM instead: it finishes the
    step, hands its state over and leaves, and training goes on without it, nothing
    replayed. ``recovery_options`` go to :func:`runtime.recovery.run_with_recovery`.
    ``num_samples`` > 0: mini-batch ``k`` is the fine-tuning samples ``(k mod N//B)*B ...``
    of ``runtime.samples`` (``dataset()`` or per-index seeds; what ``asteroid-fx finetune
    --method full`` trains on, the same samples in the same order as PAC).
    Recovery needs a ``replanner`` (a :class:`~runtime.replanning.Replanner` or its dotted
    name; ``afx.run`` and ``asteroid-fx run`` pass the front end's): the runtime never
    plans (see [Note: re-planner plugin point] in runtime.replanning).
    """
    path = check_path(directory, RuntimeFailure, "directory")
    if not (path / "plan.json").is_file() and (path / "pac_plan.json").is_file():
        # (runtime.pac_train's PAC_PLAN_FILE and BACKBONE_DIR, not imported here)
        raise RuntimeFailure(f"{str(path)!r} is a fine-tuning directory (pac_plan.json), not "
                             f"a partition: it runs with `asteroid-fx finetune MODEL --method "
                             f"pac ... --emulate CLUSTER`; its backbone alone is the "
                             f"partition {str(path / 'backbone')!r}")
    if not (path / "plan.json").is_file():
        raise RuntimeFailure(f"{str(path)!r} is not a partition directory (no plan.json); "
                             f"create it with `asteroid-fx partition MODEL --cluster C "
                             f"--batch-size N --out {path}`")
    from runtime.package_check import check_package

    check_package(path)
    check_run_arguments(steps=steps, seed=seed, lr=lr, progress=progress, token=token,
                        num_samples=num_samples)
    check_metrics_path(metrics, path, emulate)
    token = find_token(token, path)     # required under torchrun: run_source says so
    if num_samples and (fail is not None or leave is not None):
        raise RuntimeFailure("fine-tuning samples (num_samples) are not taken by runs with "
                             "--fail/--leave yet; drop one of them")
    if recovery_options and fail is None and leave is None:
        flags = ", ".join("--" + name.replace("_", "-") for name in sorted(recovery_options))
        raise RuntimeFailure(f"{flags} (API: {', '.join(sorted(recovery_options))}) apply to "
                             f"a run with --fail DEVICE@STEP or --leave DEVICE@STEP (API: "
                             f"fail= / leave=); add one, or drop them")
    with staged_output(metrics) as staged:     # a failed run keeps the metrics one had
        if fail is not None or leave is not None:
            return _run_recovering(path, emulate, steps, seed, lr, staged, progress, fail,
                                   recovery, {**recovery_options, "token": token,
                                              "replanner": replanner}, leave)
        return run_source(DirectorySource(str(path)), emulate=emulate, steps=steps, seed=seed,
                          lr=lr, metrics=staged, progress=progress, token=token,
                          num_samples=num_samples)


def _run_recovering(path: Path, emulate: str | Path | None, steps: int, seed: int, lr: float,
                    metrics: str | Path | None,
                    progress: Callable[[Mapping[str, Any]], None] | None,
                    fail: str | Mapping[str, int] | None, recovery: str,
                    options: Mapping[str, Any],
                    leave: str | Mapping[str, int] | None = None) -> RunResult:
    from runtime.recovery import RECOVERY_MODES, run_with_recovery

    if recovery not in RECOVERY_MODES:
        raise RuntimeFailure(f"--recovery {recovery!r}: choose one of {list(RECOVERY_MODES)}")
    if emulate is None:
        flag = "--fail" if fail is not None else "--leave"
        raise RuntimeFailure(f"{flag} needs --emulate cluster.yaml: under torchrun a failed "
                             f"or leaving process is not replaced by asteroid-fx (no elastic "
                             f"agent yet)")
    if steps < 1:
        raise RuntimeFailure(f"steps must be >= 1, got {steps}")
    options = dict(options)
    timeout_s = float(options.pop("timeout_s", 120.0))
    config = TrainConfig(steps=steps, seed=seed, lr=lr, timeout_s=timeout_s,
                         metrics=None if metrics is None else str(metrics))
    out = run_with_recovery(path, emulate, config, fail=fail, recovery=recovery, leave=leave,
                            progress=progress, **options)
    if out.plan is None:
        raise RuntimeFailure("training with recovery ended without a plan; see the log for "
                             "the failure that stopped it")
    result = summarize(out.plan, out.workers, mode="emulate", factor=out.factor,
                       shaping=out.shaping)
    ordered = [out.records[k] for k in sorted(out.records)]
    result.losses = [float(r["loss"]) for r in ordered]
    result.round_times = [float(r["round_time_s"]) for r in ordered]
    result.recoveries = list(out.events)
    result.exit_codes = dict(out.exit_codes)
    return result


def metrics_lines(path: str | Path) -> list[dict[str, Any]]:
    """Read a metrics.jsonl file (one JSON object per line)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
