"""Tests of asteroid_fx.onnx_export: per-stage ONNX files agree with torch in onnxruntime."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from partition_cases import TwoInOut, even_lasts, example_spec, hand_plan

from asteroid_fx.onnx_export import check_stage_onnx, export_stage_onnx, run_onnx
from asteroid_fx.package import stage_example_args
from asteroid_fx.partition import partition
from asteroid_fx.trace import trace
from contracts.errors import PartitionError


def _stages(spec_name: str, num_stages: int, batch: int = 3) -> tuple[list[Any], list[Any]]:
    spec = example_spec(spec_name)
    model = spec.build_model()
    inputs, _ = spec.example_inputs(batch)
    graph = trace(model, inputs)
    plan = hand_plan(graph.num_layers, even_lasts(graph.num_layers, num_stages))
    stages = partition(model, inputs, plan, graph=graph)
    return stages, stage_example_args(stages, inputs)


@pytest.mark.parametrize(("spec_name", "num_stages"), [("mlp.py", 2), ("skipnet.py", 3)])
def test_stage_onnx_matches_torch(tmp_path: Path, spec_name: str, num_stages: int) -> None:
    stages, args = _stages(spec_name, num_stages)
    for i, stage in enumerate(stages):
        path = tmp_path / f"stage_{i}.onnx"
        export_stage_onnx(stage, args[i], path, stage_index=i)
        assert path.is_file() and path.stat().st_size > 0
        assert stage.training  # train/eval flags restored
        # dynamic batch: a batch of 5 runs too and agrees
        bigger = tuple(torch.cat([a, a, a[:-1]]) for a in args[i])
        stage.eval()
        with torch.no_grad():
            want = stage(*bigger)
        stage.train()
        want = want if isinstance(want, tuple) else (want,)
        got = run_onnx(path, bigger)
        assert [tuple(g.shape) for g in got] == [tuple(w.shape) for w in want]
        for g, w in zip(got, want, strict=True):
            assert float((g - w).abs().max()) <= 1e-4


def test_multi_input_dict_output_stage(tmp_path: Path) -> None:
    model = TwoInOut()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    graph = trace(model, (x, y))
    stages = partition(model, (x, y), hand_plan(graph.num_layers, [2]), graph=graph)
    args = stage_example_args(stages, (x, y))
    for i, stage in enumerate(stages):  # BatchNorm exported in eval mode
        export_stage_onnx(stage, args[i], tmp_path / f"s{i}.onnx", stage_index=i)
    assert len(run_onnx(tmp_path / "s1.onnx", args[1])) == 3  # out, aux[0], aux[1]


def test_disagreement_reports_the_largest_difference(tmp_path: Path) -> None:
    stages, args = _stages("mlp.py", 2)
    path = tmp_path / "s1.onnx"
    export_stage_onnx(stages[1], args[1], path, stage_index=1)
    with torch.no_grad():
        stages[1].get_parameter("fc4.bias").add_(0.5)
    with pytest.raises(PartitionError, match=r"stage 4: ONNX output 0 differs from torch by "
                                             r"0\.5 \(tolerance 0\.0001 x 1, its largest "
                                             r"magnitude, batch 3\)"):
        check_stage_onnx(stages[1], args[1], path, stage_index=4)


def test_the_tolerance_grows_with_the_outputs_magnitude(tmp_path: Path) -> None:
    stages, args = _stages("mlp.py", 2)
    path = tmp_path / "s1.onnx"
    with torch.no_grad():
        stages[1].get_parameter("fc4.bias").add_(1000.0)
    export_stage_onnx(stages[1], args[1], path, stage_index=1)
    with torch.no_grad():
        stages[1].get_parameter("fc4.bias").add_(0.05)   # 5e-5 of the outputs
    assert 4e-5 < check_stage_onnx(stages[1], args[1], path) < 6e-5
    with torch.no_grad():
        stages[1].get_parameter("fc4.bias").add_(0.5)
    with pytest.raises(PartitionError, match=r"by 0\.55 \(tolerance 0\.0001 x 1e\+03"):
        check_stage_onnx(stages[1], args[1], path)


def test_dynamo_failure_falls_back_or_names_the_stage(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    stages, args = _stages("mlp.py", 2)
    real_export = torch.onnx.export

    def no_dynamo(*a: Any, **kw: Any) -> Any:
        if kw.get("dynamo", True):
            raise RuntimeError("unsupported operator aten::frobnicate\nmore text")
        return real_export(*a, **kw)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    with pytest.raises(PartitionError, match=r"stage 1: ONNX export \(dynamo\) failed: "
                                             r"RuntimeError: unsupported operator"):
        export_stage_onnx(stages[1], args[1], tmp_path / "a.onnx", stage_index=1,
                          fallback=False)
    with caplog.at_level(logging.WARNING, logger="asteroid_fx.onnx_export"):
        try:
            export_stage_onnx(stages[1], args[1], tmp_path / "b.onnx", stage_index=1)
        except PartitionError as exc:  # the TorchScript exporter may be unavailable
            assert "TorchScript exporter" in str(exc) and "stage 1" in str(exc)
        else:
            assert (tmp_path / "b.onnx").is_file()
    assert "stage 1: dynamo ONNX export failed" in caplog.text


def test_non_tensor_arguments_are_rejected(tmp_path: Path) -> None:
    stages, _ = _stages("mlp.py", 2)
    with pytest.raises(PartitionError, match=r"stage 0: ONNX export needs tensor arguments"):
        export_stage_onnx(stages[0], (3,), tmp_path / "x.onnx")  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize(("spec_name", "num_stages"),
                         [("resnet.py:cifar", 2), ("mobilenet_v2.py", 2),
                          ("efficientnet.py", 2), ("bert_small.py", 2)])
def test_heavy_examples_export(tmp_path: Path, spec_name: str, num_stages: int) -> None:
    stages, args = _stages(spec_name, num_stages, batch=2)
    for i, stage in enumerate(stages):
        export_stage_onnx(stage, args[i], tmp_path / f"s{i}.onnx", stage_index=i)
