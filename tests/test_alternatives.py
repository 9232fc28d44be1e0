"""Tests of solver/alternatives.py: the plans a search passed over, simulated against its best."""

from __future__ import annotations

import pytest

import solver.api as api
from asteroid_fx.report import check_words
from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.plan import Plan, Stage
from contracts.table import CostTable
from solver.alternatives import MARGIN, check_objective, simulated_alternative
from solver.anytime import SearchReport, search
from solver.evaluate import evaluate
from solver.simulate import simulate
from tests.solver_cases import make_cluster, random_instance, uniform_costs


def _plan(costs: CostTable, stages: list[Stage], micro_batch: int, batch: int = 8) -> Plan:
    return Plan(model_hash=costs.model_hash, cluster_hash="c", batch_size=batch,
                micro_batch_size=micro_batch, num_micro_batches=batch // micro_batch,
                stages=tuple(stages), num_layers=costs.num_layers)


def _pipeline_and_one_stage(memory_mib: float = 1024.0) -> tuple[CostTable, Cluster, Plan,
                                                                  Plan]:
    """A 3-stage pipeline over 100 Mbps whose middle stage's port carries both cuts (the
    closed form charges each cut apart), and one slightly slower device alone."""
    costs = uniform_costs(6, cut_bytes=600_000, param_bytes=1024)
    cluster = make_cluster([1.0, 1.0, 1.0, 0.96], bandwidth_mbps=100.0,
                           memory_mib=[1024.0, 1024.0, 1024.0, memory_mib])
    pipeline = _plan(costs, [Stage((0, 1), ("d0",), (1,)), Stage((2, 3), ("d1",), (1,)),
                             Stage((4, 5), ("d2",), (1,))], 1)
    alone = _plan(costs, [Stage((0, 5), ("d3",), (1,))], 1)
    return costs, cluster, pipeline, alone


def test_the_instance_disagrees_as_intended() -> None:
    costs, cluster, pipeline, alone = _pipeline_and_one_stage()
    # the closed form prefers the pipeline, the simulation the single device
    assert evaluate(pipeline, costs, cluster).round_time_s < \
        evaluate(alone, costs, cluster).round_time_s
    assert simulate(alone, costs, cluster).round_time_s < \
        (1 - MARGIN) * simulate(pipeline, costs, cluster).round_time_s


def test_the_faster_simulation_is_found() -> None:
    costs, cluster, pipeline, alone = _pipeline_and_one_stage()
    found = simulated_alternative(pipeline, [pipeline, alone], costs, cluster)
    assert found is not None
    plan, seconds, mine = found
    assert plan is alone
    assert seconds == pytest.approx(simulate(alone, costs, cluster).round_time_s)
    assert mine == pytest.approx(simulate(pipeline, costs, cluster).round_time_s)


def test_nothing_when_no_alternative_beats_the_margin_or_fits() -> None:
    costs, cluster, pipeline, alone = _pipeline_and_one_stage()
    assert simulated_alternative(pipeline, [], costs, cluster) is None
    assert simulated_alternative(alone, [pipeline], costs, cluster) is None
    # the single device cannot hold the model: not an alternative
    costs, small, pipeline, alone = _pipeline_and_one_stage(memory_mib=0.01)
    assert not evaluate(alone, costs, small).fits
    assert simulated_alternative(pipeline, [alone], costs, small) is None


def _searched(monkeypatch: pytest.MonkeyPatch, best: Plan, alternatives: tuple[Plan, ...]
              ) -> None:
    def fake(*_args: object, **_kwargs: object) -> SearchReport:
        return SearchReport(best, 1.0, None, ("order",), True, alternatives)

    monkeypatch.setattr(api, "search_or_raise", fake)


def test_the_planner_reports_the_alternative_and_takes_it_when_asked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    costs, cluster, pipeline, alone = _pipeline_and_one_stage()
    _searched(monkeypatch, pipeline, (alone,))
    default = api.plan(costs, cluster, 8)
    assert default.stages == pipeline.stages
    alt = default.planner.check["simulated_alternative"]
    assert alt["simulated_s"] == pytest.approx(simulate(alone, costs, cluster).round_time_s)
    assert alt["round_s"] == pytest.approx(evaluate(alone, costs, cluster).round_time_s)
    assert alt["micro_batch"] == 1 and alt["stages"] == [[0, 5, ["d3"]]]
    assert "--objective simulated takes it" in check_words(default.planner.check)

    taken = api.plan(costs, cluster, 8, objective="simulated")
    assert taken.stages == alone.stages
    assert taken.planner.check["objective"] == "simulated"
    before, after = default.predicted, taken.predicted
    assert before is not None and after is not None
    assert taken.planner.check["model_optimum"]["round_s"] == pytest.approx(
        before.round_time_s)
    assert before.simulated_round_time_s is not None
    assert after.simulated_round_time_s is not None
    assert after.simulated_round_time_s < before.simulated_round_time_s
    assert "the model's optimum found" in check_words(taken.planner.check)
    for plan in (default, taken):       # plan.json keeps what the check says
        assert Plan.from_json(plan.to_json()).planner.check == plan.planner.check


def test_without_a_better_alternative_both_objectives_agree(
        monkeypatch: pytest.MonkeyPatch) -> None:
    costs, cluster, pipeline, alone = _pipeline_and_one_stage()
    _searched(monkeypatch, alone, (pipeline,))
    for objective in ("model", "simulated"):
        got = api.plan(costs, cluster, 8, objective=objective)
        assert got.stages == alone.stages
        assert "simulated_alternative" not in got.planner.check
        assert "objective" not in got.planner.check


def test_a_search_keeps_the_incumbents_it_replaced() -> None:
    kept = 0
    for seed in range(6):
        costs, cluster, batch = random_instance(seed, max_layers=6, max_devices=4)
        report = search(costs, cluster, batch)
        if report.plan is None:
            continue
        assert all(isinstance(p, Plan) for p in report.alternatives)
        for earlier in report.alternatives:   # each lost its place to a better plan
            assert evaluate(earlier, costs, cluster).round_time_s >= report.round_time_s
        kept += len(report.alternatives)
    assert kept > 0


def test_bad_objectives_are_refused() -> None:
    costs, cluster, _pipeline, _alone = _pipeline_and_one_stage()
    with pytest.raises(PlanError, match="unknown objective 'fast'.*model, simulated"):
        api.plan(costs, cluster, 8, objective="fast")
    with pytest.raises(PlanError, match="applies to the planner 'asteroid' only"):
        api.plan(costs, cluster, 8, planner="dapple", objective="simulated")
    check_objective("model", "dapple")      # the default goes with every planner
