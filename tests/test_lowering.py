"""Tests of runtime.lowering: re-sharding transfers and the add_comms pass."""

from __future__ import annotations

import pytest

from asteroid_fx.errors import ScheduleError
from runtime.lowering import Transfer, add_comms, incoming, outgoing, remote_needs, transfers
from runtime.schedule import Action, ActionKind, format_actions, one_f_one_b
from solver.plan import Plan, Stage


def _plan() -> Plan:
    # stage 0: one device (6); stage 1: uneven pair (2, 4); stage 2: three devices (3, 1, 2)
    return Plan("m", "c", 12, 6, 2, (
        Stage((0, 0), ("a",), (6,)),
        Stage((1, 1), ("b", "c"), (2, 4)),
        Stage((2, 2), ("d", "e", "f"), (3, 1, 2)),
    ))


def test_transfers_follow_sample_ranges() -> None:
    plan = _plan()
    assert transfers(plan, 0) == [Transfer(0, 0, 1, 0, 2), Transfer(0, 0, 2, 2, 6)]
    # b owns [0,2), c owns [2,6); d [0,3), e [3,4), f [4,6)
    assert transfers(plan, 1) == [
        Transfer(1, 1, 3, 0, 2), Transfer(1, 2, 3, 2, 3), Transfer(1, 2, 4, 3, 4),
        Transfer(1, 2, 5, 4, 6)]
    for boundary in (0, 1):
        assert sum(t.samples for t in transfers(plan, boundary)) == plan.micro_batch_size
    assert [t.src for t in incoming(plan, 3)] == [1, 2]
    assert [t.dst for t in outgoing(plan, 2)] == [3, 4, 5]
    assert outgoing(plan, 5) == [] and incoming(plan, 0) == []


def test_transfers_reject_bad_boundary() -> None:
    with pytest.raises(ScheduleError, match="boundary 2 is not between two stages"):
        transfers(_plan(), 2)


def test_add_comms_inserts_recv_before_and_send_after() -> None:
    plan = _plan()
    lowered = add_comms(plan, one_f_one_b(plan))
    assert format_actions(lowered[0]) == (
        "0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1")
    assert format_actions(lowered[1]) == (
        "1RECV_F0 1F0 1SEND_F0 1RECV_F1 1F1 1SEND_F1 1RECV_B0 1B0 1SEND_B0 "
        "1RECV_B1 1B1 1SEND_B1")
    assert format_actions(lowered[5]) == "2RECV_F0 2F0 2B0 2SEND_B0 2RECV_F1 2F1 2B1 2SEND_B1"
    assert remote_needs(plan, 3, Action(2, ActionKind.RECV_F, 1)) == [
        (1, Action(1, ActionKind.SEND_F, 1)), (2, Action(1, ActionKind.SEND_F, 1))]
    assert remote_needs(plan, 2, Action(1, ActionKind.RECV_B, 0)) == [
        (3, Action(2, ActionKind.SEND_B, 0)), (4, Action(2, ActionKind.SEND_B, 0)),
        (5, Action(2, ActionKind.SEND_B, 0))]


def test_add_comms_is_pure_and_rejects_lowered_input() -> None:
    plan = _plan()
    compute = one_f_one_b(plan)
    before = {r: list(v) for r, v in compute.items()}
    lowered = add_comms(plan, compute)
    assert compute == before
    with pytest.raises(ScheduleError, match="expects a compute-only schedule"):
        add_comms(plan, lowered)
