"""Tests of asteroid_fx.shape_prop: value metadata per node, saved bytes, error context."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from asteroid_fx.shape_prop import (
    META_KEY,
    SAVED_KEY,
    MappingMeta,
    NonTensorMeta,
    ShapeProp,
    TensorMeta,
    describe,
    iter_tensor_metas,
)
from contracts.errors import TraceError


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.size(0)
        a, c = self.fc(x).chunk(2, dim=1)
        return torch.relu(a * c).view(b, -1)


def _metas(gm: fx.GraphModule) -> dict[str, object]:
    return {n.name: n.meta[META_KEY] for n in gm.graph.nodes}


def test_records_tensor_shapes_dtypes_and_bytes() -> None:
    gm = fx.symbolic_trace(_Net())
    out = ShapeProp(gm).propagate(torch.randn(3, 6))
    metas = _metas(gm)
    assert out.shape == (3, 2)
    assert metas["x"] == TensorMeta((3, 6), torch.float32, 3 * 6 * 4, False)
    fc = metas["fc"]
    assert isinstance(fc, TensorMeta) and fc.shape == (3, 4) and fc.nbytes == 48
    assert fc.requires_grad is False  # propagate without record_saved runs under no_grad
    assert metas["output"] == TensorMeta((3, 2), torch.float32, 24, False)


def test_tuples_and_non_tensors() -> None:
    gm = fx.symbolic_trace(_Net())
    ShapeProp(gm).propagate(torch.randn(3, 6))
    metas = _metas(gm)
    chunk = metas["chunk"]
    assert isinstance(chunk, tuple) and len(chunk) == 2
    assert [t.shape for t in iter_tensor_metas(chunk)] == [(3, 2), (3, 2)]
    assert metas["size"] == NonTensorMeta("int", 3)


def test_describe_plain_values() -> None:
    assert describe(None) == NonTensorMeta("NoneType", None)
    assert describe(torch.Size([2, 3])) == NonTensorMeta("Size", (2, 3))
    assert describe([torch.zeros(2), 1.5]) == (
        TensorMeta((2,), torch.float32, 8, False),
        NonTensorMeta("float", 1.5),
    )
    assert describe(object()).type_name == "object"  # type: ignore[union-attr]


def test_mappings_are_described_like_tuples() -> None:
    value = {"logits": torch.zeros(2, 3), "extra": (torch.zeros(2), None)}
    meta = describe(value)
    assert meta == MappingMeta("dict", (
        ("logits", TensorMeta((2, 3), torch.float32, 24, False)),
        ("extra", (TensorMeta((2,), torch.float32, 8, False), NonTensorMeta("NoneType"))),
    ))
    assert isinstance(meta, MappingMeta) and meta.keys() == ("logits", "extra")
    assert [t.shape for t in iter_tensor_metas(meta)] == [(2, 3), (2,)]
    assert describe({1: torch.zeros(1)}) == NonTensorMeta("dict")  # keys must be names


class _DictLeaf(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hidden": x * 2, "pooled": x.mean(1)}


class _UsesDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.leaf = _DictLeaf()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.leaf(x)
        return out["hidden"] + out["pooled"].unsqueeze(1)


def test_mapping_values_of_a_leaf_module_record_their_tensors() -> None:
    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return isinstance(m, _DictLeaf) or super().is_leaf_module(m, name)

    model = _UsesDict()
    gm = fx.GraphModule(model, Tracer().trace(model))
    ShapeProp(gm, record_saved=True).propagate(torch.randn(3, 4, requires_grad=True))
    leaf = _metas(gm)["leaf"]
    assert isinstance(leaf, MappingMeta) and leaf.keys() == ("hidden", "pooled")
    assert [t.shape for t in iter_tensor_metas(leaf)] == [(3, 4), (3,)]


def test_record_saved_counts_activations_not_parameters() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    gm = fx.symbolic_trace(model)
    ShapeProp(gm, record_saved=True).propagate(torch.randn(5, 8))
    saved = {n.name: n.meta[SAVED_KEY] for n in gm.graph.nodes}
    # Linear saves its input (5x8 floats), never its weight; ReLU saves its output (5x16);
    # the second Linear saves the same ReLU output again, counted only once.
    assert saved["_0"] == 5 * 8 * 4
    assert saved["_1"] == 5 * 16 * 4
    assert saved["_2"] == 0


def test_record_saved_counts_a_tensor_at_the_node_that_made_it() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 2))
    gm = fx.symbolic_trace(model)
    ShapeProp(gm, record_saved=True).propagate(torch.randn(5, 8))
    saved = {n.name: n.meta[SAVED_KEY] for n in gm.graph.nodes}
    # the first Linear saves the model input (made by no node: counted where it is saved);
    # its own output is saved only by the second Linear but belongs to the first, which
    # is the stage that would hold it if the model were cut between the two
    assert saved["_0"] == 5 * 8 * 4 + 5 * 16 * 4
    assert saved["_1"] == 0
    assert saved["input_1"] == 0


def test_errors_name_the_node_and_chain_the_cause() -> None:
    gm = fx.symbolic_trace(_Net())
    with pytest.raises(
        TraceError, match=r"shape propagation failed at node %fc.*call_module"
    ) as e:
        ShapeProp(gm).propagate(torch.randn(3, 5))
    assert isinstance(e.value.__cause__, RuntimeError)
    assert "batch dimension first" in str(e.value)
