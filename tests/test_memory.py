"""Tests of runtime.memory: the tensor-level count and the reserved (resident) peak."""

from __future__ import annotations

import gc
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from runtime.memory import MemoryMeter, freeze_startup, read_status, storage_bytes

MiB = 1 << 20


def _linear_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_storage_bytes_counts_each_storage_once() -> None:
    a = torch.zeros(10, 4)
    assert storage_bytes([a, a[2:5], a.t()]) == 160
    seen = {a.untyped_storage().data_ptr()}
    assert storage_bytes([a, torch.zeros(3)], seen) == 12


def test_tensor_count_of_a_linear_model_by_hand() -> None:
    model = _linear_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    meter = MemoryMeter(model, optimizer, torch.device("cpu"))
    batch = 5
    x = torch.randn(batch, 4)
    meter.begin_round()
    with meter.forward(0):
        out = model(x)
    meter.observe([x, out])
    # autograd keeps: the input of the first Linear (its weight is a parameter, not
    # counted) and the ReLU's output, which the second Linear saves too (one storage);
    # the runtime also holds the output
    saved = batch * 4 * 4 + batch * 8 * 4
    held_out = batch * 3 * 4
    assert meter._round is not None and meter._round.peak == saved + held_out
    out.sum().backward()
    meter.backward_done(0)
    meter.observe([])
    meter.end_round()
    optimizer.step()
    weights = _param_bytes(model)                       # (4*8 + 8 + 8*3 + 3) * 4
    assert weights == 67 * 4
    parts = meter.parts()
    assert parts == {"params": weights, "grads": weights, "optimizer_state": weights,
                     "buffers": 0, "in_flight": saved + held_out, "accumulating": 0,
                     "total": 3 * weights + saved + held_out}
    assert meter.peak_bytes() == parts["total"]


def test_in_flight_peak_is_the_largest_set_of_live_micro_batches() -> None:
    model = _linear_model()
    meter = MemoryMeter(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        torch.device("cpu"))
    one = 2 * 4 * 4 + 2 * 8 * 4            # saved per micro-batch of 2 samples
    meter.begin_round()
    outs = []
    for m in range(3):                     # three forwards in flight, then drain
        with meter.forward(m):
            outs.append(model(torch.randn(2, 4)))
        meter.observe([])
    for m in range(3):
        outs[m].sum().backward()
        meter.backward_done(m)
        meter.observe([])
    meter.end_round()
    assert meter.in_flight_peak == 3 * one
    # a round that is not counted changes nothing, and its forwards save nothing extra
    with meter.forward(0):
        model(torch.randn(50, 4)).sum().backward()
    meter.observe([torch.zeros(1000)])
    assert meter.in_flight_peak == 3 * one
    assert meter.parts()["optimizer_state"] == 0     # plain SGD keeps no state


def test_wire_buffers_count_once_at_the_most_allocated() -> None:
    model = _linear_model()
    meter = MemoryMeter(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        torch.device("cpu"))
    pool = [torch.zeros(256, dtype=torch.uint8) for _ in range(3)]
    meter.begin_round()
    held = torch.zeros(100)                   # 400 bytes held besides the wire
    meter.observe([held], pool[:1])
    # a received input aliases its wire buffer: counted once, as wire
    alias = pool[1][:64].view(torch.float32)
    meter.observe([held, alias], pool[:2])
    # later the pools hold three buffers while less else is held: a later round holds
    # them all at every boundary
    meter.observe([], pool)
    meter.end_round()
    assert meter.in_flight_peak == 400 + 3 * 256


def test_a_gradient_being_accumulated_is_counted() -> None:
    model = _linear_model()
    meter = MemoryMeter(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        torch.device("cpu"))
    meter.begin_round()
    for m in range(2):                     # the second backward adds into existing grads
        with meter.forward(m):
            out = model(torch.randn(2, 4))
        out.sum().backward()
        meter.backward_done(m)
        meter.observe([])
    meter.end_round()
    # the largest parameter is the first Linear's weight, 8 x 4 floats
    assert meter.accumulating_peak == 8 * 4 * 4
    assert meter.parts()["total"] == 2 * _param_bytes(model) + meter.in_flight_peak + 128
    # the hooks are gone after the round: a gradient arriving later changes nothing
    model(torch.randn(2, 4)).sum().backward()
    assert all(not p._backward_hooks for p in model.parameters())


def test_buffers_and_frozen_parameters() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model[0].bias.requires_grad_(False)
    meter = MemoryMeter(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        torch.device("cpu"))
    parts = meter.parts()
    assert parts["params"] == (16 + 4 + 4 + 4) * 4
    assert parts["grads"] == (16 + 4 + 4) * 4                  # the frozen bias has none
    assert parts["buffers"] == (4 + 4) * 4 + 8                 # running stats + counter


def _status(hwm: int, anon: int, file: int = 20 * MiB) -> str:
    kb = 1024
    return (f"Name:\tpython\nVmHWM:\t{hwm // kb} kB\nVmRSS:\t{(anon + file) // kb} kB\n"
            f"RssAnon:\t{anon // kb} kB\nRssFile:\t{file // kb} kB\nRssShmem:\t0 kB\n")


def test_reserved_peak_from_the_high_water_mark(tmp_path: Path) -> None:
    model = nn.Linear(512, 512)               # 1 MiB + 2 KiB of weights
    status, clear = tmp_path / "status", tmp_path / "clear_refs"
    status.write_text(_status(hwm=120 * MiB, anon=100 * MiB))
    clear.write_text("")
    meter = MemoryMeter(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        torch.device("cpu"), status_path=str(status),
                        clear_refs_path=str(clear))
    meter.start()
    assert meter.reserved_method == "rss" and clear.read_text() == "5"
    weights = _param_bytes(model)
    assert meter.reserved_bytes() == weights      # the high-water mark is at the baseline
    # the process peaked at 150 MiB resident, 20 MiB of it file-backed pages
    status.write_text(_status(hwm=150 * MiB, anon=110 * MiB))
    assert meter.reserved_bytes() == 30 * MiB + weights
    status.write_text(_status(hwm=130 * MiB, anon=105 * MiB))   # never decreases
    assert meter.peaks() == (meter.peak_bytes(), 30 * MiB + weights)


def test_reserved_peak_is_sampled_where_the_mark_cannot_be_reset(tmp_path: Path) -> None:
    model = nn.Linear(4, 4)
    status = tmp_path / "status"
    status.write_text(_status(hwm=500 * MiB, anon=100 * MiB))
    meter = MemoryMeter(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        torch.device("cpu"), status_path=str(status),
                        clear_refs_path=str(tmp_path / "missing" / "clear_refs"))
    meter.start()
    assert meter.reserved_method == "rss-sampled"
    weights = _param_bytes(model)
    meter.begin_round()
    status.write_text(_status(hwm=500 * MiB, anon=108 * MiB))
    meter.observe([])                      # every action boundary of a counted round
    status.write_text(_status(hwm=500 * MiB, anon=101 * MiB))
    assert meter.reserved_bytes() == 8 * MiB + weights   # the start-up peak is not seen


def test_no_status_file_means_not_measured(tmp_path: Path) -> None:
    assert read_status(str(tmp_path / "nowhere")) is None
    (tmp_path / "odd").write_text("VmHWM:\tlots\n")
    assert read_status(str(tmp_path / "odd")) is None
    model = nn.Linear(4, 4)
    meter = MemoryMeter(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        torch.device("cpu"), status_path=str(tmp_path / "nowhere"))
    meter.start()
    assert meter.reserved_method == "none"
    assert meter.peaks() == (meter.peak_bytes(), None)


@pytest.mark.skipif(read_status() is None or not sys.platform.startswith("linux"),
                    reason="needs /proc/self/status")
def test_reserved_peak_sees_a_real_allocation() -> None:
    model = nn.Linear(4, 4)
    meter = MemoryMeter(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        torch.device("cpu"))
    meter.start()
    assert meter.reserved_method in ("rss", "rss-sampled")
    block = torch.ones(64 * MiB // 4)         # touched: 64 MiB resident
    meter.sample()
    del block
    reserved = meter.reserved_bytes()
    # file-backed pages paged in after the peak are subtracted too: a little below
    assert reserved is not None and 60 * MiB <= reserved < 200 * MiB


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_a_frozen_start_keeps_the_meter_baseline_garbage_free() -> None:
    """A device process freezes what it imported (see [Note: garbage collection ahead]);
    garbage from before and after that is gone once the meter starts."""
    before = _Cycle()
    gone_before = weakref.ref(before)
    del before
    try:
        freeze_startup()
        assert gone_before() is None and gc.get_freeze_count() > 0
        after = _Cycle()
        gone_after = weakref.ref(after)
        del after
        module = nn.Linear(2, 2)
        meter = MemoryMeter(module, torch.optim.SGD(module.parameters(), lr=0.1),
                            torch.device("cpu"))
        meter.start()
        assert gone_after() is None and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
