"""Schedule checks: static validation and a dry-run simulation that finds deadlocks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from contracts.errors import DeadlockError, ScheduleError
from contracts.plan import Plan
from runtime.lowering import RECV_WINDOW, local_needs, remote_needs, sends_after
from runtime.schedule import Action, ActionKind, Schedule, rank_stages

__all__ = ["validate", "simulate", "check_posts", "check_schedule", "format_grid"]

_MARK = "  <-- ERROR HERE"


def format_grid(rows: Sequence[Sequence[str]], num_ranks: int,
                error_step: int | None = None) -> str:
    """A step x rank table of action strings; the row ``error_step`` is marked."""
    header = ["step"] + [f"rank {r}" for r in range(num_ranks)]
    table = [header] + [[str(i)] + [c or "" for c in row] for i, row in enumerate(rows)]
    widths = [max(len(line[c]) for line in table) for c in range(len(header))]
    lines = []
    for i, line in enumerate(table):
        text = " | ".join(cell.ljust(w) for cell, w in zip(line, widths))
        if error_step is not None and i - 1 == error_step:
            text += _MARK
        lines.append(text.rstrip() if not text.endswith(_MARK) else text)
    return "\n".join(lines)


def _listing_grid(schedule: Schedule, num_ranks: int, error_rank: int,
                  error_index: int) -> str:
    """The schedule itself as a grid (row i = i-th action of every rank)."""
    depth = max((len(v) for v in schedule.values()), default=0)
    rows = [[str(schedule[r][i]) if r in schedule and i < len(schedule[r]) else ""
             for r in range(num_ranks)] for i in range(depth)]
    if rows and 0 <= error_index < len(rows):
        rows[error_index][error_rank] = "*" + rows[error_index][error_rank]
    return format_grid(rows, num_ranks, error_index)


def _expected(plan: Plan, stage: int) -> set[Action]:
    compute = {Action(stage, kind, m) for m in range(plan.num_micro_batches)
               for kind in (ActionKind.F, ActionKind.B)}
    comms = {n for a in compute for n in local_needs(plan, a) if n.kind.is_comm}
    comms |= {n for a in compute for n in sends_after(plan, a)}
    return compute | comms


def validate(plan: Plan, schedule: Schedule) -> None:
    """Static checks: one list per rank, each rank acts only for its own stage, every
    micro-batch's F and B appear exactly once, the comm actions are exactly those the
    readiness rule needs, and each action comes after its local needs.

    Raises:
        ScheduleError: naming the rank and the action, with the schedule as a grid.
    """
    stages = rank_stages(plan)
    n = len(stages)
    if sorted(schedule) != list(range(n)):
        raise ScheduleError(f"the schedule has ranks {sorted(schedule)} but the plan has "
                            f"{n} devices (ranks 0..{n - 1}); generate one list per device")
    for rank in range(n):
        actions = schedule[rank]
        stage = stages[rank]
        seen: dict[Action, int] = {}
        for index, action in enumerate(actions):
            problem = None
            if action.stage != stage:
                problem = (f"rank {rank} runs stage {stage} but has action {action} of "
                           f"stage {action.stage}")
            elif not 0 <= action.microbatch < plan.num_micro_batches:
                problem = (f"rank {rank}: action {action} names micro-batch "
                           f"{action.microbatch}, outside 0..{plan.num_micro_batches - 1}")
            elif action in seen:
                problem = f"rank {rank}: action {action} appears twice (steps {seen[action]} " \
                          f"and {index})"
            elif action not in _expected(plan, stage):
                problem = (f"rank {rank}: action {action} does not belong in stage {stage}'s "
                           f"schedule (no peer for it); remove it")
            else:
                missing = [need for need in local_needs(plan, action) if need not in seen]
                if missing:
                    problem = (f"rank {rank}: action {action} at step {index} runs before "
                               f"{', '.join(map(str, missing))}")
            if problem is not None:
                raise ScheduleError(f"{problem}\n{_listing_grid(schedule, n, rank, index)}")
            seen[action] = index
        absent = sorted(_expected(plan, stage) - set(seen),
                        key=lambda a: (a.microbatch, list(ActionKind).index(a.kind)))
        if absent:
            raise ScheduleError(
                f"rank {rank} (stage {stage}) never runs {', '.join(map(str, absent))}\n"
                f"{_listing_grid(schedule, n, rank, len(actions) - 1)}")


def simulate(plan: Plan, schedule: Schedule) -> list[list[str]]:
    """Dry-run the schedule in lock-step: at every step each rank runs its next action if
    the readiness rule allows (sends never wait). Returns the step x rank grid.

    Raises:
        DeadlockError: when no rank can move; the grid marks the blocked step.
        ScheduleError: when a send is never received.
    """
    n = len(rank_stages(plan))
    position = {r: 0 for r in range(n)}
    done: set[tuple[int, Action]] = set()
    consumed: set[tuple[int, Action]] = set()
    rows: list[list[str]] = []
    while any(position[r] < len(schedule.get(r, [])) for r in range(n)):
        row = [""] * n
        ready_now: list[tuple[int, Action]] = []
        for rank in range(n):
            actions = schedule.get(rank, [])
            if position[rank] >= len(actions):
                continue
            action = actions[position[rank]]
            if all(need in done for need in remote_needs(plan, rank, action)):
                ready_now.append((rank, action))
        if not ready_now:
            blocked = []
            for rank in range(n):
                actions = schedule.get(rank, [])
                if position[rank] < len(actions):
                    action = actions[position[rank]]
                    row[rank] = f"{action}?"
                    waits = [f"{a} on rank {r}" for r, a in remote_needs(plan, rank, action)
                             if (r, a) not in done]
                    blocked.append(f"rank {rank} waits in {action} for {', '.join(waits)}")
            rows.append(row)
            raise DeadlockError(
                f"deadlock at step {len(rows) - 1}: " + "; ".join(blocked)
                + "\n" + format_grid(rows, n, len(rows) - 1))
        for rank, action in ready_now:
            row[rank] = str(action)
            position[rank] += 1
            done.add((rank, action))
            consumed.update(remote_needs(plan, rank, action))
        rows.append(row)
    unmatched = sorted((r, str(a)) for r, a in done
                       if a.kind in (ActionKind.SEND_F, ActionKind.SEND_B)
                       and (r, a) not in consumed)
    if unmatched:
        raise ScheduleError(f"sends never received: {unmatched}\n{format_grid(rows, n)}")
    return rows


_RECVS = (ActionKind.RECV_F, ActionKind.RECV_B)


def check_posts(plan: Plan, schedule: Schedule, posts: Mapping[int, Mapping[int,
                Sequence[Action]]],
                window: int | Mapping[ActionKind, int] | None = None) -> None:
    """Check where receives are posted (``runtime.lowering.recv_posts``; see
    runtime/lowering.py [Note: posting receives]): each RECV of a rank is posted exactly
    once, at or before its own position (where the rank waits for it), nothing else is
    posted, and at no position more than ``window`` receives of one kind are posted ahead
    of their wait (per kind; by default ``runtime.lowering.RECV_WINDOW``). Posting never
    blocks and each (channel, micro-batch) has its own tag, so with these checks
    :func:`simulate`'s deadlock proof covers the posted schedule.

    Raises:
        ScheduleError: naming the rank and the receive, with the schedule as a grid.
    """
    n = len(rank_stages(plan))
    limits: Mapping[ActionKind, int] = (RECV_WINDOW if window is None
                                        else dict.fromkeys(_RECVS, window)
                                        if isinstance(window, int) else window)
    for rank in range(n):
        actions = schedule.get(rank, [])
        where = {a: i for i, a in enumerate(actions)}
        posted_at: dict[Action, int] = {}
        problem: str | None = None
        index = len(actions) - 1
        for at, posted in sorted(posts.get(rank, {}).items()):
            for action in posted:
                if action.kind not in _RECVS or action not in where:
                    problem = (f"rank {rank}: posts {action} at step {at}, which is not a "
                               f"receive of its schedule")
                elif action in posted_at:
                    problem = (f"rank {rank}: posts {action} twice (steps {posted_at[action]}"
                               f" and {at})")
                elif not 0 <= at <= where[action]:
                    problem = (f"rank {rank}: posts {action} at step {at}, after it waits "
                               f"for it at step {where[action]}")
                if problem is not None:
                    index = min(max(at, 0), index)
                    break
                posted_at[action] = at
            if problem is not None:
                break
        if problem is None:
            missing = [a for a in actions if a.kind in _RECVS and a not in posted_at]
            if missing:
                problem = f"rank {rank}: never posts {', '.join(map(str, missing))}"
                index = where[missing[0]]
        if problem is None:
            for kind in _RECVS:
                spans = [(posted_at[a], where[a]) for a in actions if a.kind is kind]
                for i in range(len(actions)):
                    ahead = sum(1 for p, w in spans if p <= i < w)
                    if ahead > limits[kind]:
                        problem = (f"rank {rank}: {ahead} {kind.value} receives are posted "
                                   f"ahead of their wait at step {i} (at most "
                                   f"{limits[kind]})")
                        index = i
                        break
                if problem is not None:
                    break
        if problem is not None:
            raise ScheduleError(f"{problem}\n{_listing_grid(schedule, n, rank, index)}")


def check_schedule(plan: Plan, schedule: Schedule,
                   posts: Mapping[int, Mapping[int, Sequence[Action]]] | None = None
                   ) -> list[list[str]]:
    """:func:`validate` then :func:`simulate` (and :func:`check_posts` when ``posts``
    is given); returns the simulated grid."""
    validate(plan, schedule)
    if posts is not None:
        check_posts(plan, schedule, posts)
    return simulate(plan, schedule)
