"""Shared helpers of the partition/package/stage_io/interop tests: hand plans, toy models."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from asteroid_fx.model_spec import ModelSpec, load_model_spec
from asteroid_fx.trace import Layer, LayerGraph
from contracts.plan import Plan, Stage

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def example_spec(name: str) -> ModelSpec:
    """``examples/<name>`` (``name`` may carry a ``:prefix``)."""
    return load_model_spec(str(EXAMPLES / name))


def hand_plan(num_layers: int, lasts: Sequence[int] = (), *, micro_batch: int = 2,
              model_hash: str = "", check_layers: bool = True) -> Plan:
    """A one-device-per-stage plan whose stages end after the layers in ``lasts``."""
    bounds = [0, *(last + 1 for last in lasts), num_layers]
    stages = tuple(
        Stage(layers=(bounds[i], bounds[i + 1] - 1), devices=(f"dev{i}",), shares=(micro_batch,))
        for i in range(len(bounds) - 1)
    )
    return Plan(model_hash=model_hash, cluster_hash="", batch_size=micro_batch,
                micro_batch_size=micro_batch, num_micro_batches=1, stages=stages,
                num_layers=num_layers if check_layers else 0)


def even_lasts(num_layers: int, num_stages: int) -> list[int]:
    """Last layer of every stage but the final one, for stages of (nearly) equal length."""
    return [round(num_layers * (s + 1) / num_stages) - 1 for s in range(num_stages - 1)]


def compose(stages: Sequence[nn.Module], inputs: tuple[Any, ...]) -> Any:
    """Run the stages one after the other, as DESIGN.md's calling convention says."""
    x: Any = inputs
    for stage in stages:
        x = stage(*x) if isinstance(x, tuple) else stage(x)
    return x


def naive_graph(model: nn.Module) -> LayerGraph:
    """A LayerGraph where every node but get_attr is its own layer (no merging at all).

    Used to exercise the partitioner's own checks on cuts that ``afx.trace`` would never
    offer (a size or a batch-less tensor crossing a cut).
    """
    gm = fx.symbolic_trace(model)
    layers: list[Layer] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        layers.append(Layer(index=len(layers), name=node.name, op=str(node.target),
                            node_names=(node.name,), param_names=(), param_bytes=0,
                            buffer_bytes=0, output_bytes=0, activation_bytes=0))
    return LayerGraph(graph_module=gm, layers=layers, cut_bytes=[0] * (len(layers) - 1),
                      input_bytes=0, model_hash="naive", model_name=type(model).__name__,
                      example_batch=0)


class TwoInOut(nn.Module):
    """Two inputs, BatchNorm, a skip over several layers and a dict-of-tuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 4)
        self.pos = nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        h = torch.relu(self.bn(self.a(x)))
        h2 = torch.tanh(self.b(h) + self.pos)
        out = self.c(h2 * h) + y
        return {"out": out, "aux": (h2, out.sum(dim=1))}


class InplaceAtCut(nn.Module):
    """In-place ops right after a possible cut, on a tensor that also skips ahead."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.act = nn.ReLU(inplace=True)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = self.act(h)  # nn.ReLU(inplace=True) on the cut tensor
        g = self.b(h)
        g.mul_(2.0)  # in-place method on the cut tensor, whose value also skips ahead
        return self.c(torch.sigmoid(g)) + g + h


class TiedLM(nn.Module):
    """Embedding and output projection share one weight (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mid(self.emb(ids)))
        return self.head(h) + nn.functional.linear(h, self.emb.weight)


class SizeAcross(nn.Module):
    """Uses ``x.size(0)`` far from where it is computed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        h = self.b(torch.relu(self.a(x)))
        return h.reshape(n, -1)


class BatchlessAcross(nn.Module):
    """A tensor without the batch dimension computed early and used late."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.exp(self.scale)
        h = torch.relu(self.a(x))
        return h * s


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` imported as the module ``name`` (tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
