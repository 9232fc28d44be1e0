"""Tests of the bundled example models: they load, run, trace, and keep the layer contract."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from test_trace import check_invariants

from asteroid_fx.model_spec import load_model_spec
from asteroid_fx.trace import trace

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# spec -> (number of layers, input shape for batch 2, number of classes)
CASES = {
    "mlp.py": (7, (2, 32), 10),
    "skipnet.py": (11, (2, 3, 16, 16), 10),
    "mobilenet_v2.py": (151, (2, 3, 32, 32), 10),
    "resnet.py": (173, (2, 3, 32, 32), 10),
    "resnet.py:cifar": (173, (2, 3, 32, 32), 10),
    "resnet.py:imagenet": (174, (2, 3, 224, 224), 1000),
    "efficientnet.py": (340, (2, 3, 32, 32), 10),
    "bert_small.py": (38, (2, 512), 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_example_traces_and_matches_the_model(name: str) -> None:
    num_layers, input_shape, classes = CASES[name]
    spec = load_model_spec(str(EXAMPLES / name))
    assert spec.build_optimizer is None  # plain SGD for every bundled example
    model = spec.build_model()
    inputs, targets = spec.example_inputs(2)
    assert tuple(inputs[0].shape) == input_shape
    graph = trace(model, inputs, model_name=spec.name)
    assert len(graph.layers) == num_layers
    assert graph.model_name == spec.name
    check_invariants(graph)
    with torch.no_grad():
        expected = model(*inputs)
        got = graph.graph_module(*inputs)
    assert expected.shape == (2, classes)
    torch.testing.assert_close(got, expected)
    loss = spec.loss_fn(expected, targets)
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize(
    "path", sorted(p.name for p in EXAMPLES.glob("*.py")), ids=lambda p: str(p)
)
def test_example_files_have_a_one_line_docstring_and_no_batchnorm_where_promised(
    path: str,
) -> None:
    source = (EXAMPLES / path).read_text()
    doc = ast.get_docstring(ast.parse(source))
    assert doc and "\n" not in doc
    if path in ("mlp.py", "skipnet.py", "bert_small.py"):
        assert "BatchNorm" not in source.split('"""', 2)[2]  # exact-loss tests rely on it


def test_bert_position_embedding_belongs_to_the_layer_adding_it() -> None:
    spec = load_model_spec(str(EXAMPLES / "bert_small.py"))
    graph = trace(spec.build_model(), spec.example_inputs(2)[0])
    (layer,) = [layer for layer in graph.layers if "positions" in layer.param_names]
    assert layer.op == "add"
    assert [layer.op for layer in graph.layers].count("MultiheadAttention") == 4
    # the only model input crossing a cut is the token ids (for the sequence length)
    assert graph.cut_tensors(0) == ["input_ids", "tokens"]
