"""Tests of asteroid_fx.package: the partition directory round-trip."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from partition_cases import EXAMPLES, compose, example_spec, hand_plan

from asteroid_fx.errors import PartitionError
from asteroid_fx.package import load_partition, save_partition, stage_example_args
from asteroid_fx.partition import partition, stage_info
from asteroid_fx.trace import trace
from runtime.stage_io import load_model_module, load_partition_meta


def _skipnet_partition(num_stages_lasts: list[int]) -> tuple[Any, ...]:
    spec = example_spec("skipnet.py")
    model = spec.build_model()
    inputs, _ = spec.example_inputs(2)
    graph = trace(model, inputs)
    plan = hand_plan(graph.num_layers, num_stages_lasts, model_hash=graph.model_hash)
    return spec, model, inputs, plan, partition(model, inputs, plan, graph=graph)


def test_save_load_run_is_identical_without_onnx(tmp_path: Path) -> None:
    spec, model, inputs, plan, stages = _skipnet_partition([1, 4, 7])
    files = save_partition(tmp_path / "out", plan, stages, model_spec=spec.spec, onnx=False,
                           example_inputs=inputs)
    expected = {"plan.json", "partition.json", "model.py",
                *(f"stage_{i}.{ext}" for i in range(4) for ext in ("pt", "py"))}
    assert set(files) == expected
    assert all(p.is_file() for p in files.values())
    plan2, loaded = load_partition(tmp_path / "out")
    assert plan2 == plan
    assert len(loaded) == 4
    assert torch.equal(compose(loaded, inputs), compose(stages, inputs))
    assert torch.equal(compose(loaded, inputs), model(*inputs))
    for original, again in zip(stages, loaded, strict=True):
        assert stage_info(again) == stage_info(original)
        for (n1, p1), (n2, p2) in zip(original.named_parameters(), again.named_parameters(),
                                      strict=True):
            assert n1 == n2 and torch.equal(p1, p2)
    # gradients through the loaded stages equal the unsplit ones
    out = compose(loaded, inputs)
    out.sum().backward()
    model(*inputs).sum().backward()
    for stage in loaded:
        for name, param in stage.named_parameters():
            torch.testing.assert_close(param.grad, model.get_parameter(name).grad,
                                       rtol=1e-6, atol=1e-7)


def test_partition_json_lists_the_stage_boundaries(tmp_path: Path) -> None:
    spec, _, inputs, plan, stages = _skipnet_partition([1, 4])
    save_partition(tmp_path, plan, stages, model_spec=spec.spec, onnx=False)
    data = json.loads((tmp_path / "partition.json").read_text())
    assert data["version"] == 1 and data["num_stages"] == 3
    assert data["model_file"] == "model.py" and data["model_spec"] == spec.spec
    assert data["torch_version"] == torch.__version__
    for i, entry in enumerate(data["stages"]):
        info = stage_info(stages[i])
        assert entry["index"] == i
        assert entry["inputs"] == list(info.inputs)
        assert entry["outputs"] == list(info.outputs)
        assert entry["params"] == list(info.params)
        assert entry["buffers"] == list(info.buffers)
    assert data["stages"][0]["inputs"] == ["x"]
    code = (tmp_path / "stage_1.py").read_text()
    assert "def forward(self, stem_act)" in code and "# Stage 1: layers 2..4" in code
    assert (tmp_path / "model.py").read_text() == (EXAMPLES / "skipnet.py").read_text()
    module = load_model_module(tmp_path)
    assert callable(module.build_model)


def test_save_with_onnx_writes_checked_files(tmp_path: Path) -> None:
    spec = example_spec("mlp.py")
    model = spec.build_model()
    inputs, _ = spec.example_inputs(4)
    graph = trace(model, inputs)
    plan = hand_plan(graph.num_layers, [2])
    stages = partition(model, inputs, plan, graph=graph)
    files = save_partition(tmp_path, plan, stages, model_spec=spec, example_inputs=inputs)
    assert {"stage_0.onnx", "stage_1.onnx"} <= set(files)
    assert load_partition_meta(tmp_path).onnx is True
    from asteroid_fx.onnx_export import run_onnx

    args = stage_example_args(stages, inputs)
    for i, stage in enumerate(stages):
        got = run_onnx(tmp_path / f"stage_{i}.onnx", args[i])
        want = stage(*args[i])
        want = want if isinstance(want, tuple) else (want,)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w.detach(), rtol=0, atol=1e-4)


def test_onnx_needs_example_inputs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, _, _, plan, stages = _skipnet_partition([3])
    with caplog.at_level(logging.INFO, logger="asteroid_fx.package"):
        files = save_partition(tmp_path, plan, stages, onnx=True)
    assert not any(name.endswith(".onnx") for name in files)
    assert "model.py" not in files
    assert "skipping the per-stage ONNX files" in caplog.text
    assert load_partition_meta(tmp_path).model_file is None


def test_stage_example_args_follow_the_pipeline() -> None:
    _, model, inputs, _, stages = _skipnet_partition([1, 4])
    args = stage_example_args(stages, inputs)
    assert args[0] == inputs
    assert [len(a) for a in args] == [len(stage_info(s).inputs) for s in stages]
    assert all(s.training for s in stages)  # modes restored


def test_stage_count_mismatch_is_rejected(tmp_path: Path) -> None:
    _, _, _, plan, stages = _skipnet_partition([1, 4])
    with pytest.raises(PartitionError, match=r"plan has 3 stages but 2 stage modules"):
        save_partition(tmp_path, plan, stages[:2])
    with pytest.raises(PartitionError, match=r"position 0 was made as stage 1"):
        save_partition(tmp_path, hand_plan(plan.stages[-1].last + 1, [1]), stages[1:])


def test_load_rejects_a_plan_with_other_stage_count(tmp_path: Path) -> None:
    _, _, _, plan, stages = _skipnet_partition([1, 4])
    save_partition(tmp_path, plan, stages, onnx=False)
    hand_plan(plan.stages[-1].last + 1, [1]).save(tmp_path / "plan.json")
    with pytest.raises(PartitionError, match=r"partition.json lists 3 stages but plan.json has 2"):
        load_partition(tmp_path)


def test_bad_model_spec_is_rejected(tmp_path: Path) -> None:
    _, _, _, plan, stages = _skipnet_partition([3])
    with pytest.raises(PartitionError, match=r"model spec .*missing\.py.* cannot be loaded"):
        save_partition(tmp_path, plan, stages, model_spec=str(tmp_path / "missing.py"))


def test_report_and_gantt_with_costs_and_cluster(tmp_path: Path) -> None:
    from cost_models.analytic import analytic_costs
    from solver.cluster import Cluster

    spec, model, inputs, plan, stages = _skipnet_partition([1, 4])
    graph = trace(model, inputs)
    costs = analytic_costs(model, inputs, graph=graph, host_flops=1e10, host_mem_bw=1e10,
                           norm_efficiency=0.5)
    cluster = Cluster.from_yaml(EXAMPLES / "clusters" / "local3.yaml")
    names = ("fast", "slow0", "slow1")
    plan = replace(plan, stages=tuple(replace(s, devices=(d,))
                                      for s, d in zip(plan.stages, names, strict=True)))
    files = save_partition(tmp_path, plan, stages, onnx=False, costs=costs, cluster=cluster)
    assert "report.md" in files and "gantt.png" in files
    assert "## Stages" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "gantt.png").read_bytes()[:4] == b"\x89PNG"
    # without costs and cluster nothing is attempted
    files = save_partition(tmp_path / "b", plan, stages, onnx=False)
    assert "report.md" not in files and "gantt.png" not in files


def test_missing_report_modules_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    from cost_models.analytic import analytic_costs
    from solver.cluster import Cluster

    _, model, inputs, plan, stages = _skipnet_partition([3])
    costs = analytic_costs(model, inputs, host_flops=1e10)
    cluster = Cluster.from_yaml(EXAMPLES / "clusters" / "local3.yaml")
    monkeypatch.setitem(sys.modules, "solver.report", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "solver.gantt", None)
    with caplog.at_level(logging.INFO, logger="asteroid_fx.package"):
        files = save_partition(tmp_path, plan, stages, onnx=False, costs=costs,
                               cluster=cluster)
    assert "report.md" not in files and "gantt.png" not in files
    assert "costs.json" in files and "cluster.yaml" in files
    assert Cluster.from_yaml(tmp_path / "cluster.yaml") == cluster
    assert "solver.report is not available" in caplog.text
    assert "solver.gantt is not available" in caplog.text
