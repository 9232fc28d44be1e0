"""Tests of solver.tied_plan: a tied model's plan against the best plan of one stage."""

from __future__ import annotations

from dataclasses import replace

import pytest

from contracts.errors import PlanError
from contracts.table import TiedWeight
from solver.api import plan
from solver.evaluate import evaluate, split_ties
from solver.tied_plan import TIED_STOP, one_stage_plan
from tests.solver_cases import MIB, make_cluster, uniform_costs

COSTS = uniform_costs(4)                 # 4 MiB of weights a layer, 64 KiB a sample cut
TIED = replace(COSTS, tied=(TiedWeight("emb", (0, 3), 4 * MIB),))
HEAVY = replace(COSTS, tied=(TiedWeight("emb", (0, 3), 16 * MIB),))


def test_a_plan_that_splits_a_heavy_tie_loses_to_one_stage() -> None:
    # two equal devices on 100 Mbps: the search pipelines them, but summing a tied
    # 16 MiB over both costs more than the pipeline saves
    cluster = make_cluster([1.0, 1.0], memory_mib=1024)
    untied = plan(COSTS, cluster, 8)
    assert untied.num_stages == 2 and "tied" not in untied.planner.check
    tied = plan(HEAVY, cluster, 8)
    assert tied.num_stages == 1 and split_ties(tied, HEAVY) == []
    check = tied.planner.check["tied"]
    assert check["kept"] == "one stage" and check["weights"] == ["emb"]
    assert check["split_round_s"] == pytest.approx(evaluate(untied, HEAVY, cluster).round_time_s)
    assert check["one_stage_round_s"] == tied.predicted.round_time_s < check["split_round_s"]
    # the search's bound is still a bound; the gap is the kept plan's, tie included
    bound = tied.planner.bound
    assert bound is not None and bound.bound_s <= tied.predicted.round_time_s
    assert bound.gap == pytest.approx((tied.predicted.round_time_s - bound.bound_s)
                                      / bound.bound_s)
    assert bound.stopped == TIED_STOP and not bound.order_optimal


def test_a_split_is_kept_where_one_stage_does_not_fit() -> None:
    # no device holds the four layers; the split plan holds a copy of the tie and fits
    cluster = make_cluster([1.0, 1.0], memory_mib=32)
    tied = plan(TIED, cluster, 8)
    assert tied.num_stages == 2 and tied.predicted.fits
    check = tied.planner.check["tied"]
    assert check["kept"] == "split" and check["one_stage_round_s"] is None
    assert split_ties(tied, TIED)
    with pytest.raises(PlanError, match="no plan of one stage fits in memory"):
        one_stage_plan(TIED, cluster, 8)
    # with less memory the copy does not fit either: the error names the tie
    with pytest.raises(PlanError, match=r"splits the tied weights \['emb'\] over stages and a "
                                        r"copy does not fit: device 'd1' is 0.9 MiB short"):
        plan(TIED, make_cluster([1.0, 1.0], memory_mib=28), 8)


def test_a_light_tie_keeps_the_faster_pipeline() -> None:
    # summing a 4 KiB tie costs little: the pipeline stays
    light = replace(COSTS, tied=(TiedWeight("emb", (0, 3), 4096),))
    cluster = make_cluster([1.0, 1.0], memory_mib=1024)
    kept = plan(light, cluster, 8)
    assert kept.num_stages == 2 and kept.planner.check["tied"]["kept"] == "split"
    assert kept.predicted.round_time_s < kept.planner.check["tied"]["one_stage_round_s"]
