"""Tests of runtime.snapshots: own snapshots of committed steps, buffer reuse, and the
previous generation's snapshots a survivor restores from."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from contracts.errors import RuntimeFailure
from runtime.snapshots import Snapshots


def _module() -> tuple[nn.Module, torch.optim.Optimizer]:
    module = nn.Linear(2, 2)
    return module, torch.optim.SGD(module.parameters(), lr=0.1)


def test_only_committed_snapshots_are_own_steps_and_buffers_are_reused() -> None:
    module, opt = _module()
    times: list[float] = []
    snaps = Snapshots(rank=0, device="a", times_s=times)
    for step in range(6):
        with torch.no_grad():
            module.bias.fill_(float(step))
        snaps.take(step, module, opt)
        assert step not in snaps.own_steps()      # taken, not yet committed
        snaps.commit(step, replicated=True)
    assert snaps.last_committed() == 5 and len(times) == 6
    assert {4, 5} <= set(snaps.own_steps())
    assert len(snaps.slots) <= 3            # the newest two are kept, the others reused
    assert torch.equal(snaps.own_state(5, ["bias"]).model["bias"], torch.full((2,), 5.0))
    assert snaps.newest_names() and set(snaps.newest_names()) >= {"weight", "bias"}
    assert snaps.has(5) and not snaps.has(0)


def test_the_next_generation_restores_from_the_previous_ones_snapshots() -> None:
    module, opt = _module()
    first = Snapshots(rank=1, device="b")
    first.take(3, module, opt)
    first.commit(3, replicated=False)
    first.take(4, module, opt)                 # taken, never committed (the failed round)
    second = Snapshots(first, rank=1, device="b")
    assert second.slots is first.slots and second.own_steps() == []
    assert torch.equal(second.previous_own(3, ["weight"]).model["weight"], module.weight)
    with pytest.raises(RuntimeFailure, match=r"rank 1 \(b\) has no own snapshot of step 4"):
        second.previous_own(4, ["weight"])
    # the previous generation's watcher may still serve them: their buffers stay untouched
    second.take(0, module, opt, previous_serving=True)
    assert len(second.slots) == 3
