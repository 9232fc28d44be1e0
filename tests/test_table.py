"""Tests of contracts.table: validation and lossless JSON round-trip."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from contracts.errors import CostModelError
from contracts.table import CostTable, DeviceColumn, LayerCost, RuntimeOverhead, TimeFit


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


def _column(table: CostTable, device_type: str, factor: float) -> DeviceColumn:
    return DeviceColumn(device_type, tuple(lc.fwd.scaled(factor) for lc in table.layers),
                        tuple(lc.bwd.scaled(factor) for lc in table.layers),
                        update_s_per_byte=1e-9, host="nano-1", torch_version="2.1.2")


def test_columns_round_trip_and_lookup(tmp_path: Path) -> None:
    base = _table()
    table = replace(base, columns=(_column(base, "jetson-nano", 3.0),),
                    optimizer_state_factor=2.0)
    table.save(tmp_path / "costs.json")
    loaded = CostTable.load(tmp_path / "costs.json")
    assert loaded == table
    col = loaded.column("jetson-nano")
    assert col is not None and col.fwd[1] == base.layers[1].fwd.scaled(3.0)
    assert loaded.column("jetson-tx2") is None and loaded.column("local") is None
    assert loaded.measured_types == ("jetson-nano",)
    assert "measured on a jetson-nano on nano-1" == loaded.timing_source("jetson-nano")
    assert "no jetson-tx2 column" in loaded.timing_source("jetson-tx2")
    assert loaded.optimizer_state_factor == 2.0


def test_labelled_base_is_its_own_column() -> None:
    table = replace(_table(), device_type="jetson-tx2")
    col = table.column("jetson-tx2")
    assert col is not None and col.fwd == tuple(lc.fwd for lc in table.layers)
    assert table.measured_types == ("jetson-tx2",)


def test_version_one_files_still_read() -> None:
    data = json.loads(_table().to_json())
    data["version"] = 1
    for key in ("device_type", "columns", "optimizer_state_factor"):
        del data[key]
    assert CostTable.from_dict(data) == _table()


@pytest.mark.parametrize(("change", "match"), [
    ({"version": 99}, "upgrade asteroid-fx"),
    ({"device_type": "custom"}, "device_type must name"),
    ({"optimizer_state_factor": -1}, "optimizer_state_factor"),
    ({"columns": [{"device_type": "local", "fwd": [[0, 1]] * 4, "bwd": [[0, 1]] * 4}]},
     "other than local"),
    ({"columns": [{"device_type": "jetson-nano", "fwd": [[0, 1]], "bwd": [[0, 1]]}]},
     "one \\[intercept_s, per_sample_s\\] per layer"),
    ({"columns": [{"fwd": []}]}, "missing the field 'device_type'"),
    ({"columns": [{"device_type": "jetson-nan", "fwd": [[0, 1]] * 4, "bwd": [[0, 1]] * 4}]},
     "unknown device type 'jetson-nan'"),
])
def test_bad_columns_are_refused(change: dict[str, object], match: str) -> None:
    data = json.loads(_table().to_json())
    data.update(change)
    with pytest.raises(CostModelError, match=match):
        CostTable.from_dict(data)


def test_duplicate_column_types_are_refused() -> None:
    base = _table()
    with pytest.raises(CostModelError, match="two columns"):
        replace(base, columns=(_column(base, "jetson-nano", 2.0),
                               _column(base, "jetson-nano", 3.0)))


def test_runtime_overhead_round_trips_and_is_looked_up_per_type(tmp_path: Path) -> None:
    over = RuntimeOverhead(forward_s=1e-4, backward_s=2e-4, round_s=3e-4)
    nano = RuntimeOverhead(forward_s=5e-4)
    column = DeviceColumn("jetson-nano", fwd=tuple(lc.fwd for lc in _table().layers),
                          bwd=tuple(lc.bwd for lc in _table().layers), runtime_overhead=nano)
    table = replace(_table(), runtime_overhead=over, columns=(column,))
    assert CostTable.from_json(table.to_json()) == table
    assert table.runtime_overhead_of("local") == over       # scaled devices: the base's
    assert table.runtime_overhead_of("jetson-tx2") == over
    assert table.runtime_overhead_of("jetson-nano") == nano  # a column: its own
    bare = table.without_runtime_overhead()
    assert bare.runtime_overhead.is_zero and bare.columns[0].runtime_overhead.is_zero
    assert bare.layers == table.layers
    # files of before have no runtime_overhead: zero
    data = json.loads(_table().to_json())
    del data["runtime_overhead"]
    assert CostTable.from_dict(data).runtime_overhead == RuntimeOverhead()


@pytest.mark.parametrize("value", [-1e-3, float("nan"), float("inf")])
def test_bad_runtime_overhead_is_refused(value: float) -> None:
    with pytest.raises(CostModelError, match="runtime_overhead.round_s must be finite"):
        RuntimeOverhead(round_s=value)
    data = json.loads(_table().to_json())
    data["runtime_overhead"] = {"forward_s": "fast"}
    with pytest.raises(CostModelError, match="malformed runtime_overhead"):
        CostTable.from_dict(data)
    data["runtime_overhead"] = [1, 2, 3]
    with pytest.raises(CostModelError, match="runtime_overhead is a JSON object"):
        CostTable.from_dict(data)


def test_a_columns_message_cost_round_trips_and_is_looked_up_per_type() -> None:
    layers = _table().layers
    nano = DeviceColumn("jetson-nano", fwd=tuple(lc.fwd for lc in layers),
                        bwd=tuple(lc.bwd for lc in layers), message_overhead_s=3e-3)
    tx2 = DeviceColumn("jetson-tx2", fwd=tuple(lc.fwd for lc in layers),
                       bwd=tuple(lc.bwd for lc in layers))
    table = replace(_table(), message_overhead_s=1e-3, columns=(nano, tx2))
    assert CostTable.from_json(table.to_json()) == table
    assert table.message_cost_s("jetson-nano", 0.1) == 3e-3     # measured there: as it is
    assert table.message_cost_s("jetson-tx2", 0.5) == pytest.approx(2e-3)  # base / speed
    assert table.message_cost_s("local", 1.0) == 1e-3
    assert replace(table, message_overhead_s=0.0).message_cost_s("jetson-tx2", 0.5) == 0.0
    # a table measured on a board carries its figure into the column it becomes
    board = replace(_table(), device_type="jetson-nano", message_overhead_s=4e-3)
    assert board.base_column is not None and board.base_column.message_overhead_s == 4e-3
    with pytest.raises(CostModelError, match="message_overhead_s must be finite and >= 0"):
        replace(nano, message_overhead_s=-1.0)


def test_a_measured_workspace_round_trips_and_is_looked_up_per_type() -> None:
    layers = _table().layers
    nano = DeviceColumn("jetson-nano", fwd=tuple(lc.fwd for lc in layers),
                        bwd=tuple(lc.bwd for lc in layers), workspace_bytes=17 << 20)
    table = replace(_table(), workspace_bytes=0, columns=(nano,))
    assert CostTable.from_json(table.to_json()) == table
    assert table.workspace_of("local") == 0 and table.workspace_of("jetson-nano") == 17 << 20
    assert table.workspace_of("jetson-tx2") is None               # not measured: the default
    board = replace(_table(), device_type="jetson-tx2", workspace_bytes=5 << 20)
    assert board.base_column is not None and board.base_column.workspace_bytes == 5 << 20
    older = table.to_dict()
    del older["workspace_bytes"]
    assert CostTable.from_dict(older).workspace_bytes is None      # tables from before


@pytest.mark.parametrize("value", [-1, 1.5, True, "big"])
def test_a_bad_workspace_is_refused(value: object) -> None:
    data = _table().to_dict()
    data["workspace_bytes"] = value
    with pytest.raises(CostModelError, match="workspace_bytes must be an integer >= 0"):
        CostTable.from_dict(data)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("param_bytes", -10**12, "param_bytes must be an integer >= 0"),
    ("activation_bytes", -1, "activation_bytes must be an integer >= 0"),
    ("output_bytes", -5, "output_bytes must be an integer >= 0"),
    ("buffer_bytes", -2, "buffer_bytes must be an integer >= 0"),
    ("flops", float("nan"), "flops must be finite"),
])
def test_negative_bytes_in_a_layer_are_refused(field: str, value: object, match: str) -> None:
    # a table with negative bytes planned a peak memory of -1862 GiB before
    data = _table().to_dict()
    data["layers"][1][field] = value
    with pytest.raises(CostModelError, match=f"layer 'l1': {match}"):
        CostTable.from_dict(data)


def test_negative_cut_or_input_bytes_are_refused() -> None:
    data = _table().to_dict()
    data["cut_bytes"][2] = -48
    with pytest.raises(CostModelError, match=r"cut_bytes\[2\] must be an integer >= 0 .*got -48"):
        CostTable.from_dict(data)
    data = _table().to_dict()
    data["input_bytes"] = -1
    with pytest.raises(CostModelError, match="input_bytes must be an integer >= 0.*got -1"):
        CostTable.from_dict(data)
    with pytest.raises(CostModelError, match="got -48 at 2"):   # (built in code, not loaded)
        replace(_table(), cut_bytes=(1, 1, -48))


@pytest.mark.parametrize("value", [1.5, True, "4096", 1e30, 2**51, float("inf")])
def test_bytes_that_are_not_whole_or_are_too_large_are_refused(value: object) -> None:
    """1e30 cut bytes reached the planner and overflowed there; 1.5 and true were read as 1."""
    for where in ("cut", "param", "tie"):
        data = _table().to_dict()
        if where == "cut":
            data["cut_bytes"][0] = value
        elif where == "param":
            data["layers"][0]["param_bytes"] = value
        else:
            data["tied"] = [{"name": "w", "layers": [0, 2], "bytes": value}]
        with pytest.raises(CostModelError, match=r"must be an integer >= 0 \(bytes, at most "
                                                 r"2\^50\)"):
            CostTable.from_dict(data)


def test_whole_floats_are_read_as_bytes() -> None:
    data = _table().to_dict()
    data["cut_bytes"][0] = 4096.0
    assert CostTable.from_dict(data).cut_bytes[0] == 4096


def test_a_negative_tied_layer_is_refused() -> None:
    """It loaded, then the planner raised KeyError: -2."""
    data = _table().to_dict()
    data["tied"] = [{"name": "w", "layers": [-2, 1], "bytes": 4}]
    with pytest.raises(CostModelError, match=r"tied weight 'w' names layer -2, but the "
                                             r"table's layers are 0 to 3"):
        CostTable.from_dict(data)
