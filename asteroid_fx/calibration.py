"""``asteroid-fx calibrate``: a partition's cost table corrected by what a run of it measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from contracts.arguments import check_path
from contracts.errors import CostModelError, absent

__all__ = ["calibrate", "read_summary"]


def read_summary(metrics: str | Path, fingerprint: str | None = None) -> dict[str, Any]:
    """The last ``{"event": "summary"}`` line of a run's metrics.jsonl (of the plan with
    ``fingerprint``, when given)."""
    path = Path(metrics)
    if not path.is_file():
        raise CostModelError(f"metrics file {str(path)!r} {absent(path)}; write one with "
                             f"`asteroid-fx run DIR --emulate C --metrics {path}`")
    summaries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CostModelError(f"{path}:{number} is not a JSON line ({exc.msg}); pass the "
                                 f"metrics.jsonl that `asteroid-fx run --metrics` wrote") from None
        if isinstance(record, dict) and record.get("event") == "summary":
            summaries.append(record)
    if not summaries:
        raise CostModelError(f"{path} has no run summary line; it ends every `asteroid-fx "
                             f"run ... --metrics` of this version (a run with --fail/--leave "
                             f"or an older version writes none): run the partition again")
    if fingerprint is not None:
        matching = [s for s in summaries if s.get("plan_hash") == fingerprint]
        if not matching:
            raise CostModelError(
                f"{path} was measured on another plan (plan hash {summaries[-1].get('plan_hash')}"
                f", the partition's is {fingerprint}); calibrate with the partition "
                f"directory that ran")
        summaries = matching
    return summaries[-1]


def _package_file(directory: Path, name: str, fix: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise CostModelError(f"{str(path)!r} is missing; {fix}")
    return path


def calibrate(directory: str | Path, metrics: str | Path) -> tuple[Any, Any]:
    """The cost table of the partition in ``directory`` corrected by the run whose
    ``metrics.jsonl`` is given (``afx.calibrate``; see ``solver.calibrate.calibrate_costs``).

    Returns:
        ``(CostTable, CostCorrection)``; pass the table to ``plan``/``partition --costs``.

    Raises:
        CostModelError: a missing package file or metrics file, or metrics of another plan.
    """
    from contracts.cluster import Cluster
    from contracts.plan import Plan
    from contracts.table import CostTable
    from runtime.launch import plan_fingerprint
    from solver.calibrate import calibrate_costs

    root = check_path(directory, CostModelError, "directory")
    check_path(metrics, CostModelError, "metrics")
    again = "re-create it with `asteroid-fx partition MODEL --cluster C --batch-size N --out DIR`"
    plan = Plan.load(_package_file(root, "plan.json", again))
    costs = CostTable.load(_package_file(root, "costs.json", again))
    cluster = Cluster.from_yaml(_package_file(root, "cluster.yaml", again))
    if costs.model_hash != plan.model_hash:
        raise CostModelError(f"{root}/costs.json is for model hash {costs.model_hash}, the "
                             f"plan for {plan.model_hash}; {again}")
    summary = read_summary(metrics, plan_fingerprint(plan))
    factor = float(summary.get("slowdown_factor") or 1.0)
    devices = summary.get("devices") or {}
    unknown = sorted(set(devices) - set(plan.devices))
    if unknown:
        raise CostModelError(f"{metrics} names devices {unknown} that the plan in {root} does "
                             f"not have; calibrate with the partition directory that ran")
    compute = {name: (float(d["forward_s"]) / factor, float(d["backward_s"]) / factor)
               for name, d in devices.items()}
    round_s = float(summary["round_time_s"]) / factor
    # a plan's prediction of a run is its event simulation (Prediction.expected_round_time_s)
    return calibrate_costs(plan, costs, cluster, compute, round_s, model="simulate")
