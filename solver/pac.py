"""PAC fine-tuning plans: a forward-only pipeline (phase 1), uneven data parallelism (phase 2).

[Note: PAC phases]
Parallel-adapter fine-tuning (Pluto and Charon, ICPP'24; ``asteroid_fx.adapters``) trains
only a side network fed by tapped hidden states of a frozen backbone, so

* phase 1 (epoch 1) runs the backbone forward once per sample, without backward, through
  a pipeline plan whose cuts lie at the taps (the backbone's *segments* are the layers of
  a coarse cost table, :func:`segment_costs`: no backward, no gradients or optimizer
  state, frozen weights counted once), and hands each sample's cache entry (the taps and
  the head's inputs) to the device that trains on that sample;
* phase 2 (every step, from the cache) trains the adapters (and the head's side) with data
  parallelism: device ``d`` takes ``share_d`` samples of every mini-batch (Algorithm 1,
  ``solver.split.split_shares``, by speed, capped by the memory left after its cache),
  then the adapter gradients are all-reduced (``solver.evaluate.allreduce_time``).

The cache is placed on the device that trains on the samples (``cache="local"``: nothing
moves after epoch 1). Predicted times (``PacPrediction``): one phase-1 step is a
forward-only pipeline of ``M`` micro-batches, ``sum_s E_f^s + (M - 1) max_s E_f^s``, where
``E_f^s`` is ``solver.evaluate``'s forward term plus the stage's hand-off of cache entries;
one phase-2 step is ``max_d compute_d + all-reduce``, ``compute_d`` the whole step
(side path, head, loss, backward, optimizer step) as ``PacModel.step_fit`` measured it on
the profiling host, over the device's speed; without that measurement, the head's layers
from the cost table (a frozen head's backward counted at ``FROZEN_BACKWARD_SHARE`` of its
measured backward), the adapters' FLOPs and the optimizer step; epoch 1 runs a
phase-1 and a phase-2 step per mini-batch, later epochs only phase 2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.pac_plan import PacModel, PacPlan, PacPrediction
from contracts.plan import Plan
from contracts.table import CostTable, LayerCost, TimeFit
from solver.evaluate import WORKSPACE_BYTES, allreduce_time, evaluate, transfer_time
from solver.split import split_shares
from solver.timing import Timing

__all__ = ["PacModel", "PacPrediction", "PacPlan", "segment_costs", "plan_finetune",
           "predict_finetune"]   # the plan's data types live in contracts/pac_plan.py

FROZEN_BACKWARD_SHARE = 0.5
"""Backward time of a frozen layer (input gradients only) as a share of its measured
backward (input and weight gradients: two matrix products of about equal cost)."""


def _bounds(taps: Sequence[int]) -> list[tuple[int, int]]:
    first, out = 0, []
    for last in taps:
        out.append((first, last))
        first = last + 1
    return out


def segment_costs(costs: CostTable, taps: Sequence[int]) -> CostTable:
    """The backbone up to the last tap as a forward-only cost table of one layer per
    segment (see [Note: PAC phases]): forward fits summed, no backward, weights frozen
    (``buffer_bytes``), the activations of its largest layer only (nothing is kept for
    backward), and the cuts at the taps. Device columns are dropped (speed-scaled)."""
    if not taps or taps[-1] >= costs.num_layers - 1:
        raise PlanError(f"taps {list(taps)} must be layers before the last of the "
                        f"{costs.num_layers} layers of the cost table")
    layers = []
    for j, (first, last) in enumerate(_bounds(taps)):
        part = costs.layers[first:last + 1]
        layers.append(LayerCost(
            name=f"segment{j}", op="segment",
            fwd=TimeFit(sum(lc.fwd.intercept_s for lc in part),
                        sum(lc.fwd.per_sample_s for lc in part)),
            bwd=TimeFit(0.0, 0.0), param_bytes=0,
            activation_bytes=max(lc.output_bytes for lc in part),
            output_bytes=costs.cut_bytes[last],
            flops=sum(lc.flops for lc in part),
            buffer_bytes=sum(lc.param_bytes + lc.buffer_bytes for lc in part)))
    return replace(costs, layers=tuple(layers),
                   cut_bytes=tuple(costs.cut_bytes[t] for t in taps[:-1]),
                   columns=(), update_s_per_byte=0.0, optimizer_state_factor=0.0,
                   model_name=f"{costs.model_name} (PAC backbone)")


def _entry_parts(costs: CostTable, taps: Sequence[int], entry_bytes: int) -> list[int]:
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


def predict_finetune(plan: PacPlan, costs: CostTable, cluster: Cluster) -> PacPrediction:
    """Predict both phases of ``plan`` (see [Note: PAC phases]); pure."""
    cluster = cluster.for_costs(costs)
    model = plan.model
    coarse = segment_costs(costs, model.taps)
    p1 = evaluate(plan.phase1, coarse, cluster)
    parts = _entry_parts(costs, model.taps, model.entry_bytes)
    e_f = []
    for s, stage in enumerate(plan.phase1.stages):
        sent = sum(parts[stage.first:stage.last + 1])
        e_f.append(p1.stages[s].e_f + _handoff_s(cluster, plan.phase1, s, plan.devices,
                                                 plan.shares, sent))
    phase1_step = sum(e_f) + (plan.phase1.num_micro_batches - 1) * max(e_f)

    timing = Timing.of(costs, cluster)
    head_first, last = model.taps[-1] + 1, costs.num_layers - 1
    speeds = timing.speeds
    # a frozen head computes input gradients only: about half of a layer's backward
    bwd_share = 1.0 if model.train_head else FROZEN_BACKWARD_SHARE
    compute = []
    intercept, per_sample = model.step_fit
    for device, share in zip(plan.devices, plan.shares, strict=True):
        if intercept + per_sample > 0:   # measured: the whole step, over the device's speed
            compute.append((intercept + per_sample * share) / speeds[device])
            continue
        head = (timing.fwd_time(device, head_first, last, share)
                + bwd_share * timing.bwd_time(device, head_first, last, share))
        adapters = 3.0 * model.adapter_flops * share / (costs.host_flops * speeds[device])
        update = costs.update_s_per_byte * model.trainable_bytes / speeds[device]
        compute.append(head + adapters + update)
    allreduce = allreduce_time(cluster, plan.devices, model.trainable_bytes)
    phase2_step = max(compute) + allreduce

    steps = plan.steps_per_epoch
    epoch1 = steps * (phase1_step + phase2_step)
    epoch = steps * phase2_step
    total = epoch1 + (plan.epochs - 1) * epoch
    cache = {d: share * steps * model.entry_bytes
             for d, share in zip(plan.devices, plan.shares, strict=True)}
    phase2_mem = _phase2_memory(costs, plan)
    peak = {d: p1.peak_memory_bytes.get(d, 0) + phase2_mem[d] for d in plan.devices}
    return PacPrediction(phase1_step_s=phase1_step, phase2_step_s=phase2_step,
                         allreduce_s=allreduce, epoch1_s=epoch1, epoch_s=epoch,
                         total_s=total, peak_memory_bytes=peak, cache_bytes=cache)


def _phase2_fixed(costs: CostTable, model: PacModel, osf: float) -> int:
    head_params = sum(lc.param_bytes + lc.buffer_bytes
                      for lc in costs.layers[model.taps[-1] + 1:])
    trainable = model.trainable_bytes * (2.0 + osf)
    return int(WORKSPACE_BYTES + head_params + trainable)


def _phase2_per_sample(costs: CostTable, model: PacModel, steps: int) -> tuple[int, int]:
    """(cache bytes, working bytes) per sample of a device's share."""
    head_act = sum(lc.activation_bytes for lc in costs.layers[model.taps[-1] + 1:])
    return steps * model.entry_bytes, model.entry_bytes + head_act


def _phase2_memory(costs: CostTable, plan: PacPlan) -> dict[str, int]:
    fixed = _phase2_fixed(costs, plan.model, costs.optimizer_state_factor)
    cache, work = _phase2_per_sample(costs, plan.model, plan.steps_per_epoch)
    return {d: fixed + share * (cache + work)
            for d, share in zip(plan.devices, plan.shares, strict=True)}


def _phase2_shares(costs: CostTable, cluster: Cluster, model: PacModel, batch_size: int,
                   steps: int, devices: Sequence[str], reserved: Mapping[str, int]
                   ) -> tuple[int, ...]:
    """Algorithm 1 over all devices, each capped by the memory its cache leaves; raises
    ``PlanError`` naming the device that is most bytes short when the cache fits nowhere."""
    timing = Timing.of(costs, cluster)
    speeds = [timing.speeds[d] for d in devices]
    fixed = _phase2_fixed(costs, model, costs.optimizer_state_factor)
    cache, work = _phase2_per_sample(costs, model, steps)
    per_sample = cache + work
    caps = []
    for d in devices:
        room = cluster.device(d).memory_bytes - fixed - reserved.get(d, 0)
        caps.append(max(0, room // per_sample) if per_sample > 0 else batch_size)
    shares = split_shares(batch_size, speeds, caps)
    if shares is not None:
        return shares
    total = sum(speeds)
    short = []
    for d, v in zip(devices, speeds, strict=True):
        want = max(1, math.ceil(batch_size * v / total))
        need = fixed + reserved.get(d, 0) + want * per_sample
        short.append((need - cluster.device(d).memory_bytes, d, want, need))
    gap, device, want, need = max(short)
    have = cluster.device(device).memory_bytes
    raise PlanError(
        f"the activation cache does not fit: device {device!r} would hold {want} samples x "
        f"{steps} steps x {model.entry_bytes} bytes of cache (needs {need} bytes with the "
        f"phase-1 weights) but has {have} bytes, {max(gap, 1)} bytes short; use fewer "
        f"samples (--samples), fewer taps, a smaller batch or devices with more memory")


def _takeover(costs: CostTable, cluster: Cluster, model: PacModel, lost_share: int,
              steps: int, others: Sequence[str], reserved: Mapping[str, int]
              ) -> tuple[int, ...] | None:
    """How many of a lost device's rows each other device takes over (Algorithm 1 over
    the fastest ``min(len(others), lost_share)`` of them, capped by the memory their own
    cache leaves), or None when they cannot hold them."""
    if not others:
        return None
    timing = Timing.of(costs, cluster)
    order = sorted(others, key=lambda d: -timing.speeds[d])[:lost_share]
    try:
        part = _phase2_shares(costs, cluster, model, lost_share, steps, order, reserved)
    except PlanError:
        return None
    taken = dict(zip(order, part, strict=True))
    return tuple(taken.get(d, 0) for d in others)


def plan_finetune(costs: CostTable, cluster: Cluster, model: PacModel, *, batch_size: int,
                  num_samples: int, epochs: int, micro_batch_size: int | None = None,
                  phase1_planner: str = "asteroid") -> PacPlan:
    """Plan both phases of PAC fine-tuning (see [Note: PAC phases]); pure.

    ``phase1_planner`` is any planner of ``solver.api`` (``asteroid``: the fastest
    forward pipeline; ``pp-equal``: one device per stage, which spreads the frozen
    weights and so lowers each device's peak memory).

    Raises:
        PlanError: bad sizes, no forward-only pipeline fits, or the cache fits nowhere.
    """
    from solver.api import plan as plan_fn

    if batch_size < 1 or epochs < 1:
        raise PlanError(f"--batch-size and --epochs must be >= 1, got {batch_size} and "
                        f"{epochs}")
    steps = num_samples // batch_size
    if steps < 1:
        raise PlanError(f"{num_samples} samples make no full batch of {batch_size}; use "
                        f"more samples or a smaller --batch-size")
    if batch_size < len(cluster.devices):
        raise PlanError(f"--batch-size {batch_size} is smaller than the {len(cluster.devices)} "
                        f"devices of the cluster; phase 2 gives every device >= 1 sample")
    coarse = segment_costs(costs, model.taps)
    phase1 = plan_fn(coarse, cluster, batch_size, planner=phase1_planner,
                     optimizer_state_factor=0.0, micro_batch_size=micro_batch_size)
    p1_memory = evaluate(phase1, coarse, cluster.for_costs(coarse)).peak_memory_bytes
    devices = tuple(cluster.names)
    shares = _phase2_shares(costs, cluster.for_costs(costs), model, batch_size, steps, devices,
                            p1_memory)
    fallback = {}
    for lost, lost_share in zip(devices, shares, strict=True):
        others = tuple(d for d in devices if d != lost)
        extra = _takeover(costs, cluster.for_costs(costs), model, lost_share, steps, others,
                          {d: p1_memory.get(d, 0) + s * sum(_phase2_per_sample(
                              costs, model, steps)) for d, s in zip(devices, shares,
                                                                    strict=True)})
        if extra is not None:
            fallback[lost] = extra
    draft = PacPlan(model=model, batch_size=batch_size, num_samples=num_samples,
                    steps_per_epoch=steps, epochs=epochs, phase1=phase1, devices=devices,
                    shares=shares, model_hash=costs.model_hash,
                    cluster_hash=cluster.cluster_hash, fallback=fallback)
    return replace(draft, predicted=predict_finetune(draft, costs, cluster))
