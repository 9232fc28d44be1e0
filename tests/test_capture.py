"""Tests of capture by torch.export, the graphs ``trace`` takes when torch.fx fails."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from partition_cases import compose, even_lasts, hand_plan
from torch import nn

from asteroid_fx.partition import partition
from asteroid_fx.trace import trace
from contracts.errors import ModelOutputError, TraceError


class Block(nn.Module):
    """Two linear layers with a residual connection."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.outer = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.outer(torch.relu(self.inner(x)))


class SizeBranch(nn.Module):
    """Python control flow on a size: torch.fx cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.block = Block(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(1) > 4:
            x = self.fc1(x)
        return self.fc2(self.block(torch.tanh(x)))


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_composes(model: nn.Module, inputs: Any, num_stages: int) -> list[Any]:
    """The stages of a ``num_stages`` split give the model's outputs and gradients."""
    graph = trace(model, inputs)
    plan = hand_plan(graph.num_layers, even_lasts(graph.num_layers, num_stages))
    stages = partition(model, inputs, plan, graph=graph)
    for stage in stages:
        stage.train(model.training)
    positional = tuple(inputs.values()) if isinstance(inputs, dict) else inputs
    expected = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    got = compose(stages, positional)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    _total(expected).backward()
    _total(got).backward()
    stage_grads: dict[str, torch.Tensor] = {}
    for stage in stages:  # a parameter used by two stages: the runtime sums its gradients
        for name, grad in _grads(stage).items():
            stage_grads[name] = stage_grads[name] + grad if name in stage_grads else grad
    assert stage_grads.keys() == _grads(model).keys()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(stage_grads[name], grad, rtol=1e-5, atol=0)
    return stages


def _total(value: Any) -> torch.Tensor:
    if isinstance(value, dict):
        return sum((v.square().mean() for v in value.values()), torch.zeros(()))
    return value.square().mean()


def test_model_torch_fx_cannot_trace_is_captured_by_export() -> None:
    model = SizeBranch()
    x = torch.randn(3, 8)
    graph = trace(model, (x,))
    assert graph.capture == "export"
    names = [layer.name for layer in graph.layers]
    assert names[0] == "fc1" and names[-1] == "fc2" and "block.inner" in names
    assert {layer.op for layer in graph.layers} >= {"linear", "tanh", "relu", "add"}
    torch.testing.assert_close(graph.graph_module(x), model(x), rtol=0, atol=0)
    stages = _assert_composes(model, (x,), 3)
    one = torch.randn(1, 8)  # micro-batches of any size: the batch dimension is dynamic
    torch.testing.assert_close(compose(stages, (one,)), model(one), rtol=0, atol=0)


def test_leaf_of_a_captured_graph_is_one_layer() -> None:
    model = SizeBranch()
    graph = trace(model, (torch.randn(2, 8),), leaf_modules=["Block"])
    assert graph.capture == "export"
    blocks = [layer for layer in graph.layers
              if any(n.startswith(("linear_1", "linear_2")) for n in layer.node_names)]
    assert len(blocks) == 1 and len(graph.layers) == 4  # fc1, tanh, the block, fc2


def test_keyword_inputs_in_mapping_order_fx() -> None:
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                    scale: float = 2.0) -> dict[str, torch.Tensor]:
            h = self.fc(x) * scale
            if mask is not None:
                h = h * mask
            return {"hidden": h, "logits": self.fc(torch.relu(h))}

    model = Masked()
    inputs = {"mask": torch.rand(3, 4), "x": torch.randn(3, 4)}
    graph = trace(model, inputs)
    assert graph.capture == "fx" and graph.input_names == ("mask", "x")
    torch.testing.assert_close(graph.graph_module(**inputs), model(**inputs), rtol=0, atol=0)
    stages = _assert_composes(model, inputs, 2)
    torch.testing.assert_close(stages[1](*stages[0](**inputs)), model(**inputs))


def test_keyword_inputs_in_mapping_order_export() -> None:
    class Branchy(SizeBranch):
        def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            out = super().forward(x)
            return out if bias is None else out + bias

    model = Branchy()
    inputs = {"bias": torch.randn(2, 3), "x": torch.randn(2, 8)}
    graph = trace(model, inputs)
    assert graph.capture == "export" and graph.input_names == ("bias", "x")
    stages = _assert_composes(model, inputs, 3)
    torch.testing.assert_close(compose(stages, tuple(inputs.values())), model(**inputs))


class Encoder(nn.Module):
    """A leaf returning a mapping (as Hugging Face modules return a ModelOutput)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hidden": self.fc(x), "pooled": self.fc(x).mean(1)}


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.encoder(x)
        return self.head(out["hidden"]) + out["pooled"].unsqueeze(1)


def test_leaf_returning_a_mapping_is_a_layer() -> None:
    model = Classifier()
    x = torch.randn(2, 4)
    graph = trace(model, (x,), leaf_modules=["encoder"])
    assert [layer.name for layer in graph.layers] == ["encoder", "head", "add"]
    assert graph.layers[0].output_bytes == 4 * 4 + 4  # the tensors of the mapping, per sample
    _assert_composes(model, (x,), 2)


class Box:
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


@pytest.mark.parametrize(
    ("forward", "pattern"),
    [
        (lambda fc, x: (fc(x), "done"), r"output\[1\] is a str, not a tensor"),
        (lambda fc, x: Box(fc(x)), r"output is a .*Box"),
        (lambda fc, x: {"a": [fc(x), Box(x)]}, r"output\['a'\]\[1\] is a .*Box"),
    ],
)
def test_output_that_is_not_tensors_is_a_typed_error(forward: Any, pattern: str) -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> Any:
            return forward(self.fc, x)

    with pytest.raises(ModelOutputError, match=pattern) as error:
        trace(Odd(), (torch.randn(2, 4),))
    assert isinstance(error.value, TraceError) and "\n" not in str(error.value)


def test_no_grad_region_keeps_its_parameter_out_of_the_gradients() -> None:
    class Frozen(SizeBranch):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                factor = self.scale * 3
            return super().forward(x) * factor

    model = Frozen()
    stages = _assert_composes(model, (torch.randn(2, 8),), 2)
    assert model.scale.grad is None
    assert all(p.grad is None for s in stages for n, p in s.named_parameters() if n == "scale")


def test_in_place_ops_on_fresh_tensors_do_not_merge_layers() -> None:
    class Positions(SizeBranch):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(x.size(1), dtype=x.dtype)
            pos += 1  # in place, on a tensor the graph just made
            h = self.fc1(x) + pos
            return self.fc2(torch.relu(self.block(h)) * pos)

    model = Positions()
    graph = trace(model, (torch.randn(2, 8),))
    targets = {getattr(n.target, "__name__", "") for n in graph.graph_module.graph.nodes}
    assert "add_.Tensor" not in targets
    assert len(graph.layers) >= 6  # not merged into one layer around ``pos``
    _assert_composes(model, (torch.randn(2, 8),), 3)


def test_views_do_not_depend_on_the_input_layout() -> None:
    class Flatten(SizeBranch):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = super().forward(x).unsqueeze(2).expand(-1, -1, 4)
            return y.transpose(1, 2).transpose(1, 2).contiguous().view(y.size(0), -1)

    model = Flatten()
    graph = trace(model, (torch.randn(2, 8),))
    views = [n for n in graph.graph_module.graph.nodes
             if getattr(n.target, "__name__", "") == "view.default"]
    assert not views
    plan = hand_plan(graph.num_layers, [graph.num_layers - 2])
    stages = partition(model, (torch.randn(2, 8),), plan, graph=graph)
    x = torch.randn(2, 8)
    middle = stages[0](x)
    moved = tuple(t.transpose(0, -1).contiguous().transpose(0, -1) for t in middle)
    torch.testing.assert_close(stages[1](*moved), model(x), rtol=0, atol=0)


class VmapSquares(SizeBranch):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(torch.vmap(lambda row: row * row)(h))


class BroadcastSquares(SizeBranch):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * h)


def test_vmap_is_refused_and_the_suggested_rewrite_traces() -> None:
    x = torch.randn(2, 8)
    with pytest.raises(TraceError, match=r"(?s)functorch transform .*fix: compute the value "
                                         r"without torch.vmap \(e.g. by broadcasting\)") as error:
        trace(VmapSquares(), (x,))
    assert "cannot trace VmapSquares" in str(error.value)
    fixed = BroadcastSquares()
    fixed.load_state_dict(VmapSquares().state_dict())
    trace(fixed, (x,))  # the rewrite the message asks for
    _assert_composes(fixed, (x,), 2)
