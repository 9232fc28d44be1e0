"""Tests of contracts.plan: validation and exact JSON round-trip."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from contracts.errors import PlanError
from contracts.plan import Plan, PlannerInfo, Prediction, Stage, StagePrediction


def _plan(**overrides: object) -> Plan:
    fields: dict[str, object] = dict(
        model_hash="m", cluster_hash="c", batch_size=8, micro_batch_size=4, num_micro_batches=2,
        stages=(Stage((0, 2), ("a",), (4,)), Stage((3, 5), ("b", "c"), (3, 1))), num_layers=6,
    )
    fields.update(overrides)
    return Plan(**fields)  # type: ignore[arg-type]


def test_round_trip_exact(tmp_path: Path) -> None:
    pred = Prediction(
        round_time_s=0.1 + 0.2, throughput_samples_s=8 / 0.3,
        peak_memory_bytes={"a": 10, "b": 20, "c": 30},
        memory_capacity_bytes={"a": 100, "b": 100, "c": 100},
        stages=(StagePrediction(0.1, 0.2, 0.0, 0.5, 0.0),
                StagePrediction(1 / 3, 2 / 3, 0.1, 0.4, 1e-9, comm_f=1e-3)),
        dominant_stage=1,
    )
    plan = _plan(predicted=pred, replicas={"a": ("b",), "b": ("a",), "c": ("a",)},
                 planner=PlannerInfo("asteroid", "1", 0.0123, {"ilp_round": 0.3}))
    again = Plan.from_json(plan.to_json())
    assert again == plan
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan
    assert again.predicted is not None and again.predicted.fits
    assert plan.stage_of("c") == 1
    assert plan.stages[1].sample_ranges() == {"b": (0, 3), "c": (3, 4)}
    # without a simulation the run expects the closed form, and the JSON has no such key
    assert pred.expected_round_time_s == pred.round_time_s
    assert "simulated_round_time_s" not in pred.to_dict()
    simulated = replace(pred, simulated_round_time_s=0.1 + 0.25)
    again_pred = Prediction.from_dict(simulated.to_dict())
    assert again_pred == simulated and again_pred.expected_round_time_s == 0.1 + 0.25


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"batch_size": 9}, r"batch_size \(9\) must equal"),
        ({"stages": (Stage((0, 2), ("a",), (4,)), Stage((4, 5), ("b",), (4,)))},
         "starts at layer 4 but stage 0 ends at layer 2, so it must start at 3"),
        ({"stages": (Stage((0, 5), ("a",), (3,)),)}, "add up to 3"),
        ({"stages": (Stage((0, 2), ("a",), (4,)), Stage((3, 5), ("a",), (4,)))},
         "more than one stage"),
        ({"stages": (Stage((0, 4), ("a",), (4,)),)}, "model has 6 layers"),
        ({"stages": ()}, "at least one stage"),
        ({"schedule": "zb"}, "schedule must be"),
    ],
)
def test_invalid_plans(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(PlanError, match=match):
        _plan(**overrides)


def test_invalid_stage() -> None:
    with pytest.raises(PlanError, match="share must be >= 1"):
        Stage((0, 1), ("a", "b"), (4, 0))
    with pytest.raises(PlanError, match="2 devices but 1 shares"):
        Stage((0, 1), ("a", "b"), (4,))
    with pytest.raises(PlanError, match="first <= last"):
        Stage((3, 1), ("a",), (4,))


def test_bad_json(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json("{")
    with pytest.raises(PlanError, match="missing the field 'stages'"):
        Plan.from_json('{"model_hash": "m", "cluster_hash": "c", "batch_size": 1, '
                       '"micro_batch_size": 1, "num_micro_batches": 1}')
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "nope.json")


def test_plans_written_before_the_bound_still_load() -> None:
    from contracts.plan import PlannerInfo, SearchBound

    old = {"name": "asteroid", "version": "1", "search_time_s": 0.5, "check": {}}
    info = PlannerInfo.from_dict(old)
    assert info.bound is None and info.to_dict() == old  # and writes the same JSON back
    bound = SearchBound("classes", 1.0, 0.02, cuts=12, layers=40, stopped="time limit")
    again = PlannerInfo.from_dict(PlannerInfo("asteroid", "2", 1.0, {}, bound).to_dict())
    assert again.bound == bound and not bound.optimal


def test_a_cost_table_given_as_a_plan_is_called_so() -> None:
    # it said "plan version 2 is not supported (expected 1)"
    table = '{"version": 2, "layers": [], "cut_bytes": [], "model_name": "m"}'
    with pytest.raises(PlanError, match="this is a cost table, not a plan"):
        Plan.from_json(table)


@pytest.mark.parametrize(("field", "value"), [
    ("replicas", []), ("replicas", None), ("planner", "asteroid"), ("planner", None),
    ("batch_size", float("inf")),
])
def test_fields_of_the_wrong_type_or_size_are_plan_errors(field: str, value: object) -> None:
    """Each was a raw AttributeError, OverflowError or ValueError from inside from_dict."""
    data = _plan().to_dict()
    data[field] = value
    with pytest.raises(PlanError, match="malformed plan: .*re-create it with `asteroid-fx plan`"):
        Plan.from_dict(data)


def test_plan_text_that_is_not_json_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="plan must be JSON text, got NoneType"):
        Plan.from_json(None)  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="plan is not valid JSON \\(nested too deeply\\)"):
        Plan.from_json("[" * 100_000 + "]" * 100_000)


def test_a_batch_past_what_a_plan_may_have_is_refused_on_load() -> None:
    """A plan.json edited to a batch of 10**8 (digests rewritten) drove a device process to
    11.6 GB and the host's out-of-memory killer."""
    from contracts.plan import MAX_BATCH_SIZE

    data = _plan().to_dict()
    data.update(batch_size=10**8, num_micro_batches=10**8 // 4)
    with pytest.raises(PlanError, match=f"batch_size 100000000 is above {MAX_BATCH_SIZE}, the "
                                        f"largest a plan may have"):
        Plan.from_dict(data)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"layers": (0, 1, 2)}, r"stage layers are \[first, last\] \(two integers\)"),
    ({"layers": (None, 6)}, r"stage layers are \[first, last\]"),
    ({"shares": ("8",)}, "stage shares are whole numbers of samples"),
    ({"devices": (None,)}, "stage devices are non-empty names"),
])
def test_a_stage_of_the_wrong_types_is_a_plan_error(kwargs: dict[str, object],
                                                    match: str) -> None:
    """Each was a raw ValueError or TypeError; a device None read as the name 'None'."""
    fields: dict[str, object] = {"layers": (0, 6), "devices": ("a",), "shares": (8,)}
    fields.update(kwargs)
    with pytest.raises(PlanError, match=match):
        Stage(**fields)  # type: ignore[arg-type]
    data = _plan().to_dict()
    data["stages"][0].update({k: list(v) for k, v in kwargs.items()})   # type: ignore
    with pytest.raises(PlanError):
        Plan.from_dict(data)


def test_stages_that_are_not_stage_objects_are_a_plan_error() -> None:
    with pytest.raises(PlanError, match="a plan's stages are Stage objects, got dict"):
        _plan(stages=({"layers": [0, 5], "devices": ["a"], "shares": [4]},))
