"""Tests of tools/check_model_zoo.py on a torch-only model (the zoo itself is opt-in)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from partition_cases import load_tool

from asteroid_fx.model_spec import load_model_spec

zoo = load_tool("check_model_zoo")

PRELUDE = '''
from torch import nn
from torch.nn import functional as F


class Net(nn.Module):
    """Dropout in the code, BatchNorm, an auxiliary output in train mode only."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(8)])
        self.bn = nn.BatchNorm1d(8)
        self.aux = nn.Linear(8, 2)

    def forward(self, x):
        x = self.bn(x)
        aux = None
        for i, layer in enumerate(self.layers):
            x = F.dropout(torch.relu(layer(x)), 0.2, self.training)
            if i == 3 and self.training:
                aux = self.aux(x)
        return (x, aux) if self.training else x
'''
ENTRY = zoo.Entry("net", "custom", PRELUDE, "Net()", "(torch.randn(batch_size, 8),)")


def test_a_model_with_mode_dependent_code_passes(tmp_path: Path) -> None:
    row = zoo.check_model(ENTRY, zoo.Options(batch_size=8, check_batch=3, onnx=frozenset(),
                                             workdir=tmp_path))
    assert row.error == "" and row.notes == []
    assert row.trace_ok and row.eval_graph and row.stages == 6
    assert row.train_ok and row.eval_ok and row.ok
    assert row.train_out_diff == 0.0 and row.eval_out_diff == 0.0
    assert "| net | yes | yes | 6 | yes | yes | - |" in zoo.markdown([row])


def test_a_failure_is_one_line_naming_the_step(tmp_path: Path) -> None:
    broken = zoo.Entry("broken", "custom", PRELUDE, "Net()", "(torch.randn(batch_size, 5),)")
    row = zoo.check_model(broken, zoo.Options(onnx=frozenset(), workdir=tmp_path))
    assert not row.ok and not row.trace_ok
    assert row.error.startswith("trace: TraceError: ") and "\n" not in row.error


def test_compare_reports_a_different_model(tmp_path: Path) -> None:
    path = tmp_path / "net.py"
    path.write_text(ENTRY.source())
    spec = load_model_spec(str(path))
    model, other = spec.build_model(), spec.build_model()
    with torch.no_grad():
        other.layers[7].bias.add_(1e-3)
    (x,), _ = spec.sample_batch(3)
    diffs = zoo.compare(model, [other], (x,), training=False)
    assert not diffs.ok and 5e-4 < diffs.outputs < 2e-3
    same = zoo.compare(model, [spec.build_model()], (x,), training=True)
    assert same.ok and same.values() == (0.0, 0.0, 0.0)


def test_the_command_line_lists_and_refuses_unknown_models(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert zoo.main(["--list", "--family", "torchvision"]) == 0
    listed = capsys.readouterr().out
    assert "swin_t" in listed and "googlenet-aux" in listed and "Bert" not in listed
    assert {"LlamaForCausalLM", "ViTForImageClassification", "RobertaModel"} <= {
        e.key for e in zoo.ZOO}
    with pytest.raises(SystemExit):
        zoo.main(["--models", "resnet5O"])
