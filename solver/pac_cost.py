"""What a PAC plan costs: both phases' step times and each device's memory ([Note: PAC phases]
in ``solver.pac``)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace

from contracts.arguments import check_cluster, check_costs, require
from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.pac_plan import PacModel, PacPlan, PacPrediction
from contracts.plan import Plan
from contracts.table import CostTable, LayerCost, TimeFit
from solver.evaluate import allreduce_time, evaluate, transfer_time
from solver.timing import Timing

__all__ = ["segment_costs", "predict_finetune", "phase1_memory", "entry_parts", "disk_s",
           "FROZEN_BACKWARD_SHARE", "DevicePeaks", "Holders", "phase2_compute", "phase2_fixed",
           "phase2_per_sample", "fetch_s", "peaks", "workspaces"]

FROZEN_BACKWARD_SHARE = 0.5
"""Backward time of a frozen layer (input gradients only) as a share of its measured
backward (input and weight gradients: two matrix products of about equal cost)."""


def _bounds(taps: Sequence[int]) -> list[tuple[int, int]]:
    first, out = 0, []
    for last in taps:
        out.append((first, last))
        first = last + 1
    return out


def segment_costs(costs: CostTable, taps: Sequence[int],
                  cold_s: Sequence[float] = ()) -> CostTable:
    """The backbone up to the last tap as a forward-only cost table of one layer per
    segment (see [Note: PAC phases]): forward fits summed (plus ``cold_s[j]`` per call of
    segment ``j``, [Note: cold weights in phase 1]), no backward, weights frozen
    (``buffer_bytes``), the activations of its largest layer only (nothing is kept for
    backward), and the cuts at the taps. Device columns are dropped (speed-scaled); the
    runtime's measured costs per stage call and per message (``runtime_overhead``,
    ``message_overhead_s``) stay (see [Note: phase-1 time])."""
    if not taps or taps[-1] >= costs.num_layers - 1:
        raise PlanError(f"taps {list(taps)} must be layers before the last of the "
                        f"{costs.num_layers} layers of the cost table")
    if cold_s and len(cold_s) != len(taps):
        raise PlanError(f"{len(cold_s)} cold-call figures for {len(taps)} segments; measure "
                        f"them for this adapter model (asteroid_fx.finetune)")
    layers = []
    for j, (first, last) in enumerate(_bounds(taps)):
        part = costs.layers[first:last + 1]
        layers.append(LayerCost(
            name=f"segment{j}", op="segment",
            fwd=TimeFit(sum(lc.fwd.intercept_s for lc in part) + (cold_s[j] if cold_s else 0.0),
                        sum(lc.fwd.per_sample_s for lc in part)),
            bwd=TimeFit(0.0, 0.0), param_bytes=0,
            activation_bytes=max(lc.output_bytes for lc in part),
            output_bytes=costs.cut_bytes[last],
            flops=sum(lc.flops for lc in part),
            buffer_bytes=sum(lc.param_bytes + lc.buffer_bytes for lc in part)))
    return replace(costs, layers=tuple(layers),
                   cut_bytes=tuple(costs.cut_bytes[t] for t in taps[:-1]),
                   columns=(), update_s_per_byte=0.0, optimizer_state_factor=0.0, tied=(),
                   model_name=f"{costs.model_name} (PAC backbone)")


def entry_parts(costs: CostTable, taps: Sequence[int], entry_bytes: int) -> list[int]:
    """Cache-entry bytes per sample produced by each segment (taps, and the head inputs
    for the last), scaled so that they add up to ``entry_bytes``."""
    raw = [costs.cut_bytes[t] for t in taps]
    total = sum(raw) or 1
    return [int(round(entry_bytes * r / total)) for r in raw]


def _handoff_s(cluster: Cluster, phase1: Plan, s: int, owners: Sequence[str],
               owner_shares: Sequence[int], bytes_per_sample: int) -> float:
    """Mean seconds per micro-batch for stage ``s`` to send its cache-entry parts to the
    samples' owners (``solver.evaluate.transfer_time`` per micro-batch)."""
    stage = phase1.stages[s]
    mb = phase1.micro_batch_size
    total = 0.0
    for m in range(phase1.num_micro_batches):
        lo, hi = m * mb, (m + 1) * mb
        pieces, names, start = [], [], 0
        for owner, share in zip(owners, owner_shares, strict=True):
            a, b = max(lo, start), min(hi, start + share)
            if a < b:
                pieces.append(b - a)
                names.append(owner)
            start += share
        total += transfer_time(cluster, stage.devices, stage.shares, names, pieces,
                               bytes_per_sample)
    return total / phase1.num_micro_batches


# [Note: phase-1 time]
# A phase-1 step is a forward-only pipeline of M micro-batches; stage s's forward term
# E_f^s is solver.evaluate's (its slowest device's segments at its share, plus receiving
# the cut), and stage s finishes micro-batch k at
#     sum_{i<=s} E_f^i + k max_{i<=s} E_f^i .
# Right after it, the stage sends that micro-batch's cache-entry parts to their owners
# (runtime.pac_train: asynchronous sends with tags of their own, after the activation),
# one hand-off H_s (the mean per micro-batch) after the other on its port, so
#     phase-1 step = max_s (sum_{i<=s} E_f^i + max((M - 1) max_{i<=s} E_f^i + H_s, M H_s)).
# Until 2026-12-04 both this and the simulation sent every hand-off after the stage's last
# forward, as the runtime once did; on local3 (gpt_small, 1 x 16) they then predicted
# phase 1 1.1-1.3x the measured step.
# Stage 0 also makes its samples (``PacModel.sample_s`` per sample, measured at planning,
# over the device's speed): about a tenth of a GPT segment's forward per sample.
# Every message (a re-sharded piece of a cut, a hand-off) also costs the runtime CPU on
# both ends, which a capped device pays at 1/speed; with tens of small messages per step
# it is what pipelines pay beyond their forwards. It is charged as a per-message latency:
# the table's measured ``message_overhead_s`` (the host probe's,
# ``asteroid_fx.runtime_overhead``, or ``calibrate``'s fit to a run), which the forward-only
# table keeps (``segment_costs``), so the phase-1 planner and the prediction both see it.
# Without it, phase 1 of a 3-stage pipeline was predicted 1.8x too fast (2026-12-03); a
# fixed 1.5 ms per message (the per-hop cost before gloo's loop thread stopped spinning,
# docs/benchmarks.md "Per-hop cost") predicted it 33-37 % too slow once the segments'
# forwards matched the table (2026-12-05); the probe's 0.45 ms comes within 5-11 %
# (docs/benchmarks.md, "PAC fine-tuning").
# The closed form overlaps what a device cannot: its receives block it and each device
# has one outgoing port, so the hand-offs of all micro-batches queue behind each other and
# behind the cut pieces. For a pipeline (more than one stage) the phase-1 step is
# therefore the larger of the closed form and the event simulation of one mini-batch
# (``solver.pac_simulate.simulate_phase1``, a few hundred tasks); the closed form is kept
# as ``PacPrediction.phase1_closed_form_s``. On local3 the simulation came within +14 %
# of a run where the closed form missed by +50 % (docs/benchmarks.md).


# [Note: cold weights in phase 1]
# Phase 1 runs micro-batches of one sample, whose forward streams each segment's weights
# once (gpt_small: 3-3.6 MB a segment); between two calls a stage waits for messages, and
# whatever else runs on the device (here: the other emulated devices, other jobs) evicts
# them. The cost table times each layer back to back, its weights warm in the cache. On
# this project's host a segment's forward of one sample took 17-21 % longer after a sweep
# of the last-level cache than warm (an L2-sized sweep: +1 %), and the phase-1 runs
# measured their forwards' CPU 11-28 % above the table. So ``finetune`` measures, per
# segment, a one-sample forward cold (after a pause and a sweep of the last-level cache,
# as a stage calls it after its wait: asteroid_fx/finetune.py [Note: a step after a wait])
# against the warm one right before it (``asteroid_fx.finetune.measure_cold_segments``,
# ``PacModel.segment_cold_s``) and :func:`segment_costs` adds the difference to each call
# of the segment, over the device's speed like its layers. With the sweep alone the
# figure moved 0.1-0.8 ms a segment between measurements and phase 1's prediction 0.58-
# 0.71 s with it; with the pause it is 0.6-0.8 ms. A device whose cache holds its weights
# between calls (no other work) pays less than this.
# On the VM of 2026-12-05 (a 480 MiB last-level cache) the sweep made the figure 0.9 ms a
# segment call, but nothing in a run evicts 12.6 MiB of weights from such a cache: the
# fast device's in-run forward CPU matched the table without the extras (0.167-0.172 s
# against 0.170 s; with them 0.290 s), and phase 1 came 23-34 % under its prediction in
# six quiet runs. So ``finetune`` measures the extras only where every device's copy of
# the backbone together needs more than a quarter of the host's last-level cache
# (``asteroid_fx.finetune.weights_stay_cached``); else there are none.


def predict_finetune(plan: PacPlan, costs: CostTable, cluster: Cluster) -> PacPrediction:
    """Predict both phases of ``plan`` (see [Note: PAC phases] and [Note: phase-1 time]);
    pure."""
    require(plan, PacPlan, PlanError, "plan", "load one with PacPlan.load('pac_plan.json') "
            "or make one with afx.plan_finetune(...)")
    cluster = check_cluster(cluster)
    model = plan.model
    coarse = segment_costs(check_costs(costs), model.taps, model.segment_cold_s)
    p1_cluster = cluster.for_costs(coarse)
    cluster = cluster.for_costs(costs)
    p1 = evaluate(plan.phase1, coarse, p1_cluster)
    parts = entry_parts(costs, model.taps, model.entry_bytes)
    m = plan.phase1.num_micro_batches
    phase1_step, e_f = 0.0, []
    speeds = Timing.of(costs, cluster).speeds
    for s, stage in enumerate(plan.phase1.stages):
        making = 0.0 if s > 0 else max(   # stage 0 makes its samples (PacModel.sample_s)
            model.sample_s * share / speeds[d]
            for d, share in zip(stage.devices, stage.shares, strict=True))
        e_f.append(p1.stages[s].e_f + making)
        sent = sum(parts[stage.first:stage.last + 1])
        handoff = _handoff_s(p1_cluster, plan.phase1, s, plan.devices, plan.shares, sent)
        # micro-batch k's forward ends at sum(e_f) + k max(e_f); its hand-offs follow it
        # on the device's port, behind the earlier micro-batches' ones
        phase1_step = max(phase1_step, sum(e_f) + max((m - 1) * max(e_f) + handoff,
                                                      m * handoff))
    closed_form = phase1_step
    if plan.phase1.num_stages > 1:     # ports and blocking receives: see the Note
        from solver.pac_simulate import simulate_phase1

        phase1_step = max(closed_form, simulate_phase1(plan, costs, cluster)[0])

    # a cache on disk: its writes in phase 1, its reads in phase 2 ([Note: a cache on disk])
    write, copy, wait = disk_s(costs, cluster, model, plan.devices, plan.shares,
                               plan.cache_disk)
    phase1_step += max(write)
    compute = phase2_compute(costs, cluster, model, plan.devices, plan.shares)
    allreduce = allreduce_time(cluster, plan.devices, model.wire_bytes)
    fetch = fetch_s(cluster, plan.devices, plan.shares, _table(plan, 2), model.entry_bytes)
    # the reads run ahead: their CPU adds to the step, their storage wait overlaps it
    phase2_step = max(max(c + r for c, r in zip(compute, copy, strict=True)) + allreduce,
                      fetch, max(wait))
    handoff = _rehome_s(cluster, plan.devices, plan.shares, _table(plan, 1), _table(plan, 2),
                        plan.steps_per_epoch * model.entry_bytes)

    steps = plan.steps_per_epoch
    epoch1 = steps * (phase1_step + phase2_step) + handoff
    epoch = steps * phase2_step
    total = epoch1 + (plan.epochs - 1) * epoch
    # phase 1 fills the whole cache before the adapters train and the backbone is dropped
    # then (runtime.pac_train): the frozen weights and the adapter steps never meet
    peak, cache = peaks(costs, model, plan.devices, plan.shares, steps,
                         phase1_memory(costs, model, plan.phase1), _table(plan, 1),
                         _table(plan, 2), plan.phase1, workspaces(cluster, plan.devices),
                         on_disk=plan.cache_disk)
    return PacPrediction(phase1_step_s=phase1_step, phase2_step_s=phase2_step,
                         allreduce_s=allreduce, epoch1_s=epoch1, epoch_s=epoch,
                         total_s=total, peak_memory_bytes=peak, cache_bytes=cache,
                         phase1_closed_form_s=closed_form, fetch_s=fetch, handoff_s=handoff,
                         write_s=max(write),
                         read_s=max(max(c, w) for c, w in zip(copy, wait, strict=True)))


# [Note: a cache on disk]
# A device of ``PacPlan.cache_disk`` keeps the rows it trains on in an unnamed file of its
# local storage (runtime.activation_cache.DiskRows), exactly its own rows. Phase 1 writes
# each mini-batch's rows there as they arrive; in phase 2 a thread reads the next step's
# rows while a step computes and all-reduces (runtime.pac_train._ReadAhead). Memory holds
# the step's entry and the rows read ahead, and in phase 1 one mini-batch's rows until
# they are written, never the whole cache (``peaks``). Per device and mini-batch of
# ``share`` rows of ``entry_bytes`` (``disk_s``):
#     write = share x entry_bytes x max(write_s_per_byte / speed, 1 / storage)
#     copy  = share x entry_bytes x read_s_per_byte / speed
#     wait  = share x entry_bytes / storage            (storage = storage_mb_s x 1e6)
# The write is added to the phase-1 step (a device writes before its next forward). The
# read's CPU (``copy``) adds to the device's phase-2 step; its storage ``wait`` overlaps
# the step and the all-reduce, so the step is at least the longest wait. ``X_s_per_byte``
# is measured on the profiling host (files in its page cache: the copy's CPU, which scales
# with the device's speed); ``storage_mb_s`` (a device's storage bandwidth, from the
# cluster; none: the page cache) is where the file has to come from storage, as it does
# once the cache outgrows the page cache. The phase-2 shares weigh each device by the
# seconds a sample adds to its step, ``max(compute + copy, wait)`` (``_phase2_shares``),
# so a device on slow storage trains on fewer samples. ``--cache-store auto`` chooses
# among memory, a partial spill and every device on disk ([Note: choosing the store]).

def disk_s(costs: CostTable, cluster: Cluster, model: PacModel, devices: Sequence[str],
           shares: Sequence[int], on_disk: Collection[str]
           ) -> tuple[list[float], list[float], list[float]]:
    """Per device, for its rows of one mini-batch in its disk cache (0 for a device not
    ``on_disk``): seconds to write them, and the CPU and the storage seconds of reading
    them back (see [Note: a cache on disk]); pure."""
    speeds = Timing.of(costs, cluster.for_costs(costs)).speeds
    write, copy, wait = [], [], []
    for d, share in zip(devices, shares, strict=True):
        device = cluster.device(d)
        floor = 0.0 if device.storage_mb_s is None else 1.0 / (device.storage_mb_s * 1e6)
        size = share * model.entry_bytes if d in on_disk else 0
        write.append(size * max(model.write_s_per_byte / speeds[d], floor))
        copy.append(size * model.read_s_per_byte / speeds[d])
        wait.append(size * floor)
    return write, copy, wait


def phase2_compute(costs: CostTable, cluster: Cluster, model: PacModel,
                    devices: Sequence[str], shares: Sequence[int]) -> list[float]:
    """Seconds of each device's phase-2 step before the all-reduce (see [Note: PAC
    phases])."""
    timing = Timing.of(costs, cluster)
    head_first, last = model.taps[-1] + 1, costs.num_layers - 1
    speeds = timing.speeds
    # a frozen head computes input gradients only: about half of a layer's backward
    bwd_share = 1.0 if model.train_head else FROZEN_BACKWARD_SHARE
    compute = []
    intercept, per_sample = model.step_fit
    for device, share in zip(devices, shares, strict=True):
        # the runtime's own cost of a round (the device's runtime overhead,
        # asteroid_fx/runtime_overhead.py [Note: runtime overhead]): its bookkeeping, which
        # the measured fit leaves out; the fit times the step's forward and backward calls
        # as the runtime makes them, after a wait (asteroid_fx/finetune.py [Note: a step
        # after a wait]), so the overhead's per-call costs would count them twice
        sums, divisor = timing.sums_of(device), timing.device(device).divisor
        if intercept + per_sample > 0:   # measured: the whole step, over the device's speed
            compute.append((intercept + per_sample * share) / speeds[device]
                           + sums.round_s / divisor)
            continue
        head = (timing.fwd_time(device, head_first, last, share)       # calls included
                + bwd_share * timing.bwd_time(device, head_first, last, share))
        adapters = 3.0 * model.adapter_flops * share / (costs.host_flops * speeds[device])
        update = costs.update_s_per_byte * model.trainable_bytes / speeds[device]
        compute.append(head + adapters + update + sums.round_s / divisor)
    return compute


def phase2_fixed(costs: CostTable, model: PacModel, osf: float) -> int:
    head_params = sum(lc.param_bytes + lc.buffer_bytes
                      for lc in costs.layers[model.taps[-1] + 1:])
    trainable = model.trainable_bytes * (2.0 + osf)
    return int(head_params + trainable)


def phase2_per_sample(costs: CostTable, model: PacModel, steps: int) -> tuple[int, int]:
    """(cache bytes, working bytes) per sample of a device's share: the working bytes are
    the step's entry and what its forward saves for backward (``PacModel.step_saved_bytes``
    as measured; without it the head's activations, which leave out the side path's)."""
    saved = model.step_saved_bytes or sum(
        lc.activation_bytes for lc in costs.layers[model.taps[-1] + 1:])
    return steps * model.entry_bytes, model.entry_bytes + saved


Holders = Mapping[str, Sequence[int]]
"""Per trainer: rows of its share of every mini-batch held by each device (``devices``
order); a trainer that is not a key holds its own rows (``PacPlan.cache_phase1/2``)."""


def _table(plan: PacPlan, phase: int) -> dict[str, tuple[int, ...]]:
    return {d: plan.holders(d, phase) for d in plan.devices}


def _counts(devices: Sequence[str], shares: Sequence[int], holders: Holders
            ) -> list[list[int]]:
    """``rows[t][h]``: rows of trainer ``t`` held on device ``h`` (indices)."""
    return [list(holders[d]) if d in holders else
            [s if j == t else 0 for j in range(len(devices))]
            for t, (d, s) in enumerate(zip(devices, shares, strict=True))]


def _phase1_wire(parts: Sequence[int], plan: Plan, device: str, held: int) -> int:
    """Wire buffers of phase 1's hand-offs on ``device`` (see [Note: phase-1 memory]): the
    entry parts (``parts``: ``entry_parts`` per segment) of one mini-batch that it sends
    (rows it computes and another device holds; the owners take them after their own
    forward, so they wait until the mini-batch ends) and of one micro-batch that it
    receives (rows it holds and another device computes; a receive copies out of its
    buffer, which the next message of that sender reuses); ``held``: rows of a mini-batch
    it holds in phase 1 (spread evenly over the micro-batches, an estimate)."""
    batch, mb = plan.batch_size, plan.micro_batch_size
    wire = 0.0
    for st in plan.stages:
        part = sum(parts[st.first:st.last + 1])
        computed = st.shares[st.devices.index(device)] if device in st.devices else 0
        wire += part * computed * plan.num_micro_batches * (1 - held / batch)  # sent
        wire += part * mb * held / batch * (1 - computed / mb)  # received
    return int(wire)


# [Note: phase-1 memory]
# What a device holds in phase 1 besides its cache rows (runtime.pac_train counts the
# same tensors, [Note: PAC run] there): the frozen segments of its stage (no head: a
# frozen head is loaded when phase 2 starts, after the segments are dropped), the
# workspace constant of solver.evaluate, and for the micro-batch it has just computed at
# its share b: the cut it received (b x cut_in), what its segments output (their taps and
# the cut it passes on, b x its entry parts; with a cache dtype, both as made and as
# rounded for the cache, [Note: cache dtype] in runtime.adapter_model), the wire buffers
# of the cut (one received, b x cut_in; two micro-batches sent, 2 b x cut_out: a stage
# waits for the pieces of two micro-batches ago before it sends more); plus the
# hand-offs' wire buffers
# (``_phase1_wire``: a mini-batch of them sent, a micro-batch received). Nothing is kept
# for backward, so unlike ``solver.evaluate``'s training memory no micro-batch's
# activations outlive it. The transients inside a
# segment's forward (a feed-forward layer's hidden state) are not counted, as the runtime
# does not see them either.

def phase1_memory(costs: CostTable, model: PacModel, phase1: Plan) -> dict[str, int]:
    """Bytes each device of ``phase1`` holds in phase 1 besides its cache rows and its
    hand-offs' wire buffers (see [Note: phase-1 memory]); pure."""
    coarse = segment_costs(costs, model.taps, model.segment_cold_s)
    if phase1.stages and phase1.stages[-1].last >= coarse.num_layers:
        raise PlanError(f"the phase-1 plan runs segments up to {phase1.stages[-1].last} but "
                        f"the model has {coarse.num_layers} segments (taps "
                        f"{list(model.taps)}); plan phase 1 on this model's segment table "
                        f"(solver.pac.segment_costs)")
    parts = entry_parts(costs, model.taps, model.entry_bytes)
    if model.made_bytes != model.entry_bytes:     # made, then rounded for the cache
        parts = [a + b for a, b in zip(parts, entry_parts(costs, model.taps, model.made_bytes),
                                       strict=True)]
    last = phase1.num_stages - 1
    out = {}
    for s, stage in enumerate(phase1.stages):
        weights = sum(coarse.layers[j].buffer_bytes for j in range(stage.first, stage.last + 1))
        cut_in = coarse.cut_bytes[stage.first - 1] if s > 0 else 0
        cut_out = coarse.cut_bytes[stage.last] if s < last else 0
        made = sum(parts[stage.first:stage.last + 1])
        for d, b in zip(stage.devices, stage.shares, strict=True):
            sends = min(2, phase1.num_micro_batches)
            out[d] = int(weights + b * (cut_in + made)
                         + b * (cut_in + sends * cut_out))
    return out


class DevicePeaks:
    """``peaks`` of one device at a time: a device's peak depends only on the rows it
    holds in each phase and on how many rows of its own share it holds itself in phase 2
    (the others it streams from their holders), so ``place_cache`` scores a move of one
    row by the two devices it changes."""

    def __init__(self, costs: CostTable, model: PacModel, devices: Sequence[str],
                 shares: Sequence[int], steps: int, p1_memory: Mapping[str, int],
                 phase1_plan: Plan | None, workspace: Mapping[str, int],
                 on_disk: Collection[str]) -> None:
        self.devices, self.shares, self.model = devices, shares, model
        self.p1_memory, self.phase1_plan = p1_memory, phase1_plan
        self.workspace, self.on_disk = workspace, on_disk
        self.fixed = phase2_fixed(costs, model, costs.optimizer_state_factor)
        self.unit, self.work = phase2_per_sample(costs, model, steps)
        self.parts = entry_parts(costs, model.taps, model.entry_bytes)

    def peak(self, h: int, held1: int, held2: int, own2: int, away2: int) -> int:
        """Peak bytes of device ``h`` holding ``held1`` rows of a mini-batch in phase 1 and
        ``held2`` in phase 2, ``own2`` of them its own share's, whose other ``away2`` rows
        other devices hold in phase 2."""
        d, entry = self.devices[h], self.model.entry_bytes
        # on disk, phase 1 holds one mini-batch's rows until they are written, phase 2 the
        # next step's rows, read ahead
        unit1, unit2 = (entry, entry) if d in self.on_disk else (self.unit, self.unit)
        wire1 = (0 if self.phase1_plan is None
                 else _phase1_wire(self.parts, self.phase1_plan, d, held1))
        rows1 = held1 * unit1 + wire1
        rows2 = held2 * unit2
        # streamed rows: a holder keeps two steps' sends in flight (prefetch), the trainer
        # one step's receive buffers besides the step's entry (counted in ``work``)
        wire = entry * (2 * (held2 - own2) + away2)
        # phase 1 holds the adapters (and a trained head), not a frozen head
        return self.workspace.get(d, 0) + max(
            self.p1_memory.get(d, 0) + self.model.trainable_bytes + rows1,
            self.fixed + self.shares[h] * self.work + rows2 + wire)


def peaks(costs: CostTable, model: PacModel, devices: Sequence[str], shares: Sequence[int],
           steps: int, p1_memory: Mapping[str, int], phase1: Holders, phase2: Holders,
           phase1_plan: Plan | None = None, workspace: Mapping[str, int] | None = None,
           on_disk: Collection[str] = ()) -> tuple[dict[str, int], dict[str, int]]:
    """Peak bytes of each device over both phases and the bytes it caches in phase 2 (see
    [Note: cache placement]): the device's fixed workspace (``Cluster.workspace_bytes``)
    plus ``max(phase-1 peak + rows held in phase 1 + the hand-offs' wire buffers, phase-2
    step + rows held in phase 2 + the wire buffers of the rows it streams)``; a device
    ``on_disk`` holds one mini-batch's rows in phase 1 and none in phase 2 ([Note: a
    cache on disk])."""
    peaks = DevicePeaks(costs, model, devices, shares, steps, p1_memory, phase1_plan,
                         workspace or {}, on_disk)
    one, two = _counts(devices, shares, phase1), _counts(devices, shares, phase2)
    n = len(devices)
    peak, cache = {}, {}
    for h, d in enumerate(devices):
        held2 = sum(two[t][h] for t in range(n))
        peak[d] = peaks.peak(h, sum(one[t][h] for t in range(n)), held2, two[h][h],
                             sum(two[h][j] for j in range(n) if j != h))
        cache[d] = held2 * steps * model.entry_bytes
    return peak, cache


def fetch_s(cluster: Cluster, devices: Sequence[str], shares: Sequence[int],
             phase2: Holders, entry_bytes: int) -> float:
    """Link seconds per phase-2 step of the rows streamed from their holders: the busiest
    device's incoming or outgoing messages (every message pays the link's latency, which
    carries the runtime's cost per message)."""
    rows = _counts(devices, shares, phase2)
    return _busiest(cluster, devices, rows, entry_bytes)


def _rehome_s(cluster: Cluster, devices: Sequence[str], shares: Sequence[int],
              phase1: Holders, phase2: Holders, unit_bytes: int) -> float:
    """Seconds to hand the rows held in phase 1 to their phase-2 holders when phase 1 ends
    (one message per pair of devices), the busiest device's messages."""
    one, two = _counts(devices, shares, phase1), _counts(devices, shares, phase2)
    n = len(devices)
    moved = [[0] * n for _ in range(n)]     # moved[a][b]: rows from a to b
    for t in range(n):
        src = [h for h in _layout(t, n) for _ in range(one[t][h])]
        dst = [h for h in _layout(t, n) for _ in range(two[t][h])]
        for a, b in zip(src, dst, strict=True):
            if a != b:
                moved[a][b] += 1
    return _busiest(cluster, devices, moved, unit_bytes, by_pair=True)


def _layout(t: int, n: int) -> list[int]:
    """The order of the holders within trainer ``t``'s rows (``PacPlan.homes``)."""
    return [t] + [h for h in range(n) if h != t]


def _busiest(cluster: Cluster, devices: Sequence[str], rows: Sequence[Sequence[int]],
             row_bytes: int, by_pair: bool = False) -> float:
    """``rows[t][h]`` rows go from ``h`` to ``t`` (``by_pair``: ``rows[a][b]`` from ``a``
    to ``b``), one message per pair; the most seconds any device's port is busy."""
    n = len(devices)
    busy = [0.0] * n
    into = [0.0] * n
    for t in range(n):
        for h in range(n):
            src, dst, count = (t, h, rows[t][h]) if by_pair else (h, t, rows[t][h])
            if src == dst or count <= 0:
                continue
            a, b = devices[src], devices[dst]
            seconds = cluster.latency_s(a, b) + count * row_bytes / cluster.bandwidth_bytes_s(a, b)
            busy[src] += seconds
            into[dst] += seconds
    return max(busy + into, default=0.0)

def workspaces(cluster: Cluster, devices: Sequence[str]) -> dict[str, int]:
    return {d: cluster.workspace_bytes(d) for d in devices}
