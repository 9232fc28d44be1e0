"""Tests of contracts.devices: the catalogue of built-in device types."""

from __future__ import annotations

import pytest

from contracts.cluster import Cluster
from contracts.devices import DEVICE_TYPES, GIB

BOARDS = [t for t in DEVICE_TYPES.values() if t.name not in ("local", "custom")]


def test_catalogue_has_todays_boards() -> None:
    assert {"jetson-nano", "jetson-tx2", "jetson-xavier-nx", "jetson-agx-xavier",
            "jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin",
            "raspberry-pi-5"} <= set(DEVICE_TYPES)


@pytest.mark.parametrize("board", BOARDS, ids=lambda t: t.name)
def test_every_board_is_complete_and_below_peak(board: object) -> None:
    assert board.memory_gb and board.memory_gb > 0  # type: ignore[attr-defined]
    assert board.mem_bw_gbs and board.mem_bw_gbs > 0  # type: ignore[attr-defined]
    assert board.peak_flops and 0 < board.flops < board.peak_flops  # type: ignore[attr-defined]


def test_new_types_in_a_cluster() -> None:
    cluster = Cluster.from_dict({"devices": [
        {"name": "orin", "type": "jetson-agx-orin"}, {"name": "pi", "type": "raspberry-pi-5"},
        {"name": "nano", "type": "jetson-nano"}]})
    speeds = cluster.speeds(1e11)
    assert speeds["orin"] > speeds["nano"] > speeds["pi"]
    assert cluster.device("orin").memory_bytes == 64 * GIB
