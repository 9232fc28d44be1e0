"""Discrete-event simulation of training rounds of a plan (1F1B or GPipe), for checking the model.

[Note: simulator vs evaluate]
``evaluate`` predicts a round in closed form from per-stage terms (E_f, E_b of the
slowest device of each group, the dominant stage pacing the steady phase). The
simulator executes the schedule micro-batch by micro-batch instead:

* every device's forward, backward and optimizer step take the times ``evaluate``
  charges (``solver.timing.Timing``: its type's column of the cost table as measured,
  or the base times over its speed; the group steps as long as its slowest member);
* every device is a serial resource running its own program (1F1B: ``S - s - 1``
  warm-up forwards, then one-forward-one-backward, then the cool-down backwards;
  GPipe: all forwards, then all backwards in reverse order);
* every device has one outgoing and one incoming network port, each a serial resource
  (so every directed pair is a serial link, and a device sending to several peers
  sends one piece after the other, as ``evaluate``'s ``max(sum sent, sum received)``
  assumes); an activation piece (the samples of
  micro-batch ``m`` that device ``a`` of stage ``s-1`` computed and device ``b`` of stage
  ``s`` needs: re-sharding by sample ranges) goes from ``a`` to ``b`` after ``a``'s
  forward, and the matching gradient piece goes back after ``b``'s backward;
* with ``comm="blocking"`` (the default, as the runtime's blocking p2p and as
  ``evaluate`` charges it) the receiving stage's device is busy while its input pieces
  arrive and while it sends gradients back; with ``comm="overlap"`` only the link is;
* after its last backward each stage with more than one device runs a ring all-reduce
  of its gradients, ``2 (k-1)/k * bytes / min bandwidth``, on all its devices;
* activations of a micro-batch are held from the start of its forward to the end of
  its backward, on top of the device's static memory (weights, gradients, optimizer
  state, workspace and the runtime's wire buffers, taken from ``evaluate``'s memory
  model).

The two agree exactly on single-device stages without communication where the
dominant stage paces a full pipeline; they differ where devices of one group run
unevenly (the simulator lets a fast device run ahead), where the dominant stage cannot
be kept busy, and, with ``comm="overlap"``, where transfers hide behind compute.
``tests/test_simulate.py`` measures the agreement on random plans.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from contracts.arguments import check_cluster, check_costs, check_plan
from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.plan import Plan
from contracts.table import CostTable
from solver.evaluate import (
    WORKSPACE_FRACTION,
    LayerSums,
    allreduce_time,
    check_covers,
    in_flight,
    split_ties,
    stage_memory_parts,
    tie_time,
)
from solver.timing import Timing

__all__ = ["SimEvent", "SimResult", "simulate", "program_order"]

_KINDS = ("F", "B", "SEND", "ALLREDUCE", "UPDATE")


@dataclass(frozen=True)
class SimEvent:
    """One interval of work: ``kind`` is F, B, SEND (a transfer; ``peer`` is the other end,
    ``device`` the end that is busy or, with overlapped comm, the receiver), ALLREDUCE or
    UPDATE (the optimizer step)."""

    device: str
    kind: str
    micro_batch: int
    start: float
    end: float
    stage: int
    round: int = 0
    peer: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "kind": self.kind, "micro_batch": self.micro_batch,
                "start": self.start, "end": self.end, "stage": self.stage,
                "round": self.round, "peer": self.peer}


@dataclass(frozen=True)
class SimResult:
    """What a simulation measured. ``round_time_s`` is the simulated time of all rounds
    divided by their number; ``bubble_fraction`` is the share of device-time (devices x
    total time) not spent in F or B compute."""

    round_time_s: float
    total_time_s: float
    rounds: int
    schedule: str
    comm: str
    network: str
    bubble_fraction: float
    busy_s: Mapping[str, float]
    peak_memory_bytes: Mapping[str, int]
    memory_samples: Mapping[str, tuple[tuple[float, int], ...]]
    events: tuple[SimEvent, ...]
    throughput_samples_s: float = 0.0
    stage_of: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "round_time_s": self.round_time_s,
            "total_time_s": self.total_time_s,
            "rounds": self.rounds,
            "schedule": self.schedule,
            "comm": self.comm,
            "network": self.network,
            "bubble_fraction": self.bubble_fraction,
            "throughput_samples_s": self.throughput_samples_s,
            "busy_s": dict(self.busy_s),
            "peak_memory_bytes": dict(self.peak_memory_bytes),
            "memory_samples": {d: [list(s) for s in v] for d, v in self.memory_samples.items()},
            "stage_of": dict(self.stage_of),
            "events": [e.to_dict() for e in self.events],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def program_order(schedule: str, stage: int, num_stages: int,
                  num_micro_batches: int) -> list[tuple[str, int]]:
    """The compute program of one stage: ``[("F", 0), ("F", 1), ("B", 0), ...]``."""
    m_count = num_micro_batches
    if schedule == "gpipe":
        return [("F", m) for m in range(m_count)] + [("B", m)
                                                     for m in reversed(range(m_count))]
    if schedule != "1f1b":
        raise PlanError(f"schedule must be '1f1b' or 'gpipe', got {schedule!r}")
    warm = min(num_stages - stage - 1, m_count)
    out: list[tuple[str, int]] = [("F", m) for m in range(warm)]
    for i in range(m_count - warm):
        out += [("F", warm + i), ("B", i)]
    out += [("B", m) for m in range(m_count - warm, m_count)]
    return out


@dataclass
class _Task:
    """A node of the task graph; ``device`` chains it in program order, ``link`` is FIFO."""

    key: tuple[Any, ...]
    duration: float
    device: str | None
    link: tuple[str, str] | None
    event: SimEvent | None
    deps: list[int] = field(default_factory=list)
    users: list[int] = field(default_factory=list)
    ready: float = 0.0
    pending: int = 0
    start: float = 0.0
    end: float = 0.0


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> int:
    return max(0, min(a[1], b[1]) - max(a[0], b[0]))


def _memory_terms(plan: Plan, sums: LayerSums, cluster: Cluster, schedule: str
                  ) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """``(static, wire, per_micro_batch)`` bytes of every device, from evaluate's memory
    model: static = weights, gradients, optimizer state, buffers, fixed workspace and
    replicas held for other devices; wire = the runtime's wire buffers, allocated once and
    held (``LayerSums.flight_bytes`` less its activations); per micro-batch = the share's
    activations (the workspace fraction of wire and live activations is added when the
    level is computed)."""
    static: dict[str, int] = {}
    wire: dict[str, int] = {}
    act: dict[str, int] = {}
    weights: dict[str, int] = {}
    osf, m = plan.optimizer_state_factor, plan.num_micro_batches
    for s, stage in enumerate(plan.stages):
        fixed, _ = stage_memory_parts(sums, stage.first, stage.last, 0, osf,
                                      len(stage.devices), m)
        flight = in_flight(m, plan.num_stages, s, schedule)
        acts = sums.activations(stage.first, stage.last)
        per_wire = sums.flight_bytes(stage.first, stage.last, flight, m) - flight * acts
        for dev, share in zip(stage.devices, stage.shares, strict=True):
            static[dev] = cluster.workspace_bytes(dev) + fixed
            wire[dev] = share * per_wire
            act[dev] = share * acts
            weights[dev] = math.ceil(sums.params(stage.first, stage.last) * (1.0 + osf))
    for dev, holders in plan.replicas.items():
        for holder in holders:
            static[holder] = static.get(holder, 0) + weights[dev]
    return static, wire, act


MAX_ROUNDS = 1000
"""The most rounds ``simulate`` runs (each is a few thousand events on a large plan)."""


def simulate(plan: Plan, costs: CostTable, cluster: Cluster, *, rounds: int = 1,
             schedule: str | None = None, comm: str = "blocking",
             network: str = "ports") -> SimResult:
    """Simulate ``rounds`` training rounds of ``plan``; see [Note: simulator vs evaluate].

    Args:
        plan: the plan (its ``schedule`` unless ``schedule`` overrides it).
        costs: the model's cost table (layer times on the profiling host).
        cluster: devices (speed, memory) and links.
        rounds: consecutive rounds; round ``r + 1`` starts on a device after its stage's
            all-reduce of round ``r``.
        schedule: "1f1b" or "gpipe" (default: the plan's).
        comm: "blocking" (the receiving device waits for its transfers, as evaluate
            assumes) or "overlap" (transfers use only the network).
        network: "ports" (every device has one serial outgoing and one serial incoming
            port) or "pairs" (only every directed pair is a serial link, so a device
            talks to several peers at once at full bandwidth each).

    Raises:
        PlanError: bad arguments, or a plan that names devices or layers the cluster or
            cost table lacks.
    """
    check_plan(plan)
    cluster = check_cluster(cluster).for_costs(check_costs(costs))
    sched = schedule or plan.schedule
    if sched not in ("1f1b", "gpipe"):
        raise PlanError(f"schedule must be '1f1b' or 'gpipe', got {sched!r}")
    if comm not in ("blocking", "overlap"):
        raise PlanError(f"comm must be 'blocking' or 'overlap', got {comm!r}")
    if network not in ("ports", "pairs"):
        raise PlanError(f"network must be 'ports' or 'pairs', got {network!r}")
    if not isinstance(rounds, int) or rounds < 1:
        raise PlanError(f"rounds must be a positive integer, got {rounds!r}")
    if rounds > MAX_ROUNDS:
        raise PlanError(f"rounds {rounds} is above {MAX_ROUNDS}: every round after the first "
                        f"repeats its events (1,000 take about a second, 10,000 a quarter of a "
                        f"minute); simulate fewer")
    check_covers(plan, costs)
    timing = Timing.of(costs, cluster)
    for dev in plan.devices:
        if dev not in timing.devices:
            raise PlanError(f"plan device {dev!r} is not in the cluster; cluster devices: "
                            f"{list(cluster.names)}")

    sums = timing.base
    stages = plan.stages
    n_stages = len(stages)
    m_count = plan.num_micro_batches
    ranges = [st.sample_ranges() for st in stages]
    stage_of = {d: i for i, st in enumerate(stages) for d in st.devices}

    def compute(stage: int, dev: str, kind: str) -> float:
        st = stages[stage]
        share = st.shares[st.devices.index(dev)]
        timer = timing.fwd_time if kind == "F" else timing.bwd_time
        return timer(dev, st.first, st.last, share)

    def pieces(stage: int, dev: str) -> list[tuple[str, float]]:
        """(source device in stage - 1, seconds) of every piece of its input ``dev`` needs:
        the link's latency plus bytes / bandwidth, as ``transfer_time`` charges a message
        (0 seconds for a cut that carries no bytes: a dependency without a transfer)."""
        if stage == 0:
            return []
        per_sample = costs.cut_bytes[stages[stage].first - 1]
        out = []
        for src, rng in ranges[stage - 1].items():
            samples = _overlap(rng, ranges[stage][dev])
            if samples:
                secs = (0.0 if per_sample <= 0 or src == dev else
                        cluster.latency_s(src, dev)
                        + samples * per_sample / cluster.bandwidth_bytes_s(src, dev))
                out.append((src, secs))
        return out

    blocking = comm == "blocking"
    tasks: list[_Task] = []
    index: dict[tuple[Any, ...], int] = {}
    chain: dict[str, list[int]] = {d: [] for d in plan.devices}
    wants: list[list[tuple[Any, ...]]] = []  # dependency keys, resolved once all exist

    def add(key: tuple[Any, ...], duration: float, device: str, on_device: bool,
            link: tuple[str, str] | None, kind: str, stage: int, m: int, r: int,
            deps: list[tuple[Any, ...]], peer: str = "") -> None:
        ev = SimEvent(device, kind, m, 0.0, 0.0, stage, r, peer)
        tid = len(tasks)
        tasks.append(_Task(key, duration, device if on_device else None, link, ev))
        index[key] = tid
        wants.append(deps)
        if on_device:
            if chain[device]:
                tasks[tid].deps.append(chain[device][-1])
            chain[device].append(tid)

    round_end: dict[tuple[int, int], list[tuple[Any, ...]]] = {}
    ties = split_ties(plan, costs)
    for r in range(rounds):
        for s in range(n_stages):
            prog = program_order(sched, s, n_stages, m_count)
            for d in stages[s].devices:
                for kind, m in prog:
                    if kind == "F":
                        recv_keys: list[tuple[Any, ...]] = []
                        for src, secs in pieces(s, d):
                            key = ("RECV", r, s, d, src, m)
                            if secs <= 0:
                                recv_keys.append(("F", r, s - 1, src, m))
                                continue
                            add(key, secs, d, blocking, (src, d), "SEND", s, m, r,
                                [("F", r, s - 1, src, m)], peer=src)
                            recv_keys.append(key)
                        add(("F", r, s, d, m), compute(s, d, "F"), d, True, None, "F", s, m, r,
                            recv_keys + round_end.get((r - 1, s), []))
                    else:
                        grads: list[tuple[Any, ...]] = [("F", r, s, d, m)]
                        if s < n_stages - 1:
                            for nxt in stages[s + 1].devices:
                                for src, secs in pieces(s + 1, nxt):
                                    if src == d:
                                        grads.append(("SENDB", r, s + 1, nxt, d, m) if secs > 0
                                                     else ("B", r, s + 1, nxt, m))
                        add(("B", r, s, d, m), compute(s, d, "B"), d, True, None, "B", s, m, r,
                            grads)
                        for src, secs in pieces(s, d):
                            if secs > 0:
                                add(("SENDB", r, s, d, src, m), secs, d, blocking, (d, src),
                                    "SEND", s, m, r, [("B", r, s, d, m)], peer=src)
            group = stages[s].devices
            last: list[tuple[Any, ...]] = [("B", r, s, d, m) for d in group
                                           for m in range(m_count)]
            secs = allreduce_time(cluster, stages[s].devices,
                                  sums.params(stages[s].first, stages[s].last))
            if secs > 0:
                for d in group:
                    add(("AR", r, s, d), secs, d, True, None, "ALLREDUCE", s, -1, r, last)
                last = [("AR", r, s, d) for d in group]
            step = timing.group_update_time(stages[s].first, stages[s].last, group)
            if step > 0:
                for d in group:
                    add(("UP", r, s, d), step, d, True, None, "UPDATE", s, -1, r, last)
                last = [("UP", r, s, d) for d in group]
            round_end[(r, s)] = last
        for k, (tie, holders) in enumerate(ties):    # after every holder's own step
            ends = [key for h in holders for key in round_end[(r, h)]]
            secs = tie_time(cluster, plan, holders, tie)
            for h in holders:
                for d in stages[h].devices:
                    add(("TIE", r, k, d), secs, d, True, None, "ALLREDUCE", h, -1, r, ends)
                round_end[(r, h)] = [("TIE", r, k, d) for d in stages[h].devices]
    for task, deps in zip(tasks, wants, strict=True):
        task.deps.extend(index[k] for k in deps)

    _run(tasks, network)
    return _collect(plan, sums, tasks, sched, comm, network, rounds, stage_of, cluster)


def _run(tasks: list[_Task], network: str) -> None:
    """List scheduling in order of readiness; a transfer holds the sender's outgoing and
    the receiver's incoming port, first come first served."""
    for tid, task in enumerate(tasks):
        task.deps = sorted(set(task.deps))
        task.pending = len(task.deps)
        for dep in task.deps:
            tasks[dep].users.append(tid)
    heap: list[tuple[float, int]] = [(0.0, tid) for tid, t in enumerate(tasks) if not t.pending]
    heapq.heapify(heap)
    port_free: dict[tuple[str, str], float] = {}
    done = 0
    while heap:
        ready, tid = heapq.heappop(heap)
        task = tasks[tid]
        start = ready
        if task.link is not None:
            src, dst = task.link
            ports = (("out", src), ("in", dst)) if network == "ports" else ((src, dst),)
            start = max(start, *(port_free.get(p, 0.0) for p in ports))
            for p in ports:
                port_free[p] = start + task.duration
        task.start, task.end = start, start + task.duration
        done += 1
        for user in task.users:
            other = tasks[user]
            other.ready = max(other.ready, task.end)
            other.pending -= 1
            if not other.pending:
                heapq.heappush(heap, (other.ready, user))
    if done != len(tasks):  # pragma: no cover - the task graph is acyclic by construction
        raise PlanError("internal error: the simulated task graph has a cycle")


def _collect(plan: Plan, sums: LayerSums, tasks: list[_Task], sched: str,
             comm: str, network: str, rounds: int, stage_of: dict[str, int],
             cluster: Cluster) -> SimResult:
    events = []
    busy: dict[str, float] = {d: 0.0 for d in plan.devices}
    for task in tasks:
        if task.event is None:
            continue
        ev = task.event
        events.append(SimEvent(ev.device, ev.kind, ev.micro_batch, task.start, task.end,
                               ev.stage, ev.round, ev.peer))
        if ev.kind in ("F", "B"):
            busy[ev.device] += task.end - task.start
    events.sort(key=lambda e: (e.start, e.device, e.kind))
    total = max((t.end for t in tasks), default=0.0)
    n_dev = len(plan.devices)
    bubble = 1.0 - sum(busy.values()) / (n_dev * total) if total > 0 else 0.0

    static, wire, act = _memory_terms(plan, sums, cluster, sched)
    samples: dict[str, tuple[tuple[float, int], ...]] = {}
    peaks: dict[str, int] = {}
    for dev in plan.devices:
        changes: list[tuple[float, int]] = []
        for ev in events:
            if ev.device == dev and ev.kind == "F":
                changes.append((ev.start, act[dev]))
            elif ev.device == dev and ev.kind == "B":
                changes.append((ev.end, -act[dev]))
        changes.sort(key=lambda c: (c[0], c[1]))  # frees before allocations at equal times
        live = wire[dev]
        base = static[dev]
        peak = base + live + math.ceil(live * WORKSPACE_FRACTION)
        points = [(0.0, peak)]
        for when, delta in changes:
            live += delta
            level = base + live + math.ceil(live * WORKSPACE_FRACTION)
            peak = max(peak, level)
            points.append((when, level))
        samples[dev] = tuple(points)
        peaks[dev] = peak
    round_time = total / rounds
    return SimResult(
        round_time_s=round_time,
        total_time_s=total,
        rounds=rounds,
        schedule=sched,
        comm=comm,
        network=network,
        bubble_fraction=bubble,
        busy_s=busy,
        peak_memory_bytes=peaks,
        memory_samples=samples,
        events=tuple(events),
        throughput_samples_s=plan.batch_size / round_time if round_time > 0 else 0.0,
        stage_of=stage_of,
    )
