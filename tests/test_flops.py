"""Tests of cost_models.flops: per-op FLOP formulas against closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from asteroid_fx.shape_prop import ShapeProp
from cost_models.flops import NodeCost, node_cost, nodes_cost, tensor_shapes


def _traced(model: nn.Module, *inputs: torch.Tensor) -> fx.GraphModule:
    gm = fx.symbolic_trace(model)
    ShapeProp(gm).propagate(*inputs)
    return gm


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def test_linear_is_two_in_out_per_sample() -> None:
    gm = _traced(nn.Sequential(nn.Linear(20, 30)), torch.randn(4, 20))
    cost = node_cost(_node(gm, "_0"), gm, batch=4)
    assert cost.fwd_flops == 2 * 20 * 30
    assert cost.bwd_flops == 2 * cost.fwd_flops  # weights: input grad + weight grad
    assert cost.weight_bytes == (20 * 30 + 30) * 4
    assert cost.bytes_moved == (20 + 30) * 4
    assert cost.ops == 1


def test_linear_on_sequences_counts_every_position() -> None:
    gm = _traced(nn.Sequential(nn.Linear(8, 16)), torch.randn(3, 5, 8))
    assert node_cost(_node(gm, "_0"), gm, batch=3).fwd_flops == 5 * 2 * 8 * 16


@pytest.mark.parametrize(
    ("cin", "cout", "k", "stride", "padding", "dilation", "groups"),
    [(3, 8, 3, 1, 1, 1, 1), (8, 16, 3, 2, 0, 1, 4), (6, 6, 5, 1, 4, 2, 6), (4, 12, 1, 1, 0, 1, 2)],
)
def test_conv2d_matches_closed_form(
    cin: int, cout: int, k: int, stride: int, padding: int, dilation: int, groups: int
) -> None:
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation,
                     groups=groups)
    x = torch.randn(2, cin, 17, 15)
    gm = _traced(nn.Sequential(conv), x)
    h_out, w_out = conv(x).shape[-2:]
    expected = 2 * (cin // groups) * k * k * cout * h_out * w_out
    cost = node_cost(_node(gm, "_0"), gm, batch=2)
    assert cost.fwd_flops == expected
    assert cost.bwd_flops == 2 * expected


def test_conv1d_and_functional_forms_agree_with_modules() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(10, 6))
            self.k = nn.Parameter(torch.randn(8, 2, 3))

        def forward(self, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return (
                nn.functional.linear(x, self.w),
                x @ self.w.t(),
                nn.functional.conv1d(s, self.k, groups=2),
            )

    gm = _traced(Functional(), torch.randn(3, 6), torch.randn(3, 4, 11))
    assert node_cost(_node(gm, "linear"), gm, 3).fwd_flops == 2 * 6 * 10
    assert node_cost(_node(gm, "matmul"), gm, 3).fwd_flops == 2 * 6 * 10
    conv = node_cost(_node(gm, "conv1d"), gm, 3)
    assert conv.fwd_flops == 2 * (4 // 2) * 3 * 8 * 9
    assert conv.weight_bytes == 8 * 2 * 3 * 4


class _LeafTracer(fx.Tracer):
    """Keeps nn.MultiheadAttention whole, as asteroid_fx.trace does."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.MultiheadAttention) or super().is_leaf_module(
            m, module_qualified_name
        )


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_counts_projections_scores_and_softmax(batch_first: bool) -> None:
    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(16, 4, batch_first=batch_first)

        def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return self.att(q, kv, kv)[0]

    lq, lk, e, h, n = 5, 7, 16, 4, 2
    q = torch.randn(n, lq, e) if batch_first else torch.randn(lq, n, e)
    kv = torch.randn(n, lk, e) if batch_first else torch.randn(lk, n, e)
    tracer = _LeafTracer()
    model = Wrap()
    gm = fx.GraphModule(model, tracer.trace(model))
    ShapeProp(gm).propagate(q, kv)
    projections = 2 * lq * e * e * 2 + 2 * lk * e * e * 2  # q, out; k, v
    expected = projections + 2 * lq * lk * e * 2 + 5 * h * lq * lk
    cost = node_cost(_node(gm, "att"), gm, batch=n)
    assert cost.fwd_flops == expected
    assert cost.bwd_flops == 2 * expected


def test_elementwise_pooling_and_views() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.pool = nn.MaxPool2d(2)
            self.gap = nn.AdaptiveAvgPool2d(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.bn(x)) + x
            p = self.pool(h)
            g = self.gap(p).flatten(1)
            return torch.sigmoid(g).softmax(-1)

    x = torch.randn(2, 4, 8, 8)
    gm = _traced(Net(), x)
    per = 4 * 8 * 8

    def flops(name: str) -> float:
        return node_cost(_node(gm, name), gm, batch=2).fwd_flops

    assert flops("bn") == 5 * per
    assert flops("relu") == per
    assert flops("add") == per
    assert flops("pool") == 4 * (4 * 4 * 4)  # 2x2 kernel per output element
    assert flops("gap") == 4 * 4 * 4  # one per input element
    assert flops("sigmoid") == 4 * 4
    assert flops("softmax") == 5 * 4
    flat = node_cost(_node(gm, "flatten"), gm, batch=2)
    assert flat == NodeCost()  # views are free
    relu = node_cost(_node(gm, "relu"), gm, batch=2)
    assert relu.bwd_flops == relu.fwd_flops  # no weights: 1x
    assert relu.bytes_moved == 2 * per * 4
    bn = node_cost(_node(gm, "bn"), gm, batch=2)
    assert bn.bwd_flops == 2 * bn.fwd_flops  # affine weights
    assert (bn.norm_fwd_flops, bn.norm_bwd_flops) == (bn.fwd_flops, bn.bwd_flops)  # training
    assert relu.norm_fwd_flops == 0.0
    assert bn.weight_bytes == (4 + 4 + 4 + 4) * 4 + 8  # weight, bias, mean, var, count


def test_nodes_cost_sums_and_skips_unknown_names() -> None:
    gm = _traced(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(3, 4))
    total = nodes_cost(gm, ["_0", "_1", "_2", "no_such_node"], batch=3)
    assert total.fwd_flops == 2 * 4 * 4 + 4 + 2 * 4 * 2
    assert total.ops == 3
    assert nodes_cost(gm, [], batch=3) == NodeCost()


def test_einsum_and_bmm() -> None:
    class Net(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return torch.einsum("bij,bjk->bik", a, b), torch.bmm(a, b)

    gm = _traced(Net(), torch.randn(2, 3, 5), torch.randn(2, 5, 7))
    assert node_cost(_node(gm, "einsum"), gm, 2).fwd_flops == 2 * 3 * 5 * 7
    assert node_cost(_node(gm, "bmm"), gm, 2).fwd_flops == 2 * 3 * 5 * 7


def test_tensor_shapes_without_metadata() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
    node = _node(gm, "_0")
    assert tensor_shapes(node) == []
    assert node_cost(node, gm, batch=1).fwd_flops == 0.0  # no shapes known: nothing counted


def test_conv_transpose_layer_norm_and_embedding() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2)
            self.emb = nn.Embedding(50, 8)
            self.ln = nn.LayerNorm(8)

        def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self.up(x), self.ln(self.emb(tokens))

    gm = _traced(Net(), torch.randn(2, 4, 5, 5), torch.randint(0, 50, (2, 7)))
    up = node_cost(_node(gm, "up"), gm, batch=2)
    assert up.fwd_flops == 2 * (4 * 5 * 5) * (6 // 2) * 2 * 2  # per input element
    emb = node_cost(_node(gm, "emb"), gm, batch=2)
    assert emb.fwd_flops == 0.0
    assert emb.bytes_moved == 7 * 8 + 7 * 8 * 4  # int64 indices read, rows written
    assert node_cost(_node(gm, "ln"), gm, batch=2).fwd_flops == 5 * 7 * 8
