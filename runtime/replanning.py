"""The re-planner interface: what recovery asks of a planner, as plain data in and out.

The runtime interprets plans; it never plans and never traces. When a device fails or
leaves, recovery (``runtime.recovery``, in the launcher process) asks the
:class:`Replanner` it was handed for the cost table, the replica placement, a calibrated
cost table, the survivors' new ``Plan`` and the next generation's partition directory.
The front end implements it (``asteroid_fx.replanning.Replanner``, on the planner in
``solver`` and the partitioner in ``asteroid_fx``) and hands it to the runtime: ``asteroid-fx
run`` and ``afx.run`` do so.

[Note: re-planner plugin point]
``replanner=`` of ``runtime.launch.run`` and ``runtime.recovery.run_with_recovery`` takes
a ``Replanner`` object or its importable dotted name ``"package.module:attr"``, resolved
with importlib when recovery starts (:func:`load_replanner`); ``attr`` is a ``Replanner``
or a callable without arguments that returns one (a class). The name is plain data, so a
launcher configured by file or another process can name a re-planner, and the runtime has
no static import of any planner: ``"asteroid_fx.replanning:Replanner"`` is the front end's
(:data:`DEFAULT_REPLANNER`). Worker processes never re-plan; only the launcher calls the
re-planner. Without one (a device-only install: runtime, torch and the partition
directory) every recovery mode fails at the start with ``ReplannerUnavailable``, which
names what to install; training without ``--fail``/``--leave`` needs no re-planner.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Protocol, Sequence, Tuple, runtime_checkable

from contracts.cluster import Cluster
from contracts.errors import AsteroidError, ReplannerUnavailable
from contracts.plan import Plan
from contracts.table import CostTable

__all__ = ["Replanner", "Calibration", "Replanned", "load_replanner", "DEFAULT_REPLANNER",
           "INSTALL_HINT"]

#: the front end's re-planner, by name (what ``asteroid-fx run`` hands the runtime)
DEFAULT_REPLANNER = "asteroid_fx.replanning:Replanner"
#: what a device-only install lacks to recover
INSTALL_HINT = ("install the workstation package (`pip install asteroid-fx` on Python >= "
                "3.10: planner, cost models and partitioner) and run through `asteroid-fx "
                "run` or `afx.run`, or pass replanner='package.module:attr' naming a "
                "re-planner (see [Note: re-planner plugin point] in runtime.replanning)")

#: replica holders per device: ``{device: (holders...)}``
Replicas = Dict[str, Tuple[str, ...]]


@dataclass(frozen=True)
class Calibration:
    """A cost table corrected by what a generation measured, and what was corrected
    (JSON-ready; recorded as the recovery event's ``calibration``)."""

    costs: CostTable
    correction: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Replanned:
    """The survivors' plan and the choice behind it (recorded in the recovery event:
    ``chosen`` and, for a layer-wise repair, the predicted rounds compared)."""

    plan: Plan
    choice: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Replanner(Protocol):
    """What recovery asks of a planner. Every argument and result is plain data
    (``contracts``), paths are strings; failures raise ``AsteroidError`` subclasses
    (``PlanError`` when no plan fits)."""

    @property
    def min_calibration_steps(self) -> int:
        """Measured rounds :meth:`calibrate` needs; with fewer recovery plans on the
        uncalibrated table."""
        ...

    def costs(self, directory: str) -> CostTable:
        """The cost table to (re-)plan the partition in ``directory`` with."""
        ...

    def replicas(self, plan: Plan, costs: CostTable, cluster: Cluster,
                 every_k_steps: int | None) -> tuple[Replicas, int]:
        """Replica holders of ``plan``'s devices and the replication period K (chosen from
        the predicted idle time when ``every_k_steps`` is None)."""
        ...

    def calibrate(self, plan: Plan, costs: CostTable, cluster: Cluster,
                  compute: Mapping[str, tuple[float, float]], round_s: float) -> Calibration:
        """``costs`` corrected by the measured per-device ``(forward, backward)`` compute
        seconds per micro-batch and the measured round ``round_s`` of ``plan``."""
        ...

    def replan(self, mode: str, plan: Plan, costs: CostTable, cluster: Cluster,
               failed: Sequence[str], tolerance: float) -> Replanned:
        """The plan of ``cluster`` without ``failed``: ``mode="replay"`` a layer-wise repair
        of ``plan`` (or a full re-plan when the repair is more than ``tolerance`` slower),
        ``"restart"`` a full re-plan. Its ``plan_version`` is ``plan``'s plus one."""
        ...

    def partition(self, source: str, plan: Plan, out: str, token: str) -> list[list[str]]:
        """Write the partition of ``plan`` for the model of partition directory ``source``
        to directory ``out`` (stage modules, ``plan.json``, the job's ``token``); the
        state names (parameters and buffers) of every stage, in stage order."""
        ...


def load_replanner(value: Replanner | str | None, *, needed_for: str) -> Replanner:
    """``value`` as a :class:`Replanner`: itself, or the object its dotted name
    ``"package.module:attr"`` names (a class or other factory is called without arguments).

    Raises:
        ReplannerUnavailable: ``value`` is None, names a module that cannot be imported
            (e.g. the planner of a device-only install) or no re-planner; the one-line
            message says ``needed_for`` what and what to install.
    """
    if value is None:
        raise ReplannerUnavailable(f"{needed_for} needs a re-planner and none was given; "
                                   f"{INSTALL_HINT}")
    if not isinstance(value, str):
        return _checked(value, repr(value), needed_for)
    module_name, sep, attr = value.partition(":")
    if not sep or not module_name or not attr:
        raise ReplannerUnavailable(f"{needed_for}: re-planner {value!r} is not a dotted name "
                                   f"'package.module:attr' (e.g. {DEFAULT_REPLANNER!r})")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ReplannerUnavailable(f"{needed_for} needs the re-planner {value!r}, whose module "
                                   f"cannot be imported ({exc}); {INSTALL_HINT}") from exc
    found: Any = module
    for part in attr.split("."):
        if not hasattr(found, part):
            raise ReplannerUnavailable(f"{needed_for}: module {module_name!r} has no "
                                       f"{attr!r} (re-planner {value!r})")
        found = getattr(found, part)
    if isinstance(found, type) or (callable(found) and not isinstance(found, Replanner)):
        try:
            found = found()
        except AsteroidError as exc:
            raise ReplannerUnavailable(f"{needed_for}: making the re-planner {value!r} "
                                       f"failed: {exc}") from exc
    return _checked(found, value, needed_for)


def _checked(found: Any, name: str, needed_for: str) -> Replanner:
    if not isinstance(found, Replanner):
        missing = [m for m in ("min_calibration_steps", "costs", "replicas", "calibrate",
                               "replan", "partition") if not hasattr(found, m)]
        raise ReplannerUnavailable(f"{needed_for}: {name} is not a re-planner (it lacks "
                                   f"{', '.join(missing)}; see runtime.replanning.Replanner)")
    return found

