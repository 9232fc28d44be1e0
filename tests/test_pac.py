"""PAC plans: forward-only segment costs, phase-2 shares, predictions, JSON round trip, errors."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
from solver_cases import MIB, make_cluster, uniform_costs

from asteroid_fx.errors import PlanError
from contracts.plan import Plan, Stage
from solver.pac import PacModel, PacPlan, plan_finetune, predict_finetune, segment_costs

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
    assert pred.epoch1_s == pytest.approx(5 * (pred.phase1_step_s + pred.phase2_step_s))
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
        plan_finetune(COSTS, cluster, MODEL, batch_size=8, num_samples=8 * 400, epochs=2)
    assert "\n" not in str(info.value)


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
