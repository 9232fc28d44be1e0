"""Tests of runtime.schedule: action repr/parse and the 1F1B / GPipe generators."""

from __future__ import annotations

import pytest

from contracts.errors import ScheduleError
from contracts.plan import Plan, Stage
from runtime.schedule import (
    Action,
    ActionKind,
    format_actions,
    gpipe,
    one_f_one_b,
    parse_action,
    parse_actions,
    rank_stages,
    stage_order_1f1b,
    stage_order_gpipe,
)


def _plan(groups: list[list[int]], m: int) -> Plan:
    stages, names = [], 0
    mbs = sum(groups[0])
    for index, shares in enumerate(groups):
        devices = tuple(f"d{names + i}" for i in range(len(shares)))
        names += len(shares)
        stages.append(Stage((index, index), devices, tuple(shares)))
        assert sum(shares) == mbs
    return Plan("m", "c", mbs * m, mbs, m, tuple(stages))


@pytest.mark.parametrize("kind", list(ActionKind))
def test_action_repr_round_trips(kind: ActionKind) -> None:
    action = Action(12, kind, 7)
    assert parse_action(str(action)) == action
    assert str(action) == f"12{kind.value}7"


def test_compact_repr_examples() -> None:
    assert str(Action(1, ActionKind.F, 3)) == "1F3"
    assert str(Action(0, ActionKind.SEND_F, 3)) == "0SEND_F3"
    assert parse_actions("0F0 0SEND_F0 0RECV_B0 0B0") == [
        Action(0, ActionKind.F, 0), Action(0, ActionKind.SEND_F, 0),
        Action(0, ActionKind.RECV_B, 0), Action(0, ActionKind.B, 0)]
    assert format_actions(parse_actions("1RECV_F2 1F2")) == "1RECV_F2 1F2"


@pytest.mark.parametrize("text", ["F3", "1X3", "1F", "", "1SEND_X0", "a1F0"])
def test_parse_rejects_bad_text(text: str) -> None:
    with pytest.raises(ScheduleError, match="cannot parse action"):
        parse_action(text)


@pytest.mark.parametrize("s", [1, 2, 3, 5])
@pytest.mark.parametrize("m", [1, 2, 4, 7])
def test_1f1b_order_and_in_flight_bound(s: int, m: int) -> None:
    for stage in range(s):
        actions = stage_order_1f1b(stage, s, m)
        forwards = [a.microbatch for a in actions if a.kind is ActionKind.F]
        backwards = [a.microbatch for a in actions if a.kind is ActionKind.B]
        assert forwards == list(range(m)) and backwards == list(range(m))
        in_flight, peak = 0, 0
        for a in actions:
            in_flight += 1 if a.kind is ActionKind.F else -1
            peak = max(peak, in_flight)
            assert in_flight >= 0
        assert peak == min(m, s - stage)


def test_1f1b_example_and_gpipe() -> None:
    assert format_actions(stage_order_1f1b(0, 3, 4)) == "0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3"
    assert format_actions(stage_order_1f1b(2, 3, 2)) == "2F0 2B0 2F1 2B1"
    assert format_actions(stage_order_gpipe(1, 2, 2)) == "1F0 1F1 1B0 1B1"


def test_generators_expand_stages_to_their_devices() -> None:
    plan = _plan([[3], [1, 2], [2, 1]], m=3)
    assert rank_stages(plan) == [0, 1, 1, 2, 2]
    sched = one_f_one_b(plan)
    assert sorted(sched) == [0, 1, 2, 3, 4]
    assert sched[1] == sched[2] == stage_order_1f1b(1, 3, 3)
    assert gpipe(plan)[4] == stage_order_gpipe(2, 3, 3)


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ScheduleError, match="num_microbatches=0"):
        stage_order_1f1b(0, 2, 0)
    with pytest.raises(ScheduleError, match="stage 3 is outside 0..1"):
        stage_order_gpipe(3, 2, 2)
