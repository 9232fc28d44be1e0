"""Tests of cost_models.hostspeed: measured single-core FLOP/s and bandwidth, cached."""

from __future__ import annotations

import pytest
import torch

from contracts.errors import CostModelError
from cost_models import hostspeed


def test_host_flops_is_plausible_and_cached() -> None:
    hostspeed.clear_cache()
    first = hostspeed.measure_host_flops(size=128, repeats=3, warmup=1)
    # one CPU core: somewhere between a slow board and a very wide AVX-512 core
    assert 1e8 < first < 1e13
    assert hostspeed.measure_host_flops(size=128, repeats=3, warmup=1) == first
    again = hostspeed.measure_host_flops(size=128, repeats=3, warmup=1, force=True)
    assert 1e8 < again < 1e13


def test_mem_bw_is_plausible_and_cached() -> None:
    hostspeed.clear_cache()
    bw = hostspeed.measure_host_mem_bw(nbytes=8 * 2**20, repeats=3)
    assert 1e8 < bw < 1e13
    assert hostspeed.measure_host_mem_bw(nbytes=8 * 2**20, repeats=3) == bw


def test_measurement_restores_thread_count() -> None:
    torch.set_num_threads(2)
    try:
        with hostspeed.single_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        hostspeed.measure_host_flops(size=64, repeats=1, warmup=0, force=True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"size": 0}, "size must be >= 1, got 0"), ({"repeats": -2}, "repeats must be >= 1, got -2"),
     ({"warmup": -1}, "warmup must be >= 0, got -1")],
)
def test_bad_arguments_raise(kwargs: dict[str, int], match: str) -> None:
    options = {"size": 8, "repeats": 1, "warmup": 0, **kwargs}
    with pytest.raises(CostModelError, match=match):
        hostspeed.measure_host_flops(
            size=options["size"], repeats=options["repeats"], warmup=options["warmup"]
        )


def test_bad_bandwidth_arguments_raise() -> None:
    with pytest.raises(CostModelError, match="nbytes must be >= 4, got 2"):
        hostspeed.measure_host_mem_bw(nbytes=2)


def test_norm_rate_is_below_the_matmul_rate_and_cached() -> None:
    rate = hostspeed.measure_norm_flops(shape=(4, 16, 8, 8), repeats=3, warmup=1)
    assert 1e6 < rate < 1e13
    assert hostspeed.measure_norm_flops(shape=(4, 16, 8, 8), repeats=3, warmup=1) == rate
    with pytest.raises(CostModelError, match=r"4 positive dimensions.*got \(4, 0, 8, 8\)"):
        hostspeed.measure_norm_flops(shape=(4, 0, 8, 8))
