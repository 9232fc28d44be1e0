"""Launcher side of fault tolerance: inject failures, detect, re-plan, restore, resume."""

from __future__ import annotations

import logging
import re
import shutil
import signal
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from contracts.arguments import is_int
from contracts.cluster import Cluster
from contracts.errors import AsteroidError, PlanError, RuntimeFailure
from contracts.plan import Plan
from contracts.table import CostTable
from runtime import protocol as proto
from runtime.checkpoint import (
    StageState,
    latest_checkpoint,
    load_checkpoint,
    merge_states,
    slice_state,
    state_from_bytes,
    state_to_bytes,
)
from runtime.heartbeat import Blame, process_state
from runtime.replanning import Calibration, Replanner, load_replanner
from runtime.replication import WorkerSpec, announce_failure, external_holders
from runtime.shaping import choose_shaping, remove_cgroups
from runtime.supervisor import FailureJudge, Supervisor
from runtime.train import DirectorySource, StageSource, TrainConfig, WorkerResult, model_state

__all__ = ["RECOVERY_MODES", "LEAVE_ROUND_S", "REPLAY_CHECKPOINT_EVERY", "REPLAN_TOLERANCE",
           "parse_fail", "parse_leave", "parse_replicate_every", "resume_point", "RecoveryRun",
           "run_with_recovery"]

log = logging.getLogger(__name__)

RECOVERY_MODES = ("replay", "restart")
#: seconds a survivor may take to leave the failed round before it is restarted instead
LEAVE_ROUND_S = 1.5
#: default of ``replan_tolerance``: replay keeps the layer-wise repair when its predicted
#: round is at most this much slower than a full re-plan's
REPLAN_TOLERANCE = 0.10
#: default disk-checkpoint period in replay mode (only the double-failure fallback);
#: restart mode checkpoints every step
REPLAY_CHECKPOINT_EVERY = 10
#: seconds the launcher waits for a survivor to answer a request for part of its state
REQUEST_TIMEOUT_S = 10.0
#: seconds the launcher waits after a leave for rank 0's record of the leaver's last step
LEAVE_RECORD_S = 5.0

# [Note: who imports what]
# Worker processes import only runtime/ (train, executor, comm, heartbeat, checkpoint,
# replication) and contracts (plain data). This module runs in the *launcher* process and
# imports nothing more: after a failure it asks the re-planner it was handed
# (runtime.replanning.Replanner; the front end's is asteroid_fx.replanning.Replanner) for
# the survivors' plan and for the next generation's stage modules in DIR/recovery/gen<k>/
# (the re-planner traces the model file of the partition directory again). See [Note:
# re-planner plugin point] in runtime.replanning.
#
# [Note: recovery timeline]
# t0 = the failed process's kill (it records time.time() in the store just before).
# detect_s = detection (process exit seen by its parent, or heartbeat silence) - t0.
# replan_s = plan search + writing the new generation's partition.
# restore_s = the rest until the first round of the new generation starts: stopping the
# workers, collecting the state (hand-over or checkpoint), starting the processes,
# rendezvous, loading stage modules and state. total_s = detect_s + replan_s + restore_s.

_FAIL = re.compile(r"^\s*([^@\s,]+)@(\d+)\s*$")


def parse_fail(spec: str | Mapping[str, int] | None, plan: Plan, steps: int, *,
               option: str = "--fail") -> dict[str, int]:
    """``"DEVICE@STEP[,DEVICE@STEP...]"`` -> ``{device: step}`` (steps from 0); ``option``
    names the flag in the messages (``--fail``, or ``--leave``: steps in ``[0, steps - 1)``,
    a device leaves after finishing its step)."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        items = [(str(d), s) for d, s in spec.items()]
        for device, step in items:
            if not is_int(step):
                raise RuntimeFailure(f"{option} {{{device!r}: {step!r}}}: the step must be an "
                                     f"integer (steps from 0)")
    else:
        items = []
        for part in str(spec).split(","):
            match = _FAIL.match(part)
            if not match:
                raise RuntimeFailure(f"{option} {spec!r}: expected DEVICE@STEP (e.g. "
                                     f"{plan.devices[-1]}@2), comma-separated for several")
            items.append((match.group(1), int(match.group(2))))
    out: dict[str, int] = {}
    for device, step in items:
        if device not in plan.devices:
            raise RuntimeFailure(f"{option}: device {device!r} is not in the plan (devices: "
                                 f"{list(plan.devices)})")
        end = steps - 1 if option == "--leave" else steps
        if not 0 <= int(step) < end:
            why = (" (the device leaves after finishing that step; after the last step there "
                   "is nothing left to hand over)" if option == "--leave" else "")
            raise RuntimeFailure(f"{option} {device}@{step}: the step must be in [0, {end}) "
                                 f"for --steps {steps}{why}")
        if device in out:
            raise RuntimeFailure(f"{option} names device {device!r} twice")
        out[device] = int(step)
    if set(out) >= set(plan.devices) and len(set(out.values())) == 1:
        verb = "kill" if option == "--fail" else "remove"
        raise RuntimeFailure(f"{option} would {verb} every device of the plan "
                             f"{list(plan.devices)} at once; at least one must survive")
    return out


def parse_leave(spec: str | Mapping[str, int] | None, fail: Mapping[str, int], plan: Plan,
                steps: int) -> dict[str, int]:
    """``--leave DEVICE@STEP[,...]`` -> ``{device: step}``: that device gets SIGTERM during
    step STEP, finishes it and leaves (see [Note: graceful leave] in runtime.replication).
    ``fail`` is the parsed ``--fail``: a device may be in one of them only.

    Raises:
        RuntimeFailure: bad format, unknown device, a step outside ``[0, steps - 1)`` (the
            device leaves after finishing STEP, so the last step leaves nothing to hand
            over), a device also in ``fail``, or every device of the plan gone at once.
    """
    out = parse_fail(spec, plan, steps, option="--leave")
    for device, step in out.items():
        if device in fail:
            raise RuntimeFailure(f"device {device!r} is in both --fail ({device}@"
                                 f"{fail[device]}) and --leave ({device}@{step}); name it in "
                                 f"one of them")
    gone: dict[int, set[str]] = {}
    for device, step in [*fail.items(), *out.items()]:
        gone.setdefault(step, set()).add(device)
    for step, devices in sorted(gone.items()):
        if devices >= set(plan.devices):
            raise RuntimeFailure(f"--fail and --leave would remove every device of the plan "
                                 f"{list(plan.devices)} during step {step}; at least one must "
                                 f"stay")
    return out


def check_someone_stays(fail: Mapping[str, int], leave: Mapping[str, int],
                        devices: Sequence[str]) -> None:
    """``RuntimeFailure`` where ``--fail`` and ``--leave`` remove every device of the
    emulated cluster by the end of the run, one after the other (``parse_fail`` and
    ``parse_leave`` refuse every device of the plan at once): such a run failed seconds in,
    at its last loss, with "restart from the last checkpoint on new devices". A device of
    the cluster that the plan leaves out can take over, so the cluster counts, not the
    plan."""
    gone = {**fail, **leave}
    if gone and set(gone) >= set(devices):
        raise RuntimeFailure(f"--fail and --leave would remove every device of the cluster "
                             f"{list(devices)} by step {max(gone.values())}; at least one "
                             f"must stay")


@dataclass
class RecoveryRun:
    """Results of a run with recoveries (all generations)."""

    records: dict[int, dict[str, Any]] = field(default_factory=dict)   # step -> metrics line
    events: list[dict[str, Any]] = field(default_factory=list)
    workers: list[WorkerResult] = field(default_factory=list)           # last generation
    plan: Plan | None = None                                            # last generation
    factor: float = 1.0
    shaping: str = "none"
    directories: list[str] = field(default_factory=list)
    replication: dict[str, dict[str, float]] = field(default_factory=dict)   # last generation
    replicate_every: list[int] = field(default_factory=list)   # replication period per generation
    #: exit codes of the device processes that ended before the last generation's end
    #: (a device that left gracefully: 0; a killed one: -9)
    exit_codes: dict[str, int | None] = field(default_factory=dict)


@dataclass
class _Outcome:
    workers: list[WorkerResult] | None = None
    failed: tuple[int, ...] = ()
    detected_at: float = 0.0            # time.time()
    detected_by: str = ""
    silent_s: float = 0.0
    stopped_at: float = 0.0             # time.time() when every old process was gone
    handoffs: dict[int, proto.Handoff] = field(default_factory=dict)
    resume: int | None = None           # newest step every stage has a state of (replay)
    stuck: dict[int, StageState] = field(default_factory=dict)   # own states of stuck ranks
    generation: int = 0
    collect_parts: dict[str, float] = field(default_factory=dict)
    left: dict[int, proto.LeftMarker] = field(default_factory=dict)   # rank -> its marker


@dataclass
class _Model:
    """What the launcher needs to recover (loaded once, before training): the model file,
    the cost table and cluster to re-plan with, and the re-planner."""

    module: Any
    costs: CostTable
    cluster: Cluster
    directory: Path
    replanner: Replanner


def _load_model(directory: Path, cluster_path: Cluster | str | Path,
                replanner: Replanner) -> _Model:
    from runtime.stage_io import load_model_module

    module = load_model_module(directory)
    costs = replanner.costs(str(directory))
    cluster = cluster_path if isinstance(cluster_path, Cluster) else \
        Cluster.from_yaml(cluster_path)
    return _Model(module=module, costs=costs, cluster=cluster, directory=directory,
                  replanner=replanner)


def _prewarm(planner: Replanner) -> None:
    """Let the re-planner import now what a recovery needs (the planners, calibration,
    partitioning and packaging), if it can: a first import after a failure cost ~0.5 s of
    the launcher's re-plan on the 2-core test host (tools/chaos.py, cold ``search_s`` +
    ``partition_s`` 0.7 s against 0.16 s warm)."""
    prewarm = getattr(planner, "prewarm", None)
    if callable(prewarm):
        prewarm()


def _seeded_state(module: Any, seed: int) -> StageState:
    torch.manual_seed(seed)
    model = module.build_model()
    return StageState(step=-1, model=model_state(model))


def run_with_recovery(directory: str | Path, cluster: Any, config: TrainConfig, *,
                      fail: str | Mapping[str, int] | None, recovery: str = "replay",
                      leave: str | Mapping[str, int] | None = None,
                      progress: Callable[[Mapping[str, Any]], None] | None = None,
                      host_cores: int | None = None, checkpoint_every: int | None = None,
                      replicate: bool = True, replicate_every: int | str = 1,
                      fail_signal: int = int(signal.SIGKILL),
                      use_cgroups: bool | None = None, timeout_s: float = 600.0,
                      heartbeat_timeout_s: float = 1.0,
                      replan_tolerance: float = REPLAN_TOLERANCE,
                      calibrate: bool = True, token: str | None = None,
                      replanner: Replanner | str | None = None) -> RecoveryRun:
    """Emulate ``cluster`` and train the partition in ``directory`` with ``fail`` injected.

    ``recovery="replay"``: replicas in holders' memory, layer-wise re-plan; the surviving
    processes stay up, rebuild the process group (next generation), load their new stage
    module and the state (their own, and the replicas of lost layers), and replay the
    interrupted round; falls back to the on-disk checkpoint when a stage and all its
    holders failed. ``recovery="restart"``: stop every process, full re-plan on the
    survivors, reload the last on-disk checkpoint in fresh processes. Every
    ``checkpoint_every`` steps (default: every step for restart, every
    ``REPLAY_CHECKPOINT_EVERY`` for replay, where the checkpoint is only the fallback) each
    stage writes its state to ``DIR/recovery/checkpoints``; replicas are refreshed every
    ``replicate_every`` steps (a failure then re-trains the rounds since the last replica;
    ``"auto"``: the smallest K whose replica traffic fits in half of every device's
    predicted idle time, chosen again for every generation's plan). After a failure replay
    keeps the layer-wise repair when its predicted round is at most ``replan_tolerance``
    slower than a full re-plan's (0: always the faster of the two). With ``calibrate``
    (replay), both are predicted on the cost table as the failed generation measured it:
    forward and backward times corrected per timing group and stage by the workers' own
    compute times, and a per-message overhead fitted to the measured round
    (the re-planner's ``calibrate``, what ``asteroid-fx calibrate`` does; the event's
    ``calibration``).

    ``leave="DEVICE@STEP"`` (replay only) sends SIGTERM to that device during step STEP: it
    finishes the step, hands its state over and exits with code 0; the survivors re-plan
    without it and go on at STEP + 1 with nothing replayed (event ``reason: "leave"``,
    ``source: "handover"``; see [Note: graceful leave] in runtime.replication).

    Every device process proves ``token`` (a fresh one when None) before it joins, and the
    processes exchange only ``runtime.protocol`` messages through the store. The recovery
    event names exactly the devices that failed (see [Note: who failed]).

    ``replanner``: the :class:`~runtime.replanning.Replanner` (or its dotted name
    ``"package.module:attr"``) that gives the cost table, replicas, calibration, the
    survivors' plan and the next generation's partition; ``asteroid-fx run`` passes the
    front end's. Without one every recovery mode raises ``ReplannerUnavailable`` before
    training starts (see [Note: re-planner plugin point] in runtime.replanning).
    """
    if recovery not in RECOVERY_MODES:
        raise RuntimeFailure(f"--recovery {recovery!r}: choose one of {list(RECOVERY_MODES)}")
    if checkpoint_every is None:
        checkpoint_every = REPLAY_CHECKPOINT_EVERY if recovery == "replay" else 1
    if checkpoint_every < 1:
        raise RuntimeFailure(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    every_k = parse_replicate_every(replicate_every)
    if not 0.0 <= replan_tolerance < float("inf"):
        raise RuntimeFailure(f"--replan-tolerance must be a fraction >= 0 (0.1: keep the "
                             f"layer-wise repair when at most 10% slower than a full "
                             f"re-plan; 0: always the faster plan), got {replan_tolerance}")
    root = Path(directory)
    plan = DirectorySource(str(root)).load_plan()
    pending = parse_fail(fail, plan, config.steps)
    leaving = parse_leave(leave, pending, plan, config.steps)
    if leaving and recovery != "replay":
        raise RuntimeFailure(f"--leave needs --recovery replay (got {recovery!r}): a device "
                             f"that leaves hands its state to the survivors, which restart "
                             f"mode does not keep")
    planner = load_replanner(replanner, needed_for=f"--recovery {recovery}")
    model = _load_model(root, cluster, planner)
    check_someone_stays(pending, leaving, model.cluster.names)
    if recovery == "replay":   # the re-planner's imports now, not after a failure
        _prewarm(planner)
    work = root / "recovery"
    shutil.rmtree(work, ignore_errors=True)
    checkpoints = work / "checkpoints"
    checkpoints.mkdir(parents=True)
    if config.metrics:
        Path(config.metrics).write_text("")
    procs = _Processes(config.timeout_s, host_cores, use_cgroups, token)
    out = RecoveryRun()
    alive = model.cluster
    current = root
    generation = 0
    event: dict[str, Any] | None = None
    gen_config = replace(config, append_metrics=True)
    try:
        while True:
            replicas, every = (_replicas(plan, model, alive, every_k)
                               if recovery == "replay" else ({}, 1))
            out.replicate_every.append(every)
            spec = WorkerSpec(
                generation=generation, mode=recovery, plan_version=plan.plan_version,
                devices=tuple(plan.devices),
                stages=tuple(plan.stage_of(d) for d in plan.devices),
                holders=external_holders(plan, replicas), checkpoint_dir=str(checkpoints),
                checkpoint_every=checkpoint_every, replicate=replicate,
                replicate_every=every, steps=config.steps, restore=generation > 0,
                fail_at=dict(pending), fail_signal=fail_signal, leave_at=dict(leaving),
                metrics=config.metrics, event=event, heartbeat_timeout_s=heartbeat_timeout_s,
                heartbeat_interval_s=heartbeat_timeout_s / 5)
            out.directories.append(str(current))
            def committed_of(g: int = generation, first: int = gen_config.start_step) -> int:
                return _committed(procs.store, g, first)

            outcome = procs.run_generation(DirectorySource(str(current)), plan, alive,
                                           gen_config, spec, progress, timeout_s,
                                           committed_of=committed_of)
            out.factor, out.shaping, out.plan = procs.factor, procs.shaping, plan
            store = procs.store
            keys = proto.Keys(generation)
            _collect_records(store, generation, gen_config.start_step, config.steps, out)
            logged = proto.get_if_present(store, keys.event(), proto.RecoveryEvent)
            if event is not None and logged is not None:
                out.events.append(dict(logged.data))
            out.exit_codes.update(procs.exit_codes)
            if outcome.workers is not None:
                out.workers = outcome.workers
                for rank, device in enumerate(plan.devices):
                    stats = proto.get_if_present(store, keys.stats(rank),
                                                 proto.ReplicationSummary)
                    if stats is not None:
                        out.replication[device] = dict(stats.values)
                return out
            # ---- recovery -----------------------------------------------------------
            failed = [plan.devices[r] for r in outcome.failed]
            left = sorted(plan.devices[r] for r in outcome.left)
            # a leave: every lost device left gracefully after committing its last step
            reason = "leave" if left and set(failed) <= set(left) else "failure"
            committed = _committed(store, generation, gen_config.start_step)
            killed = proto.get_if_present(store, keys.killed_at(), proto.KilledAt)
            if reason == "leave":   # t0: the leavers stopped (committed their last step)
                killed_at = min(m.at for m in outcome.left.values())
            elif killed is not None:
                killed_at = killed.at
            else:
                killed_at = outcome.detected_at - outcome.silent_s
            detect_s = max(0.0, outcome.detected_at - killed_at)
            if reason == "leave":
                log.warning("devices %s left after step %d (noticed after %.3f s); "
                            "recovering by %s", failed, committed, detect_s, recovery)
            else:
                log.warning("devices %s failed during step %d (detected by %s after %.3f s); "
                            "recovering by %s", failed, committed + 1, outcome.detected_by,
                            detect_s, recovery)
            began = time.perf_counter()
            calibration = (_calibration(plan, model, alive, store, generation, out,
                                        gen_config.start_step, committed, procs.factor)
                           if recovery == "replay" and calibrate else None)
            costs = model.costs if calibration is None else calibration.costs
            new_plan, choice = _new_plan(model.replanner, recovery, plan, costs, alive, failed,
                                         replan_tolerance)
            search_s = time.perf_counter() - began
            if calibration is not None:
                choice["calibration"] = dict(calibration.correction)
            survivors = alive.subset([d for d in alive.names if d not in failed])
            generation += 1
            began = time.perf_counter()
            gen_dir = work / f"gen{generation}"
            stage_names = model.replanner.partition(str(root), new_plan, str(gen_dir),
                                                    procs.token)
            partition_s = time.perf_counter() - began
            began = time.perf_counter()
            kept = set(procs.waiting)
            manifests, source_kind, step_from = _assemble(
                recovery, plan, new_plan, stage_names, outcome, committed, checkpoints,
                model, config.seed, kept, procs, generation)
            for device, manifest in manifests.items():
                proto.put(store, proto.Keys(generation).restore(device), manifest)
            load_s = time.perf_counter() - began
            resume = step_from + 1
            if reason == "leave" and source_kind == "replica":
                source_kind = "handover"    # the leavers' and survivors' own states
            extra: dict[str, Any] = {}
            if left:
                extra["left"] = left
                notice = [m.at - m.signal_at for m in outcome.left.values()
                          if m.signal_at is not None]
                if notice:   # SIGTERM -> the leaver committed its last step (still training)
                    extra["notice_s"] = max(0.0, max(notice))
            event = {"event": "recovery", "failed": failed, "reason": reason,
                     "detect_s": detect_s,
                     "replan_s": search_s + partition_s, "lost_steps": committed - step_from,
                     "mode": recovery, "source": source_kind,
                     "replicate_every": out.replicate_every[-1],
                     "detected_by": outcome.detected_by, "search_s": search_s,
                     "partition_s": partition_s,
                     "stop_s": max(0.0, outcome.stopped_at - outcome.detected_at),
                     "stop_parts_s": outcome.collect_parts,
                     "load_s": load_s, "kept": sorted(procs.waiting - set(left)),
                     "spawn_at": time.time(), "plan_version": new_plan.plan_version,
                     "resume_step": resume, "killed_at": killed_at,
                     "detected_at": outcome.detected_at, **extra, **choice}
            for step in list(out.records):
                if step >= resume:
                    del out.records[step]
            pending = {d: s for d, s in pending.items() if d not in failed and s > committed}
            leaving = {d: s for d, s in leaving.items() if d not in failed and s > committed}
            # a fault scheduled on a device the new plan does not use cannot be injected:
            # said, not skipped in silence (the run ended 0 with one recovery of two)
            for what, faults in (("--fail", pending), ("--leave", leaving)):
                idle = sorted(d for d in faults if d not in new_plan.devices)
                if idle:
                    log.warning("%s %s: the re-planned run (plan v%d) does not use %s, so "
                                "nothing is injected there", what,
                                ",".join(f"{d}@{faults[d]}" for d in idle),
                                new_plan.plan_version, ", ".join(idle))
                    for d in idle:
                        del faults[d]
            plan, alive, current = new_plan, survivors, gen_dir
            gen_config = replace(config, start_step=resume, append_metrics=True,
                                 prediction="calibrated" if calibration is not None
                                 else config.prediction)
    finally:
        procs.close()


def parse_replicate_every(value: int | str | None) -> int | None:
    """``--replicate-every`` as a period K >= 1, or ``None`` for "auto" (the re-planner
    chooses K; the front end's with ``solver.replicas.plan_replication``).

    Raises:
        RuntimeFailure: neither "auto" nor an integer >= 1.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        k = int(value)
    except (TypeError, ValueError):
        k = 0
    if k < 1:
        raise RuntimeFailure(f"--replicate-every must be 'auto' or an integer >= 1 (steps "
                             f"between replicas), got {value!r}")
    return k


def _replicas(plan: Plan, model: _Model, alive: Cluster, every_k_steps: int | None
              ) -> tuple[dict[str, tuple[str, ...]], int]:
    """Holders and replication period of ``plan`` (the re-planner's: the plan's own
    holders when it has them); ``every_k_steps=None`` chooses K from the idle time."""
    try:
        replicas, k = model.replanner.replicas(plan, model.costs, alive, every_k_steps)
    except AsteroidError as exc:
        log.warning("no replica placement (%s): recovery will use the on-disk checkpoint", exc)
        return {}, every_k_steps or 1
    log.info("replicas %s every %d step(s)", replicas, k)
    return replicas, k


def _calibration(plan: Plan, model: _Model, alive: Cluster, store: dist.Store,
                 generation: int, out: RecoveryRun, start: int, committed: int, factor: float
                 ) -> Calibration | None:
    """The calibrated cost table from what generation ``generation`` measured (rank
    ``compute`` records and the committed rounds, divided by the emulator's slow-down
    ``factor``; the re-planner's ``calibrate``, as ``asteroid-fx calibrate`` does), or None
    with fewer than the re-planner's ``min_calibration_steps`` rounds."""
    min_steps = model.replanner.min_calibration_steps
    rounds = [float(out.records[s]["round_time_s"]) for s in range(start + 1, committed + 1)
              if s in out.records]
    if len(rounds) < min_steps:
        log.info("re-plan on the declared cluster: only %d measured round(s) in this "
                 "generation (calibration needs %d)", len(rounds), min_steps)
        return None
    scale = 1.0 / max(factor, 1e-9)
    compute: dict[str, tuple[float, float]] = {}
    for rank, device in enumerate(plan.devices):
        timing = proto.get_if_present(store, proto.Keys(generation).compute(rank),
                                      proto.ComputeTiming)
        if timing is not None:
            compute[device] = (timing.forward_s * scale, timing.backward_s * scale)
    try:
        found = model.replanner.calibrate(plan, model.costs, alive, compute,
                                          statistics.median(rounds) * scale)
    except AsteroidError as exc:
        log.warning("re-plan on the profiled costs: calibration failed (%s)", exc)
        return None
    log.info("calibrated from %d round(s): %s", len(rounds), dict(found.correction))
    return found


def _new_plan(replanner: Replanner, mode: str, plan: Plan, costs: CostTable, alive: Cluster,
              failed: list[str], tolerance: float = REPLAN_TOLERANCE
              ) -> tuple[Plan, dict[str, Any]]:
    """The re-planner's plan for the survivors of ``failed`` (replay: a layer-wise repair,
    or the full re-plan when the repair's predicted round is more than ``tolerance``
    slower; restart: the full planner) and the choice behind it."""
    try:
        found = replanner.replan(mode, plan, costs, alive, failed, tolerance)
    except PlanError as exc:
        raise RuntimeFailure(f"cannot recover from the failure of {failed}: {exc}") from exc
    return found.plan, dict(found.choice)


def resume_point(plan: Plan, handoffs: Mapping[int, proto.Handoff],
                 committed: int) -> int | None:
    """The newest step (<= ``committed``) of which every stage of ``plan`` has a state: a
    survivor's own snapshot or a replica held by a survivor; None when there is none."""
    available: dict[int, set[int]] = {i: set() for i in range(plan.num_stages)}
    for payload in handoffs.values():
        if payload.stage in available:
            available[payload.stage] |= set(payload.own_steps)
        for stage, held in payload.held_steps.items():
            if stage in available:
                available[stage] |= set(held)
    common = set.intersection(*available.values()) if available else set()
    steps = [s for s in common if s <= committed]
    return max(steps) if steps else None


class _Requests:
    """Requests for parts of survivors' states (``rx/<g>/want/<rank>/<n>``), served by each
    survivor's watcher thread, which writes the bytes to the request's ``to`` key."""

    def __init__(self, store: dist.Store, generation: int,
                 counters: dict[tuple[int, int], int]) -> None:
        self.store = store
        self.generation = generation
        self.counters = counters
        self.pending: dict[int, list[tuple[int, str]]] = {}

    def ask(self, rank: int, step: int, *, names: list[str] | None = None,
            held: int | None = None, to: str | None = None, tag: int | None = None) -> str:
        """Ask ``rank`` for state of ``step`` (the replica of stage ``held``, or its own
        state ``names``: all when None); the answer lands in the store under the returned
        key (``to``, or a fresh ``rx/<g>/own/<rank>/<n>``)."""
        keys = proto.Keys(self.generation)
        n = self.counters.get((self.generation, rank), 0)
        self.counters[(self.generation, rank)] = n + 1
        to = to or keys.own(rank, n)
        proto.put(self.store, keys.want(rank, n), proto.StateRequest(
            step=step, to=to, names=None if names is None else tuple(names), held=held))
        self.pending.setdefault(rank if tag is None else tag, []).append((rank, to))
        return to

    def collect(self, timeout_s: float = REQUEST_TIMEOUT_S) -> dict[int, StageState]:
        """tag -> the (merged) states answered; a missing answer raises RuntimeFailure."""
        deadline = time.monotonic() + timeout_s
        out: dict[int, StageState] = {}
        for tag, answers in self.pending.items():
            states = []
            for rank, name in answers:
                while not self.store.check([name]):
                    if time.monotonic() > deadline:
                        raise RuntimeFailure(f"rank {rank} did not send the requested part of "
                                             f"its state within {timeout_s:.0f} s")
                    time.sleep(0.002)
                states.append(state_from_bytes(proto.get_bytes(self.store, name),
                                               where=f"store key {name!r}"))
            out[tag] = merge_states(states)
        return out


def _assemble(mode: str, plan: Plan, new_plan: Plan, stage_names: list[list[str]],
              outcome: _Outcome, committed: int, checkpoints: Path, model: _Model, seed: int,
              kept: set[str], procs: _Processes, generation: int
              ) -> tuple[dict[str, proto.Manifest], str, int]:
    """Per device of ``new_plan`` (generation ``generation``), the manifest of where its
    stage state comes from (see ``WorkerHooks._gather``); the source kind and the step
    resumed from. Replay from survivors moves only what a device does not hold itself."""
    devices = [(d, index) for index, stage in enumerate(new_plan.stages) for d in stage.devices]
    if mode == "replay" and committed >= 0:
        try:
            manifests, step = _from_survivors(plan, stage_names, outcome, kept, procs,
                                              devices, generation)
            return manifests, "replica", step
        except _NoState as exc:
            log.warning("stage(s) %s lost every device and every replica holder (or no "
                        "replica of a common step exists): falling back to the last on-disk "
                        "checkpoint", exc.args[0])
    state, kind = _whole_state(plan, committed, checkpoints, model, seed)
    manifests = {}
    for device, index in devices:
        name = proto.Keys(generation).restore_part(device, "data")
        proto.put_bytes(procs.store, name, state_to_bytes(slice_state(state,
                                                                      stage_names[index])))
        manifests[device] = proto.Manifest(step=state.step, parts=(
            proto.ManifestPart(names=tuple(stage_names[index]), key=name),))
    return manifests, kind, state.step


class _NoState(Exception):
    """No common step of which every stage has a state (payload: [(stage, devices)])."""


def _from_survivors(plan: Plan, stage_names: list[list[str]], outcome: _Outcome,
                    kept: set[str], procs: _Processes, devices: list[tuple[str, int]],
                    generation: int) -> tuple[dict[str, proto.Manifest], int]:
    step = outcome.resume
    by_rank = {p.rank: p for p in outcome.handoffs.values()}
    if step is None:
        covered = {p.stage for p in by_rank.values()} | {
            st for p in by_rank.values() for st in p.held_steps}
        raise _NoState([(i, list(plan.stages[i].devices)) for i in range(plan.num_stages)
                        if i not in covered] or "(no common step)")
    # every old stage: where its state of ``step`` is (own snapshots first, then replicas)
    owners: dict[int, list[tuple[str, int]]] = {}     # stage -> [("own"|"held", rank)]
    names_of: dict[int, set[str]] = {}
    for rank, p in by_rank.items():
        if step in p.own_steps:
            owners.setdefault(p.stage, []).append(("own", rank))
            names_of[p.stage] = set(p.own_names)
    for rank, p in by_rank.items():
        for st, steps in p.held_steps.items():
            if step in steps:
                owners.setdefault(st, []).append(("held", rank))
                names_of.setdefault(st, set(p.held_names.get(st, ())))
    missing = [i for i in range(plan.num_stages) if i not in owners]
    if missing:
        raise _NoState([(i, list(plan.stages[i].devices)) for i in missing])
    stage_of_name = {n: st for st, names in names_of.items() for n in names}
    rank_of = {d: r for r, d in enumerate(plan.devices)}
    requests = _Requests(procs.store, outcome.generation, procs.requests)
    keys = proto.Keys(generation)
    manifests: dict[str, proto.Manifest] = {}
    for device, index in devices:
        wanted: dict[int, list[str]] = {}
        for name in stage_names[index]:
            if name not in stage_of_name:
                raise _NoState([("no state holds", name)])
            wanted.setdefault(stage_of_name[name], []).append(name)
        me = rank_of.get(device, -1) if device in kept else -1
        parts: list[proto.ManifestPart] = []
        for st, names in sorted(wanted.items()):
            sources = owners[st]
            local = [kind for kind, r in sources if r == me]
            if local:                       # this process has it: nothing moves
                parts.append(proto.ManifestPart(names=tuple(names), own=step)
                             if local[0] == "own" else
                             proto.ManifestPart(names=tuple(names), held=st))
                continue
            stuck = [r for kind, r in sources if r in outcome.stuck]
            if stuck:                       # the launcher already has it
                name = keys.restore_part(device, st)
                proto.put_bytes(procs.store, name,
                                state_to_bytes(slice_state(outcome.stuck[stuck[0]], names)))
                parts.append(proto.ManifestPart(names=tuple(names), key=name))
                continue
            alive = [(kind, r) for kind, r in sources if plan.devices[r] in kept]
            if not alive:
                raise _NoState([(st, list(plan.stages[st].devices))])
            kind, r = alive[0]
            to = requests.ask(r, step, names=names if kind == "own" else None,
                              held=st if kind == "held" else None,
                              to=keys.restore_part(device, st))
            parts.append(proto.ManifestPart(names=tuple(names), key=to))
        manifests[device] = proto.Manifest(step=step, parts=tuple(parts))
    return manifests, step


def _whole_state(plan: Plan, committed: int, checkpoints: Path, model: _Model,
                 seed: int) -> tuple[StageState, str]:
    """The whole-model state of the newest complete checkpoint (or the seeded weights)."""
    if committed < 0:
        return _seeded_state(model.module, seed), "seed"
    step = latest_checkpoint(checkpoints, plan.plan_version, plan.num_stages, at_most=committed)
    if step is None:
        log.warning("no complete checkpoint of plan version %d: restarting from the seeded "
                    "initial weights", plan.plan_version)
        return _seeded_state(model.module, seed), "seed"
    return load_checkpoint(checkpoints, step, plan.plan_version, plan.num_stages), "checkpoint"


def _committed(store: dist.Store, generation: int, start: int) -> int:
    step = start
    while store.check([proto.Keys(generation).step(step)]):
        step += 1
    return step - 1


def _collect_records(store: dist.Store, generation: int, start: int, steps: int,
                     out: RecoveryRun) -> None:
    for step in range(start, steps):
        record = proto.get_if_present(store, proto.Keys(generation).step(step),
                                      proto.StepRecord)
        if record is None:
            break
        out.records[step] = dict(record.data)


class _Processes:
    """The device processes of every generation, the store and the result channels.

    In replay mode a process that survives a failure is kept: it waits on
    ``rx/<g>/next/<device>`` for its ``runtime.protocol.Assignment`` in generation ``g + 1``
    (rank, world size, partition directory, config and WorkerSpec, as JSON) or
    ``ExitOrder``. Every process proves the job's token first (``Gatekeeper``).
    """

    def __init__(self, timeout_s: float, host_cores: int | None,
                 use_cgroups: bool | None, token: str | None = None) -> None:
        from runtime import emulator as emu

        #: every device process of every generation, the job's store, token gate and
        #: result channels (the supervisor ``launch_local`` uses too)
        self.supervisor = Supervisor(timeout_s, token)
        self.token = self.supervisor.token
        self.gate = self.supervisor.gate
        #: the job's keys (prefixed: see runtime.trust); everything below reads and writes here
        self.store: dist.Store = self.supervisor.store
        self.host_cores = host_cores
        self.use_cgroups = emu.cgroup_available() if use_cgroups is None else use_cgroups
        self.waiting: set[str] = set()        # survivors ready for the next generation
        self.requests: dict[tuple[int, int], int] = {}   # (generation, rank) -> next request
        self.ranks: dict[str, int] = {}                  # device -> rank (this generation)
        self.cgroups: list[str] = []
        self.factor = 1.0
        self.shaping = "none"
        self.generation = -1
        self.exiting: set[str] = set()        # told to exit (after answering requests)

    @property
    def exit_codes(self) -> dict[str, int | None]:
        """Exit codes of the processes that ended by themselves, by device."""
        return self.supervisor.exit_codes

    def _shape(self, plan: Plan, cluster: Any, source: StageSource, generation: int
               ) -> tuple[StageSource, list[str] | None, Any]:
        from runtime import emulator as emu

        setup = emu.emulation_setup(plan, cluster, host_cores=self.host_cores)
        # After the first generation survivors sit in their old groups, whose quotas were
        # set for the old plan's common factor: every rank then moves to a group of this
        # generation (regroup), or a survivor would keep its old, lower cap. A rank at
        # speed >= 1 (no quota) moves to the root group (fast_in_root).
        shaping = choose_shaping(setup.effective_speeds, use_cgroups=self.use_cgroups,
                                 tag=generation, fast_in_root=True,
                                 regroup=bool(self.cgroups))
        self.cgroups.extend(shaping.made)
        self.factor, self.shaping = setup.factor, shaping.kind
        cgroups = None if shaping.cgroups is None else list(shaping.cgroups)
        return shaping.wrap(source), cgroups, setup

    def run_generation(self, source: DirectorySource, plan: Plan, cluster: Any,
                       config: TrainConfig, spec: WorkerSpec,
                       progress: Callable[[Mapping[str, Any]], None] | None,
                       timeout_s: float,
                       committed_of: Callable[[], int] | None = None) -> _Outcome:

        previous = self.generation
        self.generation = spec.generation
        run_source, cgroups, setup = self._shape(plan, cluster, source, spec.generation)
        config = replace(config, **setup.links, **setup.storage, **setup.timing(config))
        spec = replace(spec, **setup.links)    # replica sends are paced too
        world = len(plan.devices)
        procs = []
        self.gate.expect()
        for rank, device in enumerate(plan.devices):
            cgroup = None if cgroups is None else cgroups[rank]
            if device in self.waiting:
                # plain data: the partition directory, and the rank's time-dilation scale
                # in its own config (what a PerRankScale source carries for a new process)
                scale = getattr(run_source, "compute_scale", None)
                mine = replace(config, compute_scale=float(scale(rank))) \
                    if callable(scale) else config
                proto.put(self.store, proto.Keys(previous).next(device), proto.Assignment(
                    rank=rank, world=world, directory=source.directory, config=mine,
                    spec=spec, cgroup=cgroup, requests=self._requests_of(previous, device)))
                procs.append(self.supervisor.procs[device])
                continue
            procs.append(self.supervisor.start(device, rank, world, run_source, config,
                                               cgroup, spec=spec,
                                               label=f"g{spec.generation}-{device}"))
        for device in sorted(self.waiting - set(plan.devices)):
            proto.put(self.store, proto.Keys(previous).next(device),
                      proto.ExitOrder(requests=self._requests_of(previous, device)))
            self.exiting.add(device)
        self.waiting = set()
        self.ranks = {d: r for r, d in enumerate(plan.devices)}
        outcome = self._supervise(plan, spec, procs, progress, timeout_s, committed_of)
        outcome.stopped_at = time.time()
        return outcome

    def _requests_of(self, generation: int, device: str) -> int:
        """How many state requests the device's process got in ``generation``."""
        rank = self.ranks.get(device)
        return 0 if rank is None else self.requests.get((generation, rank), 0)

    def _supervise(self, plan: Plan, spec: WorkerSpec, procs: list[Any],
                   progress: Callable[[Mapping[str, Any]], None] | None,
                   timeout_s: float, committed_of: Callable[[], int] | None = None
                   ) -> _Outcome:
        """Watch one generation until it finishes or a process dies or hangs."""
        world = len(procs)
        judge = FailureJudge(self.store, world, generation=spec.generation,
                             heartbeat_timeout_s=spec.heartbeat_timeout_s,
                             replay=spec.mode == "replay")
        outcome = _Outcome()
        ok = False
        try:
            watched = self.supervisor.watch(
                procs, plan.devices, progress=progress, timeout_s=timeout_s, judge=judge,
                grace_s={"error": 0.0, "interrupted": 2.0}, generation=spec.generation)
            verdict: Blame | None = watched.verdict
            if verdict is None:
                outcome.workers = [watched.done[r] for r in range(world)]
                ok = True
                return outcome
            left = judge.left
            outcome.detected_at = time.time()
            outcome.failed = verdict.failed
            outcome.left = left
            outcome.detected_by = verdict.by
            outcome.silent_s = verdict.silent_s
            for r in outcome.failed:
                if r not in left:
                    self.supervisor.fence(procs[r])   # a hung device (our own child)
            if spec.mode == "replay":
                if left:   # rank 0 records the leavers' last step right after it
                    self._await_record(spec.generation, max(m.step for m in left.values()))
                committed = committed_of() if committed_of is not None else -1
                self._collect(plan, spec.generation, procs, outcome, committed)
            return outcome
        finally:
            # training done: every process may end by itself (killing one breaks its
            # peers' last barrier); else only those that left; survivors waiting for the
            # next generation are kept, every other process is killed at once
            everyone = set(self.supervisor.procs)
            self.supervisor.stop(keep=set() if ok else self.waiting,
                                 let_end=everyone if ok else set(self.exiting))
            self.exiting -= everyone

    def _await_record(self, generation: int, step: int,
                      limit_s: float = LEAVE_RECORD_S) -> None:
        """Wait (at most ``limit_s``) until rank 0 has recorded committed ``step``."""
        try:
            self.store.wait([proto.Keys(generation).step(step)], timedelta(seconds=limit_s))
        except RuntimeError:    # DistStoreError: timed out
            log.warning("rank 0 did not record step %d within %.0f s after a device left "
                        "after it; resuming from the last recorded step", step, limit_s)

    def _collect(self, plan: Plan, generation: int, procs: list[Any], outcome: _Outcome,
                 committed: int, limit_s: float = 10.0,
                 leave_s: float = LEAVE_ROUND_S) -> None:
        """Hand-overs of the survivors (up to ``limit_s``), which of them left the failed
        round within ``leave_s`` after that (free for the next generation), the step to
        resume from, and the own state of survivors that did not leave (they are restarted)."""
        store = self.store
        began = time.perf_counter()
        outcome.generation = generation
        failed = outcome.failed
        announce_failure(store, generation, failed, len(procs))
        # a device that left gracefully is lost to the plan but hands its state over
        wanted = {r for r in range(len(procs)) if r not in failed or r in outcome.left}
        got: dict[int, proto.Handoff] = {}
        keys = proto.Keys(generation)
        free: set[int] = set()
        deadline = time.monotonic() + limit_s
        handed_at = None
        late: set[int] = set()
        while (wanted - free) and time.monotonic() < deadline:
            for rank in sorted(wanted - free):
                # failed too (e.g. at the same moment), or stopped (SIGSTOP) during the
                # hand-over: certain evidence (see [Note: who failed]); fence a stopped one
                if not procs[rank].is_alive() or process_state(procs[rank].pid) == "stopped":
                    self.supervisor.fence(procs[rank])
                    wanted.discard(rank)
                    free.discard(rank)
                    got.pop(rank, None)
                    late.add(rank)
                    continue
                if rank not in got:
                    handoff = proto.get_if_present(store, keys.handoff(rank), proto.Handoff)
                    if handoff is not None:
                        got[rank] = handoff
                if rank in got and store.check([keys.waiting(rank)]):
                    free.add(rank)
            if handed_at is None and wanted <= set(got):
                handed_at = time.perf_counter()
                deadline = min(deadline, time.monotonic() + leave_s)
            if wanted - free:
                time.sleep(0.002)
        silent = sorted(wanted - set(got) - late)
        if silent:
            # no hand-over within limit_s: a process that runs but never answers (hung)
            # would otherwise be neither a survivor nor failed, and a new process could be
            # started for its device beside it; it failed, fence it
            log.warning("ranks %s (%s) did not hand over within %.0f s: counted as failed",
                        silent, [plan.devices[r] for r in silent], limit_s)
            for rank in silent:
                self.supervisor.fence(procs[rank])
                wanted.discard(rank)
                free.discard(rank)
                late.add(rank)
        outcome.collect_parts = {
            "handoff": (handed_at or time.perf_counter()) - began,
            "leave": time.perf_counter() - (handed_at or began)}
        if late:
            outcome.failed = tuple(sorted(set(failed) | late))
            log.warning("ranks %s (%s) failed during the hand-over", sorted(late),
                        [plan.devices[r] for r in sorted(late)])
        outcome.handoffs = got
        outcome.resume = resume_point(plan, got, committed)
        stuck = sorted((wanted - free) & set(got))
        if stuck:
            log.warning("ranks %s (%s) did not leave the failed round: they are stopped and "
                        "started again", stuck, [plan.devices[r] for r in stuck])
            if outcome.resume is not None and outcome.resume >= 0:
                requests = _Requests(store, generation, self.requests)
                for rank in stuck:
                    if outcome.resume in got[rank].own_steps:
                        requests.ask(rank, outcome.resume)
                outcome.stuck = requests.collect()
        self.waiting = {plan.devices[r] for r in free}

    def close(self) -> None:
        try:
            self.supervisor.close()
        finally:
            if self.cgroups:
                remove_cgroups(self.cgroups)
