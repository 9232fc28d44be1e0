"""The front end's re-planner: what recovery hands to the planner, the cost models and the
partitioner (``runtime.replanning.Replanner``, implemented on ``solver`` and ``asteroid_fx``).

``asteroid-fx run`` and ``afx.run`` hand a :class:`Replanner` to the runtime; it is also
importable by name as ``"asteroid_fx.replanning:Replanner"`` (see [Note: re-planner plugin
point] in ``runtime.replanning``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from contracts.cluster import Cluster
from contracts.inputs import model_inputs
from contracts.plan import Plan
from contracts.table import CostTable
from runtime.replanning import Calibration, Replanned
from runtime.stage_io import load_model_module, load_partition_meta
from solver.anytime import check_time_limit
from solver.calibrate import MIN_STEPS, calibrate_costs
from solver.replan import REPLAN_TIME_LIMIT_S

log = logging.getLogger(__name__)

__all__ = ["Replanner"]


@dataclass
class _Model:
    """The model of a partition directory, loaded once: its module, example inputs (batch
    2, seed 0) and MODEL_SPEC."""

    module: Any
    inputs: Any
    spec: str


class Replanner:
    """Re-plans with ``solver`` (``replan``, ``api.plan``, ``replicas``, ``calibrate``) and
    re-partitions with ``asteroid_fx.partition`` / ``asteroid_fx.package``; it loads the
    model file of a partition directory once and keeps it for later generations."""

    min_calibration_steps: int = MIN_STEPS

    def __init__(self, full_time_limit: float | None = REPLAN_TIME_LIMIT_S) -> None:
        """``full_time_limit``: seconds the full re-plan (replay's check of the layer-wise
        repair, and restart's plan) may search while the survivors wait; None: exact
        (``solver.replan.REPLAN_TIME_LIMIT_S``)."""
        check_time_limit(full_time_limit)
        self.full_time_limit = full_time_limit
        self._models: dict[str, _Model] = {}

    def _model(self, directory: str) -> _Model:
        key = str(Path(directory).resolve())
        if key not in self._models:
            path = Path(directory)
            module = load_model_module(path)
            meta = load_partition_meta(path)
            spec = str(path / "model.py") + (f":{meta.prefix}" if meta.prefix else "")
            torch.manual_seed(0)
            inputs, _ = module.sample_batch(2)
            if not isinstance(inputs, Mapping):  # keyword inputs stay a mapping: traced by name
                inputs = model_inputs(inputs)
            self._models[key] = _Model(module=module, inputs=inputs, spec=spec)
        return self._models[key]

    def costs(self, directory: str) -> CostTable:
        """``DIR/costs.json`` when the partition has one, else analytic costs of its model."""
        costs_file = Path(directory) / "costs.json"
        if costs_file.is_file():
            return CostTable.load(costs_file)
        from asteroid_fx.costs import analytic_costs

        model = self._model(directory)
        return analytic_costs(model.module.build_model(), model.inputs)

    def replicas(self, plan: Plan, costs: CostTable, cluster: Cluster,
                 every_k_steps: int | None) -> tuple[dict[str, tuple[str, ...]], int]:
        """The plan's own holders when it has them, else ``solver.replicas.plan_replication``;
        ``every_k_steps=None`` chooses K from the idle time."""
        from solver.replicas import auto_replicate_every, plan_replication

        cluster = cluster.subset(list(plan.devices))
        if plan.replicas:
            replicas = {d: tuple(h) for d, h in plan.replicas.items()}
            k = (every_k_steps if every_k_steps is not None
                 else auto_replicate_every(plan, costs, cluster, replicas))
            return replicas, k
        return plan_replication(plan, costs, cluster, every_k_steps=every_k_steps)

    def calibrate(self, plan: Plan, costs: CostTable, cluster: Cluster,
                  compute: Mapping[str, tuple[float, float]], round_s: float) -> Calibration:
        """``solver.calibrate.calibrate_costs`` (what ``asteroid-fx calibrate`` does)."""
        table, found = calibrate_costs(plan, costs, cluster, dict(compute), round_s)
        return Calibration(costs=table, correction=found.to_dict())

    def replan(self, mode: str, plan: Plan, costs: CostTable, cluster: Cluster,
               failed: Sequence[str], tolerance: float) -> Replanned:
        """Replay: ``solver.replan.replan`` (layer-wise repair, or the full re-plan when the
        repair's predicted round is more than ``tolerance`` slower); restart: the full
        planner on the survivors."""
        from solver.api import plan as full_plan
        from solver.replan import replan, survivors_of

        # every device of the plan lost but devices the plan did not use alive (the plan's
        # last device left after a re-plan dropped the others): plan afresh on those; the
        # state comes from the leavers' hand-over, else from the checkpoint
        unused = [d for d in cluster.names if d not in failed]
        fresh_start = set(plan.devices) <= set(failed) and bool(unused)
        if fresh_start:
            log.warning("every device of the plan %s is lost; planning afresh on the "
                        "cluster's other devices %s", list(plan.devices), unused)
        if mode == "replay" and not fresh_start:
            new, info = replan(plan, costs, cluster, list(failed), tolerance=tolerance,
                               time_limit=self.full_time_limit)
            return Replanned(new, {"chosen": info.chosen,
                                   "layerwise_round_s": info.layerwise_round_s,
                                   "full_round_s": info.full_round_s})
        survivors = (cluster.subset(unused) if fresh_start
                     else survivors_of(plan, cluster, failed))
        fresh = full_plan(costs, survivors, plan.batch_size, planner="asteroid",
                          optimizer_state_factor=plan.optimizer_state_factor,
                          time_limit=self.full_time_limit)
        return Replanned(replace(fresh, plan_version=plan.plan_version + 1),
                         {"chosen": "full"})

    def prewarm(self) -> None:
        """Import the planners, calibration, partitioning and packaging now (a first
        import after a failure costs the launcher's re-plan ~0.5 s on a slow host)."""
        import importlib

        for name in ("asteroid_fx.package", "asteroid_fx.partition", "solver.api",
                     "solver.calibrate", "solver.replan"):
            importlib.import_module(name)

    def partition(self, source: str, plan: Plan, out: str, token: str) -> list[list[str]]:
        """Trace the model of ``source`` again, cut it as ``plan`` says and save the
        partition (no ONNX) to ``out``."""
        from asteroid_fx.package import save_partition
        from asteroid_fx.partition import partition

        model = self._model(source)
        stages = partition(model.module.build_model(), model.inputs, plan)
        save_partition(out, plan, stages, model_spec=model.spec, onnx=False, token=token)
        return [list(stage.state_dict()) for stage in stages]
