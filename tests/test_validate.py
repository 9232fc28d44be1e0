"""Tests of runtime.validate: static checks and the deadlock-finding dry run."""

from __future__ import annotations

import itertools

import pytest

from contracts.errors import DeadlockError, ScheduleError
from contracts.plan import Plan, Stage
from runtime.lowering import add_comms, recv_posts
from runtime.schedule import Action, ActionKind, gpipe, one_f_one_b, parse_actions
from runtime.validate import check_posts, check_schedule, format_grid, simulate, validate

GROUPS = [
    [[4]],
    [[4], [4]],
    [[1, 3], [4]],
    [[4], [2, 2]],
    [[2, 2], [1, 3]],
    [[4], [1, 3], [4]],
    [[3, 1], [1, 1, 2], [2, 2], [4]],
    [[1, 1, 1, 1], [4], [2, 1, 1]],
    [[4]] * 5,
]


def _plan(groups: list[list[int]], m: int) -> Plan:
    stages, count = [], 0
    for index, shares in enumerate(groups):
        devices = tuple(f"d{count + i}" for i in range(len(shares)))
        count += len(shares)
        stages.append(Stage((index, index), devices, tuple(shares)))
    return Plan("m", "c", 4 * m, 4, m, tuple(stages))


@pytest.mark.parametrize(("groups", "m"), list(itertools.product(GROUPS, [1, 2, 3, 5, 8])))
def test_generated_schedules_validate(groups: list[list[int]], m: int) -> None:
    plan = _plan(groups, m)
    for generator in (one_f_one_b, gpipe):
        lowered = add_comms(plan, generator(plan))
        rows = check_schedule(plan, lowered)
        # posting receives ahead leaves the blocking points, and so the proof, unchanged
        assert check_schedule(plan, lowered, recv_posts(plan, lowered)) == rows
        for rank, actions in lowered.items():
            assert [row[rank] for row in rows if row[rank]] == [str(a) for a in actions]


def test_broken_schedule_deadlocks_with_grid() -> None:
    plan = _plan([[4], [1, 3]], 2)
    sched = add_comms(plan, one_f_one_b(plan))
    # rank 0 waits for a gradient before sending the activation that produces it
    sched[0] = parse_actions("0F0 0RECV_B0 0SEND_F0 0F1 0SEND_F1 0B0 0RECV_B1 0B1")
    validate(plan, sched)          # every rank's own order is fine ...
    with pytest.raises(DeadlockError) as info:
        simulate(plan, sched)      # ... but together they deadlock
    text = str(info.value)
    assert "deadlock at step 1" in text
    assert "rank 0 waits in 0RECV_B0 for 1SEND_B0 on rank 1, 1SEND_B0 on rank 2" in text
    marked = [line for line in text.splitlines() if line.endswith("<-- ERROR HERE")]
    assert len(marked) == 1 and "0RECV_B0?" in marked[0] and "1RECV_F0?" in marked[0]


def test_static_errors_name_rank_and_action() -> None:
    plan = _plan([[4], [2, 2]], 2)
    good = add_comms(plan, one_f_one_b(plan))

    def broken(rank: int, text: str) -> dict[int, list[Action]]:
        out = {r: list(v) for r, v in good.items()}
        out[rank] = parse_actions(text)
        return out

    with pytest.raises(ScheduleError, match=r"rank 1: action 1F0 at step 0 runs before "
                                            r"1RECV_F0(.|\n)*<-- ERROR HERE"):
        validate(plan, broken(1, "1F0 1RECV_F0 1SEND_F0 1RECV_F1 1F1 1SEND_F1 "
                                 "1RECV_B0 1B0 1SEND_B0 1RECV_B1 1B1 1SEND_B1"))
    with pytest.raises(ScheduleError, match="rank 0 runs stage 0 but has action 1F0"):
        validate(plan, broken(0, "1F0"))
    with pytest.raises(ScheduleError, match="appears twice"):
        validate(plan, broken(0, "0F0 0F0"))
    with pytest.raises(ScheduleError, match="micro-batch 5, outside 0..1"):
        validate(plan, broken(0, "0F5"))
    with pytest.raises(ScheduleError, match="0SEND_B0 does not belong"):
        validate(plan, broken(0, "0F0 0SEND_F0 0RECV_B0 0B0 0SEND_B0"))
    with pytest.raises(ScheduleError, match=r"rank 0 \(stage 0\) never runs 0F1, 0B1"):
        validate(plan, broken(0, "0F0 0SEND_F0 0RECV_B0 0B0"))
    with pytest.raises(ScheduleError, match=r"ranks \[0, 1\] but the plan has 3 devices"):
        validate(plan, {0: good[0], 1: good[1]})


def test_unmatched_send_is_reported() -> None:
    plan = _plan([[4], [4]], 1)
    sched = {0: [Action(0, ActionKind.F, 0), Action(0, ActionKind.SEND_F, 0)], 1: []}
    with pytest.raises(ScheduleError, match="sends never received"):
        simulate(plan, sched)


def test_format_grid_marks_one_row() -> None:
    text = format_grid([["0F0", ""], ["", "1F0"]], 2, error_step=1)
    lines = text.splitlines()
    assert lines[0].startswith("step | rank 0 | rank 1")
    assert lines[2].endswith("<-- ERROR HERE") and not lines[1].endswith("<-- ERROR HERE")


def test_posted_receives_are_checked() -> None:
    """Each receive is posted once, before it is waited on, and at most two activations
    and one gradient ahead (runtime/lowering.py [Note: posting receives])."""
    plan = _plan([[4], [2, 2]], 3)
    sched = add_comms(plan, one_f_one_b(plan))
    posts = recv_posts(plan, sched)
    check_posts(plan, sched, posts)

    def moved(rank: int, changes: dict[int, list[Action]]) -> dict[int, dict[int, list[Action]]]:
        out = {r: {i: list(v) for i, v in p.items()} for r, p in posts.items()}
        out[rank] = changes
        return out

    recvs = [a for a in sched[1] if a.kind in (ActionKind.RECV_F, ActionKind.RECV_B)]
    first_f = sched[1].index(Action(1, ActionKind.RECV_F, 0))
    with pytest.raises(ScheduleError, match=r"rank 1: posts 1RECV_F0 at step 1, after it waits "
                                            r"for it at step 0(.|\n)*<-- ERROR HERE"):
        check_posts(plan, sched, moved(1, {first_f + 1: recvs}))
    with pytest.raises(ScheduleError, match="posts 1RECV_F0 twice"):
        check_posts(plan, sched, moved(1, {0: recvs + [recvs[0]]}))
    with pytest.raises(ScheduleError, match="rank 1: never posts 1RECV_F0"):
        check_posts(plan, sched, moved(1, {0: recvs[1:]}))
    with pytest.raises(ScheduleError, match="posts 1F0 at step 0, which is not a receive"):
        check_posts(plan, sched, moved(1, {0: [Action(1, ActionKind.F, 0), *recvs]}))
    # everything posted at the start: two RECV_F ahead of their waits at once, which their
    # window of two allows and a window of one does not
    check_posts(plan, sched, moved(1, {0: recvs}))
    with pytest.raises(ScheduleError, match=r"2 RECV_F receives are posted ahead of their "
                                            r"wait at step 0 \(at most 1\)"):
        check_posts(plan, sched, moved(1, {0: recvs}), window=1)
    # a middle stage posting every gradient at the start: three ahead, one allowed
    three = _plan([[4], [4], [4]], 3)
    lowered = add_comms(three, one_f_one_b(three))
    mine = [a for a in lowered[1] if a.kind in (ActionKind.RECV_F, ActionKind.RECV_B)]
    all_posts = recv_posts(three, lowered)
    with pytest.raises(ScheduleError, match=r"3 RECV_B receives are posted ahead of their "
                                            r"wait at step 0 \(at most 1\)"):
        check_posts(three, lowered, {**all_posts, 1: {0: mine}})
    check_posts(plan, sched, moved(1, {0: recvs}), window=len(recvs))
