"""The public API's checks of the contract objects it is handed: typed errors with the fix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contracts.errors import AsteroidError, ClusterError, CostModelError, PlanError

if TYPE_CHECKING:
    from typing import TypeGuard

    from contracts.cluster import Cluster
    from contracts.plan import Plan
    from contracts.table import CostTable

__all__ = ["check_cluster", "check_costs", "check_path", "check_plan", "is_int", "is_number",
           "require"]


def is_int(value: object) -> TypeGuard[int]:
    """Whether ``value`` is an ``int`` and not a ``bool`` (``True`` is an ``int`` to Python,
    never a count or a size here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[float]:
    """Whether ``value`` is an ``int`` or a ``float`` and not a ``bool`` (``True`` is never a
    rate, a time or a factor here; NaN and the infinities are numbers: range checks are the
    caller's)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require(value: object, kind: type | tuple[type, ...], error: type[AsteroidError],
            what: str, fix: str) -> None:
    """``error`` (``"{what} must be a KIND, got TYPE VALUE; {fix}"``) unless ``value`` is
    an instance of ``kind``. A path or a dict handed where a ``Cluster`` is due failed deep
    inside the planner with ``AttributeError: 'str' object has no attribute 'for_costs'``."""
    if isinstance(value, kind):
        return
    kinds = kind if isinstance(kind, tuple) else (kind,)
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise error(f"{what} must be a {' or '.join(k.__name__ for k in kinds)}, got "
                f"{type(value).__name__} {shown}; {fix}")


def check_costs(value: Any, what: str = "costs") -> CostTable:
    """``value`` if it is a ``CostTable``, else ``CostModelError`` saying how to get one."""
    from contracts.table import CostTable  # (here: a device's run imports no table)

    require(value, CostTable, CostModelError, what,
            "load one with CostTable.load('costs.json'), or make one with "
            "afx.analytic_costs(model, inputs) or afx.profile(...)")
    return value


def check_cluster(value: Any, what: str = "cluster") -> Cluster:
    """``value`` if it is a ``Cluster``, else ``ClusterError`` saying how to get one."""
    from contracts.cluster import Cluster

    require(value, Cluster, ClusterError, what,
            "load one with Cluster.from_yaml('cluster.yaml') or Cluster.from_dict({...})")
    return value


def check_plan(value: Any, what: str = "plan") -> Plan:
    """``value`` if it is a ``Plan``, else ``PlanError`` saying how to get one."""
    from contracts.plan import Plan

    require(value, Plan, PlanError, what,
            "load one with Plan.load('plan.json'), or make one with "
            "afx.plan(costs, cluster, batch_size)")
    return value


def check_path(value: Any, error: type[AsteroidError], what: str) -> Path:
    """``value`` as a ``Path`` where it is a string or path, else ``error`` (``None`` failed
    inside pathlib with "expected str, bytes or os.PathLike object")."""
    require(value, (str, os.PathLike), error, what, "give a path")
    return Path(value)
