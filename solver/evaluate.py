"""The round-latency and memory model: what a plan costs on a cluster (``afx.evaluate``).

[Note: the latency model]
For stage ``s`` with layers ``D_s`` on devices ``G_s`` (shares ``b_d``, speeds ``v_d``):

* compute: device ``d`` needs ``sum_{l in D_s} fwd_l.at(b_d) / v_d`` (the same for
  backward); ``compute_f`` / ``compute_b`` are the maxima over the group. A device whose
  type has a column in the cost table takes that column's ``fwd_l`` / ``bwd_l`` as they
  are, without ``v_d`` ([Note: cost columns] in ``solver.timing``). The sums are
  taken from prefix sums of the fitted intercepts and slopes (``LayerSums``, through
  ``Timing``), which is the same number up to float rounding and lets the DP reproduce
  it bit for bit.
* communication of the cut before ``s`` (``s > 0``): ``cut_bytes[first_s - 1]`` per
  sample. Devices own contiguous sample ranges (``Stage.sample_ranges``); every device of
  ``G_s`` receives its range from the previous-stage devices that own those samples
  (re-sharding). Every (sender, receiver) piece is one message of ``latency + bytes/bw``
  (``Cluster.latency_s``: the link's one-way latency, 0 unless the cluster file sets
  ``latency_ms``). The transfer takes ``max(max over receivers of sum_src message times,
  max over senders of sum_dst message times)``. Gradients of the same cut go back the
  same way, so ``comm_b == comm_f``. Model inputs (stage 0) and labels are local.
* ``E_f = compute_f + comm_f``, ``E_b = compute_b + comm_b``, ``X = E_f + E_b``.
* ``T_a`` ring all-reduce of the stage's parameter bytes over the slowest link of the
  group, plus ``2(n - 1)`` times the group's largest latency (one message per ring step;
  0 for a single device), plus the optimizer step on the group's slowest device,
  ``max_d param_bytes * update_s_per_byte / v_d`` (``CostTable.update_s_per_byte``,
  measured by the profiler, 0 in tables without it; a device with a column takes its
  column's ``update_s_per_byte`` without ``v_d``). DESIGN.md's ``T_a`` is the all-reduce alone;
  the step is added because the round ends only after it, and for parameter-heavy
  stages it is several percent of a round. ``T_w`` / ``T_e`` as in DESIGN.md, with the
  drain correction below.
* The dominant stage is the one with the largest ``X``; on exact ties the **last** such
  stage wins. With two equal stages this gives the physically right ``(M + 1) X``
  (the first of them must also wait for the second's last micro-batch); the first would
  give ``M X``.
* ``round = max_s (T_w + T_e + T_a)``; throughput = batch_size / round.

[Note: tied weights]
A tensor several layers use (``CostTable.tied``: GPT-2's token embedding is its output
head) that a plan puts in several stages is copied into each (runtime/ties.py): each
holding stage adds to its ``T_a`` the all-reduce of the tensor's bytes over every device
of the holding stages (after its own all-reduce; the first stage, which ends the round
under 1F1B, waits for it), and every holder but the first keeps a copy with its gradient
and optimizer state (``(2 + optimizer_state_factor)`` times the bytes; the first stage's
layer counts the tensor already), plus a gradient-sized temporary where gradients
accumulate and the copy is larger than the stage's own largest gradient. The searches
(``solver.dp``, the MILP) do not see this term: their plans are scored by this function,
which does.

[Note: the drain correction]
The paper's ``T_e^s = M X_dm + sum_{i=s}^{dm-1} X_i`` (``s <= dm``) never counts the
stages *after* the dominant one: it assumes the dominant stage is busy from its first
forward to its last backward. Every micro-batch must make the round trip through the tail
``T_tail = sum_{i>dm} X_i`` between its forward and its backward on ``dm``; under 1F1B the
dominant stage runs ``w = min(M, S - dm)`` forwards before its first backward and ``w - 1``
backwards between its last forward and its last backward, so the round trip of the first
(last) micro-batch hides only behind ``(w - 1) E_f^dm`` (``(w - 1) E_b^dm``) of its work.
This model therefore adds, as a documented correction of the paper's formula,

    D = max(0, T_tail - (w - 1) min(E_f^dm, E_b^dm))

to ``T_e^s`` for every ``s <= dm`` (``s > dm`` are unchanged). Checks on single-device
stages without communication (``tests/test_evaluate.py``; ``solver.simulate`` agrees
exactly on the first three):

* ``M = 1``: ``round = sum_s X_s`` wherever the dominant stage is (one micro-batch goes
  through every stage and back; the paper's formula leaves out the stages after ``dm``);
* ``X = (10, 1)`` (``E_f = E_b``): 11 with ``M = 1``, ``4 * 10 = 40`` with ``M = 4``
  (the tail hides behind the dominant stage's work);
* ``E_f = (8, 1, 1, 1)``, ``E_b = (2, 1, 1, 1)``, ``M = 2``: ``D = 6 - 1 * 2``, 24;
* ``X_0 = 10`` (``E_f = E_b``) before 10 stages of ``X = 1``, ``M = 2``: ``D = 10 - 5``,
  round 25, where the simulator needs 29. Behind a long tail the correction is a lower
  bound: the tail's own 1F1B order makes micro-batch 0's backward wait for later
  forwards. ``tests/test_simulate.py`` measures the remaining gap on random plans.

The same formulas apply to ``schedule="gpipe"`` plans, except that all ``M``
micro-batches are in flight for memory.

[Note: the memory model]
Device ``d`` of stage ``s`` (layers ``first..last``, share ``b_d``) holds

* ``param_bytes * (2 + optimizer_state_factor)``: weights, gradients (backward allocates
  one per weight; later micro-batches accumulate into it) and optimizer state;
* the largest layer's ``param_bytes`` once more (``LayerSums.largest_params``) where
  gradients accumulate (``accumulates``): autograd computes a later micro-batch's
  gradient of a weight before adding it to ``.grad``, and an optimizer that keeps state
  (Adam, momentum) makes a temporary of a weight's size at its step; with one
  micro-batch and plain SGD the gradient is assigned, not added, and nothing is counted.
  A data-parallel group's device counts instead the flat copy of its largest all-reduce
  bucket (``transient_gradient_bytes``, ``SMALL_BUCKET_BYTES``);
* the stage's ``buffer_bytes``;
* ``b_d`` times ``LayerSums.flight_bytes``: for every micro-batch in flight
  (``F = min(M, S - s)`` under 1F1B, ``M`` under GPipe) the activations its layers save
  for backward (``activation_bytes``), and the runtime's wire buffers at the stage's two
  cuts (see [Note: wire buffers]);
* workspace ``WORKSPACE_FRACTION`` times those bytes: the gradient of the inputs that
  backward makes before it is copied into a send buffer, stage outputs that autograd
  does not save, the mini-batch the first and last stages hold, operators' scratch and
  gradients before they are accumulated;
* the device's fixed workspace, ``Cluster.workspace_bytes(d)``: what a training process
  holds there beyond its tensors whatever the stage (cuBLAS's workspaces on a GPU,
  measured by ``asteroid-fx profile --device cuda`` or its type's default in
  contracts/devices.py; none on a CPU). Every planner fits the rest into
  ``Cluster.usable_bytes(d)``, the device's memory less that workspace.

Every holder of a replica (``plan.replicas``) also stores that device's stage weights
and optimizer state, ``param_bytes * (1 + optimizer_state_factor)``.

[Note: wire buffers]
The runtime sends and receives through pooled buffers of the cut's size (runtime/comm.py
[Note: lean hops]) that it allocates when its pool is empty and keeps for the rest of
the run, so a stage holds the most it ever used at once. For the 1F1B and GPipe
schedules with activations posted two ahead and gradients one (``RECV_WINDOW``, runtime/
lowering.py [Note: posting receives]), replaying the runtime's own posts, releases and
recycles (tests/test_evaluate.py checks this against runtime.lowering) gives, per
sample and with ``c_in = cut_bytes[first - 1]`` (0 for the first stage) and
``c_out = cut_bytes[last]``:

* received activations: ``min(M, F + 2)`` buffers of ``c_in`` (one per micro-batch in
  flight, kept until its backward, and the next two posted ahead);
* gradients sent back: ``min(M, F + 1)`` of ``c_in``; a send is freed only once the
  schedule proves it received (runtime/lowering.py [Note: releasing sends]), which the
  cool-down's sends never are before the round ends;
* activations sent on: ``F`` of ``c_out`` (each freed when its gradient comes back);
* received gradients: one of ``c_out`` (posted ahead, consumed by the next backward).

The last stage sends nothing on; it holds the model's output for the loss instead,
``F`` times the last layer's ``output_bytes``. Before these were counted, the last stage
of a three-stage BERT with Adam was predicted at 0.89x its measured peak
(``tools/check_memory.py --cases bert-pp-adam``).

This counts tensors, as ``torch.cuda.max_memory_allocated`` does, and the runtime
measures the same (``peak_memory_bytes``, runtime/memory.py [Note: measured memory]).
What a CPU process takes from the C heap for those tensors is more (docs/latency-model.md,
"Memory").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from contracts.arguments import check_cluster, check_costs, check_plan
from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.plan import SMALL_BUCKET_BYTES, Plan, Prediction, StagePrediction
from contracts.table import CostTable, TiedWeight
from solver.timing import LayerSums, Timing

__all__ = [
    "WORKSPACE_FRACTION",
    "LayerSums",
    "evaluate",
    "check_covers",
    "transfer_time",
    "resharding_time",
    "resharding_pieces",
    "pieces_time",
    "Pieces",
    "allreduce_time",
    "allreduce_from",
    "stage_tail_time",
    "split_ties",
    "tie_time",
    "stage_memory_bytes",
    "stage_memory_parts",
    "transient_gradient_bytes",
    "accumulates",
    "memory_from_parts",
    "in_flight",
    "round_terms",
    "drain_term",
]

WORKSPACE_FRACTION = 0.1
"""Extra workspace as a fraction of the device's in-flight activation bytes."""


def transfer_time(cluster: Cluster, senders: Sequence[str], send_shares: Sequence[int],
                  receivers: Sequence[str], recv_shares: Sequence[int],
                  bytes_per_sample: int) -> float:
    """Seconds to re-shard one micro-batch across a cut (see [Note: the latency model]).

    Senders and receivers own contiguous sample ranges in the order given; each receiver
    gets its range from whichever senders own those samples.
    """
    def link(i: int, j: int) -> tuple[float, float] | None:
        a, b = senders[i], receivers[j]
        if a == b:
            return None
        return cluster.latency_s(a, b), cluster.bandwidth_bytes_s(a, b)

    return resharding_time(send_shares, recv_shares, bytes_per_sample, link)


def resharding_time(send_shares: Sequence[int], recv_shares: Sequence[int],
                    bytes_per_sample: int,
                    link: Callable[[int, int], tuple[float, float] | None]) -> float:
    """``transfer_time`` given ``link(sender index, receiver index)``: the link's
    ``(latency s, bandwidth bytes/s)``, or None for a device sending to itself (free)."""
    if bytes_per_sample <= 0:
        return 0.0
    return pieces_time(resharding_pieces(send_shares, recv_shares, link), len(send_shares),
                       len(recv_shares), bytes_per_sample)


Pieces = list[tuple[int, int, float, int, float]]
"""The messages of a re-sharding: ``(sender, receiver, latency s, samples, bandwidth
bytes/s)`` in the order the samples are walked (see ``resharding_pieces``)."""


def resharding_pieces(send_shares: Sequence[int], recv_shares: Sequence[int],
                      link: Callable[[int, int], tuple[float, float] | None]) -> Pieces:
    """Which sender sends how many samples to which receiver over which link: every
    overlap of a sender's and a receiver's contiguous sample ranges, except a device's
    samples to itself."""
    out: Pieces = []
    i = j = 0
    s_start, r_start = 0, 0
    s_stop, r_stop = send_shares[0], recv_shares[0]
    while i < len(send_shares) and j < len(recv_shares):
        overlap = min(s_stop, r_stop) - max(s_start, r_start)
        if overlap > 0:
            found = link(i, j)
            if found is not None:
                out.append((i, j, found[0], overlap, found[1]))
        if s_stop <= r_stop:
            i += 1
            if i < len(send_shares):
                s_start, s_stop = s_stop, s_stop + send_shares[i]
        else:
            j += 1
            if j < len(recv_shares):
                r_start, r_stop = r_stop, r_stop + recv_shares[j]
    return out


def pieces_time(pieces: Pieces, senders: int, receivers: int, bytes_per_sample: int) -> float:
    """The re-sharding time of ``pieces`` for a cut of ``bytes_per_sample``: the largest
    sum of message times ``latency + samples * bytes / bandwidth`` over the senders and
    over the receivers."""
    if bytes_per_sample <= 0:
        return 0.0
    recv = [0.0] * receivers
    send = [0.0] * senders
    for i, j, latency, overlap, bandwidth in pieces:
        seconds = latency + overlap * bytes_per_sample / bandwidth
        recv[j] += seconds
        send[i] += seconds
    return max(max(recv), max(send))


def allreduce_time(cluster: Cluster, devices: Sequence[str], param_bytes: int) -> float:
    """Ring all-reduce of ``param_bytes`` inside a group:
    ``2(n-1) w / (n min_bw) + 2(n-1) max_latency`` (2(n-1) steps of one message each)."""
    n = len(devices)
    if n <= 1 or param_bytes <= 0:
        return 0.0
    min_bw = min(cluster.bandwidth_bytes_s(a, b) for a in devices for b in devices if a != b)
    return allreduce_from(n, param_bytes, min_bw, cluster.max_latency_s(devices))


def allreduce_from(group_size: int, param_bytes: int, min_bw: float,
                   max_latency_s: float = 0.0) -> float:
    """``allreduce_time`` given the group's slowest link (bytes/s) and largest latency."""
    if group_size <= 1 or param_bytes <= 0:
        return 0.0
    return (2.0 * (group_size - 1) * param_bytes / (group_size * min_bw)
            + 2.0 * (group_size - 1) * max_latency_s)


def stage_tail_time(cluster: Cluster, devices: Sequence[str], timing: Timing, first: int,
                    last: int) -> float:
    """``T_a``: the group's all-reduce plus the optimizer step of its slowest device
    (``Timing.group_update_time``: each device's own column or scaled base step)."""
    return (allreduce_time(cluster, devices, timing.base.params(first, last))
            + timing.group_update_time(first, last, devices))


def split_ties(plan: Plan, costs: CostTable) -> list[tuple[TiedWeight, tuple[int, ...]]]:
    """The tied weights (``CostTable.tied``) ``plan`` puts in two or more stages, each with
    its holding stages (see [Note: tied weights] above)."""
    stage_of = {layer: s for s, stage in enumerate(plan.stages)
                for layer in range(stage.first, stage.last + 1)}
    split = []
    for tie in costs.tied:
        holders = tuple(sorted({stage_of[layer] for layer in tie.layers}))
        if len(holders) > 1:
            split.append((tie, holders))
    return split


def tie_time(cluster: Cluster, plan: Plan, holders: Sequence[int], tie: TiedWeight) -> float:
    """The all-reduce of a tied weight's gradient over every device of its holding stages."""
    devices = [d for s in holders for d in plan.stages[s].devices]
    return allreduce_time(cluster, devices, tie.bytes)


def _copies_bytes(copies: Sequence[int], sums: LayerSums, first: int, last: int,
                  num_micro_batches: int, optimizer_state_factor: float) -> int:
    """The memory a stage's copies of tied weights add: weight, gradient and optimizer
    state each, and where gradients accumulate (:func:`accumulates`) a temporary of the
    largest copy's size where it is larger than the stage's own largest gradient."""
    if not copies:
        return 0
    extra = math.ceil(sum(copies) * (2.0 + optimizer_state_factor))
    if accumulates(num_micro_batches, optimizer_state_factor):
        extra += max(0, max(copies) - sums.largest_params(first, last))
    return extra


def in_flight(num_micro_batches: int, num_stages: int, stage: int, schedule: str = "1f1b") -> int:
    """Micro-batches whose activations stage ``stage`` holds at once."""
    if schedule == "gpipe":
        return num_micro_batches
    return min(num_micro_batches, num_stages - stage)


def transient_gradient_bytes(sums: LayerSums, first: int, last: int, group_size: int = 1,
                             accumulates: bool = True) -> int:
    """The gradient bytes a device of a stage on layers ``first..last`` holds besides its
    ``.grad`` tensors at their peak: the largest layer's when gradients ``accumulate`` (a
    later micro-batch's gradient before it is added, or an optimizer's temporary of a
    weight's size: see :func:`accumulates`) and, in a data-parallel group
    (``group_size > 1``), the flat copy of an all-reduce bucket, up to the largest
    gradient or ``SMALL_BUCKET_BYTES`` but never more than the stage's gradients
    (runtime/comm.py ``gradient_buckets``)."""
    largest = sums.largest_params(first, last)
    if group_size > 1:     # at least the largest gradient, so accumulating adds nothing
        return min(int(sums.params(first, last)), max(largest, SMALL_BUCKET_BYTES))
    return largest if accumulates else 0


def accumulates(num_micro_batches: int | None, optimizer_state_factor: float) -> bool:
    """Whether a device makes a gradient-sized temporary besides ``.grad``: with more than
    one micro-batch a round (each later one's gradient is computed, then added), or with
    an optimizer that keeps state (its step's temporaries); None: not known, assume so.
    With one micro-batch and plain SGD autograd hands each gradient to ``.grad`` as it
    is."""
    return (num_micro_batches is None or num_micro_batches > 1
            or optimizer_state_factor > 0.0)


def stage_memory_parts(sums: LayerSums, first: int, last: int, in_flight: int,
                       optimizer_state_factor: float, group_size: int = 1,
                       num_micro_batches: int | None = None) -> tuple[int, int]:
    """``(fixed, per_sample)`` bytes of layers ``first..last`` on one device of a group of
    ``group_size`` running ``num_micro_batches`` a round (None: unknown, counted as
    several): a device with ``b`` samples needs ``fixed + b * per_sample +
    ceil(b * per_sample * WORKSPACE_FRACTION)``."""
    weights = math.ceil(sums.params(first, last) * (2.0 + optimizer_state_factor))
    fixed = (weights + sums.buffers(first, last)
             + transient_gradient_bytes(sums, first, last, group_size,
                                        accumulates(num_micro_batches, optimizer_state_factor)))
    return fixed, sums.flight_bytes(first, last, in_flight, num_micro_batches)


def memory_from_parts(fixed: int, per_sample: int, share: int) -> int:
    """Peak bytes for ``share`` samples given ``stage_memory_parts``."""
    activations = share * per_sample
    return fixed + activations + math.ceil(activations * WORKSPACE_FRACTION)


def stage_memory_bytes(sums: LayerSums, first: int, last: int, share: int, in_flight: int,
                       optimizer_state_factor: float, group_size: int = 1,
                       num_micro_batches: int | None = None) -> int:
    """Peak bytes of one device of a group of ``group_size`` holding layers ``first..last``
    with ``share`` samples (``num_micro_batches``: see :func:`stage_memory_parts`)."""
    fixed, per_sample = stage_memory_parts(sums, first, last, in_flight,
                                           optimizer_state_factor, group_size,
                                           num_micro_batches)
    return memory_from_parts(fixed, per_sample, share)


def drain_term(f_dm: float, b_dm: float, tail: float, tail_stages: int,
               num_micro_batches: int) -> float:
    """The drain correction ``D`` (see [Note: the drain correction]).

    Args:
        f_dm, b_dm: ``E_f`` and ``E_b`` of the dominant stage.
        tail: ``sum (E_f + E_b)`` of the stages after it.
        tail_stages: how many stages follow it.
        num_micro_batches: ``M``.
    """
    w = min(num_micro_batches, tail_stages + 1)
    hidden = (w - 1) * min(f_dm, b_dm)
    return tail - hidden if tail > hidden else 0.0


def round_terms(e_f: Sequence[float], e_b: Sequence[float],
                num_micro_batches: int) -> tuple[list[float], list[float], int]:
    """``(T_w, T_e, dominant)`` per stage from DESIGN.md (dominant: last argmax of E_f+E_b),
    with the drain correction added to ``T_e`` of the stages up to the dominant one."""
    x = [f + b for f, b in zip(e_f, e_b, strict=True)]
    dm = 0
    for s, value in enumerate(x):
        if value >= x[dm]:
            dm = s
    m = num_micro_batches
    t_w = [0.0] * len(x)
    for s in range(1, len(x)):
        t_w[s] = t_w[s - 1] + e_f[s - 1]
    drain = drain_term(e_f[dm], e_b[dm], sum(x[dm + 1:]), len(x) - dm - 1, m)
    t_e = []
    for s in range(len(x)):
        if s < dm:
            t_e.append(m * x[dm] + sum(x[s:dm]) + drain)
        elif s == dm:
            t_e.append(m * x[dm] + drain)
        else:
            t_e.append(m * x[dm] - sum(x[dm:s]))
    return t_w, t_e, dm


def check_covers(plan: Plan, costs: CostTable) -> None:
    """``PlanError`` unless the plan's stages end at the cost table's last layer (a table of
    another model, or a plan made for one)."""
    if plan.stages[-1].last != costs.num_layers - 1:
        raise PlanError(f"the plan covers layers 0..{plan.stages[-1].last} but the cost table "
                        f"has {costs.num_layers} layers; re-plan for this model")


def _check(plan: Plan, costs: CostTable, cluster: Cluster) -> None:
    check_covers(plan, costs)
    known = set(cluster.names)
    for device in plan.devices:
        if device not in known:
            raise PlanError(f"plan device {device!r} is not in the cluster "
                            f"{sorted(known)}; re-plan for this cluster")
    for device, holders in plan.replicas.items():
        for name in (device, *holders):
            if name not in known:
                raise PlanError(f"replica entry {device!r}: {list(holders)} names unknown "
                                f"device {name!r}; devices are {sorted(known)}")
        if device not in plan.devices:
            raise PlanError(f"replicas name {device!r}, which holds no stage of the plan")


def evaluate(plan: Plan, costs: CostTable, cluster: Cluster) -> Prediction:
    """Predict round time, throughput, per-stage terms and per-device peak memory.

    Args:
        plan: the plan to score (its ``predicted`` field is ignored).
        costs: the model's cost table (layer ``i`` = layer ``i`` of the plan).
        cluster: the devices and links named by the plan.

    Returns:
        The ``Prediction``; ``prediction.fits`` tells whether every device has room.

    Raises:
        PlanError: the plan does not match the cost table or the cluster.
    """
    check_plan(plan)
    cluster = check_cluster(cluster).for_costs(check_costs(costs))
    _check(plan, costs, cluster)
    timing = Timing.of(costs, cluster)
    sums = timing.base
    m = plan.num_micro_batches
    num_stages = plan.num_stages

    compute: list[tuple[float, float]] = []
    comm: list[float] = []
    t_a: list[float] = []
    for s, stage in enumerate(plan.stages):
        compute.append(timing.compute(stage.first, stage.last, stage.devices, stage.shares))
        if s == 0:
            comm.append(0.0)
        else:
            prev = plan.stages[s - 1]
            comm.append(transfer_time(cluster, prev.devices, prev.shares, stage.devices,
                                      stage.shares, costs.cut_bytes[stage.first - 1]))
        t_a.append(stage_tail_time(cluster, stage.devices, timing, stage.first, stage.last))
    copies: dict[int, list[int]] = {}     # stage -> bytes of the tied weights it copies
    for tie, holding in split_ties(plan, costs):
        secs = tie_time(cluster, plan, holding, tie)
        owner = holding[0]            # the first layer's stage counts the tensor already
        for h in holding:
            t_a[h] += secs
            if h != owner:
                copies.setdefault(h, []).append(tie.bytes)

    e_f = [cf + c for (cf, _), c in zip(compute, comm, strict=True)]
    e_b = [cb + c for (_, cb), c in zip(compute, comm, strict=True)]
    t_w, t_e, dm = round_terms(e_f, e_b, m)
    predictions = tuple(
        StagePrediction(e_f=e_f[s], e_b=e_b[s], t_w=t_w[s], t_e=t_e[s], t_a=t_a[s],
                        compute_f=compute[s][0], compute_b=compute[s][1],
                        comm_f=comm[s], comm_b=comm[s])
        for s in range(num_stages))
    round_time = max(p.total for p in predictions)

    peak: dict[str, int] = {}
    stage_weights: dict[str, int] = {}
    for s, stage in enumerate(plan.stages):
        flight = in_flight(m, num_stages, s, plan.schedule)
        replica = math.ceil(sums.params(stage.first, stage.last)
                            * (1.0 + plan.optimizer_state_factor))
        for device, share in zip(stage.devices, stage.shares, strict=True):
            peak[device] = cluster.workspace_bytes(device) + stage_memory_bytes(
                sums, stage.first, stage.last, share, flight, plan.optimizer_state_factor,
                len(stage.devices), m) + _copies_bytes(
                    copies.get(s, []), sums, stage.first, stage.last, m,
                    plan.optimizer_state_factor)
            stage_weights[device] = replica
    for device, holders in plan.replicas.items():
        for holder in holders:
            peak[holder] = peak.get(holder, 0) + stage_weights[device]
    capacity = {d: cluster.device(d).memory_bytes for d in peak}
    throughput = plan.batch_size / round_time if round_time > 0 else math.inf
    return Prediction(round_time_s=round_time, throughput_samples_s=throughput,
                      peak_memory_bytes=peak, memory_capacity_bytes=capacity,
                      stages=predictions, dominant_stage=dm)
