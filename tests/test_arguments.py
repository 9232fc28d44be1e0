"""Tests of ``contracts.arguments``: the public API refuses objects of the wrong kind with the
fix, before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import asteroid_fx as afx
from contracts.arguments import (
    check_cluster,
    check_costs,
    check_path,
    check_plan,
    is_int,
    is_number,
)
from contracts.errors import (
    ClusterError,
    CostModelError,
    PartitionError,
    PlanError,
    RuntimeFailure,
    TraceError,
)
from tests.solver_cases import make_cluster, uniform_costs

ROOT = Path(__file__).resolve().parents[1]
COSTS = uniform_costs(4)
CLUSTER = make_cluster([1.0, 0.5])


def test_each_check_names_the_kind_the_value_and_the_fix() -> None:
    with pytest.raises(ClusterError, match=r"cluster must be a Cluster, got str 'home\.yaml'; "
                                           r"load one with Cluster\.from_yaml"):
        check_cluster("home.yaml")
    with pytest.raises(CostModelError, match=r"costs must be a CostTable, got dict \{\}; "
                                             r"load one with CostTable\.load"):
        check_costs({})
    with pytest.raises(PlanError, match=r"plan must be a Plan, got NoneType None; load one "
                                        r"with Plan\.load"):
        check_plan(None)
    with pytest.raises(RuntimeFailure, match="directory must be a str or PathLike, got "
                                             "NoneType"):
        check_path(None, RuntimeFailure, "directory")
    long = check_cluster.__name__ * 20
    with pytest.raises(ClusterError, match=r"got str '.{56}\.\.\.;"):
        check_cluster(long)
    assert check_cluster(CLUSTER) is CLUSTER and check_path("x", PlanError, "p") == Path("x")


@pytest.fixture(scope="module")
def plan() -> Any:
    return afx.plan(COSTS, CLUSTER, 4)


@pytest.mark.parametrize(("call", "error", "match"), [
    # a path or a dict where an object is due failed with AttributeError deep inside
    (lambda p: afx.plan(COSTS, str(ROOT / "examples/clusters/local3.yaml"), 4), ClusterError,
     "cluster must be a Cluster, got str"),
    (lambda p: afx.plan("costs.json", CLUSTER, 4), CostModelError, "costs must be a CostTable"),
    (lambda p: afx.plan(CLUSTER, COSTS, 4), ClusterError, "got CostTable"),    # swapped
    (lambda p: afx.evaluate(p.to_dict(), COSTS, CLUSTER), PlanError, "plan must be a Plan"),
    (lambda p: afx.simulate(p, COSTS, CLUSTER.to_dict()), ClusterError, "got dict"),
    (lambda p: afx.merge_costs(COSTS), CostModelError, "takes a list of cost tables"),
    (lambda p: afx.merge_costs(["a.json"]), CostModelError, "table 0 of merge_costs must be"),
    (lambda p: afx.load_partition(None), PartitionError, "directory must be a str"),
    (lambda p: afx.run(None), RuntimeFailure, "directory must be a str"),
    # numbers and lists of the wrong kind
    (lambda p: afx.plan(COSTS, CLUSTER, 4, optimizer_state_factor=float("nan")), PlanError,
     r"optimizer_state_factor must be a finite number >= 0 \(0 SGD"),
    (lambda p: afx.plan(COSTS, CLUSTER, 4, optimizer_state_factor=-1), PlanError,
     "optimizer_state_factor must be"),
    (lambda p: afx.plan(COSTS, CLUSTER, 4, micro_batch_sizes=2), PlanError,
     "micro_batch_sizes must be a list of integers .* for one size use micro_batch_size="),
    (lambda p: afx.plan(COSTS, CLUSTER, 4, micro_batch_sizes=[True]), PlanError,
     "micro_batch_sizes must be a non-empty list of integers"),
    (lambda p: afx.plan(COSTS, CLUSTER, 4, planner=["asteroid"]), PlanError, "unknown planner"),
    (lambda p: afx.plan(COSTS, CLUSTER, 4, progress=5), PlanError,
     "progress must be a callable"),
    (lambda p: afx.plan(COSTS, CLUSTER, 4, planner="ilp", time_limit_s=None), PlanError,
     "time_limit_s .* got None"),
])
def test_the_api_refuses_the_wrong_kind_of_argument(plan: Any, call: Any, error: type,
                                                    match: str) -> None:
    with pytest.raises(error, match=match):
        call(plan)


def test_tracing_refuses_what_is_not_a_module_and_takes_one_leaf_name() -> None:
    import torch

    from asteroid_fx.trace import leaf_tuple

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    x = torch.randn(2, 4)
    with pytest.raises(TraceError, match=r"model must be a Module, got type .*; pass the "
                                         r"module itself, e.g\. build_model\(\) or "
                                         r"Sequential\(\)"):
        afx.trace(torch.nn.Sequential, (x,))
    with pytest.raises(TraceError, match="model_name must be a str"):
        afx.trace(model, (x,), model_name=5)  # type: ignore[arg-type]
    # one class name is one entry, not its letters ("leaf_modules names 'L'"); None is none
    assert leaf_tuple("Linear") == ("Linear",) and leaf_tuple(None) == ()
    assert leaf_tuple(torch.nn.Linear) == (torch.nn.Linear,)
    with pytest.raises(TraceError, match="leaf_modules must be a list"):
        leaf_tuple(5)
    whole = afx.trace(model, (x,), leaf_modules="Linear")
    assert whole.num_layers == afx.trace(model, (x,), leaf_modules=None).num_layers == 3


def test_a_model_that_returns_no_tensor_is_refused_at_trace() -> None:
    """A ``forward`` that returned None was traced, planned and partitioned, and failed only
    in the loss of a run."""
    import torch

    from contracts.errors import ModelOutputError

    class Nothing(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> None:
            self.fc(x)

    with pytest.raises(ModelOutputError, match=r"output holds no tensor \(forward returned "
                                               r"None\)"):
        afx.trace(Nothing(), (torch.randn(2, 4),))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"steps": "2"}, "steps must be an integer >= 1, got '2'"),
    ({"steps": 1.5}, "steps must be an integer >= 1"),
    ({"seed": "x"}, "seed must be an integer >= 0, got 'x'"),
    ({"num_samples": -1}, "num_samples must be an integer >= 0, got -1"),
    ({"lr": float("nan")}, "--lr must be a learning rate >= 0"),
    ({"progress": 5}, "progress must be a callable"),
    ({"token": 1234}, "token must be a string"),
])
def test_run_arguments_are_checked_before_any_process_starts(kwargs: dict[str, Any],
                                                             match: str) -> None:
    from runtime.launch import check_run_arguments

    args: dict[str, Any] = {"steps": 1, "seed": 0, "lr": 0.01, "progress": None,
                            "token": None, "num_samples": 0, **kwargs}
    with pytest.raises(RuntimeFailure, match=match):
        check_run_arguments(**args)


def test_an_emulated_cluster_given_as_a_dict_is_a_cluster_error() -> None:
    from runtime.emulator import emulated_cluster

    with pytest.raises(ClusterError, match="emulate must be a Cluster, got dict"):
        emulated_cluster(CLUSTER.to_dict())
    assert emulated_cluster(CLUSTER) is CLUSTER
    assert emulated_cluster(ROOT / "examples" / "clusters" / "local3.yaml").names == (
        "fast", "slow0", "slow1")


def test_a_graph_or_a_host_figure_of_the_wrong_kind_is_refused() -> None:
    """``graph="g"`` was AttributeError: 'str' object has no attribute 'graph_module', and
    ``host_flops="1e9"`` a TypeError."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    x = torch.randn(2, 4)
    with pytest.raises(TraceError, match="graph must be a LayerGraph, got str 'g'"):
        afx.analytic_costs(model, (x,), graph="g")  # type: ignore[arg-type]
    with pytest.raises(TraceError, match="graph must be a LayerGraph"):
        afx.partition(model, (x,), afx.plan(afx.analytic_costs(model, (x,)),
                                            make_cluster([1.0]), 2), graph="g")
    with pytest.raises(CostModelError, match="host_flops must be a finite number > 0, got "
                                             "'1e9'"):
        afx.analytic_costs(model, (x,), host_flops="1e9")  # type: ignore[arg-type]


def test_small_helpers_refuse_arguments_of_the_wrong_kind() -> None:
    """Each was a raw TypeError ('<=' not supported between int and str, NoneType is not
    iterable)."""
    import torch

    from asteroid_fx.model_spec import load_model_spec
    from contracts.errors import ModelSpecError

    with pytest.raises(PartitionError, match="stage_index and num_stages must be integers, "
                                             "got '0' and 3"):
        afx.to_pipeline_stage(torch.nn.Linear(2, 2), "0", 3, "cpu")  # type: ignore[arg-type]
    with pytest.raises(PartitionError, match="tied_parameters takes the list of stages"):
        afx.tied_parameters(None)  # type: ignore[arg-type]
    spec = load_model_spec(str(ROOT / "examples" / "mlp.py"))
    with pytest.raises(ModelSpecError, match="batch_size must be an integer >= 1, got '4'"):
        spec.example_inputs("4")  # type: ignore[arg-type]


def test_is_int_takes_ints_not_bools_nor_floats() -> None:
    assert is_int(0) and is_int(-3) and is_int(2 ** 70)
    assert not any(is_int(v) for v in (True, False, 1.0, "1", None, [1]))


def test_is_number_takes_ints_and_floats_not_bools() -> None:
    assert is_number(0) and is_number(-3) and is_number(2.5) and is_number(float("nan"))
    assert not any(is_number(v) for v in (True, False, "1", None, [1.0]))


def test_a_learning_rate_of_true_is_refused() -> None:
    # (True passed as 1.0 where the check read isinstance(lr, (int, float)))
    from runtime.train import check_lr

    check_lr(0.01)
    for bad in (True, -0.1, float("inf"), float("nan"), "0.1"):
        with pytest.raises(RuntimeFailure, match="--lr must be a learning rate >= 0"):
            check_lr(bad)
