"""Pipeline schedules as data: actions, their compact repr, and 1F1B / GPipe generators."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Dict, List

from contracts.errors import ScheduleError
from contracts.plan import Plan

__all__ = [
    "ActionKind",
    "Action",
    "Schedule",
    "parse_action",
    "format_actions",
    "parse_actions",
    "stage_order_1f1b",
    "stage_order_gpipe",
    "one_f_one_b",
    "gpipe",
    "compute_schedule",
    "rank_stages",
]


class ActionKind(Enum):
    """What one action does. ``F``/``B`` compute; the others move activations/gradients."""

    F = "F"
    B = "B"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    @property
    def is_compute(self) -> bool:
        return self in (ActionKind.F, ActionKind.B)

    @property
    def is_comm(self) -> bool:
        return not self.is_compute


_KIND_BY_NAME: dict[str, ActionKind] = {kind.value: kind for kind in ActionKind}
_ACTION_RE = re.compile(r"^(\d+)([A-Z_]+)(\d+)$")


@dataclass(frozen=True, order=True)
class Action:
    """One step of one rank: ``kind`` for ``microbatch`` of ``stage`` (the acting stage).

    ``str(Action(1, ActionKind.F, 3)) == "1F3"``; ``str(Action(0, ActionKind.SEND_F, 3)) ==
    "0SEND_F3"`` (stage 0 sends the activations of micro-batch 3 to stage 1), and
    :func:`parse_action` is the exact inverse.
    """

    stage: int
    kind: ActionKind
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.microbatch}"

    def __repr__(self) -> str:
        return str(self)


# A schedule: one list of actions per rank (rank i <-> plan.devices[i]).
Schedule = Dict[int, List[Action]]   # typing: evaluated at run time on Python 3.8


def parse_action(text: str) -> Action:
    """Inverse of ``str(action)``: ``parse_action("1F3") == Action(1, ActionKind.F, 3)``."""
    match = _ACTION_RE.match(text.strip())
    kind = None if match is None else _KIND_BY_NAME.get(match.group(2))
    if match is None or kind is None:
        raise ScheduleError(f"cannot parse action {text!r}; expected STAGE KIND MICROBATCH "
                            f"such as '1F3' or '0SEND_F3' with KIND in "
                            f"{sorted(_KIND_BY_NAME)}")
    return Action(int(match.group(1)), kind, int(match.group(3)))


def format_actions(actions: list[Action]) -> str:
    """Space-separated compact form of one rank's actions (inverse: :func:`parse_actions`)."""
    return " ".join(str(a) for a in actions)


def parse_actions(text: str) -> list[Action]:
    return [parse_action(tok) for tok in text.split()]


def _check_shape(num_stages: int, num_microbatches: int) -> None:
    if num_stages < 1 or num_microbatches < 1:
        raise ScheduleError(f"a schedule needs >= 1 stage and >= 1 micro-batch, got "
                            f"num_stages={num_stages}, num_microbatches={num_microbatches}")


def stage_order_1f1b(stage: int, num_stages: int, num_microbatches: int) -> list[Action]:
    """Compute actions of ``stage`` under 1F1B: ``S-1-stage`` warm-up forwards, then
    alternating F/B, then the remaining backwards. At most ``min(M, S - stage)``
    micro-batches are in flight on the stage, as the memory model assumes."""
    _check_shape(num_stages, num_microbatches)
    if not 0 <= stage < num_stages:
        raise ScheduleError(f"stage {stage} is outside 0..{num_stages - 1}")
    m = num_microbatches
    warmup = min(num_stages - 1 - stage, m)
    out = [Action(stage, ActionKind.F, i) for i in range(warmup)]
    next_f, next_b = warmup, 0
    while next_b < m:
        if next_f < m:
            out.append(Action(stage, ActionKind.F, next_f))
            next_f += 1
        out.append(Action(stage, ActionKind.B, next_b))
        next_b += 1
    return out


def stage_order_gpipe(stage: int, num_stages: int, num_microbatches: int) -> list[Action]:
    """Compute actions of ``stage`` under GPipe: every forward, then every backward."""
    _check_shape(num_stages, num_microbatches)
    if not 0 <= stage < num_stages:
        raise ScheduleError(f"stage {stage} is outside 0..{num_stages - 1}")
    return ([Action(stage, ActionKind.F, i) for i in range(num_microbatches)]
            + [Action(stage, ActionKind.B, i) for i in range(num_microbatches)])


def rank_stages(plan: Plan) -> list[int]:
    """Stage index of every rank (rank i runs ``plan.devices[i]``)."""
    return [index for index, stage in enumerate(plan.stages) for _ in stage.devices]


def _expand(plan: Plan, per_stage: list[list[Action]]) -> Schedule:
    return {rank: list(per_stage[stage]) for rank, stage in enumerate(rank_stages(plan))}


def one_f_one_b(plan: Plan) -> Schedule:
    """Compute-only 1F1B schedule of every rank. Every device of a multi-device stage runs
    the stage's actions on its own share of each micro-batch (the same list)."""
    s, m = plan.num_stages, plan.num_micro_batches
    return _expand(plan, [stage_order_1f1b(i, s, m) for i in range(s)])


def gpipe(plan: Plan) -> Schedule:
    """Compute-only GPipe schedule of every rank (all forwards, then all backwards)."""
    s, m = plan.num_stages, plan.num_micro_batches
    return _expand(plan, [stage_order_gpipe(i, s, m) for i in range(s)])


def compute_schedule(plan: Plan) -> Schedule:
    """The compute-only schedule that ``plan.schedule`` names."""
    return {"1f1b": one_f_one_b, "gpipe": gpipe}[plan.schedule](plan)
