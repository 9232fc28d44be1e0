"""Tests of cost_models.merge: one table with a column per measured device type."""

from __future__ import annotations

from dataclasses import replace

import pytest

from contracts.errors import CostModelError
from contracts.table import CostTable, LayerCost, TimeFit
from cost_models.merge import merge_costs


def _table(device_type: str = "local", factor: float = 1.0, **changes: object) -> CostTable:
    layers = tuple(
        LayerCost(f"l{i}", "conv" if i % 2 else "linear", TimeFit(1e-5 * factor, 1e-4 * factor),
                  TimeFit(2e-5 * factor, 2e-4 * factor), param_bytes=100, activation_bytes=64,
                  output_bytes=32)
        for i in range(3))
    table = CostTable(layers=layers, cut_bytes=(32, 32), input_bytes=16, model_name="toy",
                      model_hash="h1", host=f"{device_type}-host", host_flops=1e10,
                      source="measured", batch_sizes=(1, 2, 4, 8), device_type=device_type,
                      update_s_per_byte=1e-9 * factor)
    return replace(table, **changes) if changes else table


def test_merge_keeps_the_local_base_and_adds_columns() -> None:
    nano, local, tx2 = _table("jetson-nano", 4.0), _table(), _table("jetson-tx2", 2.0)
    merged = merge_costs([nano, local, tx2])
    assert merged.device_type == "local"
    assert merged.layers == local.layers
    assert merged.measured_types == ("jetson-nano", "jetson-tx2")
    nano_col = merged.column("jetson-nano")
    assert nano_col is not None
    assert nano_col.fwd == tuple(lc.fwd for lc in nano.layers)
    assert nano_col.update_s_per_byte == nano.update_s_per_byte
    assert nano_col.host == "jetson-nano-host"
    assert [m["device_type"] for m in merged.meta["merged_from"]] == [
        "jetson-nano", "local", "jetson-tx2"]
    assert CostTable.from_json(merged.to_json()) == merged


def test_merge_without_local_uses_the_first_as_base_and_merges_again() -> None:
    merged = merge_costs([_table("jetson-nano", 4.0), _table("jetson-tx2", 2.0)])
    assert merged.device_type == "jetson-nano"
    assert merged.measured_types == ("jetson-nano", "jetson-tx2")
    again = merge_costs([_table(), merged])
    assert again.device_type == "local"
    assert again.measured_types == ("jetson-nano", "jetson-tx2")


@pytest.mark.parametrize(("other", "match"), [
    (_table("jetson-nano", model_hash="other"), "profile the same model"),
    (_table("jetson-nano", batch_sizes=(1, 2)), "same --batch-sizes"),
    (_table("jetson-nano", cut_bytes=(32, 64)), "different cut sizes"),
    (_table("local"), "both unlabelled"),
    (_table("jetson-tx2"), "is in both"),
])
def test_merge_refuses_mismatches(other: CostTable, match: str) -> None:
    with pytest.raises(CostModelError, match=match):
        merge_costs([_table(), _table("jetson-tx2", 2.0), other], names=["a", "b", "c"])


def test_merge_refuses_different_layers() -> None:
    renamed = _table("jetson-nano")
    renamed = replace(renamed, layers=(replace(renamed.layers[0], name="x"),
                                       *renamed.layers[1:]))
    with pytest.raises(CostModelError, match="first difference at layer 0"):
        merge_costs([_table(), renamed])


def test_merge_needs_tables() -> None:
    with pytest.raises(CostModelError, match="at least one"):
        merge_costs([])


def test_merge_keeps_each_boards_runtime_overhead_and_message_cost() -> None:
    from contracts.table import RuntimeOverhead

    over = RuntimeOverhead(forward_s=3e-4, backward_s=4e-4, round_s=5e-4)
    nano = _table("jetson-nano", 4.0, runtime_overhead=over, message_overhead_s=2e-3)
    local = _table(message_overhead_s=5e-4)
    merged = merge_costs([local, nano])
    col = merged.column("jetson-nano")
    assert col is not None and col.runtime_overhead == over and col.message_overhead_s == 2e-3
    assert merged.message_overhead_s == 5e-4       # the workstation's stays the base's
    # a Nano pays its own per message, a local device of speed 0.5 the base's over 0.5
    assert merged.message_cost_s("jetson-nano", 0.1) == 2e-3
    assert merged.message_cost_s("local", 0.5) == pytest.approx(1e-3)
