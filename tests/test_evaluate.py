"""Tests of the round-latency and memory model (solver/evaluate.py) on hand-computed plans."""

from __future__ import annotations

from dataclasses import replace

import pytest

from contracts.cluster import Cluster
from contracts.errors import CostModelError, PlanError
from contracts.plan import SMALL_BUCKET_BYTES, Plan, Stage
from contracts.table import CostTable, TiedWeight
from solver.evaluate import (
    LayerSums,
    accumulates,
    allreduce_time,
    drain_term,
    evaluate,
    in_flight,
    round_terms,
    split_ties,
    stage_memory_bytes,
    stage_memory_parts,
    transfer_time,
    transient_gradient_bytes,
)
from solver.simulate import simulate
from tests.solver_cases import make_cluster, make_costs, uniform_costs


def _costs3():  # type: ignore[no-untyped-def]
    return make_costs(fwd=[(0.001, 0.01), (0.0, 0.02), (0.003, 0.005)],
                      bwd=[(0.002, 0.02), (0.0, 0.04), (0.0, 0.01)],
                      param_bytes=[1000, 2000, 3000], activation_bytes=[100, 200, 300],
                      cut_bytes=[5000, 1000], buffer_bytes=[0, 64, 0])


def _cluster3():  # type: ignore[no-untyped-def]
    # 8 Mbps = 1e6 B/s by default, 16 Mbps = 2e6 B/s between d0 and d2
    return make_cluster([2.0, 1.0, 1.0], memory_mib=1024, bandwidth_mbps=8.0,
                        links=[("d0", "d2", 16.0)])


def _plan3(**kw):  # type: ignore[no-untyped-def]
    return Plan(model_hash="h", cluster_hash="c", batch_size=8, micro_batch_size=4,
                num_micro_batches=2,
                stages=(Stage((0, 0), ("d0",), (4,)), Stage((1, 2), ("d1", "d2"), (3, 1))),
                **kw)


def test_hand_computed_two_stage_plan() -> None:
    pred = evaluate(_plan3(), _costs3(), _cluster3())
    s0, s1 = pred.stages
    assert s0.compute_f == pytest.approx(0.0205)
    assert s0.compute_b == pytest.approx(0.041)
    assert s0.comm_f == 0.0 and s0.t_a == 0.0 and s0.t_w == 0.0
    assert s1.compute_f == pytest.approx(0.078)
    assert s1.compute_b == pytest.approx(0.15)
    # d0 sends 3 samples to d1 (15000 B at 1e6 B/s) and 1 to d2 (5000 B at 2e6 B/s)
    assert s1.comm_f == pytest.approx(0.0175)
    assert s1.comm_b == pytest.approx(0.0175)
    assert s1.e_f == pytest.approx(0.0955)
    assert s1.e_b == pytest.approx(0.1675)
    assert s1.t_a == pytest.approx(0.005)  # 2 * 1 * 5000 / (2 * 1e6)
    assert pred.dominant_stage == 1
    assert s1.t_w == pytest.approx(0.0205)
    assert s0.t_e == pytest.approx(2 * 0.263 + 0.0615)
    assert s1.t_e == pytest.approx(2 * 0.263)
    assert pred.round_time_s == pytest.approx(0.5875)
    assert pred.throughput_samples_s == pytest.approx(8 / 0.5875)
    # per sample: stage 0 holds the activations (100) of its 2 micro-batches in flight and
    # the wire buffers of its outputs (5000): one per micro-batch in flight and the posted
    # receive of a gradient, 3 in all, for 4 samples; stage 1 holds its activations (500)
    # for one micro-batch, 2 received inputs (one in flight, one posted ahead) and 2
    # gradients sent back (5000 each), and the model's output (4); 10 % of that on top as
    # workspace. Weights count twice (gradients) and the largest layer's once more (a
    # gradient being accumulated); on the data-parallel stage 1 the all-reduce's flat
    # bucket copy instead, here all of its 5000 bytes of gradients (under
    # SMALL_BUCKET_BYTES)
    assert pred.peak_memory_bytes == {
        "d0": 2000 + 1000 + 4 * (2 * 100 + 3 * 5000) + 6080,
        "d1": 10000 + 5000 + 64 + 3 * (500 + 4 * 5000 + 4) + 6152,
        "d2": 10000 + 5000 + 64 + (500 + 4 * 5000 + 4) + 2051}
    assert pred.memory_capacity_bytes["d1"] == 1024 * 2**20
    assert pred.fits


def test_optimizer_state_and_replicas_add_memory() -> None:
    plan = _plan3(optimizer_state_factor=1.0, replicas={"d0": ("d1",)})
    pred = evaluate(plan, _costs3(), _cluster3())
    assert pred.peak_memory_bytes["d0"] == 3000 + 1000 + 60800 + 6080
    assert pred.peak_memory_bytes["d1"] == (15000 + 5000 + 64 + 61512
                                            + 6152 + 2 * 1000)
    assert pred.peak_memory_bytes["d2"] == (15000 + 5000 + 64 + 20504
                                            + 2051)


def _with_workspace(cluster: Cluster, workspace: int) -> Cluster:
    return replace(cluster, devices=tuple(replace(d, workspace_bytes=workspace)
                                          for d in cluster.devices))


def test_memory_shortfall_reported() -> None:
    # 1 MiB of memory, all of it the devices' fixed workspace: every byte of a stage is short
    cluster = _with_workspace(make_cluster([2.0, 1.0, 1.0], memory_mib=1.0,
                                           bandwidth_mbps=8.0), 1 << 20)
    pred = evaluate(_plan3(), _costs3(), cluster)
    assert not pred.fits
    assert set(pred.memory_shortfall()) == {"d0", "d1", "d2"}
    assert pred.memory_shortfall()["d0"] == 2000 + 1000 + 60800 + 6080


def test_peak_memory_adds_each_devices_fixed_workspace() -> None:
    plain = evaluate(_plan3(), _costs3(), _cluster3())
    held = evaluate(_plan3(), _costs3(), _with_workspace(_cluster3(), 5000))
    assert {d: held.peak_memory_bytes[d] - plain.peak_memory_bytes[d]
            for d in plain.peak_memory_bytes} == {"d0": 5000, "d1": 5000, "d2": 5000}
    assert held.memory_capacity_bytes == plain.memory_capacity_bytes


def test_a_measured_workspace_in_the_table_replaces_the_devices_own() -> None:
    costs = replace(_costs3(), workspace_bytes=7000)   # the base type: custom devices scale it
    cluster = _with_workspace(_cluster3(), 5000)
    assert cluster.for_costs(costs).workspace_bytes("d0") == 5000   # not custom's column
    local = replace(costs, device_type="jetson-nano")
    nano = replace(cluster, devices=tuple(replace(d, type="jetson-nano")
                                          for d in cluster.devices))
    assert nano.for_costs(local).workspace_bytes("d1") == 7000
    assert nano.for_costs(local).usable_bytes("d1") == nano.device("d1").memory_bytes - 7000
    held = evaluate(_plan3(), local, nano)
    plain = evaluate(_plan3(), replace(local, workspace_bytes=None), nano)
    assert held.peak_memory_bytes["d2"] - plain.peak_memory_bytes["d2"] == 7000 - 5000


def test_equal_stages_give_m_plus_one_x() -> None:
    costs = uniform_costs(2, cut_bytes=0, param_bytes=0)
    cluster = make_cluster([1.0, 1.0])
    plan = Plan(model_hash="h", cluster_hash="c", batch_size=8, micro_batch_size=2,
                num_micro_batches=4,
                stages=(Stage((0, 0), ("d0",), (2,)), Stage((1, 1), ("d1",), (2,))))
    pred = evaluate(plan, costs, cluster)
    x = 2 * 0.01 + 2 * 0.02
    assert pred.dominant_stage == 1  # ties go to the last stage
    assert pred.round_time_s == pytest.approx(5 * x)


def test_single_stage_round_is_m_times_x_plus_allreduce() -> None:
    costs = uniform_costs(3, param_bytes=1000)
    cluster = make_cluster([1.0, 0.5], bandwidth_mbps=8.0)
    plan = Plan(model_hash="h", cluster_hash="c", batch_size=6, micro_batch_size=3,
                num_micro_batches=2, stages=(Stage((0, 2), ("d0", "d1"), (2, 1)),))
    pred = evaluate(plan, costs, cluster)
    x = (3 * 0.01 * 2) + (3 * 0.02 * 2)  # d0: 2 samples at speed 1; d1: 1 at 0.5 -> same
    ta = 2 * 1 * 3000 / (2 * 1e6)
    assert pred.round_time_s == pytest.approx(2 * x + ta)
    assert pred.stages[0].t_a == pytest.approx(ta)


def test_transfer_time_reshards_by_sample_ranges() -> None:
    cluster = make_cluster([1.0] * 4, bandwidth_mbps=8.0)  # 1e6 B/s
    # senders own [0,3) and [3,4); receivers own [0,1) and [1,4)
    t = transfer_time(cluster, ["d0", "d1"], [3, 1], ["d2", "d3"], [1, 3], 1000)
    # d0 sends 1000 to d2 and 2000 to d3; d1 sends 1000 to d3: d0 and d3 move 3000 B
    assert t == pytest.approx(0.003)
    assert transfer_time(cluster, ["d0"], [4], ["d1"], [4], 0) == 0.0


def test_allreduce_uses_slowest_link() -> None:
    cluster = make_cluster([1.0] * 3, bandwidth_mbps=80.0, links=[("d0", "d1", 8.0)])
    assert allreduce_time(cluster, ["d0", "d1", "d2"], 3000) == pytest.approx(
        2 * 2 * 3000 / (3 * 1e6))
    assert allreduce_time(cluster, ["d0"], 3000) == 0.0


def test_latency_is_charged_once_per_message() -> None:
    # 1 ms default, 5 ms between d0 and d3; the same re-sharding as above: d0 sends two
    # messages (to d2 and d3), d3 receives two (from d0 and d1)
    cluster = make_cluster([1.0] * 4, bandwidth_mbps=8.0, latency_ms=1.0,
                           link_latency=[("d0", "d3", 5.0)])
    t = transfer_time(cluster, ["d0", "d1"], [3, 1], ["d2", "d3"], [1, 3], 1000)
    # d0: (1 ms + 1 ms) to d2 + (5 ms + 2 ms) to d3 = 9 ms; d3: 7 ms + (1 ms + 1 ms) = 9 ms
    assert t == pytest.approx(0.009)
    # a cut without bytes sends nothing, so it pays no latency either
    assert transfer_time(cluster, ["d0"], [4], ["d1"], [4], 0) == 0.0


def test_latency_in_the_ring_all_reduce() -> None:
    cluster = make_cluster([1.0] * 3, bandwidth_mbps=8.0, latency_ms=2.0,
                           link_latency=[("d1", "d2", 3.0)])
    # 2(n-1) ring steps, each one message on the group's slowest (largest-latency) link
    assert allreduce_time(cluster, ["d0", "d1", "d2"], 3000) == pytest.approx(
        2 * 2 * 3000 / (3 * 1e6) + 2 * 2 * 0.003)
    assert allreduce_time(cluster, ["d0", "d1"], 3000) == pytest.approx(
        2 * 1 * 3000 / (2 * 1e6) + 2 * 1 * 0.002)
    assert allreduce_time(cluster, ["d0"], 3000) == 0.0


def test_latency_adds_to_the_hand_computed_plan() -> None:
    # _plan3 with 1 ms on every link: stage 1 receives one message per device (d0 -> d1,
    # d0 -> d2), d0 sends two, so comm_f = comm_b = 0.0175 + 2 * 0.001 (the sender's side
    # is the maximum); the group's all-reduce pays 2 x 1 ms
    base = evaluate(_plan3(), _costs3(), _cluster3())
    slow = make_cluster([2.0, 1.0, 1.0], memory_mib=1024, bandwidth_mbps=8.0,
                        links=[("d0", "d2", 16.0)], latency_ms=1.0)
    pred = evaluate(_plan3(), _costs3(), slow)
    assert pred.stages[1].comm_f == pytest.approx(0.0175 + 0.002)
    assert pred.stages[1].t_a == pytest.approx(base.stages[1].t_a + 0.002)
    # stage 1 dominates, X_1 grows by 2 x 2 ms, so stage 0's T_e = M X_1 + X_0 (the
    # round's maximum) grows by M x 4 ms; stage 1's T_a grows too but stays off the maximum
    assert pred.stages[0].t_e == pytest.approx(base.stages[0].t_e + 2 * 0.004)
    assert pred.round_time_s == pytest.approx(base.round_time_s + 2 * 0.004)
    # without latency the numbers are bit for bit those of a cluster that never had it
    zero = make_cluster([2.0, 1.0, 1.0], memory_mib=1024, bandwidth_mbps=8.0,
                        links=[("d0", "d2", 16.0)], latency_ms=0.0)
    assert evaluate(_plan3(), _costs3(), zero).round_time_s == base.round_time_s


def test_round_terms_formula() -> None:
    t_w, t_e, dm = round_terms([1.0, 2.0, 1.0], [1.0, 3.0, 1.0], 3)
    assert dm == 1
    assert t_w == [0.0, 1.0, 3.0]
    assert t_e == [3 * 5 + 2, 15, 15 - 5]


def _chain(f: list[float], b: list[float], m: int) -> tuple[Plan, CostTable, Cluster]:
    """One single-device stage per layer, no communication, no weights, micro-batches of
    one sample: stage ``s`` has ``E_f = f[s]`` and ``E_b = b[s]`` exactly."""
    n = len(f)
    costs = make_costs([(0.0, v) for v in f], [(0.0, v) for v in b], [0] * n, [1024] * n,
                       [0] * (n - 1))
    cluster = make_cluster([1.0] * n)
    plan = Plan(model_hash=costs.model_hash, cluster_hash="c", batch_size=m,
                micro_batch_size=1, num_micro_batches=m, num_layers=n,
                stages=tuple(Stage((i, i), (f"d{i}",), (1,)) for i in range(n)))
    return plan, costs, cluster


def test_drain_term_helper() -> None:
    # D = max(0, tail - (min(M, tail_stages + 1) - 1) * min(E_f, E_b))
    assert drain_term(5.0, 5.0, 1.0, 1, 1) == 1.0
    assert drain_term(5.0, 5.0, 1.0, 1, 4) == 0.0
    assert drain_term(8.0, 2.0, 9.0, 3, 3) == 9.0 - 2 * 2.0
    assert drain_term(8.0, 2.0, 9.0, 3, 10) == 9.0 - 3 * 2.0
    assert drain_term(3.0, 3.0, 0.0, 0, 5) == 0.0


def test_round_terms_with_drain() -> None:
    # dominant stage 1 (X = 5, min(E_f, E_b) = 2), tail X = 4 over one stage
    t_w, t_e, dm = round_terms([1.0, 2.0, 2.0], [1.0, 3.0, 2.0], 1)
    assert dm == 1
    assert t_e == [5 + 2 + 4, 5 + 4, 5 - 5]  # M = 1: D = the whole tail
    assert max(w + e for w, e in zip(t_w, t_e, strict=True)) == 2 + 5 + 4
    _, t_e, _ = round_terms([1.0, 2.0, 2.0], [1.0, 3.0, 2.0], 3)
    assert t_e == [15 + 2 + 2, 15 + 2, 15 - 5]  # w = 2 hides 2 of the tail's 4


@pytest.mark.parametrize("dominant", [0, 1, 2, 3])
def test_one_micro_batch_visits_every_stage(dominant: int) -> None:
    # with M = 1 the round is the sum of every stage's X (no all-reduce here), wherever
    # the dominant stage is; the paper's formula gives X_dm plus the stages before it
    f, b = [1.0, 0.5, 2.0, 1.0], [2.0, 1.5, 1.0, 1.0]
    f[dominant], b[dominant] = 4.0, 6.0
    plan, costs, cluster = _chain(f, b, 1)
    pred = evaluate(plan, costs, cluster)
    assert pred.dominant_stage == dominant
    assert pred.round_time_s == pytest.approx(sum(f) + sum(b))
    assert simulate(plan, costs, cluster).round_time_s == pytest.approx(sum(f) + sum(b))


def test_drain_of_a_short_tail() -> None:
    # X = (10, 1): M = 1 gives 11 (the paper's formula: 10); M = 4 hides the tail: 40
    plan, costs, cluster = _chain([5.0, 0.5], [5.0, 0.5], 1)
    pred = evaluate(plan, costs, cluster)
    assert pred.dominant_stage == 0
    assert pred.round_time_s == pytest.approx(11.0)
    assert simulate(plan, costs, cluster).round_time_s == pytest.approx(11.0)
    plan, costs, cluster = _chain([5.0, 0.5], [5.0, 0.5], 4)
    assert evaluate(plan, costs, cluster).round_time_s == pytest.approx(40.0)
    assert simulate(plan, costs, cluster).round_time_s == pytest.approx(40.0)
    # E_f != E_b: the hiding work is w - 1 = 1 backward of 2 (min(8, 2)); tail 3 * 2 = 6
    plan, costs, cluster = _chain([8.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 1.0], 2)
    assert evaluate(plan, costs, cluster).round_time_s == pytest.approx(2 * 10 + 6 - 2)
    assert simulate(plan, costs, cluster).round_time_s == pytest.approx(24.0)


def test_drain_of_a_long_tail_is_a_lower_bound() -> None:
    # dominant first stage (E_f = E_b = 5) before 10 stages of X = 1, M = 2:
    # D = 10 - (2 - 1) * 5 = 5, round 2 * 10 + 5 = 25. The simulator needs 29: under
    # 1F1B the tail's own order makes micro-batch 0's backward wait for micro-batch 1's
    # forward at the second-to-last stage, which the closed form does not model
    plan, costs, cluster = _chain([5.0] + [0.5] * 10, [5.0] + [0.5] * 10, 2)
    pred = evaluate(plan, costs, cluster)
    assert pred.stages[0].t_e == pytest.approx(2 * 10 + 5)
    assert pred.round_time_s == pytest.approx(25.0)
    assert simulate(plan, costs, cluster).round_time_s == pytest.approx(29.0)


def test_in_flight_and_memory_helpers() -> None:
    assert in_flight(4, 3, 0) == 3
    assert in_flight(2, 3, 0) == 2
    assert in_flight(4, 3, 2) == 1
    assert in_flight(4, 3, 2, "gpipe") == 4
    sums = LayerSums.of(_costs3())
    assert sums.params(1, 2) == 5000
    # one stage: no cut inside, the model's output (4 bytes per sample) for the loss
    assert sums.in_flight_bytes(0, 2) == 600 + 4
    assert sums.in_flight_bytes(1, 1) == 5000 + 200 + 1000
    assert [sums.largest_params(0, i) for i in range(3)] == [1000, 2000, 3000]
    assert sums.largest_params(1, 1) == 2000
    assert stage_memory_bytes(sums, 0, 2, 2, 1, 0.0) == (
        12000 + 3000 + 64 + 1208 + 121)


def _wire_high_water(num_stages: int, m: int, schedule: str) -> list[dict[str, int]]:
    """Per stage, the most pooled wire buffers of each kind the runtime holds at once
    (sf/sb: sends of activations/gradients, rf/rb: receives), replaying its own receive
    posts and send releases (runtime.lowering) and its recycling of received buffers at
    backward (runtime.executor)."""
    from runtime.lowering import add_comms, recv_posts, send_releases
    from runtime.schedule import ActionKind, compute_schedule

    plan = Plan("h", "c", m, 1, m, tuple(Stage((i, i), (f"d{i}",), (1,))
                                         for i in range(num_stages)),
                num_layers=num_stages, schedule=schedule)
    sched = add_comms(plan, compute_schedule(plan))
    posts, releases = recv_posts(plan, sched), send_releases(plan, sched)
    kinds = {ActionKind.SEND_F: "sf", ActionKind.SEND_B: "sb",
             ActionKind.RECV_F: "rf", ActionKind.RECV_B: "rb"}
    out = []
    for rank in range(num_stages):
        held: dict[str, set[int]] = {k: set() for k in ("sf", "sb", "rf", "rb")}
        high = dict.fromkeys(held, 0)
        for i, action in enumerate(sched[rank]):
            for recv in posts[rank].get(i, ()):
                held[kinds[recv.kind]].add(recv.microbatch)       # posted ahead
            if action.kind in (ActionKind.SEND_F, ActionKind.SEND_B):
                held[kinds[action.kind]].add(action.microbatch)
            elif action.kind is ActionKind.B:                       # received ones recycled
                held["rf"].discard(action.microbatch)
                held["rb"].discard(action.microbatch)
            for kind, ids in held.items():
                high[kind] = max(high[kind], len(ids))
            for send in releases[rank].get(i, ()):
                held[kinds[send.kind]].discard(send.microbatch)
        out.append(high)
    return out


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_wire_buffers_are_what_the_runtime_allocates(schedule: str) -> None:
    # [Note: wire buffers]: min(M, F + 2) received activations (two posted ahead), min(M,
    # F + 1) gradients sent back, F activations sent on and one gradient received, F the
    # micro-batches in flight
    for num_stages in range(2, 6):
        for m in (1, 2, 3, 4, 8):
            for s, high in enumerate(_wire_high_water(num_stages, m, schedule)):
                flight = in_flight(m, num_stages, s, schedule)
                first, last = s == 0, s == num_stages - 1
                assert high == {"rf": 0 if first else min(m, flight + 2),
                                "sb": 0 if first else min(m, flight + 1),
                                "sf": 0 if last else flight,
                                "rb": 0 if last else 1}, (num_stages, m, s)


def test_flight_bytes_counts_activations_and_wire_buffers() -> None:
    sums = LayerSums.of(_costs3())
    # the first stage of two: 2 in flight, activations 100, outputs 5000 three times
    assert sums.flight_bytes(0, 0, 2, 4) == 2 * 100 + 3 * 5000
    # the last: inputs 5000 five times (three received, two sent back), the model's output
    assert sums.flight_bytes(1, 2, 1, 4) == 500 + 5 * 5000 + 4
    assert sums.flight_bytes(1, 2, 1, 1) == 500 + 2 * 5000 + 4       # nothing posted ahead
    assert sums.flight_bytes(1, 2, 1) == sums.flight_bytes(1, 2, 1, 8)   # M unknown: more
    # a middle stage of layers 1..1: inputs 5000, outputs 1000
    assert sums.flight_bytes(1, 1, 2, 8) == 2 * 200 + (4 + 3) * 5000 + 3 * 1000


def test_largest_params_is_the_range_maximum() -> None:
    import random

    rng = random.Random(3)
    values = [rng.randrange(10_000) for _ in range(37)]
    n = len(values)
    costs = make_costs([(0.0, 0.01)] * n, [(0.0, 0.02)] * n, values, [1] * n, [8] * (n - 1))
    sums = LayerSums.of(costs)
    for first in range(n):
        for last in range(first, n):
            assert sums.largest_params(first, last) == max(values[first:last + 1])


def test_gpipe_keeps_all_micro_batches() -> None:
    plan = _plan3(schedule="gpipe")
    pred = evaluate(plan, _costs3(), _cluster3())
    # both micro-batches in flight: 2 received inputs, 2 gradients sent back
    assert pred.peak_memory_bytes["d1"] == (10000 + 5000 + 64 + 3 * (2 * 504 + 4 * 5000)
                                            + 6303)


def test_a_data_parallel_stage_holds_an_all_reduce_bucket() -> None:
    sums = LayerSums.of(_costs3())
    # alone: the largest layer's gradient; in a group: the flat copy of its gradients,
    # at most SMALL_BUCKET_BYTES or the largest gradient
    assert transient_gradient_bytes(sums, 1, 2) == 3000
    assert transient_gradient_bytes(sums, 1, 2, group_size=2) == 5000
    big = make_costs([(0.0, 0.01)] * 3, [(0.0, 0.02)] * 3, [100_000, 120_000, 90_000],
                     [1] * 3, [8] * 2)
    big_sums = LayerSums.of(big)
    assert transient_gradient_bytes(big_sums, 0, 2, 3) == SMALL_BUCKET_BYTES
    huge = make_costs([(0.0, 0.01)] * 2, [(0.0, 0.02)] * 2, [10**6, 10**5], [1] * 2, [8])
    assert transient_gradient_bytes(LayerSums.of(huge), 0, 1, 2) == 10**6
    assert (stage_memory_bytes(sums, 1, 2, 3, 1, 0.0, group_size=2)
            - stage_memory_bytes(sums, 1, 2, 3, 1, 0.0)) == 2000


def test_plan_for_another_model_is_rejected() -> None:
    with pytest.raises(PlanError, match="cost table has 4 layers"):
        evaluate(_plan3(), uniform_costs(4), _cluster3())


def test_unknown_device_is_rejected() -> None:
    cluster = make_cluster([1.0, 1.0])
    with pytest.raises(PlanError, match="'d2' is not in the cluster"):
        evaluate(_plan3(), _costs3(), cluster)


def test_bad_replicas_are_rejected() -> None:
    with pytest.raises(PlanError, match="unknown device 'zz'"):
        evaluate(_plan3(replicas={"d0": ("zz",)}), _costs3(), _cluster3())


def _with_update(costs: CostTable, per_byte: float) -> CostTable:
    from dataclasses import replace

    return replace(costs, update_s_per_byte=per_byte)


def test_optimizer_step_is_part_of_t_a() -> None:
    costs = _with_update(uniform_costs(3, param_bytes=1000), 1e-6)
    cluster = make_cluster([1.0, 0.5], bandwidth_mbps=8.0)
    plan = Plan(model_hash="h", cluster_hash="c", batch_size=6, micro_batch_size=3,
                num_micro_batches=2, stages=(Stage((0, 2), ("d0", "d1"), (2, 1)),))
    pred = evaluate(plan, costs, cluster)
    x = (3 * 0.01 * 2) + (3 * 0.02 * 2)
    ta = 2 * 1 * 3000 / (2 * 1e6)
    step = 3000 * 1e-6 / 0.5  # the slowest member (speed 0.5) decides
    assert pred.stages[0].t_a == pytest.approx(ta + step)
    assert pred.round_time_s == pytest.approx(2 * x + ta + step)
    sim = simulate(plan, costs, cluster)
    assert sim.round_time_s == pytest.approx(pred.round_time_s)
    assert {e.kind for e in sim.events} >= {"ALLREDUCE", "UPDATE"}


def test_update_time_round_trips_and_is_validated() -> None:
    costs = _with_update(uniform_costs(2), 2.5e-10)
    assert CostTable.from_json(costs.to_json()).update_s_per_byte == 2.5e-10
    legacy = costs.to_dict()
    del legacy["update_s_per_byte"]
    assert CostTable.from_dict(legacy).update_s_per_byte == 0.0
    from contracts.errors import CostModelError

    with pytest.raises(CostModelError, match="update_s_per_byte"):
        _with_update(costs, -1.0)


def test_planners_agree_with_an_optimizer_step() -> None:
    import random

    from solver.brute import brute_force
    from solver.dp import asteroid_dp
    from solver.ilp import ilp_plan
    from tests.solver_cases import random_cluster, random_costs

    for seed in range(6):
        rng = random.Random(seed)
        costs = _with_update(random_costs(rng, 5), 2e-9)
        cluster = random_cluster(rng, 3)
        dp = asteroid_dp(costs, cluster, 4)
        brute = brute_force(costs, cluster, 4)
        assert dp.round_time_s == pytest.approx(brute.round_time_s, rel=1e-9)
        if dp.plan is None:
            continue
        assert evaluate(dp.plan, costs, cluster).round_time_s == pytest.approx(
            brute.round_time_s, rel=1e-9)
        ilp = ilp_plan(costs, cluster, 4)
        assert ilp.round_time_s == pytest.approx(brute.round_time_s, rel=1e-6)


def test_hand_computed_plan_with_a_cost_column() -> None:
    """``_plan3`` with d0 a Jetson Nano whose measured column the table holds: stage 0 takes
    the column as it is (d0's declared speed is ignored), stage 1 scales the base times."""
    from dataclasses import replace

    from contracts.cluster import Cluster, Device
    from contracts.table import DeviceColumn, TimeFit

    base = _with_update(_costs3(), 1e-6)
    column = DeviceColumn("jetson-nano",
                          fwd=(TimeFit(0.002, 0.005), TimeFit(0.0, 0.5), TimeFit(0.0, 0.5)),
                          bwd=(TimeFit(0.001, 0.012), TimeFit(0.0, 0.5), TimeFit(0.0, 0.5)),
                          update_s_per_byte=2e-6)
    costs = replace(base, columns=(column,))
    for declared in (2.0, 0.1):
        plain = _cluster3()
        cluster = Cluster(devices=(Device("d0", "jetson-nano", 2**30, speed=declared),
                                   *plain.devices[1:]),
                          bandwidth_mbps=plain.bandwidth_mbps, links=plain.links)
        pred = evaluate(_plan3(), costs, cluster)
        s0, s1 = pred.stages
        assert s0.compute_f == pytest.approx(0.002 + 0.005 * 4)
        assert s0.compute_b == pytest.approx(0.001 + 0.012 * 4)
        assert s0.t_a == pytest.approx(1000 * 2e-6)  # the column's optimizer step
        assert s1.compute_f == pytest.approx(0.078) and s1.compute_b == pytest.approx(0.15)
        assert s1.comm_f == pytest.approx(0.0175)
        assert s1.t_a == pytest.approx(0.005 + 5000 * 1e-6)
        assert pred.dominant_stage == 1
        # T_e of stage 0: 2 X_1 + X_0 = 2 * 0.263 + 0.071; stage 1: 0.022 + 2 * 0.263 + 0.01
        assert pred.round_time_s == pytest.approx(2 * 0.263 + 0.071 + 0.002)
        # without the column the same plan scales the base times by d0's speed
        assert evaluate(_plan3(), base, cluster).stages[0].compute_f == pytest.approx(
            0.0205 * 2.0 / declared)


def test_one_micro_batch_of_plain_sgd_makes_no_gradient_temporary() -> None:
    sums = LayerSums.of(_costs3())
    # one micro-batch, no optimizer state: autograd hands each gradient to .grad as it is
    assert not accumulates(1, 0.0)
    assert accumulates(2, 0.0) and accumulates(1, 1.0) and accumulates(None, 0.0)
    one = stage_memory_bytes(sums, 0, 2, 4, 1, 0.0, num_micro_batches=1)
    assert stage_memory_bytes(sums, 0, 2, 4, 1, 0.0, num_micro_batches=2) - one == 3000
    assert stage_memory_bytes(sums, 0, 2, 4, 1, 0.0) - one == 3000       # unknown: counted
    # a data-parallel group's bucket copy is there whatever the micro-batches
    assert (stage_memory_parts(sums, 1, 2, 1, 0.0, 2, num_micro_batches=1)[0]
            == stage_memory_parts(sums, 1, 2, 1, 0.0, 2, num_micro_batches=4)[0])
    single = Plan(model_hash="h", cluster_hash="c", batch_size=4, micro_batch_size=4,
                  num_micro_batches=1, stages=(Stage((0, 2), ("d0",), (4,)),))
    assert evaluate(single, _costs3(), _cluster3()).peak_memory_bytes["d0"] == one


# -- tied weights ------------------------------------------------------------------------------
def test_a_tied_weight_split_over_stages_costs_an_all_reduce_and_a_copy() -> None:
    # the tensor of layer 0 (1000 B) is also used by layer 2: d0 and the stage of d1, d2
    # sum its gradient (a ring over three devices) and that stage keeps a second copy
    costs = _costs3()
    tied = replace(costs, tied=(TiedWeight("emb", (0, 2), 1000),))
    cluster = _cluster3()
    plain, split = evaluate(_plan3(), costs, cluster), evaluate(_plan3(), tied, cluster)
    secs = allreduce_time(cluster, ("d0", "d1", "d2"), 1000)
    assert secs > 0
    for before, after in zip(plain.stages, split.stages, strict=True):
        assert after.t_a == pytest.approx(before.t_a + secs)
    assert split.round_time_s == pytest.approx(plain.round_time_s + secs)
    assert split.peak_memory_bytes["d0"] == plain.peak_memory_bytes["d0"]
    for d in ("d1", "d2"):          # weight and gradient (no optimizer state here)
        assert split.peak_memory_bytes[d] == plain.peak_memory_bytes[d] + 2 * 1000
    assert split_ties(_plan3(), tied) == [(tied.tied[0], (0, 1))]
    # a copy larger than the stage's largest gradient (3000 B) adds a temporary of its size
    # as the micro-batches' gradients accumulate
    big = evaluate(_plan3(), replace(costs, tied=(TiedWeight("emb", (0, 2), 5000),)), cluster)
    assert big.peak_memory_bytes["d1"] == plain.peak_memory_bytes["d1"] + 2 * 5000 + 2000
    # inside one stage the tie costs nothing more
    one = replace(_plan3(), stages=(Stage((0, 2), ("d0",), (4,)),))
    assert split_ties(one, tied) == []
    assert evaluate(one, tied, cluster) == evaluate(one, costs, cluster)
    # the simulator runs the all-reduce after both stages' own steps
    assert simulate(_plan3(), tied, cluster).round_time_s == pytest.approx(
        simulate(_plan3(), costs, cluster).round_time_s + secs)


def test_a_tied_weight_names_layers_of_the_table() -> None:
    with pytest.raises(CostModelError, match="names layer 5, but the table.s layers are 0 to 2"):
        replace(_costs3(), tied=(TiedWeight("emb", (0, 5), 10),))
    with pytest.raises(CostModelError, match="two or more distinct layers"):
        TiedWeight("emb", (2,), 10)
    with pytest.raises(CostModelError, match="-1 bytes"):
        TiedWeight("emb", (0, 1), -1)
    tied = replace(_costs3(), tied=(TiedWeight("emb", (0, 2), 1000),))
    assert CostTable.from_json(tied.to_json()) == tied
    assert "tied" not in _costs3().to_dict()
    with pytest.raises(CostModelError, match="malformed cost table"):
        CostTable.from_dict({**tied.to_dict(), "tied": [{"name": "x", "layers": "ab",
                                                         "bytes": 1}]})
