"""Event simulation of a PAC fine-tuning plan: the forward-only pipeline of phase 1, then phase 2.

[Note: PAC simulation]
``predict_finetune`` prices phase 1 in closed form ([Note: phase-1 time] in ``solver.pac_cost``).
The simulator runs one phase-1 mini-batch micro-batch by micro-batch on the task scheduler
of ``solver.simulate`` (every device a serial resource; every device one outgoing and one
incoming port):

* device ``d`` of stage ``s`` runs ``F(m)`` for ``m = 0 .. M-1`` in order; stage 0 first
  makes its samples (``PacModel.sample_s``); ``F`` takes its segments' forward time at its
  share over its speed (``solver.timing.Timing`` of the forward-only table);
* the cut's pieces (re-sharded by sample ranges) go from the devices of stage ``s-1`` to
  those of stage ``s`` after the sender's ``F(m)``; the receiver is busy while they arrive
  (blocking receives, as the runtime's); each message costs the link's latency plus the
  runtime's per-message cost (the table's ``message_overhead_s``) plus bytes / bandwidth;
* after a device's ``F(m)``, it hands micro-batch ``m``'s cache-entry parts to the devices
  that train on those rows (``runtime.pac_train`` sends them right after the activation),
  one message per (micro-batch, owner): the sender first pays the runtime's per-message
  cost on its own CPU (a ``PACK`` event on the device, before its next forward), then
  the bytes cross its outgoing port, arriving a link latency later; each owner takes its
  rows after its own forwards, stage by stage and micro-batch by micro-batch (as
  ``runtime.pac_train`` collects them), paying the per-message cost on its CPU (``TAKE``).

The phase-1 step ends with the last hand-off. Phase 2 is plain data parallelism (each
device's step, then one all-reduce): it has no schedule to simulate, so its step is
``predict_finetune``'s. Epoch 1 = steps x (phase 1 + phase 2), later epochs steps x phase 2.
Peak memory is ``predict_finetune``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.pac_plan import PacPlan
from contracts.table import CostTable
from solver.pac_cost import entry_parts, predict_finetune, segment_costs
from solver.simulate import SimEvent, _run, _Task
from solver.timing import Timing

__all__ = ["PacSimResult", "simulate_finetune", "simulate_phase1"]


@dataclass(frozen=True)
class PacSimResult:
    """Simulated seconds of one step of each phase and of the epochs; phase 1's events."""

    phase1_step_s: float
    phase2_step_s: float
    epoch1_s: float
    epoch_s: float
    total_s: float
    epochs: int
    phase1_bubble_fraction: float
    peak_memory_bytes: Mapping[str, int]
    events: tuple[SimEvent, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"phase1_step_s": self.phase1_step_s, "phase2_step_s": self.phase2_step_s,
                "epoch1_s": self.epoch1_s, "epoch_s": self.epoch_s, "total_s": self.total_s,
                "epochs": self.epochs, "phase1_bubble_fraction": self.phase1_bubble_fraction,
                "peak_memory_bytes": dict(self.peak_memory_bytes)}


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> int:
    return max(0, min(a[1], b[1]) - max(a[0], b[0]))


def simulate_finetune(plan: PacPlan, costs: CostTable, cluster: Cluster) -> PacSimResult:
    """Simulate ``plan`` (see [Note: PAC simulation]); pure.

    Raises:
        PlanError: a plan whose devices are not in the cluster, or whose taps do not fit
            the cost table.
    """
    phase1_step, events, bubble = simulate_phase1(plan, costs, cluster)
    pred = predict_finetune(plan, costs, cluster)
    phase1_step += pred.write_s      # a disk cache's writes ([Note: a cache on disk])
    steps = plan.steps_per_epoch
    epoch1 = steps * (phase1_step + pred.phase2_step_s)
    epoch = steps * pred.phase2_step_s
    return PacSimResult(phase1_step_s=phase1_step, phase2_step_s=pred.phase2_step_s,
                        epoch1_s=epoch1, epoch_s=epoch,
                        total_s=epoch1 + (plan.epochs - 1) * epoch, epochs=plan.epochs,
                        phase1_bubble_fraction=bubble,
                        peak_memory_bytes=dict(pred.peak_memory_bytes), events=events)


def simulate_phase1(plan: PacPlan, costs: CostTable, cluster: Cluster
                    ) -> tuple[float, tuple[SimEvent, ...], float]:
    """One phase-1 mini-batch of ``plan``, event by event (see [Note: PAC simulation]):
    its seconds, its events and the devices' idle fraction; pure."""
    missing = [d for d in plan.devices if d not in cluster.names]
    if missing:
        raise PlanError(f"PAC plan devices {missing} are not in the cluster "
                        f"({list(cluster.names)}); simulate with the cluster it was made for")
    model = plan.model
    coarse = segment_costs(costs, model.taps, model.segment_cold_s)
    net = cluster.for_costs(coarse)
    timing = Timing.of(coarse, net)
    speeds = Timing.of(costs, cluster.for_costs(costs)).speeds
    p1 = plan.phase1
    mb, m_count = p1.micro_batch_size, p1.num_micro_batches
    parts = entry_parts(costs, model.taps, model.entry_bytes)
    ranges = [st.sample_ranges() for st in p1.stages]
    owners = {d: plan.sample_range(d) for d in plan.devices}

    tasks: list[_Task] = []
    index: dict[tuple[Any, ...], int] = {}
    wants: list[list[tuple[Any, ...]]] = []
    chain: dict[str, int] = {}

    def add(key: tuple[Any, ...], duration: float, device: str, on_device: bool,
            link: tuple[str, str] | None, kind: str, stage: int, m: int,
            deps: list[tuple[Any, ...]], peer: str = "") -> None:
        tid = len(tasks)
        event = SimEvent(device, kind, m, 0.0, 0.0, stage, 0, peer)
        tasks.append(_Task(key, duration, device if on_device else None, link, event))
        index[key] = tid
        wants.append(deps)
        if on_device:
            if device in chain:
                tasks[tid].deps.append(chain[device])
            chain[device] = tid

    busy: dict[str, float] = {d: 0.0 for d in p1.devices}
    handed: list[tuple[int, int, int, str, str]] = []    # (stage, m, index in it, from, to)
    for s, stage in enumerate(p1.stages):
        cut = coarse.cut_bytes[stage.first - 1] if s > 0 else 0
        sent = sum(parts[stage.first:stage.last + 1])
        for d, share in zip(stage.devices, stage.shares, strict=True):
            fwd = timing.fwd_time(d, stage.first, stage.last, share)
            making = model.sample_s * share / speeds[d] if s == 0 else 0.0
            lo, hi = ranges[s][d]
            # the next stage's devices that receive a piece of the cut from d
            nexts = [] if s + 1 >= len(p1.stages) or coarse.cut_bytes[stage.last] <= 0 else [
                nxt for nxt, rng in ranges[s + 1].items()
                if nxt != d and _overlap(ranges[s][d], rng)]
            for m in range(m_count):
                deps: list[tuple[Any, ...]] = []
                if s > 0:
                    for src, rng in ranges[s - 1].items():
                        rows = _overlap(rng, ranges[s][d])
                        if not rows:
                            continue
                        if src == d or cut <= 0:
                            deps.append(("F", s - 1, src, m))
                            continue
                        secs = net.latency_s(src, d) + rows * cut / net.bandwidth_bytes_s(src, d)
                        add(("RECV", s, d, src, m), secs, d, True, (src, d), "SEND", s, m,
                            [("F", s - 1, src, m)], peer=src)
                        deps.append(("RECV", s, d, src, m))
                add(("F", s, d, m), fwd + making, d, True, None, "F", s, m, deps)
                busy[d] += fwd + making
                # micro-batch m's hand-offs right after its forward: the sender's CPU for
                # each message (the runtime's per-message cost at its speed), then the
                # bytes on its port and the link's own latency (the owner's CPU: TAKE)
                mine = (m * mb + lo, m * mb + hi)
                for owner, rows_of in owners.items():
                    rows = _overlap(mine, rows_of)
                    if not rows or owner == d or sent <= 0:
                        continue
                    cpu = net.message_cost_s(d)
                    add(("PACK", s, d, owner, m), cpu, d, True, None, "PACK", s, m,
                        [("F", s, d, m)], peer=owner)
                    busy[d] += cpu
                    secs = (net.link_latency_s(d, owner)
                            + rows * sent / net.bandwidth_bytes_s(d, owner))
                    # after the micro-batch's activation (sent first) has left on its link
                    after = [("RECV", s + 1, nxt, d, m) for nxt in nexts]
                    add(("HAND", s, d, owner, m), secs, d, False, (d, owner), "SEND", s, m,
                        [("PACK", s, d, owner, m), *after], peer=owner)
                    handed.append((s, m, stage.devices.index(d), d, owner))
    # each owner takes its rows after its own forwards, stage by stage, micro-batch by
    # micro-batch (runtime.pac_train's _collect), paying the per-message cost on its CPU
    for s, m, _i, d, owner in sorted(handed):
        cpu = net.message_cost_s(owner)
        add(("TAKE", s, d, owner, m), cpu, owner, True, None, "TAKE", s, m,
            [("HAND", s, d, owner, m)], peer=d)
        if owner in busy:      # an owner outside phase 1 has no forwards to idle between
            busy[owner] += cpu
    for task, deps in zip(tasks, wants, strict=True):
        task.deps.extend(index[k] for k in deps)
    _run(tasks, "ports")
    phase1_step = max((t.end for t in tasks), default=0.0)
    events = tuple(sorted((SimEvent(t.event.device, t.event.kind, t.event.micro_batch,
                                    t.start, t.end, t.event.stage, 0, t.event.peer)
                           for t in tasks if t.event is not None),
                          key=lambda e: (e.start, e.device, e.kind)))
    bubble = (1.0 - sum(busy.values()) / (len(busy) * phase1_step)
              if phase1_step > 0 and busy else 0.0)
    return phase1_step, events, bubble
