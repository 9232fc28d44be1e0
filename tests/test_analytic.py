"""Tests of cost_models.analytic: FLOP-based cost tables on the trace's layers."""

from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

from asteroid_fx.costs import analytic_costs
from asteroid_fx.trace import trace
from contracts.errors import CostModelError
from contracts.table import CostTable
from cost_models.analytic import OP_OVERHEAD_S
from cost_models.hostspeed import measure_host_flops


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = self.conv2(h)
        return self.fc(h.flatten(1))


def _by_name(table: CostTable) -> dict[str, int]:
    return {layer.name: i for i, layer in enumerate(table.layers)}


def test_flops_equal_closed_forms() -> None:
    model = SmallCNN()
    table = analytic_costs(model, (torch.randn(2, 3, 16, 16),), host_flops=1e10,
                           host_mem_bw=1e10)
    idx = _by_name(table)
    assert table.layers[idx["conv1"]].flops == 2 * 3 * 3 * 3 * 8 * 16 * 16
    assert table.layers[idx["conv2"]].flops == 2 * (8 // 2) * 3 * 3 * 16 * 8 * 8
    assert table.layers[idx["fc"]].flops == 2 * (16 * 8 * 8) * 10
    assert table.source == "analytic"


def test_layers_match_the_trace_and_record_provenance() -> None:
    model = SmallCNN()
    inputs = (torch.randn(2, 3, 16, 16),)
    graph = trace(model, inputs)
    table = analytic_costs(model, inputs, host_flops=2e9, host_mem_bw=1e10, graph=graph)
    assert [c.name for c in table.layers] == [layer.name for layer in graph.layers]
    assert [c.op for c in table.layers] == [layer.op for layer in graph.layers]
    assert [c.param_bytes for c in table.layers] == [layer.param_bytes for layer in graph.layers]
    assert list(table.cut_bytes) == list(graph.cut_bytes)
    assert table.input_bytes == graph.input_bytes == 3 * 16 * 16 * 4
    assert table.model_hash == graph.model_hash
    assert table.model_name == "SmallCNN"
    assert table.host == platform.node()
    assert table.torch_version == torch.__version__
    assert table.host_flops == 2e9


def test_roofline_times() -> None:
    model = SmallCNN()
    flops_s, bw = 1e9, 2e9
    table = analytic_costs(model, (torch.randn(2, 3, 16, 16),), host_flops=flops_s,
                           host_mem_bw=bw)
    fc = table.layers[_by_name(table)["fc"]]
    # compute-bound: 20480 FLOPs/sample at 1 GFLOP/s beats 4136 bytes/sample at 2 GB/s
    assert fc.fwd.per_sample_s == pytest.approx(fc.flops / flops_s)
    assert fc.bwd.per_sample_s == pytest.approx(2 * fc.flops / flops_s)
    weights = (16 * 8 * 8 * 10 + 10) * 4
    assert fc.fwd.intercept_s == pytest.approx(OP_OVERHEAD_S + weights / bw)
    relu = next(c for c in table.layers if c.op == "relu")
    # memory-bound: 1 FLOP per element, 8 bytes moved per element
    assert relu.fwd.per_sample_s == pytest.approx(2 * 8 * 16 * 16 * 4 / bw)
    assert all(c.fwd.at(4) > c.fwd.at(1) > 0 for c in table.layers)


def test_default_host_flops_is_the_measured_one() -> None:
    table = analytic_costs(SmallCNN(), torch.randn(2, 3, 16, 16))
    assert table.host_flops == measure_host_flops()


def test_json_round_trip_is_lossless() -> None:
    table = analytic_costs(SmallCNN(), (torch.randn(2, 3, 16, 16),), host_flops=3.3e9,
                           host_mem_bw=1.7e10)
    assert CostTable.from_json(table.to_json()) == table


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_host_flops_raise(bad: float) -> None:
    with pytest.raises(CostModelError, match=f"host_flops must be a finite number > 0, got {bad}"):
        analytic_costs(SmallCNN(), (torch.randn(2, 3, 16, 16),), host_flops=bad)


def test_bad_example_inputs_raise() -> None:
    with pytest.raises(CostModelError,
                       match="example_inputs must be a tensor, a tuple of tensors or a dict"):
        analytic_costs(SmallCNN(), "not a tensor", host_flops=1e9)


def test_training_batch_norm_uses_the_norm_ceiling() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
    inputs = (torch.randn(2, 3, 8, 8),)
    flops_s, bw = 1e9, 1e15  # memory is never the bound here
    table = analytic_costs(model, inputs, host_flops=flops_s, host_mem_bw=bw,
                           norm_efficiency=0.1)
    bn = next(c for c in table.layers if c.op == "batchnorm2d")
    assert bn.flops == 5 * 8 * 8 * 8
    assert bn.fwd.per_sample_s == pytest.approx(bn.flops / (0.1 * flops_s))
    assert bn.bwd.per_sample_s == pytest.approx(2 * bn.flops / (0.1 * flops_s))
    assert table.meta["norm_efficiency"] == 0.1
    conv = next(c for c in table.layers if c.op == "conv2d")
    assert conv.fwd.per_sample_s == pytest.approx(conv.flops / flops_s)
    model.eval()  # inference-mode statistics are cheap: matmul ceiling
    frozen = analytic_costs(model, inputs, host_flops=flops_s, host_mem_bw=bw,
                            norm_efficiency=0.1)
    bn_eval = next(c for c in frozen.layers if c.op == "batchnorm2d")
    assert bn_eval.fwd.per_sample_s == pytest.approx(bn.flops / flops_s)


def test_bad_norm_efficiency_raises() -> None:
    with pytest.raises(CostModelError, match="norm_efficiency must be a finite number > 0, got 0"):
        analytic_costs(SmallCNN(), (torch.randn(2, 3, 16, 16),), host_flops=1e9,
                       norm_efficiency=0)
