"""asteroid-fx: hybrid pipeline-parallel training across heterogeneous edge devices.

Example::

    import asteroid_fx as afx
    costs = afx.analytic_costs(model, example_inputs)
    cluster = afx.Cluster.from_yaml("examples/clusters/B-1000mbps.yaml")
    plan = afx.plan(costs, cluster, batch_size=32)
    stages = afx.partition(model, example_inputs, plan)
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from contracts.errors import (
    AdapterError,
    AsteroidError,
    AuthenticationError,
    ClusterError,
    CostModelError,
    DatasetError,
    DeadlockError,
    ModelOutputError,
    ModelSpecError,
    OutputError,
    PartitionError,
    PlanError,
    ProtocolError,
    ReplannerUnavailable,
    RuntimeFailure,
    ScheduleError,
    StageFailure,
    TraceError,
)

__version__ = "0.1.0"

# [Note: lazy public API]
# Attributes are imported on first use so that ``import asteroid_fx`` (the device entry
# point ``asteroid_fx.device`` on a bare board, or code that only wants the errors) pulls
# in nothing heavy.
_LAZY: dict[str, str] = {
    "trace": "asteroid_fx.trace",
    "LayerGraph": "asteroid_fx.trace",
    "Layer": "asteroid_fx.trace",
    "load_model_spec": "asteroid_fx.model_spec",
    "ModelSpec": "asteroid_fx.model_spec",
    "profile": "asteroid_fx.costs",
    "analytic_costs": "asteroid_fx.costs",
    "merge_costs": "cost_models.merge",
    "calibrate": "asteroid_fx.calibration",
    "CostTable": "contracts.table",
    "LayerCost": "contracts.table",
    "Cluster": "contracts.cluster",
    "Device": "contracts.cluster",
    "Plan": "contracts.plan",
    "Stage": "contracts.plan",
    "Prediction": "contracts.plan",
    "plan": "solver.api",
    "evaluate": "solver.evaluate",
    "simulate": "solver.simulate",
    "partition": "asteroid_fx.partition",
    "tied_parameters": "asteroid_fx.partition",
    "save_partition": "asteroid_fx.package",
    "load_partition": "asteroid_fx.package",
    "to_pipeline_stage": "asteroid_fx.interop",
    "run": "asteroid_fx.training",
    "parallel_adapters": "asteroid_fx.adapters",
    "AdapterModel": "asteroid_fx.adapters",
    "plan_finetune": "solver.pac",
    "PacPlan": "solver.pac",
    "predict_finetune": "solver.pac",
    "simulate_finetune": "solver.pac_simulate",
}

__all__ = [
    "AdapterError",
    "AsteroidError",
    "AuthenticationError",
    "ClusterError",
    "CostModelError",
    "DatasetError",
    "DeadlockError",
    "ModelOutputError",
    "ModelSpecError",
    "OutputError",
    "PartitionError",
    "PlanError",
    "ProtocolError",
    "ReplannerUnavailable",
    "RuntimeFailure",
    "ScheduleError",
    "StageFailure",
    "TraceError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'asteroid_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value



class _Package(types.ModuleType):
    """The package module; keeps ``afx.trace``/``afx.partition`` the functions.

    [Note: function shadows submodule]
    Importing ``asteroid_fx.trace`` makes Python set the attribute ``trace`` of this package
    to the submodule, which would shadow the public function of the same name. Such
    assignments are ignored (the submodule stays in ``sys.modules``; use
    ``from asteroid_fx.trace import ...`` to reach it).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
