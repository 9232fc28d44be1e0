"""Plans the search passed over, simulated: where the closed form's best plan stalls.

[Note: simulated alternatives]
Every planner ranks plans by the closed form (``solver.evaluate``), and the DP, the MILP
and brute force agree on its optimum. The event simulator (``solver.simulate``) runs the
same times through the schedule and lets a device's network port carry the cuts on both
sides of its stage. The closed form charges each cut apart (docs/latency-model.md, "What
the model still leaves out").

Where many stages talk over slow links, the two disagree most on exactly the plans the
closed form likes. On the 32-device ResNet-50 fleet of ``tools/time_planner.py`` (100
Mbps Wi-Fi, a few wired pairs), `afx.plan` returns these plans:

* 5 s: a 2-stage plan, closed form 4.504 s, simulated 4.527 s;
* 30 s: an 8-stage plan, closed form 4.349 s, simulated 6.312 s.

A longer search gave a plan that should run 39 % slower.

So a search keeps the incumbents it replaced (``SearchReport.alternatives``, the latest
first), and :func:`simulated_alternative` simulates them against the chosen plan. The
one that simulates fastest is reported in ``plan.planner.check["simulated_alternative"]``
when it beats the chosen plan's simulation by ``MARGIN``. With ``objective="simulated"``
(`--objective simulated`), the planner returns it instead. The default stays the closed
form's optimum, which the proven bound and the cross-checks are about.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from contracts.cluster import Cluster
from contracts.errors import PlanError
from contracts.plan import Plan
from contracts.table import CostTable
from solver.evaluate import evaluate
from solver.simulate import simulate

__all__ = ["MARGIN", "OBJECTIVES", "check_objective", "simulated_alternative", "describe"]

MARGIN = 0.05
"""An alternative must simulate at least this much faster (relative) than the chosen plan
to be reported or taken."""

OBJECTIVES = ("model", "simulated")
"""``model``: the closed form's optimum (the default); ``simulated``: the plan of those the
search found that simulates fastest ([Note: simulated alternatives])."""


def check_objective(objective: str, planner: str) -> None:
    """PlanError for an objective not in ``OBJECTIVES``, or ``simulated`` with a planner
    other than ``asteroid`` (only its search keeps alternatives)."""
    if objective not in OBJECTIVES:
        raise PlanError(f"unknown objective {objective!r} (--objective); choose one of "
                        f"{', '.join(OBJECTIVES)}")
    if objective != "model" and planner != "asteroid":
        raise PlanError(f"objective {objective!r} (--objective) applies to the planner "
                        f"'asteroid' only, not {planner!r}; drop it or plan with 'asteroid'")


def simulated_alternative(best: Plan, alternatives: Sequence[Plan], costs: CostTable,
                          cluster: Cluster) -> tuple[Plan, float, float] | None:
    """Of ``alternatives`` that fit in memory, the one whose simulated round beats
    ``best``'s by at least ``MARGIN``, the fastest: ``(plan, its simulated round, best's
    simulated round)``; None where none does. Pure."""
    if not alternatives:
        return None
    mine = simulate(best, costs, cluster).round_time_s
    found: tuple[Plan, float] | None = None
    for plan in alternatives:
        if not evaluate(plan, costs, cluster).fits:
            continue
        seconds = simulate(plan, costs, cluster).round_time_s
        if seconds < mine * (1.0 - MARGIN) and (found is None or seconds < found[1]):
            found = (plan, seconds)
    return None if found is None else (found[0], found[1], mine)


def describe(plan: Plan, simulated_s: float, costs: CostTable,
             cluster: Cluster) -> dict[str, Any]:
    """The JSON summary of an alternative for ``plan.planner.check``."""
    return {"round_s": evaluate(plan, costs, cluster).round_time_s,
            "simulated_s": simulated_s, "micro_batch": plan.micro_batch_size,
            "stages": [[s.first, s.last, list(s.devices)] for s in plan.stages]}
