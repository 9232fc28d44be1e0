"""AdapterModel.run_segment: frozen segments run on torch's folded matrix products."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from runtime.adapter_model import Adapter, AdapterModel


class _Block(nn.Module):
    """A linear layer on a (sequence, batch, hidden) view of a batch-first input, as
    ``nn.MultiheadAttention(batch_first=True)`` projects its input."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(x.transpose(0, 1)).transpose(0, 1)
        return out


class _Attention(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(hidden, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.attn(x, x, x, need_weights=False)[0]
        return out


def _model(segment: nn.Module, hidden: int) -> AdapterModel:
    return AdapterModel([segment], nn.Identity(), [Adapter(hidden, 2)], [0], 0, [0],
                        [(8, hidden)])


def _ops(fn: object) -> Counter[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()   # type: ignore[operator]
    return Counter(e.name for e in prof.events())


@pytest.mark.parametrize("make", [_Block, _Attention])
def test_a_frozen_segment_runs_the_products_of_a_trainable_one(make: type[nn.Module]) -> None:
    torch.manual_seed(0)
    hidden, x = 16, torch.randn(4, 8, 16)
    trainable = make(hidden)
    model = _model(copy.deepcopy(trainable), hidden)
    assert all(not p.requires_grad for p in model.segments.parameters())
    (out,), tap = model.run_segment(0, (x,))
    with torch.no_grad():
        want = trainable(x)
    torch.testing.assert_close(out, want)
    assert tap is out and not out.requires_grad
    # the same kernels as the trainable weights (one folded product), not a batched
    # product over the sequence with the weight broadcast ([Note: frozen weights and matmul])
    got_ops = _ops(lambda: model.run_segment(0, (x,)))

    def plain() -> None:
        with torch.no_grad():
            trainable(x)

    want_ops = _ops(plain)
    for op in ("aten::bmm", "aten::mm", "aten::addmm"):
        assert got_ops[op] == want_ops[op], op
    assert got_ops["aten::bmm"] == 0 or make is _Attention
    # still frozen afterwards: no gradient reaches the backbone
    assert all(not p.requires_grad for p in model.segments.parameters())


def test_a_failing_segment_leaves_its_weights_frozen() -> None:
    model = _model(_Block(16), 16)
    with pytest.raises(RuntimeError):
        model.run_segment(0, (torch.randn(4, 8, 3),))     # wrong hidden size
    assert all(not p.requires_grad for p in model.segments.parameters())
