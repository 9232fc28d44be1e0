"""Tied parameters across stages: which ranks sum a tied weight's gradient, and the sum.

[Note: tied weights across stages]
A parameter that several stages use (GPT-2's token embedding, which is also its output
head) is copied into every stage that holds it (``asteroid_fx.partition``, [Note: tied
parameters]). Each copy's gradient covers only its own uses, and the unsplit model's
gradient is their sum. Every rank of every holding stage holds a partial gradient (its
share of the mini-batch, its stage's uses), so one SUM all-reduce over the union of the
holding stages' ranks gives every copy the whole gradient. It replaces the stage's own
all-reduce for that parameter (which would count the other stages' ranks nowhere). The
copies start equal (each stage loads them from the seeded model by name) and the
optimizer steps them with equal gradients, so they stay equal: the run trains the model
the single-process reference trains.

Every rank creates every tie group's process group, in the order of the canonical names
(``torch.distributed.new_group`` is collective over the whole world), and the members
all-reduce them in that order after their stage's own all-reduce.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from contracts.errors import RuntimeFailure
from contracts.plan import Plan

__all__ = ["TieGroup", "tie_groups", "tied_parameters_of"]


@dataclass(frozen=True)
class TieGroup:
    """One tied parameter held by several stages.

    ``ranks``: every rank of every stage that holds it (the all-reduce's members);
    ``names``: per holding stage, its local names of the parameter.
    """

    name: str
    stages: tuple[int, ...]
    ranks: tuple[int, ...]
    names: Mapping[int, tuple[str, ...]]

    def local_names(self, stage: int) -> tuple[str, ...]:
        """This stage's names of the parameter (empty: the stage does not hold it)."""
        return self.names.get(stage, ())


def tie_groups(plan: Plan, tied: Mapping[str, Sequence[tuple[int, str]]]) -> list[TieGroup]:
    """The tie groups of ``tied`` (``partition.json``'s ``tied``: canonical name ->
    ``((stage, local name), ...)``) under ``plan``, sorted by name; a group held by one
    stage only needs no all-reduce and is left out.

    Raises:
        RuntimeFailure: a holder names a stage the plan does not have.
    """
    first: list[int] = []
    start = 0
    for planned in plan.stages:
        first.append(start)
        start += len(planned.devices)
    groups: list[TieGroup] = []
    for name in sorted(tied):
        names: dict[int, list[str]] = {}
        for stage, local in tied[name]:
            if not 0 <= stage < plan.num_stages:
                raise RuntimeFailure(f"tied parameter {name!r} is held by stage {stage}, but "
                                     f"the plan has {plan.num_stages} stages; the partition "
                                     f"does not belong to this plan: re-run `asteroid-fx "
                                     f"partition`")
            names.setdefault(stage, []).append(local)
        if len(names) < 2:
            continue
        stages = tuple(sorted(names))
        ranks = tuple(r for s in stages
                      for r in range(first[s], first[s] + len(plan.stages[s].devices)))
        groups.append(TieGroup(name, stages, ranks,
                               {s: tuple(sorted(set(v))) for s, v in names.items()}))
    return groups


def tied_parameters_of(module: torch.nn.Module, group: TieGroup,
                       stage: int) -> list[torch.nn.Parameter]:
    """The distinct parameters of ``module`` (stage ``stage``) that are ``group``'s copies
    and are trained (a frozen copy is in no all-reduce).

    Raises:
        RuntimeFailure: the stage module has no parameter of a name the partition gives.
    """
    found: dict[int, torch.nn.Parameter] = {}
    for local in group.local_names(stage):
        try:
            param = module.get_parameter(local)
        except AttributeError as exc:
            raise RuntimeFailure(f"stage {stage} has no parameter {local!r} of the tied "
                                 f"parameter {group.name!r}; the stage files and "
                                 f"partition.json disagree: re-run `asteroid-fx "
                                 f"partition`") from exc
        if param.requires_grad:
            found[id(param)] = param
    return list(found.values())
