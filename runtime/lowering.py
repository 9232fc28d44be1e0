"""Lowering pass: add SEND/RECV actions (with re-sharding by sample ranges) to a schedule."""

from __future__ import annotations

from dataclasses import dataclass

from contracts.errors import ScheduleError
from contracts.plan import Plan
from runtime.schedule import Action, ActionKind, Schedule, rank_stages

__all__ = [
    "Transfer",
    "transfers",
    "outgoing",
    "incoming",
    "local_needs",
    "sends_after",
    "remote_needs",
    "add_comms",
    "send_peers",
    "send_releases",
    "recv_posts",
    "RECV_WINDOW",
]

# [Note: readiness rule]
# The single source of truth for "what must happen before an action can run":
#   F(s, m)      needs RECV_F(s, m) on the same rank            (s > 0)
#   B(s, m)      needs F(s, m) and RECV_B(s, m) on the same rank (the latter when s < S-1)
#   SEND_F(s, m) needs F(s, m) on the same rank;  SEND_B(s, m) needs B(s, m)
#   RECV_F(s, m) needs SEND_F(s-1, m) on every rank of stage s-1 whose sample range overlaps
#   RECV_B(s, m) needs SEND_B(s+1, m) on every rank of stage s+1 whose sample range overlaps
# Sends are asynchronous (posted, then awaited at the end of the round), so a SEND never
# waits for its receiver. ``add_comms`` inserts exactly the comm actions that
# ``local_needs`` asks for, and ``runtime.validate`` checks order and simulates with
# ``local_needs`` / ``remote_needs``.
#
# [Note: releasing sends]
# A posted send keeps its packed buffer alive until it is awaited. Awaiting every send only
# at the end of the round would hold one buffer per micro-batch and direction, M of them,
# where 1F1B needs activations for at most min(M, S - s) micro-batches. A send is awaited
# (and its buffer freed) as soon as the schedule proves it was received, without ever
# blocking: X = SEND on rank r to peer q is received once q ran the matching RECV, and r
# knows that once it has received anything q sent after that RECV (q runs its actions in
# order). ``send_releases`` finds, for every send, the first of r's receives that proves
# it for all of its peers; sends no later receive proves (the last micro-batches) are
# awaited at the end of the round as before. Under 1F1B a SEND_F(m) is released by
# RECV_B(m), so a stage holds its send buffers as long as the activations they came from.
#
# [Note: posting receives]
# A RECV action is where the rank WAITS for its message; the receive itself is posted
# earlier (``recv_posts``), so that gloo writes the payload as soon as the sender sends
# (see runtime/comm.py [Note: lean hops]). Posting never blocks and every message has a tag
# of its own, so the blocking points are exactly the RECV actions of the schedule and the
# readiness rule, ``runtime.validate.simulate`` and the release proofs above are unchanged.
# The first ``w`` receives of a kind (RECV_F, RECV_B) are posted before the rank's first
# action, every later one right after the receive ``w`` before it of its kind was
# consumed, ``w = RECV_WINDOW[kind]``: at most ``w`` receives of a kind are posted ahead of
# their wait, which bounds the buffers held for them (``runtime.validate.check_posts``
# checks all of this).
#
# Activations are posted two ahead, gradients one. A stage runs ahead of the next one (in
# 1F1B it sends the activations of micro-batch m + 1 as soon as the gradients of m - 1
# are back), so with one ahead the next stage, which posts the receive of m + 1 only once
# it has taken m, was often late, most of all when it is the slower one: gloo then
# announces the send, waits for the receive to be posted and writes the payload from the
# sender's transport thread, a round trip and a wake-up of both processes' transport
# threads more per message. Posted two ahead, the receive is there before the send. On
# the 2-stage pipeline of tools/measure_hop.py (16 micro-batches, uncapped) the transport
# threads' CPU per round fell from 0.56-0.60 to 0.28-0.37 ms and the main threads' by
# 0.4-0.5 ms (docs/benchmarks.md, "Per-hop cost"). The price is one more received
# activation buffer on every stage but the first (solver.evaluate [Note: wire buffers]).
# Gradients are posted as soon as the previous ones are taken, long before the next
# stage can send them (it needs these activations first), so one ahead is enough.


@dataclass(frozen=True)
class Transfer:
    """Samples ``[start, stop)`` of every micro-batch (micro-batch-relative) go from rank
    ``src`` of stage ``boundary`` to rank ``dst`` of stage ``boundary + 1`` (activations)
    and back (gradients)."""

    boundary: int
    src: int
    dst: int
    start: int
    stop: int

    @property
    def samples(self) -> int:
        return self.stop - self.start


def _rank_ranges(plan: Plan, stage: int) -> list[tuple[int, int, int]]:
    """(rank, start, stop) of every device of ``stage``."""
    first_rank = sum(len(s.devices) for s in plan.stages[:stage])
    ranges = plan.stages[stage].sample_ranges()
    return [(first_rank + i, *ranges[d]) for i, d in enumerate(plan.stages[stage].devices)]


def transfers(plan: Plan, boundary: int) -> list[Transfer]:
    """Every transfer across the cut after stage ``boundary``: each device of the stage
    sends each of its sample ranges to the device of the next stage that owns it."""
    if not 0 <= boundary < plan.num_stages - 1:
        raise ScheduleError(f"boundary {boundary} is not between two stages of a "
                            f"{plan.num_stages}-stage plan")
    out: list[Transfer] = []
    for src, a0, a1 in _rank_ranges(plan, boundary):
        for dst, b0, b1 in _rank_ranges(plan, boundary + 1):
            lo, hi = max(a0, b0), min(a1, b1)
            if lo < hi:
                out.append(Transfer(boundary, src, dst, lo, hi))
    return out


def outgoing(plan: Plan, rank: int) -> list[Transfer]:
    """Transfers whose activations leave ``rank`` (sorted by sample range)."""
    stage = rank_stages(plan)[rank]
    if stage == plan.num_stages - 1:
        return []
    return [t for t in transfers(plan, stage) if t.src == rank]


def incoming(plan: Plan, rank: int) -> list[Transfer]:
    """Transfers whose activations arrive at ``rank`` (sorted by sample range)."""
    stage = rank_stages(plan)[rank]
    if stage == 0:
        return []
    return sorted((t for t in transfers(plan, stage - 1) if t.dst == rank),
                  key=lambda t: t.start)


def local_needs(plan: Plan, action: Action) -> list[Action]:
    """Actions that must come earlier on the same rank (see [Note: readiness rule])."""
    s, m, last = action.stage, action.microbatch, plan.num_stages - 1
    kind = action.kind
    if kind is ActionKind.F:
        return [Action(s, ActionKind.RECV_F, m)] if s > 0 else []
    if kind is ActionKind.B:
        needs = [Action(s, ActionKind.F, m)]
        if s < last:
            needs.append(Action(s, ActionKind.RECV_B, m))
        return needs
    if kind is ActionKind.SEND_F:
        return [Action(s, ActionKind.F, m)]
    if kind is ActionKind.SEND_B:
        return [Action(s, ActionKind.B, m)]
    return []


def remote_needs(plan: Plan, rank: int, action: Action) -> list[tuple[int, Action]]:
    """(rank, action) pairs that must have run elsewhere first (see [Note: readiness rule])."""
    s, m = action.stage, action.microbatch
    if action.kind is ActionKind.RECV_F:
        return [(t.src, Action(s - 1, ActionKind.SEND_F, m)) for t in incoming(plan, rank)]
    if action.kind is ActionKind.RECV_B:
        return [(t.dst, Action(s + 1, ActionKind.SEND_B, m)) for t in outgoing(plan, rank)]
    return []


def sends_after(plan: Plan, action: Action) -> list[Action]:
    s, m, last = action.stage, action.microbatch, plan.num_stages - 1
    if action.kind is ActionKind.F and s < last:
        return [Action(s, ActionKind.SEND_F, m)]
    if action.kind is ActionKind.B and s > 0:
        return [Action(s, ActionKind.SEND_B, m)]
    return []


def add_comms(plan: Plan, schedule: Schedule) -> Schedule:
    """Pure pass: compute-only schedule -> compute + comm schedule.

    Each receive the readiness rule asks for goes right before its compute action and each
    send right after the compute that produces its data. Shapes of the re-sharding follow
    :func:`transfers` (a device may send to, or receive from, several devices per action).
    """
    out: Schedule = {}
    for rank, actions in schedule.items():
        lowered: list[Action] = []
        for action in actions:
            if action.kind.is_comm:
                raise ScheduleError(f"rank {rank}: add_comms expects a compute-only schedule, "
                                    f"got {action}; lower the compute schedule once")
            lowered.extend(a for a in local_needs(plan, action) if a.kind.is_comm)
            lowered.append(action)
            lowered.extend(sends_after(plan, action))
        out[rank] = lowered
    return out


def send_peers(plan: Plan, rank: int, action: Action) -> list[int]:
    """Ranks that a SEND action of ``rank`` sends to (empty for other actions)."""
    if action.kind is ActionKind.SEND_F:
        return [t.dst for t in outgoing(plan, rank)]
    if action.kind is ActionKind.SEND_B:
        return [t.src for t in incoming(plan, rank)]
    return []


def _matching_recv(action: Action) -> Action:
    if action.kind is ActionKind.SEND_F:
        return Action(action.stage + 1, ActionKind.RECV_F, action.microbatch)
    return Action(action.stage - 1, ActionKind.RECV_B, action.microbatch)


def send_releases(plan: Plan, schedule: Schedule) -> dict[int, dict[int, list[Action]]]:
    """Pure pass: ``out[rank][i]`` lists the SEND actions of ``rank`` that every receiver
    has provably received once ``rank`` has run its ``i``-th action (see
    [Note: releasing sends]); sends listed nowhere are awaited at the end of the round."""
    position = {r: {a: i for i, a in enumerate(actions)} for r, actions in schedule.items()}
    peers = {r: {a: send_peers(plan, r, a) for a in actions if a.kind in _SENDS}
             for r, actions in schedule.items()}
    # proof[q][r][i]: the earliest position on r of a receive of something q sent at or
    # after q's i-th action (None: nothing q sends to r from there on)
    proof: dict[int, dict[int, list[int | None]]] = {}
    for q, actions in schedule.items():
        proof[q] = {}
        for r in {p for targets in peers[q].values() for p in targets}:
            best: int | None = None
            earliest: list[int | None] = [None] * (len(actions) + 1)
            for i in range(len(actions) - 1, -1, -1):
                action = actions[i]
                if r in peers[q].get(action, ()):
                    got = position[r].get(_matching_recv(action))
                    if got is not None and (best is None or got < best):
                        best = got
                earliest[i] = best
            proof[q][r] = earliest
    out: dict[int, dict[int, list[Action]]] = {r: {} for r in schedule}
    for r, sends in peers.items():
        for action, targets in sends.items():
            release: int | None = -1
            for q in targets:
                received = position.get(q, {}).get(_matching_recv(action))
                chain = proof.get(q, {}).get(r)
                known = chain[received + 1] if received is not None and chain else None
                if known is None or release is None:
                    release = None
                    break
                release = max(release, known)
            if release is not None and release > position[r][action]:
                out[r].setdefault(release, []).append(action)
    return out


_SENDS = (ActionKind.SEND_F, ActionKind.SEND_B)


RECV_WINDOW: dict[ActionKind, int] = {ActionKind.RECV_F: 2, ActionKind.RECV_B: 1}
"""Receives of each kind a rank posts ahead of their wait (see [Note: posting receives])."""


def recv_posts(plan: Plan, schedule: Schedule) -> dict[int, dict[int, list[Action]]]:
    """Pure pass: ``out[rank][i]`` lists the RECV actions of ``rank`` whose receives are
    posted right before its ``i``-th action (see [Note: posting receives])."""
    out: dict[int, dict[int, list[Action]]] = {}
    for rank, actions in schedule.items():
        posts: dict[int, list[Action]] = {}
        waits: dict[ActionKind, list[int]] = {}
        for index, action in enumerate(actions):
            window = RECV_WINDOW.get(action.kind)
            if window is not None:
                earlier = waits.setdefault(action.kind, [])
                at = earlier[-window] + 1 if len(earlier) >= window else 0
                posts.setdefault(at, []).append(action)
                earlier.append(index)
        out[rank] = posts
    return out
