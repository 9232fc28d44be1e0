"""PAC: a device lost in phase 1 (the backbone's forward pipeline) is recovered, and the losses
still equal the single-process reference ([Note: PAC phase-1 recovery])."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from asteroid_fx.finetune import run_finetune
from contracts.cluster import Cluster
from contracts.errors import PlanError, RuntimeFailure, StageFailure
from contracts.pac_plan import PacPlan
from contracts.plan import Plan, Stage
from runtime.pac_recovery import parse_fail
from solver.pac import replan_phase1
from tests.test_pac_train import assert_matches_reference, prepare_tiny


def _prepare(tmp_path: Path, cache_store: str = "memory"
             ) -> tuple[Any, Cluster, Any, Path, PacPlan, Path]:
    """The tiny GPT on a, b, c with a pipelined phase 1 (segment 0 on a, segments 1-2 on
    b + c); 2 epochs of 2 mini-batches of 6 (``mixed``: b and c cache on disk)."""
    return prepare_tiny(tmp_path, 2, pipelined=True, cache_store=cache_store)


@pytest.mark.parametrize("fail, store", [("b@1", "mixed"), ("a@0", "memory")],
                         ids=["middle-stage-second-batch-disk-cache",
                              "first-stage-first-batch"])
def test_a_device_lost_in_phase_1_is_recovered(tmp_path: Path, fail: str, store: str) -> None:
    spec, _cluster, _costs, out, plan, cluster_file = _prepare(tmp_path, store)
    assert plan.cache_store == ("mixed" if store == "mixed" else "memory")
    lost, step = fail.split("@")
    metrics = tmp_path / "m.jsonl"
    result = run_finetune(out, cluster_file, seed=0, lr=0.05, metrics=metrics, timeout_s=300,
                          fail=fail)
    assert_matches_reference(result.losses, spec, 2)
    (event,) = result.recoveries
    assert event["event"] == "recovery" and event["phase"] == 1
    assert event["failed"] == [lost] and event["at_step"] == int(step)
    assert event["resume_step"] == int(step) and event["lost_steps"] == 0
    assert event["replanned"] is True               # the lost device ran a phase-1 stage
    survivors = {d for d in plan.devices if d != lost}
    assert {d for st in event["phase1"] for d in st["devices"]} <= survivors
    assert set(event["rows"]) == survivors
    # every row of the mini-batch has one owner, the lost device's rows split as planned
    owned = sorted(i for rs in event["rows"].values() for a, b in rs for i in range(a, b))
    assert owned == list(range(6))
    # the entries the lost device held in phase 1 (its own rows, or rows parked on it)
    held = sum(b - a for a, b in plan.homes(1)[plan.devices.index(lost)])
    assert event["recomputed_rows"] == int(step) * held
    for key in ("detect_s", "replan_s", "restore_s", "recompute_s", "total_s"):
        assert 0 <= event[key] < 30, key
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if '"step"' in line]
    assert [r["step"] for r in rows] == list(range(4))
    assert [r["phase"] for r in rows] == [1, 1, 2, 2]
    assert all(set(r["cache_bytes"]) == survivors for r in rows)
    # phase 2 reads everything from the cache: nothing was left for it to recompute
    assert [r["cache_hit_rate"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
    assert all(r["plan_version"] == 1 for r in rows)


def test_bad_fail_values_are_one_line_errors(tmp_path: Path) -> None:
    _spec, cluster, costs, out, plan, cluster_file = _prepare(tmp_path)
    for bad, message in [("z@1", "not in the PAC plan"), ("b", "DEVICE@STEP"),
                         ("b@x", "DEVICE@STEP"), ("b@4", "steps 0..3"),
                         ("a@1,b@1,c@1", "every device"), ("a@1,b@2", "one lost device"),
                         ("b@a9", "steps 0..3"), ("b@ax", "DEVICE@aSTEP")]:
        with pytest.raises(RuntimeFailure, match=message) as info:
            parse_fail(bad, plan)
        assert "\n" not in str(info.value)
    no_fallback = replace(plan, fallback={d: v for d, v in plan.fallback.items() if d != "c"})
    with pytest.raises(RuntimeFailure, match="no other device can cache"):
        parse_fail("c@1", no_fallback)
    assert parse_fail("b@1", plan) is not None and parse_fail(None, plan) is None
    after = parse_fail("b@a1", plan)      # epoch 1's adapter step 1: not a phase-1 loss
    assert after is not None and after.step == 1 and not after.in_phase1(plan)
    assert parse_fail("b@1", plan).in_phase1(plan)  # type: ignore[union-attr]
    # the run refuses before any process starts
    with pytest.raises(RuntimeFailure, match="not in the PAC plan"):
        run_finetune(out, cluster_file, fail="z@0", timeout_s=60)
    # the re-planner: the plan stays when the lost device ran no phase-1 stage, every
    # device lost is a PlanError, and a new plan uses only survivors
    only_a = replace(plan, phase1=replace(plan.phase1, stages=(
        Stage((0, 2), ("a",), (6,)),), micro_batch_size=6, num_micro_batches=1))
    assert replan_phase1(only_a, costs, cluster, ["c"]) == only_a.phase1
    with pytest.raises(PlanError, match="every device"):
        replan_phase1(plan, costs, cluster, ["a", "b", "c"])
    new = replan_phase1(plan, costs, cluster, ["b"])
    assert set(new.devices) <= {"a", "c"} and new.plan_version == plan.phase1.plan_version + 1


def test_no_phase_1_plan_on_the_survivors_ends_the_run_with_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The re-planner's error reaches every survivor, which stops (no hang)."""
    import asteroid_fx.finetune as finetune

    _spec, _cluster, _costs, out, _plan, cluster_file = _prepare(tmp_path)

    def no_plan(*_args: Any) -> Plan:
        raise PlanError("no forward-only pipeline fits on the survivors")

    monkeypatch.setattr(finetune, "replan_phase1", no_plan)
    began = time.perf_counter()
    with pytest.raises(StageFailure, match="could not be re-planned: PlanError: no forward") \
            as info:
        run_finetune(out, cluster_file, seed=0, lr=0.05, timeout_s=120, fail="c@1")
    assert "\n" not in str(info.value)
    assert time.perf_counter() - began < 60


def test_the_re_planner_needs_the_directory_s_costs_and_cluster(tmp_path: Path) -> None:
    from asteroid_fx.finetune import PacReplanner

    with pytest.raises(RuntimeFailure, match="no costs.json or cluster.json"):
        PacReplanner(tmp_path)
