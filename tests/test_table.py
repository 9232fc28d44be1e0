"""Tests of cost_models.table: validation and lossless JSON round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from asteroid_fx.errors import CostModelError
from cost_models.table import CostTable, LayerCost, TimeFit


def _table() -> CostTable:
    layers = tuple(
        LayerCost(f"l{i}", "linear", TimeFit(1e-5 * i, 1 / 3 * 1e-4), TimeFit(2e-5, 2e-4 / 3),
                  param_bytes=1000 * i, activation_bytes=64, output_bytes=32, flops=1.5e6,
                  buffer_bytes=i)
        for i in range(4)
    )
    return CostTable(layers=layers, cut_bytes=(32, 48, 32), input_bytes=16, model_name="toy",
                     model_hash="abc", host="h", host_flops=5.5e10, source="measured",
                     torch_version="2.13.0", batch_sizes=(1, 2, 4), meta={"repeats": 5})


def test_round_trip_lossless(tmp_path: Path) -> None:
    table = _table()
    assert CostTable.from_json(table.to_json()) == table
    table.save(tmp_path / "costs.json")
    assert CostTable.load(tmp_path / "costs.json") == table
    assert table.total_param_bytes == 6000


def test_time_fit() -> None:
    fit = TimeFit(0.5, 0.25)
    assert fit.at(0) == 0.0
    assert fit.at(4) == 1.5
    with pytest.raises(CostModelError, match="finite and >= 0"):
        TimeFit(-1.0, 0.0)


def test_validation() -> None:
    table = _table()
    data = table.to_dict()
    data["cut_bytes"] = [1]
    with pytest.raises(CostModelError, match="cut_bytes must have"):
        CostTable.from_dict(data)
    data = table.to_dict()
    del data["layers"][0]["fwd"]
    with pytest.raises(CostModelError, match="malformed layer"):
        CostTable.from_dict(data)
    data = table.to_dict()
    data["version"] = 99
    with pytest.raises(CostModelError, match="version 99"):
        CostTable.from_dict(data)
    with pytest.raises(CostModelError, match="not valid JSON"):
        CostTable.from_json("nope")
    with pytest.raises(CostModelError, match="does not exist"):
        CostTable.load("missing/costs.json")
