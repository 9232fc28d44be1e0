"""PAC plans: forward-only segment costs, phase-2 shares, predictions, JSON round trip, errors."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from typing import Any

import pytest
from solver_cases import MIB, make_cluster, uniform_costs

from asteroid_fx.errors import PlanError
from contracts.cluster import Cluster
from contracts.plan import Plan, Stage
from solver.pac import (
    DEFAULT_PHASE1_SLACK,
    PacModel,
    PacPlan,
    phase1_memory,
    plan_finetune,
    predict_finetune,
    segment_costs,
)

COSTS = uniform_costs(10, fwd=0.01, bwd=0.02, param_bytes=MIB, cut_bytes=64 * 1024)
MODEL = PacModel(taps=(2, 5, 8), entry_bytes=3 * 64 * 1024, trainable_bytes=32 * 1024,
                 adapter_flops=1e6)


def test_segment_costs_are_forward_only_and_frozen() -> None:
    coarse = segment_costs(COSTS, MODEL.taps)
    assert coarse.num_layers == 3
    assert [lc.fwd.per_sample_s for lc in coarse.layers] == pytest.approx([0.03] * 3)
    assert all(lc.bwd.per_sample_s == 0 and lc.param_bytes == 0 for lc in coarse.layers)
    assert [lc.buffer_bytes for lc in coarse.layers] == [3 * MIB] * 3
    assert coarse.cut_bytes == (64 * 1024, 64 * 1024)
    with pytest.raises(PlanError, match="before the last"):
        segment_costs(COSTS, (2, 9))


def test_cold_weights_add_to_every_call_of_their_segment() -> None:
    warm = segment_costs(COSTS, MODEL.taps)
    cold = segment_costs(COSTS, MODEL.taps, (0.001, 0.0, 0.004))
    # per call (the intercept), not per sample; one figure per segment
    assert [c.fwd.intercept_s - w.fwd.intercept_s for c, w in
            zip(cold.layers, warm.layers, strict=True)] == pytest.approx([0.001, 0.0, 0.004])
    assert [c.fwd.per_sample_s for c in cold.layers] == [w.fwd.per_sample_s
                                                          for w in warm.layers]
    with pytest.raises(PlanError, match="2 cold-call figures for 3 segments"):
        segment_costs(COSTS, MODEL.taps, (0.001, 0.002))
    # the prediction charges them on phase 1, and the plan keeps them (JSON round trip)
    cluster = make_cluster([1.0, 0.5, 0.5], bandwidth_mbps=1000)
    chilled = replace(MODEL, segment_cold_s=(0.001, 0.0, 0.004))
    plain = plan_finetune(COSTS, cluster, MODEL, batch_size=8, num_samples=16, epochs=2)
    plan = plan_finetune(COSTS, cluster, chilled, batch_size=8, num_samples=16, epochs=2)
    assert PacPlan.from_json(plan.to_json()).model == chilled
    assert plan.predicted is not None and plain.predicted is not None
    assert predict_finetune(replace(plain, model=chilled), COSTS, cluster).phase1_step_s > \
        plain.predicted.phase1_step_s


def test_plan_shares_by_speed_and_round_trips() -> None:
    cluster = make_cluster([1.0, 0.5, 0.5], bandwidth_mbps=1000)
    plan = plan_finetune(COSTS, cluster, MODEL, batch_size=8, num_samples=40, epochs=3)
    assert plan.steps_per_epoch == 5
    assert plan.shares == (4, 2, 2)
    assert plan.sample_range("d1") == (4, 6)
    assert PacPlan.from_json(plan.to_json()) == plan
    pred = plan.predicted
    assert pred is not None
    assert pred.total_s == pytest.approx(pred.epoch1_s + 2 * pred.epoch_s)
    assert pred.epoch1_s == pytest.approx(5 * (pred.phase1_step_s + pred.phase2_step_s)
                                          + pred.handoff_s)
    assert pred.phase1_step_s > 3 * pred.phase2_step_s     # 9 frozen layers vs 1 + adapters
    assert pred.cache_bytes == {"d0": 4 * 5 * MODEL.entry_bytes,
                                "d1": 2 * 5 * MODEL.entry_bytes,
                                "d2": 2 * 5 * MODEL.entry_bytes}
    assert predict_finetune(plan, COSTS, cluster) == pred     # pure


def test_prediction_of_a_hand_made_pipeline() -> None:
    cluster = make_cluster([1.0, 0.5, 0.5], bandwidth_mbps=100)
    plan = plan_finetune(COSTS, cluster, MODEL, batch_size=8, num_samples=16, epochs=2)
    phase1 = Plan(model_hash="h", cluster_hash="c", batch_size=8, micro_batch_size=4,
                  num_micro_batches=2, num_layers=3,
                  stages=(Stage((0, 0), ("d0",), (4,)), Stage((1, 2), ("d1", "d2"), (2, 2))))
    piped = replace(plan, phase1=phase1)
    pred = predict_finetune(piped, COSTS, cluster)
    assert pred.phase1_step_s > 0
    # the second stage holds two of three segments: only their weights, once
    assert pred.peak_memory_bytes["d1"] < pred.peak_memory_bytes["d0"] + 3 * MIB


def test_cache_that_fits_nowhere_names_device_and_bytes() -> None:
    cluster = make_cluster([1.0, 0.5], memory_mib=[40, 40])
    with pytest.raises(PlanError, match=r"device 'd\d' .* bytes short") as info:
        plan_finetune(COSTS, cluster, MODEL, batch_size=8, num_samples=8 * 400, epochs=2,
                      cache_store="memory")
    assert "\n" not in str(info.value)
    assert str(info.value).endswith("--cache-store disk or --cache-dtype bfloat16 (half the "
                                    "bytes)")


# -- a cache on disk (see [Note: a cache on disk]) -----------------------------------------

DISKY = replace(MODEL, write_s_per_byte=2e-10, read_s_per_byte=1e-10)


def test_a_cache_too_big_for_memory_goes_to_disk_by_default() -> None:
    cluster = make_cluster([1.0, 0.5], memory_mib=[40, 40])
    plan = plan_finetune(COSTS, cluster, DISKY, batch_size=8, num_samples=8 * 400, epochs=2)
    assert plan.cache_store == "disk" and plan.cache == "local"
    assert plan.cache_disk == ("d0", "d1")
    assert plan.meta["cache_choice"]["store_reason"].startswith(
        "disk: the cache does not fit in memory (the activation cache does not fit")
    assert plan.meta["cache_choice"]["reason"].startswith("disk: every device keeps")
    pred = plan.predicted
    assert pred is not None
    for d, peak in pred.peak_memory_bytes.items():
        assert peak <= cluster.device(d).memory_bytes
        # cache bytes are what it keeps on disk: more than its memory
        assert pred.cache_bytes[d] > cluster.device(d).memory_bytes
    assert PacPlan.from_json(plan.to_json()) == plan


def test_auto_takes_the_disk_where_it_costs_little_and_memory_where_it_costs_more() -> None:
    # see [Note: choosing the store]
    cluster = make_cluster([1.0, 0.5], memory_mib=[4096, 4096])
    kwargs: dict[str, Any] = {"batch_size": 8, "num_samples": 8 * 20, "epochs": 3,
                              "cache": "local"}
    memory = plan_finetune(COSTS, cluster, DISKY, cache_store="memory", **kwargs)
    disk = plan_finetune(COSTS, cluster, DISKY, cache_store="disk", **kwargs)
    mp, dp = memory.predicted, disk.predicted
    assert mp is not None and dp is not None
    assert dp.total_s > mp.total_s            # the reads and writes cost time ...
    assert dp.total_s < 1.05 * mp.total_s     # ... a little
    assert max(dp.peak_memory_bytes.values()) < max(mp.peak_memory_bytes.values())
    auto = plan_finetune(COSTS, cluster, DISKY, **kwargs)
    assert auto.cache_store == "disk" and auto.predicted == dp
    reason = auto.meta["cache_choice"]["store_reason"]
    assert reason.startswith("disk: peak memory pressure ") and reason.endswith("allowed: +5%")
    # no slack, or the fastest objective: the cache stays in memory, and the report says
    # what the disk would have cost
    for extra in ({"store_slack": 0.0}, {"phase1_objective": "time"}):
        fast = plan_finetune(COSTS, cluster, DISKY, **kwargs, **extra)
        assert fast.cache_store == "memory"
    tight = plan_finetune(COSTS, cluster, DISKY, store_slack=0.0, **kwargs)
    assert tight.predicted == mp
    assert re.fullmatch(r"memory: the cache fits there; on disk it would cost \+\d+\.\d% of "
                        r"the predicted total for peak memory pressure .*",
                        tight.meta["cache_choice"]["store_reason"])
    # slow storage (1 MB/s) on both devices: the disk costs more than the slack allows
    slow = replace(cluster, devices=tuple(replace(d, storage_mb_s=1.0)
                                          for d in cluster.devices))
    assert plan_finetune(COSTS, slow, DISKY, **kwargs).cache_store == "memory"
    assert plan_finetune(COSTS, slow, DISKY, store_slack=100.0, **kwargs).cache_store == "disk"


def test_only_the_devices_short_of_memory_keep_their_cache_on_disk() -> None:
    # d1 (40 MiB) cannot hold its share's cache; d0 (4 GiB) can (and, with --cache auto,
    # would hold some of d1's rows for it: a sharded cache in memory comes first)
    cluster = make_cluster([1.0, 0.5], memory_mib=[4096, 40])
    plan = plan_finetune(COSTS, cluster, DISKY, batch_size=8, num_samples=8 * 400, epochs=2,
                         cache="local")
    assert plan.cache_store == "mixed" and plan.cache_disk == ("d1",)
    assert plan.on_disk("d1") and not plan.on_disk("d0")
    assert plan.meta["cache_choice"]["store_reason"].startswith(
        "mixed: d1 keep their rows on disk: the cache does not fit in memory")
    assert plan.meta["cache_choice"]["reason"].startswith(
        "mixed: d1 keep the rows they train on in a file (writing them")
    pred = plan.predicted
    assert pred is not None
    share = dict(zip(plan.devices, plan.shares, strict=True))
    rows = plan.steps_per_epoch * DISKY.entry_bytes
    # d0 holds its whole cache in memory, d1 none of it
    assert pred.peak_memory_bytes["d0"] > share["d0"] * rows
    assert pred.peak_memory_bytes["d1"] <= cluster.device("d1").memory_bytes
    assert pred.peak_memory_bytes["d1"] < share["d1"] * rows
    # only d1 reads: at half speed, its share
    assert pred.read_s == pytest.approx(share["d1"] * DISKY.entry_bytes * 1e-10 / 0.5)
    assert PacPlan.from_json(plan.to_json()) == plan


def test_a_disk_cache_trades_its_memory_for_reads_and_writes() -> None:
    cluster = make_cluster([1.0, 0.5], memory_mib=[4096, 4096])
    kwargs = {"batch_size": 8, "num_samples": 8 * 20, "epochs": 3, "cache": "local"}
    memory = plan_finetune(COSTS, cluster, DISKY, cache_store="memory",
                           phase1_objective="time", **kwargs)
    disk = plan_finetune(COSTS, cluster, DISKY, cache_store="disk", phase1_objective="time",
                         **kwargs)
    assert memory.phase1.stages == disk.phase1.stages and memory.shares == disk.shares
    mp, dp = memory.predicted, disk.predicted
    assert mp is not None and dp is not None
    assert dp.cache_bytes == mp.cache_bytes
    steps, entry = disk.steps_per_epoch, DISKY.entry_bytes
    for d, share in zip(disk.devices, disk.shares, strict=True):
        # the whole cache leaves memory; one mini-batch's rows wait to be written at most
        assert mp.peak_memory_bytes[d] - dp.peak_memory_bytes[d] >= (steps - 1) * share * entry
    speed = {"d0": 1.0, "d1": 0.5}
    write = max(share * entry * 2e-10 / speed[d]
                for d, share in zip(disk.devices, disk.shares, strict=True))
    read = max(share * entry * 1e-10 / speed[d]
               for d, share in zip(disk.devices, disk.shares, strict=True))
    assert dp.write_s == pytest.approx(write) and dp.read_s == pytest.approx(read)
    assert dp.phase1_step_s == pytest.approx(mp.phase1_step_s + write)
    assert mp.phase2_step_s < dp.phase2_step_s <= mp.phase2_step_s + read * (1 + 1e-9)
    assert mp.write_s == mp.read_s == 0.0


def test_a_devices_storage_bandwidth_bounds_its_reads() -> None:
    cluster = make_cluster([1.0, 0.5], memory_mib=[4096, 4096])
    slow = replace(cluster, devices=tuple(replace(d, storage_mb_s=2.0) if d.name == "d1"
                                          else d for d in cluster.devices))
    plan = plan_finetune(COSTS, slow, DISKY, batch_size=8, num_samples=80, epochs=2,
                         cache_store="disk")
    share = dict(zip(plan.devices, plan.shares, strict=True))["d1"]
    assert plan.predicted is not None
    # 2 MB/s: far slower than the host's page-cache copy at half its speed
    assert plan.predicted.read_s == pytest.approx(share * DISKY.entry_bytes / 2e6)
    # read ahead: the storage's wait overlaps the step, which is at least that long
    assert plan.predicted.phase2_step_s >= plan.predicted.read_s
    # and the slow reader trains on fewer samples than its speed alone would give it
    fast_disk = plan_finetune(COSTS, cluster, DISKY, batch_size=8, num_samples=80, epochs=2,
                              cache_store="disk")
    assert share < dict(zip(fast_disk.devices, fast_disk.shares, strict=True))["d1"]
    assert fast_disk.predicted is not None
    assert plan.predicted.phase2_step_s > fast_disk.predicted.phase2_step_s


def test_a_disk_cache_holds_exactly_its_own_rows() -> None:
    plan = plan_finetune(COSTS, make_cluster([1.0, 0.5]), MODEL, batch_size=8,
                         num_samples=16, epochs=1, cache_store="disk")
    assert plan.cache_disk == ("d0", "d1") and plan.cache == "local"
    moved = {"d0": (plan.shares[0] - 1, 1)}
    for disk in (("d0",), ("d1",)):       # d0's rows away from it, or onto d1's disk
        with pytest.raises(PlanError, match="keeps its cache on disk, so it holds exactly"):
            replace(plan, cache="sharded", cache_phase2=moved, cache_disk=disk)
    with pytest.raises(PlanError, match=r"cache_disk \['zz'\] must name distinct devices"):
        replace(plan, cache_disk=("zz",))


@pytest.mark.parametrize("kwargs, words", [
    ({"batch_size": 8, "num_samples": 4, "epochs": 1}, "no full batch"),
    ({"batch_size": 0, "num_samples": 4, "epochs": 1}, "must be >= 1"),
    ({"batch_size": 2, "num_samples": 4, "epochs": 1}, "smaller than the 3 devices"),
])
def test_bad_sizes(kwargs: dict[str, int], words: str) -> None:
    with pytest.raises(PlanError, match=words):
        plan_finetune(COSTS, make_cluster([1.0, 0.5, 0.5]), MODEL, **kwargs)


def test_malformed_json_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="malformed PAC plan"):
        PacPlan.from_json('{"model": {}}')


def test_solver_pac_never_imports_torch() -> None:
    code = "import sys, solver.pac; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- the phase-1 objective (see [Note: phase-1 objective]) --------------------------------

BIG = uniform_costs(8, fwd=0.002, bwd=0.004, param_bytes=64 * MIB, cut_bytes=16 * 1024)
BIG_MODEL = PacModel(taps=(1, 3, 5), entry_bytes=3 * 16 * 1024, trainable_bytes=32 * 1024,
                     adapter_flops=1e6)


def _plan(objective: str, slack: float = DEFAULT_PHASE1_SLACK) -> PacPlan:
    cluster = make_cluster([1.0, 1.0, 1.0], memory_mib=4096, bandwidth_mbps=1000)
    return plan_finetune(BIG, cluster, BIG_MODEL, batch_size=12, num_samples=24, epochs=2,
                         phase1_objective=objective, phase1_slack=slack)


def _held(plan: PacPlan) -> dict[str, int]:
    """Backbone segments each device holds in phase 1."""
    return {d: plan.phase1.stages[plan.phase1.stage_of(d)].last
            - plan.phase1.stages[plan.phase1.stage_of(d)].first + 1
            for d in plan.phase1.devices}


def test_memory_objective_spreads_the_frozen_backbone() -> None:
    fast, lean = _plan("time"), _plan("memory")
    assert fast.predicted is not None and lean.predicted is not None
    # the fastest phase 1 is data parallel: every device holds all 3 segments
    assert max(_held(fast).values()) == 3
    assert max(_held(lean).values()) < 3
    assert max(lean.predicted.peak_memory_bytes.values()) < \
        max(fast.predicted.peak_memory_bytes.values())
    assert lean.predicted.phase1_step_s <= (1 + DEFAULT_PHASE1_SLACK) * \
        fast.predicted.phase1_step_s
    choice = lean.meta["phase1_choice"]
    assert choice["objective"] == "memory" and len(choice["candidates"]) >= 2
    chosen = choice["candidates"][choice["chosen"]]
    assert chosen["pressure"] == min(c["pressure"] for c in choice["candidates"]
                                     if c["phase1_step_s"] <= (1 + DEFAULT_PHASE1_SLACK)
                                     * min(x["phase1_step_s"] for x in choice["candidates"]))
    assert "peak memory pressure" in choice["reason"] and "\n" not in choice["reason"]
    assert PacPlan.from_json(lean.to_json()) == lean


def test_no_slack_keeps_the_fastest_phase_1() -> None:
    plan = _plan("memory", slack=0.0)
    assert plan.phase1.stages == _plan("time").phase1.stages
    assert plan.meta["phase1_choice"]["chosen"] == 0


@pytest.mark.parametrize(("objective", "slack", "match"), [
    ("speed", 1.0, "objective must be one of"), ("memory", -0.5, "slack must be >= 0"),
    ("memory", float("nan"), "slack must be >= 0")])
def test_bad_phase1_objective_or_slack(objective: str, slack: float, match: str) -> None:
    with pytest.raises(PlanError, match=match) as info:
        _plan(objective, slack)
    assert "\n" not in str(info.value)


def test_segment_costs_charge_the_tables_measured_cost_per_message() -> None:
    cluster = make_cluster([1.0, 0.5], bandwidth_mbps=1000)
    probed = replace(COSTS, message_overhead_s=4e-4)     # the host probe's figure
    coarse = segment_costs(probed, MODEL.taps)
    assert coarse.message_overhead_s == 4e-4
    assert coarse.runtime_overhead == probed.runtime_overhead
    # at one core: a message to or from the half-speed device pays twice that
    wire = cluster.latency_s("d0", "d1")
    assert cluster.for_costs(coarse).latency_s("d0", "d1") == pytest.approx(wire + 4e-4 / 0.5)
    # not measured: no figure of another host or time stands in for it
    assert segment_costs(COSTS, MODEL.taps).message_overhead_s == 0.0
    assert cluster.for_costs(segment_costs(COSTS, MODEL.taps)).latency_s("d0", "d1") == wire


def _piped(cluster: Cluster) -> tuple[PacPlan, Plan]:
    """A plan on ``cluster`` whose phase 1 is the 2-stage pipeline ``d0 | d1`` (M = 2),
    and that phase-1 plan."""
    plan = plan_finetune(COSTS, cluster, MODEL, batch_size=4, num_samples=8, epochs=1,
                         phase1_objective="time")
    one = Plan(model_hash="h", cluster_hash="c", batch_size=4, micro_batch_size=2,
               num_micro_batches=2, num_layers=3,
               stages=(Stage((0, 1), ("d0",), (2,)), Stage((2, 2), ("d1",), (2,))))
    return replace(plan, phase1=one, shares=(2, 2)), one


def test_phase1_prediction_grows_with_the_measured_cost_per_message() -> None:
    cluster = make_cluster([1.0, 1.0], bandwidth_mbps=1000)
    piped, _one = _piped(cluster)
    free = predict_finetune(piped, COSTS, cluster).phase1_step_s
    paid = predict_finetune(piped, replace(COSTS, message_overhead_s=1e-3), cluster).phase1_step_s
    # the last micro-batch's cut piece lies on the critical path (the first one's receive
    # overlaps d0's second forward; micro-batch 0's hand-off from d1 overlaps d1's wait)
    assert paid - free >= 1e-3 - 1e-12


def test_phase1_prediction_adds_the_hand_off_after_the_pipeline() -> None:
    cluster = make_cluster([1.0, 1.0], bandwidth_mbps=10)
    piped, one = _piped(cluster)
    pred = predict_finetune(piped, COSTS, cluster)
    coarse = segment_costs(COSTS, MODEL.taps)
    from solver.evaluate import evaluate
    e_f = [st.e_f for st in evaluate(one, coarse, cluster.for_costs(coarse)).stages]
    pipeline = sum(e_f) + max(e_f)          # M = 2
    assert pred.phase1_step_s > pipeline     # hand-off to the other owner comes after it


def test_stage_0_pays_for_making_its_samples() -> None:
    cluster = make_cluster([1.0, 0.5, 0.5], bandwidth_mbps=1000)
    plan = plan_finetune(COSTS, cluster, MODEL, batch_size=8, num_samples=16, epochs=1,
                         phase1_objective="time")
    slow = replace(plan, model=replace(MODEL, sample_s=0.01))
    base, made = predict_finetune(plan, COSTS, cluster), predict_finetune(slow, COSTS, cluster)
    (stage,) = plan.phase1.stages      # data parallel: each makes its share at its speed
    per_mb = max(0.01 * n / v for n, v in zip(stage.shares, (1.0, 0.5, 0.5), strict=True))
    assert made.phase1_step_s == pytest.approx(base.phase1_step_s
                                               + plan.phase1.num_micro_batches * per_mb)
    assert PacPlan.from_json(slow.to_json()).model.sample_s == 0.01


# -- simulation of both phases (solver/pac_simulate.py) ------------------------------------

def test_simulation_equals_the_model_on_one_device() -> None:
    from solver.pac_simulate import simulate_finetune

    cluster = make_cluster([1.0], bandwidth_mbps=1000)
    plan = plan_finetune(COSTS, cluster, replace(MODEL, sample_s=1e-3), batch_size=8,
                         num_samples=24, epochs=3)
    sim, pred = simulate_finetune(plan, COSTS, cluster), predict_finetune(plan, COSTS, cluster)
    assert sim.phase1_step_s == pytest.approx(pred.phase1_step_s)
    assert sim.phase2_step_s == pred.phase2_step_s
    assert sim.total_s == pytest.approx(pred.total_s)
    assert sim.total_s == pytest.approx(sim.epoch1_s + 2 * sim.epoch_s)
    assert sim.phase1_bubble_fraction == pytest.approx(0.0, abs=1e-9)
    # with the cache on disk: its writes in phase 1 and its reads in phase 2, both alike
    disk = plan_finetune(COSTS, cluster, replace(DISKY, sample_s=1e-3), batch_size=8,
                         num_samples=24, epochs=3, cache_store="disk")
    sim, pred = simulate_finetune(disk, COSTS, cluster), predict_finetune(disk, COSTS, cluster)
    assert pred.write_s > 0 and pred.read_s > 0
    assert sim.phase1_step_s == pytest.approx(pred.phase1_step_s)
    assert sim.total_s == pytest.approx(pred.total_s)


def test_simulation_of_a_pipeline_with_hand_offs() -> None:
    from solver.pac_simulate import simulate_finetune

    cluster = make_cluster([1.0, 0.5, 0.5], bandwidth_mbps=100)
    plan = plan_finetune(COSTS, cluster, MODEL, batch_size=8, num_samples=16, epochs=2,
                         phase1_objective="time")
    phase1 = Plan(model_hash="h", cluster_hash="c", batch_size=8, micro_batch_size=4,
                  num_micro_batches=2, num_layers=3,
                  stages=(Stage((0, 0), ("d0",), (4,)), Stage((1, 2), ("d1", "d2"), (2, 2))))
    piped = replace(plan, phase1=phase1)
    sim = simulate_finetune(piped, COSTS, cluster)
    kinds = {(e.kind, e.device) for e in sim.events}
    assert ("F", "d0") in kinds and ("F", "d1") in kinds and ("SEND", "d0") in kinds
    # d1 and d2 each hold two segments: their forwards pace the pipeline; each micro-batch's
    # hand-offs follow its forward (as runtime.pac_train sends them), overlapping the next
    # forward: micro-batch 0's rows go to d0 while micro-batch 1 computes, and micro-batch
    # 1's rows are d1's and d2's own (phase 2's shares 4 / 2 / 2), so the step ends with
    # the last forward
    slow_fwd = max(e.end for e in sim.events if e.kind == "F")
    assert sim.phase1_step_s == pytest.approx(slow_fwd)
    for device in ("d1", "d2"):
        f0 = next(e for e in sim.events if (e.kind, e.device, e.micro_batch) == ("F", device, 0))
        f1 = next(e for e in sim.events if (e.kind, e.device, e.micro_batch) == ("F", device, 1))
        hand = [e for e in sim.events if e.kind == "SEND" and e.device == device
                and e.peer == "d0" and e.start >= f0.end]
        assert hand and all(f0.end <= e.start and e.end < f1.end for e in hand)
    # each owner takes its rows after its own forwards, one message at a time on its CPU:
    # d0 from d1 and d2 (micro-batch 0), d1 and d2 from d0 (micro-batch 1)
    takes = sorted((e for e in sim.events if e.kind == "TAKE"), key=lambda e: e.start)
    assert {(e.device, e.peer) for e in takes} == {("d0", "d1"), ("d0", "d2"),
                                                   ("d1", "d0"), ("d2", "d0")}
    for device in ("d0", "d1", "d2"):
        mine = [e for e in takes if e.device == device]
        last_f = max(e.end for e in sim.events if e.kind == "F" and e.device == device)
        assert all(e.start >= last_f for e in mine)
        assert all(a.end <= b.start + 1e-12 for a, b in zip(mine, mine[1:], strict=False))
    assert 0.0 < sim.phase1_bubble_fraction < 1.0
    bad = make_cluster([1.0, 0.5], bandwidth_mbps=100)
    with pytest.raises(PlanError, match="not in the cluster"):
        simulate_finetune(piped, COSTS, bad)


def test_a_pipeline_is_predicted_no_faster_than_its_simulation() -> None:
    from solver.pac_simulate import simulate_phase1

    cluster = make_cluster([1.0, 0.5, 0.5], bandwidth_mbps=100)
    plan = plan_finetune(COSTS, cluster, MODEL, batch_size=8, num_samples=16, epochs=2,
                         phase1_objective="time")
    phase1 = Plan(model_hash="h", cluster_hash="c", batch_size=8, micro_batch_size=2,
                  num_micro_batches=4, num_layers=3,
                  stages=(Stage((0, 0), ("d0",), (2,)), Stage((1, 1), ("d1",), (2,)),
                          Stage((2, 2), ("d2",), (2,))))
    piped = replace(plan, phase1=phase1)
    pred = predict_finetune(piped, COSTS, cluster)
    simulated = simulate_phase1(piped, COSTS, cluster)[0]
    assert pred.phase1_step_s == pytest.approx(max(simulated, pred.phase1_closed_form_s))
    assert pred.phase1_closed_form_s > 0
    back = type(pred).from_dict(pred.to_dict())
    assert back == pred
    older = {k: v for k, v in pred.to_dict().items() if k != "phase1_closed_form_s"}
    assert type(pred).from_dict(older).phase1_closed_form_s == 0.0   # plans made before


# -- the cache's placement (see [Note: cache placement]) ----------------------------------

def _placed(memory_mib: list[int], cache: str = "auto", **kwargs: float) -> PacPlan:
    cluster = make_cluster([1.0, 0.5, 0.5], bandwidth_mbps=1000, memory_mib=memory_mib)
    # each device holds 1 MiB whatever it trains (Cluster.workspace_bytes), as a GPU does
    cluster = replace(cluster, devices=tuple(replace(d, workspace_bytes=MIB)
                                             for d in cluster.devices))
    return plan_finetune(COSTS, cluster, MODEL, batch_size=8, num_samples=80, epochs=3,
                         cache=cache, cache_store="memory", **kwargs)


def _rows_held(plan: PacPlan, phase: int) -> dict[str, int]:
    return {d: sum(b - a for a, b in rs)
            for d, rs in zip(plan.devices, plan.homes(phase), strict=True)}


def test_a_cache_that_fits_only_sharded_is_streamed_from_other_devices() -> None:
    with pytest.raises(PlanError, match=r"device 'd1' .* bytes short"):
        _placed([64, 4, 64], cache="local")
    plan = _placed([64, 4, 64])
    assert plan.cache == "sharded" and "d1" in plan.cache_phase2
    # --cache-store auto: a sharded cache in memory comes before a partial spill to disk,
    # and is weighed against the whole cache on disk ([Note: choosing the store]); here
    # the disk needs no hand-off and no fetches, so it is even faster
    cluster = replace(make_cluster([1.0, 0.5, 0.5], bandwidth_mbps=1000, memory_mib=[64, 4, 64]))
    cluster = replace(cluster, devices=tuple(replace(d, workspace_bytes=MIB)
                                             for d in cluster.devices))
    sharded = plan_finetune(COSTS, cluster, DISKY, batch_size=8, num_samples=80, epochs=3,
                            cache_store="memory")
    auto = plan_finetune(COSTS, cluster, DISKY, batch_size=8, num_samples=80, epochs=3,
                         store_slack=0.0)
    assert sharded.cache == "sharded" and auto.cache_store == "disk"
    assert sharded.predicted is not None and auto.predicted is not None
    assert auto.predicted.total_s <= sharded.predicted.total_s
    assert auto.meta["cache_choice"]["store_reason"].startswith("disk: peak memory pressure")
    assert PacPlan.from_json(plan.to_json()) == plan
    held, own = _rows_held(plan, 2), dict(zip(plan.devices, plan.shares, strict=True))
    assert held["d1"] < own["d1"] and sum(held.values()) == plan.batch_size
    pred = plan.predicted
    assert pred is not None and pred.fetch_s > 0
    assert pred.phase2_step_s >= pred.fetch_s
    # every device within its memory, and the cache bytes are where the rows are held
    cluster = make_cluster([1.0, 0.5, 0.5], memory_mib=[64, 4, 64])
    for d, peak in pred.peak_memory_bytes.items():
        assert peak <= cluster.device(d).memory_bytes
        assert pred.cache_bytes[d] == held[d] * plan.steps_per_epoch * MODEL.entry_bytes
    assert "sharded" in plan.meta["cache_choice"]["reason"]


def test_rows_parked_in_phase_1_make_the_cache_fit() -> None:
    with pytest.raises(PlanError, match=r"device 'd0' .* bytes short"):
        _placed([12, 12, 12], cache="local")
    plan = _placed([12, 12, 12])
    # d0 runs phase 1's last stage: its rows wait on another device until phase 1 ends
    assert plan.cache == "sharded" and "d0" in plan.cache_phase1
    assert _rows_held(plan, 1)["d0"] < plan.shares[plan.devices.index("d0")]
    pred = plan.predicted
    assert pred is not None
    cluster = make_cluster([1.0, 0.5, 0.5], memory_mib=[12, 12, 12])
    assert all(peak <= cluster.device(d).memory_bytes
               for d, peak in pred.peak_memory_bytes.items())
    # rows held elsewhere in phase 1 than in phase 2 are handed over once, in epoch 1
    assert (pred.handoff_s > 0) == (plan.homes(1) != plan.homes(2))
    assert pred.epoch1_s == pytest.approx(plan.steps_per_epoch * (pred.phase1_step_s
                                                                  + pred.phase2_step_s)
                                          + pred.handoff_s)


def test_sharding_lowers_the_summed_peak_and_only_where_memory_dictates() -> None:
    local, auto = _placed([64, 20, 64], cache="local"), _placed([64, 20, 64])
    assert local.cache == "local" and not local.cache_phase1 and not local.cache_phase2
    assert local.predicted is not None and auto.predicted is not None
    assert auto.cache == "sharded"
    assert sum(auto.predicted.peak_memory_bytes.values()) < \
        sum(local.predicted.peak_memory_bytes.values())
    # on devices with room to spare everywhere, nothing moves
    roomy = _placed([64, 64, 64])
    assert roomy.cache == "local" and roomy.predicted is not None
    assert roomy.predicted.fetch_s == 0 and roomy.predicted.handoff_s == 0


def test_no_slack_keeps_fetches_hidden_behind_the_step() -> None:
    plan = _placed([64, 18, 64])
    assert plan.cache_phase2 and plan.predicted is not None and plan.predicted.fetch_s > 0
    local_like = replace(plan, cache="local", cache_phase1={}, cache_phase2={})
    assert plan.predicted is not None
    base = predict_finetune(local_like, COSTS, make_cluster([1.0, 0.5, 0.5],
                                                           bandwidth_mbps=1000,
                                                           memory_mib=[64, 18, 64]))
    assert plan.predicted.phase2_step_s == pytest.approx(base.phase2_step_s)


@pytest.mark.parametrize("kwargs, match", [({"cache": "disk"}, "cache placement must be"),
                                           ({"cache_store": "tape"}, "cache store must be"),
                                           ({"cache_slack": -1.0}, "cache slack must be")])
def test_bad_cache_mode_or_slack(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(PlanError, match=match):
        plan_finetune(COSTS, make_cluster([1.0, 0.5, 0.5]), MODEL, batch_size=8,
                      num_samples=16, epochs=1, **kwargs)  # type: ignore[arg-type]


def test_cache_holders_must_add_up_to_the_share() -> None:
    plan = _placed([12, 12, 12])
    with pytest.raises(PlanError, match="adding up to its share"):
        replace(plan, cache_phase2={"d0": (1, 1, 0)})
    with pytest.raises(PlanError, match="use cache='local'"):
        replace(plan, cache_phase1={}, cache_phase2={})
    # the layout: a trainer's own rows first, then the other holders in device order
    homes = plan.homes(2)
    assert sorted(i for rs in homes for a, b in rs for i in range(a, b)) == list(range(8))


def _pipeline(micro_batch: int, num_micro_batches: int) -> Plan:
    """Segment 0 on d0, 1 on d1, 2 on d2, every device at the whole micro-batch."""
    return Plan(model_hash="h", cluster_hash="c", batch_size=micro_batch * num_micro_batches,
                micro_batch_size=micro_batch, num_micro_batches=num_micro_batches,
                num_layers=3, stages=(Stage((0, 0), ("d0",), (micro_batch,)),
                                      Stage((1, 1), ("d1",), (micro_batch,)),
                                      Stage((2, 2), ("d2",), (micro_batch,))))


def test_phase_1_memory_is_one_micro_batch_of_a_forward_only_stage() -> None:
    one = phase1_memory(COSTS, MODEL, _pipeline(2, 4))
    # nothing is kept for backward: more micro-batches of the same size hold no more
    assert phase1_memory(COSTS, MODEL, _pipeline(2, 8)) == one
    coarse = segment_costs(COSTS, MODEL.taps)
    part = MODEL.entry_bytes // 3                 # three taps of equal cuts
    cut = 64 * 1024
    # the middle stage: its weights, the workspace, the cut it received and its wire
    # buffer, its tap, and two micro-batches of the cut it sends
    assert one["d1"] == coarse.layers[1].buffer_bytes + 2 * (
        cut + part) + 2 * (cut + 2 * cut)
    # the first stage receives nothing; the last sends no cut
    assert one["d0"] == coarse.layers[0].buffer_bytes + 2 * part + 2 * 2 * cut
    assert one["d2"] == coarse.layers[2].buffer_bytes + 2 * (cut + part) \
        + 2 * cut
    # more rows per micro-batch hold more
    assert all(v > one[d] for d, v in phase1_memory(COSTS, MODEL, _pipeline(4, 2)).items())


def test_a_rounded_cache_holds_its_parts_as_made_and_as_rounded_in_phase_1() -> None:
    half = replace(MODEL, entry_bytes=MODEL.entry_bytes // 2,
                   made_entry_bytes=MODEL.entry_bytes)
    cluster = make_cluster([1.0, 0.5, 0.5], bandwidth_mbps=1000)
    assert PacPlan.from_json(plan_finetune(COSTS, cluster, half, batch_size=8,
                                           num_samples=16, epochs=2).to_json()).model == half
    one, rounded = phase1_memory(COSTS, MODEL, _pipeline(2, 4)), \
        phase1_memory(COSTS, half, _pipeline(2, 4))
    part = MODEL.entry_bytes // 3
    # each stage's micro-batch of 2 rows holds its tap as made and its rounded copy
    assert {d: rounded[d] - one[d] for d in one} == {d: 2 * (part // 2) for d in one}


def test_phase_1_memory_of_a_plan_for_another_model_is_a_plan_error() -> None:
    wrong = Plan(model_hash="h", cluster_hash="c", batch_size=4, micro_batch_size=4,
                 num_micro_batches=1, num_layers=5,
                 stages=(Stage((0, 4), ("d0",), (4,)),))
    with pytest.raises(PlanError, match=r"segments up to 4 but .* 3 segments .*segment_costs"):
        phase1_memory(COSTS, MODEL, wrong)



def test_memory_caps_keep_each_devices_workspace() -> None:
    """[Note: phase-1 objective]: a cap cuts the memory for tensors, not the workspace (a cap
    of the whole memory fell below the Jetsons' 16 MiB workspaces for small models, where
    no plan fits)."""
    from solver.pac import _capped, _usable_pressure

    cluster = Cluster.from_dict({"devices": [
        {"name": "nano", "type": "jetson-nano", "count": 2},
        {"name": "nx", "type": "jetson-xavier-nx"}, {"name": "me", "type": "local"}]})
    capped = _capped(cluster, 0.001)
    for d in cluster.devices:
        assert capped.workspace_bytes(d.name) == cluster.workspace_bytes(d.name)
        assert capped.usable_bytes(d.name) == max(1, int(0.001 * cluster.usable_bytes(d.name)))
    assert cluster.workspace_bytes("nano0") > capped.usable_bytes("nano0") > 0
    peak = {d.name: cluster.workspace_bytes(d.name) + cluster.usable_bytes(d.name) // 4
            for d in cluster.devices}
    assert _usable_pressure(peak, cluster) == pytest.approx(0.25, rel=1e-6)


def test_the_cache_placement_scored_per_device_is_the_reference_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``place_cache`` scores a move by the two devices it changes (``_DevicePeaks``); on
    random clusters and data sets, tight and roomy, every call places every row as the
    reference that re-scores every device (tests/pac_cache_reference.py) and fails with
    the same error."""
    import random

    import solver.pac
    from tests.pac_cache_reference import place_cache_reference

    quick = solver.pac.place_cache
    calls = {"same": 0, "moved": 0, "errors": 0}

    def both(*args: Any, **kwargs: Any) -> Any:
        try:
            expected: Any = place_cache_reference(*args, **kwargs)
        except PlanError as exc:
            expected = str(exc)
        try:
            got: Any = quick(*args, **kwargs)
        except PlanError as exc:
            got = str(exc)
        assert got == expected
        calls["same"] += 1
        if isinstance(got, str):
            calls["errors"] += 1
            raise PlanError(got)
        calls["moved"] += bool(got[0] or got[1])
        return got

    monkeypatch.setattr(solver.pac, "place_cache", both)
    rng = random.Random(2812)
    for _ in range(24):
        n = rng.randint(2, 5)
        memory = [rng.choice([6.0, 8.0, 12.0, 64.0]) for _ in range(n)]
        cluster = make_cluster([rng.choice([0.5, 1.0, 2.0]) for _ in range(n)],
                               memory_mib=memory, bandwidth_mbps=rng.choice([100, 1000]))
        batch = n * rng.randint(1, 3)
        try:
            plan_finetune(COSTS, cluster, MODEL, batch_size=batch,
                          num_samples=batch * rng.randint(1, 12), epochs=2,
                          cache_store=rng.choice(["memory", "auto"]),
                          cache_slack=rng.choice([0.0, 0.5, 5.0]))
        except PlanError:
            pass
    for memory_mib in ([40, 40], [40, 64, 24]):       # caches that fit nowhere
        with pytest.raises(PlanError, match="bytes short"):
            plan_finetune(COSTS, make_cluster([1.0] * len(memory_mib), memory_mib=memory_mib),
                          MODEL, batch_size=8, num_samples=8 * 400, epochs=2,
                          cache_store="memory")
    assert calls["same"] >= 24 and calls["moved"] >= 3 and calls["errors"] >= 2, calls
