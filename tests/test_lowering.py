"""Tests of runtime.lowering: re-sharding transfers and the add_comms pass."""

from __future__ import annotations

import pytest

from contracts.errors import ScheduleError
from contracts.plan import Plan, Stage
from runtime.lowering import (
    RECV_WINDOW,
    Transfer,
    add_comms,
    incoming,
    outgoing,
    recv_posts,
    remote_needs,
    send_peers,
    send_releases,
    transfers,
)
from runtime.schedule import Action, ActionKind, Schedule, format_actions, gpipe, one_f_one_b


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


def _pipeline(micro_batches: int) -> Plan:
    return Plan("m", "c", micro_batches, 1, micro_batches,
                tuple(Stage((i, i), (f"d{i}",), (1,)) for i in range(3)))


def _proven(plan: Plan, schedule: Schedule, rank: int, index: int, send: Action) -> bool:
    """Brute force: every peer of ``send`` ran its matching receive and then sent ``rank``
    something that ``rank`` received by its ``index``-th action."""
    recv = (Action(send.stage + 1, ActionKind.RECV_F, send.microbatch)
            if send.kind is ActionKind.SEND_F
            else Action(send.stage - 1, ActionKind.RECV_B, send.microbatch))
    for q in send_peers(plan, rank, send):
        after = schedule[q][schedule[q].index(recv) + 1:]
        proofs = []
        for z in after:
            if rank not in send_peers(plan, q, z):
                continue
            got = (Action(z.stage + 1, ActionKind.RECV_F, z.microbatch)
                   if z.kind is ActionKind.SEND_F
                   else Action(z.stage - 1, ActionKind.RECV_B, z.microbatch))
            proofs.append(schedule[rank].index(got))
        if not proofs or min(proofs) > index:
            return False
    return True


def _most_pending(schedule: Schedule, releases: dict[int, dict[int, list[Action]]],
                  rank: int) -> int:
    pending: set[Action] = set()
    most = 0
    for i, action in enumerate(schedule[rank]):
        if action.kind in (ActionKind.SEND_F, ActionKind.SEND_B):
            pending.add(action)
        pending -= set(releases[rank].get(i, ()))
        most = max(most, len(pending))
    return most


@pytest.mark.parametrize("make", [_pipeline, lambda m: _plan()])
@pytest.mark.parametrize("order", [one_f_one_b, gpipe])
def test_send_releases_are_proven_by_a_later_receive(make: object, order: object) -> None:
    plan = make(8)  # type: ignore[operator]
    schedule = add_comms(plan, order(plan))  # type: ignore[operator]
    releases = send_releases(plan, schedule)
    assert set(releases) == set(schedule)
    for rank, by_index in releases.items():
        for index, sends in by_index.items():
            assert schedule[rank][index].kind in (ActionKind.RECV_F, ActionKind.RECV_B)
            for send in sends:
                assert schedule[rank].index(send) < index
                assert _proven(plan, schedule, rank, index, send)


def test_1f1b_holds_send_buffers_only_for_micro_batches_in_flight() -> None:
    plan = _pipeline(8)
    schedule = add_comms(plan, one_f_one_b(plan))
    releases = send_releases(plan, schedule)
    # SEND_F(m) of stage 0 is known received when the gradient of m comes back, or earlier
    where = {a: i for i, sends in releases[0].items() for a in sends}
    for m in range(8):
        assert where[Action(0, ActionKind.SEND_F, m)] <= schedule[0].index(
            Action(0, ActionKind.RECV_B, m))
    # without releases every rank would hold all 8 (stage 1: 16) buffers until the end
    assert [_most_pending(schedule, releases, r) for r in range(3)] == [3, 3, 2]
    assert [_most_pending(schedule, {r: {} for r in range(3)}, r) for r in range(3)] == [
        8, 16, 8]
    # one micro-batch: activations are proven received by the gradient that comes back;
    # nothing proves the gradients, which are awaited at the end of the round
    one = _pipeline(1)
    assert send_releases(one, add_comms(one, one_f_one_b(one))) == {
        0: {2: [Action(0, ActionKind.SEND_F, 0)]}, 1: {3: [Action(1, ActionKind.SEND_F, 0)]},
        2: {}}


@pytest.mark.parametrize("order", [one_f_one_b, gpipe])
def test_receives_are_posted_once_the_previous_of_their_kind_is_consumed(order: object) -> None:
    """Activations two ahead, gradients one (runtime/lowering.py [Note: posting receives])."""
    plan = _plan()
    schedule = add_comms(plan, order(plan))  # type: ignore[operator]
    posts = recv_posts(plan, schedule)
    assert set(posts) == set(schedule)
    for rank, actions in schedule.items():
        where = {a: i for i, sends in posts[rank].items() for a in sends}
        recvs = [a for a in actions if a.kind in (ActionKind.RECV_F, ActionKind.RECV_B)]
        assert sorted(where, key=actions.index) == recvs       # each exactly once
        for kind, window in ((ActionKind.RECV_F, 2), (ActionKind.RECV_B, 1)):
            assert RECV_WINDOW[kind] == window
            mine = [a for a in recvs if a.kind is kind]
            for i, after in enumerate(mine):
                # the first `window` at the start, every later one right after the wait of
                # the one `window` before it
                assert where[after] == (0 if i < window
                                        else actions.index(mine[i - window]) + 1)
    # the middle stage of a 3-stage 1F1B pipeline: both first receives at the start
    one = _pipeline(2)
    lowered = add_comms(one, one_f_one_b(one))
    assert format_actions(lowered[1]) == ("1RECV_F0 1F0 1SEND_F0 1RECV_F1 1F1 1SEND_F1 "
                                          "1RECV_B0 1B0 1SEND_B0 1RECV_B1 1B1 1SEND_B1")
    assert recv_posts(one, lowered)[1] == {
        0: [Action(1, ActionKind.RECV_F, 0), Action(1, ActionKind.RECV_F, 1),
            Action(1, ActionKind.RECV_B, 0)],
        7: [Action(1, ActionKind.RECV_B, 1)]}
