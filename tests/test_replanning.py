"""Tests of the re-planner interface (runtime/replanning.py) and the front end's re-planner
(asteroid_fx/replanning.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from asteroid_fx.model_spec import import_model_file
from asteroid_fx.replanning import Replanner as FrontEndReplanner
from contracts.errors import ReplannerUnavailable, RuntimeFailure
from contracts.plan import Plan, Stage
from runtime.replanning import DEFAULT_REPLANNER, Calibration, Replanned, Replanner, load_replanner

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CLUSTER = EXAMPLES / "clusters" / "local3.yaml"
THREE = (Stage((0, 1), ("fast",), (6,)), Stage((2, 3), ("slow0",), (6,)),
         Stage((4, 6), ("slow1",), (6,)))


@pytest.fixture(scope="module")
def partition_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/mlp.py in three stages on local3 (batch 12, two micro-batches of 6)."""
    from asteroid_fx.costs import analytic_costs
    from asteroid_fx.package import save_partition
    from asteroid_fx.partition import partition
    from contracts.cluster import Cluster

    out = tmp_path_factory.mktemp("replanning") / "part"
    module = import_model_file(EXAMPLES / "mlp.py")
    torch.manual_seed(0)
    inputs, _ = module.sample_batch(2)
    costs = analytic_costs(module.build_model(), inputs)
    cluster = Cluster.from_yaml(CLUSTER)
    plan = Plan(costs.model_hash, cluster.cluster_hash, 12, 6, 2, THREE, num_layers=7,
                model_name="MLP")
    save_partition(out, plan, partition(module.build_model(), inputs, plan),
                   model_spec=str(EXAMPLES / "mlp.py"), onnx=False)
    return out


def test_the_front_end_re_planner_is_one_by_protocol_and_by_name() -> None:
    assert isinstance(FrontEndReplanner(), Replanner)
    assert isinstance(load_replanner(DEFAULT_REPLANNER, needed_for="x"), FrontEndReplanner)
    mine = FrontEndReplanner()
    assert load_replanner(mine, needed_for="x") is mine


def test_no_re_planner_is_one_typed_line_naming_what_to_install() -> None:
    with pytest.raises(ReplannerUnavailable, match="pip install asteroid-fx") as info:
        load_replanner(None, needed_for="--recovery replay")
    assert isinstance(info.value, RuntimeFailure) and "\n" not in str(info.value)
    assert str(info.value).startswith("--recovery replay needs a re-planner")
    with pytest.raises(ReplannerUnavailable, match="'no_such_planner_pkg:R'.*cannot be "
                                                   "imported.*pip install asteroid-fx"):
        load_replanner("no_such_planner_pkg:R", needed_for="--recovery replay")
    with pytest.raises(ReplannerUnavailable, match="not a dotted name"):
        load_replanner("asteroid_fx.replanning", needed_for="--recovery replay")
    with pytest.raises(ReplannerUnavailable, match="has no 'Nope'"):
        load_replanner("asteroid_fx.replanning:Nope", needed_for="--recovery replay")
    with pytest.raises(ReplannerUnavailable, match="is not a re-planner.*lacks"):
        load_replanner("os:sep", needed_for="--recovery replay")


def test_the_front_end_re_planner_gives_the_full_re_plan_its_time_limit(
        partition_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import solver.api
    from contracts.cluster import Cluster
    from contracts.errors import PlanError
    from runtime.stage_io import load_plan
    from solver.replan import REPLAN_TIME_LIMIT_S

    seen: list[Any] = []
    plan_within = solver.api.plan

    def recorded(*args: Any, **kwargs: Any) -> Plan:
        seen.append(kwargs.get("time_limit"))
        return plan_within(*args, **kwargs)

    monkeypatch.setattr(solver.api, "plan", recorded)
    plan = load_plan(partition_dir)
    cluster = Cluster.from_yaml(CLUSTER)
    for planner, limit in ((FrontEndReplanner(), REPLAN_TIME_LIMIT_S),
                           (FrontEndReplanner(full_time_limit=3.0), 3.0),
                           (FrontEndReplanner(full_time_limit=None), None)):
        costs = planner.costs(str(partition_dir))
        seen.clear()
        planner.replan("replay", plan, costs, cluster, ["slow0"], 0.1)
        planner.replan("restart", plan, costs, cluster, ["slow0"], 0.1)
        assert seen == [limit, limit]
    with pytest.raises(PlanError, match="time limit must be a number of seconds > 0, got 0"):
        FrontEndReplanner(full_time_limit=0)


@pytest.mark.parametrize("mode", ["replay", "restart"])
def test_recovery_without_a_re_planner_stops_before_training(partition_dir: Path,
                                                             mode: str) -> None:
    from runtime.launch import run

    with pytest.raises(ReplannerUnavailable, match=f"--recovery {mode} needs a re-planner"):
        run(partition_dir, emulate=CLUSTER, steps=3, fail="slow0@1", recovery=mode)
    assert not (partition_dir / "recovery").exists()   # nothing started


def test_the_front_end_re_planner_answers_in_plain_data(partition_dir: Path,
                                                        tmp_path: Path) -> None:
    from contracts.cluster import Cluster
    from runtime.stage_io import load_plan

    planner = FrontEndReplanner()
    plan = load_plan(partition_dir)
    cluster = Cluster.from_yaml(CLUSTER)
    costs = planner.costs(str(partition_dir))
    assert costs.num_layers == plan.num_layers
    replicas, k = planner.replicas(plan, costs, cluster, 2)
    assert k == 2 and set(replicas) <= set(plan.devices)
    found = planner.replan("replay", plan, costs, cluster, ["slow0"], 10.0)
    assert isinstance(found, Replanned) and found.choice["chosen"] in ("layerwise", "full")
    assert "slow0" not in found.plan.devices
    assert found.plan.plan_version == plan.plan_version + 1
    full = planner.replan("restart", plan, costs, cluster, ["slow0"], 0.1)
    assert full.choice == {"chosen": "full"} and "slow0" not in full.plan.devices
    names = planner.partition(str(partition_dir), found.plan, str(tmp_path / "gen1"), "t" * 32)
    assert len(names) == found.plan.num_stages and all(names)
    assert load_plan(tmp_path / "gen1") == found.plan
    compute = {d: (1e-3, 2e-3) for d in plan.devices}
    calibrated = planner.calibrate(plan, costs, cluster, compute, 0.05)
    assert isinstance(calibrated, Calibration) and "ratios" in calibrated.correction
