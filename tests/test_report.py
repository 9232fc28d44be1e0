"""Tests of the plan report (asteroid_fx/report.py) and the Gantt chart (asteroid_fx/gantt.py)."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from asteroid_fx.gantt import COLOURS, gantt_png
from asteroid_fx.report import format_bytes, format_seconds, plan_report, plan_report_markdown
from contracts.plan import Plan, PlannerInfo, Stage
from solver.evaluate import evaluate
from solver.simulate import simulate
from tests.solver_cases import MIB, make_cluster, uniform_costs


def _setup() -> tuple[Plan, object, object]:
    costs = uniform_costs(4, param_bytes=MIB, cut_bytes=10_000)
    cluster = make_cluster([2.0, 1.0, 1.0], memory_mib=[1024.0, 512.0, 1.0])
    plan = Plan(model_hash=costs.model_hash, cluster_hash=cluster.cluster_hash, batch_size=8,
                micro_batch_size=4, num_micro_batches=2,
                stages=(Stage((0, 2), ("d0",), (4,)), Stage((3, 3), ("d1", "d2"), (2, 2))),
                planner=PlannerInfo("asteroid", "1", 0.0123), num_layers=4,
                model_name="uniform4")
    return plan, costs, cluster


def test_formatters() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * MIB) == "3.0 MiB"
    assert format_bytes(5 * 2**30) == "5.0 GiB"
    assert format_seconds(0.0123) == "12.3 ms"
    assert format_seconds(2.5) == "2.50 s"


def test_markdown_report_has_stages_memory_and_summary() -> None:
    plan, costs, cluster = _setup()
    text = plan_report_markdown(plan, costs, cluster)  # type: ignore[arg-type]
    pred = evaluate(plan, costs, cluster)  # type: ignore[arg-type]
    assert text.startswith("# Plan for uniform4: 2 stage(s) on 3 of 3 device(s)")
    assert "0..2 (layer0 .. layer2)" in text and "3 (layer3)" in text
    assert "| d1, d2 | 2, 2 |" in text
    assert format_seconds(pred.round_time_s) in text
    assert f"{pred.throughput_samples_s:.2f} samples/s" in text
    assert "asteroid v1, search 12.3 ms" in text
    assert "OOM" in text and "NO: d2" in text  # d2 has 1 MiB
    assert "## Memory per device" in text and "1.0 MiB" in text
    dominant = pred.dominant_stage
    assert f"| {dominant} * |" in text


def test_rich_report_renders() -> None:
    plan, costs, cluster = _setup()
    console = Console(record=True, width=200)
    console.print(plan_report(plan, costs, cluster))  # type: ignore[arg-type]
    out = console.export_text()
    assert "Stages" in out and "Memory per device" in out and "d2" in out
    assert "samples/s" in out


def test_report_uses_stored_prediction() -> None:
    plan, costs, cluster = _setup()
    pred = evaluate(plan, costs, cluster)  # type: ignore[arg-type]
    fake = Plan.from_dict({**plan.to_dict(),
                           "predicted": {**pred.to_dict(), "round_time_s": 123.0}})
    assert "123.00 s" in plan_report_markdown(fake, costs, cluster)  # type: ignore[arg-type]


def test_gantt_png_written(tmp_path: Path) -> None:
    plan, costs, cluster = _setup()
    result = simulate(plan, costs, cluster)  # type: ignore[arg-type]
    out = gantt_png(result, tmp_path / "gantt.png", title="toy")
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5000
    overlap = simulate(plan, costs, cluster, comm="overlap", rounds=2)  # type: ignore[arg-type]
    assert gantt_png(overlap, tmp_path / "g2.png").is_file()
    assert set(COLOURS) == {"F", "B", "SEND", "ALLREDUCE", "UPDATE"}


def test_report_names_the_source_of_every_device_types_times() -> None:
    from dataclasses import replace

    from tests.solver_cases import scaled_column, typed_cluster, with_ops

    costs = with_ops(uniform_costs(4, param_bytes=MIB, cut_bytes=10_000),
                     ["conv", "matmul", "conv", "matmul"])
    costs = replace(costs, columns=(scaled_column(costs, "jetson-nano",
                                                  {"conv": 2.0, "matmul": 0.5}),))
    cluster = typed_cluster(["jetson-nano", "custom", "local", "jetson-nano"],
                            [1.0, 0.5, 1.0, 1.0])
    plan = Plan(model_hash=costs.model_hash, cluster_hash=cluster.cluster_hash, batch_size=4,
                micro_batch_size=4, num_micro_batches=1,
                stages=(Stage((0, 3), ("d0",), (4,)),), num_layers=4)
    text = plan_report_markdown(plan, costs, cluster)
    assert "## Layer times per device type" in text
    for type_name, devices in (("jetson-nano", "d0, d3"), ("custom", "d1"), ("local", "d2")):
        assert f"| {type_name} | {devices} | {costs.timing_source(type_name)} |" in text
    assert "measured on a jetson-nano on jetson-nano-0" in text
    console = Console(record=True, width=200)
    console.print(plan_report(plan, costs, cluster))
    assert "Layer times per device type" in console.export_text()


def test_planner_checks_read_as_words() -> None:
    from asteroid_fx.report import check_words

    text = check_words({"device_order_from": "hetpipe", "replicas": [5, 1], "gap": 0.0012,
                        "ilp_status": "optimal", "dp_time_s": 1.5})
    assert text == ("best device order from the hetpipe baseline; replicas 5, 1; "
                    "DP-ILP gap 0.12%; ILP optimal; dp time 1.50 s")
    assert "{" not in text
    tied = {"weights": ["wte.weight"], "split_round_s": 2.26, "split_fits": True,
            "one_stage_round_s": 1.35, "kept": "one stage"}
    assert check_words({"tied": tied}) == ("tied wte.weight: kept one stage (split 2.26 s; "
                                           "one stage 1.35 s)")
    none = {**tied, "split_fits": False, "one_stage_round_s": None, "kept": "split"}
    assert check_words({"tied": none}) == ("tied wte.weight: kept split (split 2.26 s, does not "
                                           "fit; no plan of one stage fits)")


def test_a_gap_the_tied_weights_opened_says_so() -> None:
    from asteroid_fx.report import _bound_text
    from contracts.plan import SearchBound
    from solver.tied_plan import TIED_STOP

    tied = SearchBound("classes", 1.16, 0.166, 64, 65, stopped=TIED_STOP)
    assert _bound_text(tied) == ("within 16.6% of the optimum over every device order, every "
                                 "cut (proven bound 1.16 s; the bound leaves out the tied "
                                 "weights' all-reduce and copies)")
    assert "search stopped: time limit" in _bound_text(replace(tied, stopped="time limit"))


def test_report_fits_an_80_column_terminal_without_cutting_text() -> None:
    plan, costs, cluster = _setup()
    console = Console(width=80, record=True, file=io.StringIO())
    plan = replace(plan, predicted=evaluate(plan, costs, cluster))  # type: ignore[arg-type]
    console.print(plan_report(plan, costs, cluster))  # type: ignore[arg-type]
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
