"""Tests of runtime.ties: the groups that sum a tied weight's gradient across stages."""

from __future__ import annotations

import pytest
from torch import nn

from contracts.errors import RuntimeFailure
from contracts.plan import Plan, Stage
from runtime.ties import TieGroup, tie_groups, tied_parameters_of

PLAN = Plan("m", "c", 12, 6, 2, (Stage((0, 0), ("a",), (6,)),
                                 Stage((1, 2), ("b", "c"), (2, 4)),
                                 Stage((3, 4), ("d", "e"), (3, 3))), num_layers=5)


def test_a_tie_group_holds_every_rank_of_its_stages_in_name_order() -> None:
    tied = {"wte.weight": [[0, "wte.weight"], [2, "lm_head.weight"], [2, "wte.weight"]],
            "pos": ((1, "pos"), (2, "pos")),
            "alone": ((1, "x"), (1, "y"))}           # one stage only: no all-reduce
    groups = tie_groups(PLAN, tied)
    assert [g.name for g in groups] == ["pos", "wte.weight"]
    pos, wte = groups
    assert pos.stages == (1, 2) and pos.ranks == (1, 2, 3, 4)
    assert wte.stages == (0, 2) and wte.ranks == (0, 3, 4)
    assert wte.local_names(2) == ("lm_head.weight", "wte.weight")
    assert wte.local_names(1) == ()
    assert tie_groups(PLAN, {}) == []


def test_a_holder_outside_the_plan_is_a_clear_error() -> None:
    with pytest.raises(RuntimeFailure, match="held by stage 3, but the plan has 3 stages"):
        tie_groups(PLAN, {"w": ((0, "w"), (3, "w"))})


def test_the_copies_of_a_stage_are_its_distinct_trained_parameters() -> None:
    stage = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False), nn.Linear(3, 3))
    stage[1].weight = stage[0].weight                    # one tensor under two names
    group = TieGroup("emb", (0, 1), (0, 1), {1: ("0.weight", "1.weight")})
    assert tied_parameters_of(stage, group, 1) == [stage[0].weight]
    assert tied_parameters_of(stage, group, 0) == []
    stage[0].weight.requires_grad_(False)                # a frozen copy is in no sum
    assert tied_parameters_of(stage, group, 1) == []
    missing = TieGroup("emb", (0, 1), (0, 1), {1: ("2.bias", "9.weight")})
    with pytest.raises(RuntimeFailure, match="no parameter '9.weight' of the tied"):
        tied_parameters_of(stage, missing, 1)

